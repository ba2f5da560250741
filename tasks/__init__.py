"""Prefect tasks of madloop: each a thin wrapper over a plain function in this package that tests call directly.

Tasks pass numpy arrays and torch modules in memory, so input hashing (Prefect's default cache policy) is off:
resuming is handled by manifests on disk (see ``tasks.resume``), not by Prefect's result cache.

Importing this package sets madloop's offline defaults, so every entry point gets them (the CLI, deployments'
flow runs, benchmarks, tests): no usage telemetry from Prefect's server or its client library (``DO_NOT_TRACK``;
prefect 3.8's client also prints a telemetry notice in a terminal), MLflow or the ``dvc`` commands, which would
try to reach the network. Anything the user sets wins.
"""

from __future__ import annotations

import os

for _key, _value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                     "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "GIT_PYTHON_REFRESH": "quiet"}.items():
    os.environ.setdefault(_key, _value)

from typing import Callable  # noqa: E402

from prefect import task  # noqa: E402  (after the defaults: Prefect reads its settings on import)
from prefect.cache_policies import NO_CACHE  # noqa: E402


def as_task(fn: Callable, *, retries: int = 0, retry_delay_seconds: float = 1.0):
    """Wrap a plain function as a Prefect task named after it."""
    return task(fn, name=fn.__name__.replace("_", "-"), cache_policy=NO_CACHE, retries=retries,
                retry_delay_seconds=retry_delay_seconds, persist_result=False)
