"""Prefect flows of madloop (the loop, the paper studies, deployments) and the ``madloop`` command line.

The offline defaults (no telemetry) are set by ``tasks``, which every entry point imports."""
