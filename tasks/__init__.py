"""Prefect tasks of madloop: each a thin wrapper over a plain function in this package that tests call directly.

Tasks pass numpy arrays and torch modules in memory, so input hashing (Prefect's default cache policy) is off:
resuming is handled by manifests on disk (see ``tasks.study``), not by Prefect's result cache.
"""

from __future__ import annotations

from typing import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE


def as_task(fn: Callable, *, retries: int = 0, retry_delay_seconds: float = 1.0):
    """Wrap a plain function as a Prefect task named after it."""
    return task(fn, name=fn.__name__.replace("_", "-"), cache_policy=NO_CACHE, retries=retries,
                retry_delay_seconds=retry_delay_seconds, persist_result=False)
