"""Prefect tasks of madloop: each a thin wrapper over a plain function in this package that tests call directly
(made on first use, :class:`LazyTask`).

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

from typing import Any, Callable  # noqa: E402


class LazyTask:
    """A plain function as a Prefect task named after it, made on first use: importing a module that declares
    tasks imports no Prefect (``madloop --help``, ``madloop params`` and the plain runner never need it)."""

    def __init__(self, fn: Callable, retries: int, retry_delay_seconds: float):
        self.fn, self._options, self._task = fn, {"retries": retries, "retry_delay_seconds": retry_delay_seconds}, None

    @property
    def task(self):
        if self._task is None:
            from prefect import task  # after the defaults above: Prefect reads its settings on import
            from prefect.cache_policies import NO_CACHE

            self._task = task(self.fn, name=self.fn.__name__.replace("_", "-"), cache_policy=NO_CACHE,
                              persist_result=False, **self._options)
        return self._task

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return call_quoted(self.task, args, kwargs)

    def with_options(self, **options: Any) -> Callable[..., Any]:
        """The task under other options (a run name), called as :meth:`__call__` calls it."""
        task = self.task.with_options(**options)
        return lambda *args, **kwargs: call_quoted(task, args, kwargs)

    def __getattr__(self, name: str) -> Any:  # submit, map, name, ...: the Prefect task's
        if name.startswith("_"):  # not a task's (and never recurse through self._task while unpickling)
            raise AttributeError(name)
        return getattr(self.task, name)


def call_quoted(task, args: tuple, kwargs: dict[str, Any]) -> Any:
    """Run ``task`` now, its arguments wrapped in Prefect's ``quote``: Prefect then does not walk them looking for
    futures to wait on (a called task gets plain values here, never futures). The walk cost 0.8 s over a 1-D study's
    13 task calls, most of it on lineages' batches of 30 manifests (docs/performance.md); the function still gets
    the values themselves."""
    from prefect.utilities.annotations import quote

    return task(*(quote(a) for a in args), **{k: quote(v) for k, v in kwargs.items()})


def as_task(fn: Callable, *, retries: int = 0, retry_delay_seconds: float = 1.0) -> LazyTask:
    """Wrap a plain function as a Prefect task named after it (made when first used)."""
    return LazyTask(fn, retries, retry_delay_seconds)
