"""What a dead run of a study left behind, cleaned up when the next run of the study starts (under its lock).

- temporary files of atomic writes killed before their rename (``tasks.storage``), and a ``.dvcignore`` that
  keeps DVC from versioning any that appear while a run is in flight;
- MLflow lineage runs left RUNNING by a process that is gone: marked KILLED (``tasks.tracking``);
- Prefect flow runs of the study left RUNNING by a process that is gone: marked Crashed. The study lock proves it:
  a live in-process run of this study would hold it. Flow runs on a work pool's workers are Prefect's own to judge
  (their workers report them), and are left alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.layout import StudyPaths
from tasks.storage import TEMP_PATTERN, remove_stray_temps

DVCIGNORE_NOTE = "# madloop: temporary files of atomic writes (renamed into place, or removed by the next run)"


def ensure_dvcignore(dvc_root: Path) -> bool:
    """Add madloop's temporary-file pattern to the project's .dvcignore (once); True when it was added."""
    path = dvc_root / ".dvcignore"
    text = path.read_text() if path.is_file() else ""
    if TEMP_PATTERN in text.splitlines():
        return False
    path.write_text(text + ("" if not text or text.endswith("\n") else "\n") + f"{DVCIGNORE_NOTE}\n{TEMP_PATTERN}\n")
    return True


def study_flow_runs(client, flow_names: list[str], study: str, root: Path) -> list:
    """This study's in-process flow runs (no work pool) that the server says are RUNNING."""
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState,
                                                FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType

    runs = client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=flow_names)),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))),
        limit=200)

    def of_this_study(run) -> bool:
        params: dict[str, Any] = run.parameters or {}
        study_name = ((params.get("params") or {}).get("study") or {}).get("name", "default")
        return (run.work_pool_name is None and study_name == study
                and Path(str(params.get("root", "."))).resolve() == root)

    return [run for run in runs if of_this_study(run)]


def mark_dead_flow_runs(flow_names: list[str], study: str, root: Path) -> int:
    """Mark Crashed the RUNNING in-process flow runs of this study other than the caller's own (call it holding the
    study lock). Returns how many were marked."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run
    from prefect.states import Crashed

    own = {str(flow_run.id), str(flow_run.root_flow_run_id)} - {"None"}
    marked = 0
    with get_client(sync_client=True) as client:
        for run in study_flow_runs(client, flow_names, study, root):
            if str(run.id) not in own:
                client.set_flow_run_state(run.id, Crashed(message="the process running it is gone (found by the "
                                                                  "next run of the study)"), force=True)
                marked += 1
    return marked


def clean_up_dead_runs(p, paths: StudyPaths, flow_names: list[str], dvc_root: Path | None) -> list[str]:
    """Everything above, for the study in ``paths``; returns what was done, one line each (nothing: [])."""
    from tasks.tracking import mark_dead_runs, tracking_uri

    done = []
    removed = remove_stray_temps(paths.data, paths.reports)
    if removed:
        done.append(f"removed {len(removed)} temporary file(s) a killed run left: "
                    + ", ".join(str(r.relative_to(paths.root)) for r in removed[:3]) + (" ..." if len(removed) > 3
                                                                                       else ""))
    if dvc_root is not None and ensure_dvcignore(dvc_root):
        done.append(f"added {TEMP_PATTERN} to {dvc_root / '.dvcignore'} (temporary files of atomic writes)")
    killed = mark_dead_runs(tracking_uri(p.tracking.uri, paths.root), p.experiment, p.study.name)
    if killed:
        done.append(f"marked KILLED {killed} MLflow run(s) left RUNNING by a process that is gone")
    crashed = mark_dead_flow_runs(flow_names, p.study.name, paths.root)
    if crashed:
        done.append(f"marked Crashed {crashed} Prefect flow run(s) left RUNNING by a process that is gone")
    return done
