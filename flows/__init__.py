"""Prefect flows of madloop (the loop, studies), and the ``madloop`` command line."""

import os

# Quiet, offline defaults for a laptop with no network; anything the user sets wins. Without them Prefect's
# server, MLflow (3.x, outside CI) and every `dvc` command send usage telemetry over the network.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
