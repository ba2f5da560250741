"""Prefect flows of madloop (the loop, the paper studies, deployments) and the ``madloop`` command line.

The offline defaults (no telemetry) are set by ``tasks``, imported here first: Prefect reads them when it is
imported, which any module below does."""

import tasks  # noqa: F401
