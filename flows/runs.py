"""What Prefect shows of a study: its flow runs' names and tags, and a generation's steps named as task runs.

Used by the flows (``flows.loop``); nothing here runs or changes a study.
"""

from __future__ import annotations

from tasks.generation import TASKS, Lineage, Steps
from tasks.params import LineageParams, Params, lineage_params


def lineage_run_name() -> str:
    """A lineage's flow run: ``<study>/<lineage>``."""
    from prefect.runtime import flow_run

    parameters = flow_run.parameters
    return f"{(parameters['params'].get('study') or {}).get('name', 'default')}/{parameters['lineage']}"


def study_run_name() -> str:
    """A study's flow run: ``study <study>``."""
    from prefect.runtime import flow_run

    study = ((flow_run.parameters.get("params") or {}).get("study") or {}).get("name", "default")
    return f"study {study}"


def tag_this_run(*names: str) -> None:
    """Add tags to the running flow run (tags of a run made elsewhere, a deployment's, are set at its creation)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    wanted = list(dict.fromkeys([*flow_run.tags, *names]))
    if flow_run.id and wanted != list(flow_run.tags):
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, tags=wanted)


def lineage_tags(p: Params, spec: LineageParams) -> list[str]:
    """A lineage's flow-run tags: its name, recipe, estimator and family (filters in the Prefect UI)."""
    return [f"lineage:{spec.name}", f"recipe:{spec.group or spec.name}", f"estimator:{spec.estimator}",
            f"family:{lineage_params(p, spec).model.family}"]


def named_steps(lineage: Lineage, k: int) -> Steps:
    """The Prefect-task steps, each run named ``fit-model [mle gen 3]``."""
    return Steps(*(step.with_options(task_run_name=f"{step.name} [{lineage.name} gen {k}]")
                   for step in (TASKS.fit, TASKS.sample, TASKS.score, TASKS.save)))
