"""Prefect flows of madloop (the loop, studies), and the ``madloop`` command line."""

import os

# Quiet, offline defaults for a laptop with no network; anything the user sets wins.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
