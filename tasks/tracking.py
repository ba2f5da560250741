"""MLflow: one experiment per study, a parent run per lineage, a nested run per generation (unless batched).

The study's experiment opens in MLflow's model-training view (``mlflow.experimentKind``). A lineage's parent run
carries its recipe as params (the flat ``{dotted key: value}`` its resume hash is made of), the git commit and the
user, and every score and ``fit_seconds`` at step = generation, so the UI overlays lineages; its sample grid is
logged as an image at each step (the UI's image slider moves across generations). A metric that is undefined at a
generation (``r_fair`` when the minority class got too few samples) is left out at that step, never logged as NaN
(the UI hides a metric whose last value is NaN), and the run's ``madloop.undefined.<metric>`` tags say where.

Datasets are run inputs (``log_input``) with DVC's md5 as the digest and the DVC path as the source: the link
back to DVC. A lineage recorded per generation (``tracking.batch_records``; by default the image families') gives
each generation a nested run with its params, the dataset it trained on and the one it produced, its weights (an
MLflow logged model and the safetensors file) and the fit's own metrics. A batched lineage (by default the 1-D
families: fits of milliseconds, where a nested run per generation would cost more than the generation) is recorded
on the parent run alone (scores, datasets as inputs), in batches, with a sample image at the steps its recorder
names (the lineage's last generation): what is recorded never depends on how long a fit took.

Recording is idempotent: a generation already recorded is not logged again, so resuming a killed study never
duplicates runs or steps, and a call retried after a "database is locked" error (lineages running in parallel
processes share one sqlite store) does not either.

A generation re-scored under other score params replaces its nested run, and its new scores are logged on the
parent again (the latest value at a step is what MLflow shows). Parent runs carry the host and pid of the process
running them, so a later run of the study marks the runs of a dead process KILLED instead of leaving them RUNNING
forever (:func:`mark_dead_runs`). Studies that share an experiment (``tracking.experiment``) are kept apart: a
lineage's parent run is found by lineage, recipe and study.

One store per project, and runs that are never erased by the next ones, so MLflow can compare DVC experiments:

- A relative sqlite URI (``sqlite:///mlflow.db``) is anchored at the project root, and inside a DVC experiment's
  temporary copy of the repository (``dvc exp run --queue`` / ``--run-all`` / ``--temp`` run the stage in
  ``<repo>/.dvc/tmp/exps/...``) at the repository the experiment belongs to (``DVC_ROOT``, which DVC sets to it),
  so every kind of run logs to the repository's one ``mlflow.db`` (:func:`tracking_root`).
- Every run is tagged with the git commit it ran from and, under ``dvc exp run``, with the DVC experiment's name
  and baseline commit (``dvc.exp_name``, ``dvc.exp_baseline_rev``, from ``DVC_EXP_NAME`` and
  ``DVC_EXP_BASELINE_REV``; :func:`source_tags`). A lineage's parent run is reused only by the same lineage under
  the same params in the same context (the same DVC experiment, or plain runs): one under other params
  (``--overwrite`` moves the old outputs to the trash) or in another experiment gets runs of its own, and the
  earlier ones stay as they were.
"""

from __future__ import annotations

import functools
import getpass
import json
import math
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient

LINEAGE_TAG, RECIPE_TAG, GENERATION_TAG = "madloop.lineage", "madloop.recipe", "madloop.generation"
SCORE_TAG, HOST_TAG, PID_TAG = "madloop.score_hash", "madloop.host", "madloop.pid"
DONE_TAG, UNDEFINED_TAG = "madloop.generations_done", "madloop.undefined"
# MLflow 3's experiment type: the model-training view (MLflow 3.17's UI follows its own switch instead: the links
# madloop prints set it, TRAINING_VIEW).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# MLflow 3's UI opens a page in its GenAI or its model-training view as its switch (remembered per browser, GenAI
# in a new one) says, whatever the experiment's kind; this query parameter sets the switch, for run pages too.
TRAINING_VIEW = "workflowType=machine_learning"
LOCAL_UI = "http://127.0.0.1:5000"  # `make ui` (mlflow ui on the project's mlflow.db)
IMAGE_KEY = "samples"
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
LOCKED_ATTEMPTS = 8
F = TypeVar("F", bound=Callable[..., Any])


# DVC's names (dvc.env) for what it puts in a stage command's environment under `dvc exp run`
DVC_ROOT, DVC_EXP_NAME, DVC_EXP_BASELINE_REV = "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"
DVC_TEMP_WORKSPACES = Path(".dvc", "tmp", "exps")  # where queued and --temp experiments run (dvc.repo.experiments)
EXP_NAME_TAG, EXP_BASELINE_TAG = "dvc.exp_name", "dvc.exp_baseline_rev"


def tracking_root(project_root: Path) -> Path:
    """Where a relative tracking URI and MLflow's artifacts are anchored: the project root, except in a DVC
    experiment's temporary copy of the repository (``<repo>/.dvc/tmp/exps/[standalone/]tmpXXXX/``, deleted when the
    experiment ends), where it is the same folder in the repository itself (``DVC_ROOT``: DVC points it at the
    repository the experiment was queued in)."""
    root = Path(project_root).resolve()
    repo = os.environ.get(DVC_ROOT)
    if not repo:
        return root
    repo_root = Path(repo).resolve()
    if not root.is_relative_to(repo_root / DVC_TEMP_WORKSPACES):
        return root
    copy = next((folder for folder in [root, *root.parents] if (folder / ".dvc").is_dir()), None)
    if copy is None or not copy.is_relative_to(repo_root / DVC_TEMP_WORKSPACES):
        return root
    return repo_root / root.relative_to(copy)


def tracking_uri(configured: str, project_root: Path) -> str:
    """MLFLOW_TRACKING_URI wins over params; a relative sqlite path is anchored at :func:`tracking_root`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str((tracking_root(project_root) / uri[len(prefix):]).resolve())
    return uri


def dvc_experiment() -> dict[str, str]:
    """The DVC experiment this process runs in, as MLflow tags (none outside ``dvc exp run``)."""
    name, baseline = os.environ.get(DVC_EXP_NAME), os.environ.get(DVC_EXP_BASELINE_REV)
    return {**({EXP_NAME_TAG: name} if name else {}), **({EXP_BASELINE_TAG: baseline} if name and baseline else {})}


def ui_address(uri: str) -> str:
    """Where a person opens the runs of this store: the tracking server itself, or ``make ui`` for a local one."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI


def experiment_url(uri: str, exp_id: str) -> str:
    """An experiment's page, in the model-training view."""
    return f"{ui_address(uri)}/#/experiments/{exp_id}?{TRAINING_VIEW}"


def run_url(uri: str, exp_id: str, run_id: str) -> str:
    """A run's page, in the model-training view (without the parameter a new browser shows it as a GenAI
    "evaluation run")."""
    return f"{ui_address(uri)}/#/experiments/{exp_id}/runs/{run_id}?{TRAINING_VIEW}"


def client_for(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def experiment_id(client: MlflowClient, name: str, project_root: Path) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        for key, value in EXPERIMENT_KIND.items():
            if experiment.tags.get(key) != value:
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    local = client.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in client.tracking_uri
    location = (tracking_root(project_root) / "mlruns").as_uri() if local else None
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except Exception:  # created meanwhile by a parallel run
        return client.get_experiment_by_name(name).experiment_id


def find_runs(client: MlflowClient, exp_id: str, filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], filter_string=filter_string, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def source_tags(project_root: Path) -> dict[str, str]:
    """Who ran it from which code: MLflow's own tags for the user and the git commit (``mlflow.source.git.commit``),
    whether the working tree had uncommitted changes (then the commit alone does not identify the code), and, under
    ``dvc exp run``, the DVC experiment (:func:`dvc_experiment`). A DVC experiment's commit is made when it ends, so
    its runs carry the commit it started from (its baseline), and its name, which ``dvc exp apply`` takes."""
    experiment = dvc_experiment()
    tags = {**git_tags(Path(project_root)), **experiment}
    if EXP_BASELINE_TAG in experiment:
        tags["mlflow.source.git.commit"] = experiment[EXP_BASELINE_TAG]
    return tags


@functools.lru_cache(maxsize=8)
def git_tags(project_root: Path) -> dict[str, str]:
    tags = {"mlflow.user": getpass.getuser(), "mlflow.source.name": "madloop", "mlflow.source.type": "LOCAL"}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=project_root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["madloop.git.dirty"] = str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower()
    return tags


def param_items(params: dict[str, Any]) -> list[Param]:
    return [Param(k, str(v)[:6000]) for k, v in params.items()]


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = param_items(params)
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start:start + MAX_PARAMS_PER_BATCH])


def log_metrics(client: MlflowClient, run_id: str, metrics: list[Metric], tags: list[RunTag] = ()) -> None:
    """In batches of MLflow's limit; ``tags`` go with the last batch (so a marker tag lands with the metrics)."""
    for start in range(0, max(len(metrics), 1), MAX_METRICS_PER_BATCH):
        last = start + MAX_METRICS_PER_BATCH >= len(metrics)
        client.log_batch(run_id, metrics=metrics[start:start + MAX_METRICS_PER_BATCH], tags=tags if last else ())


def same_context(run, tags: dict[str, str]) -> bool:
    """Whether ``run`` was made in the context these tags describe: the same DVC experiment, or none."""
    return run.data.tags.get(EXP_NAME_TAG) == tags.get(EXP_NAME_TAG)


def lineage_run(client: MlflowClient, exp_id: str, lineage: str, recipe: str, tags: dict[str, str],
                run_name: str | None = None, params: dict[str, Any] | None = None) -> str:
    """The parent run of this lineage and recipe in this study and context (:func:`same_context`): reused when it
    exists (resume), created otherwise with the recipe as its params. So a lineage under other params, or in
    another DVC experiment, gets runs of its own, and the earlier ones stay as they were."""
    study = f" and tags.study = '{tags['study']}'" if "study" in tags else ""
    runs = [r for r in find_runs(client, exp_id, f"tags.`{LINEAGE_TAG}` = '{lineage}' and "
                                                  f"tags.`{RECIPE_TAG}` = '{recipe}'{study}")
            if not r.data.tags.get("mlflow.parentRunId") and same_context(r, tags)]
    owner = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    if runs:
        run_id = runs[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        for key, value in owner.items():
            client.set_tag(run_id, key, value)
        if params and not runs[0].data.params:  # a parent made before parents carried their recipe
            log_params(client, run_id, params)
        return run_id
    name = run_name or lineage
    if tags.get(EXP_NAME_TAG):  # as DVC names an experiment's commit: "<rev> [<name>]"
        name += f" [{tags[EXP_NAME_TAG]}]"
    run = client.create_run(exp_id, run_name=name, tags={LINEAGE_TAG: lineage, RECIPE_TAG: recipe, **tags, **owner})
    if params:
        log_params(client, run.info.run_id, params)
    return run.info.run_id


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def mark_dead_runs(uri: str, experiment: str, study: str) -> int:
    """Mark KILLED the RUNNING lineage runs of ``study`` (and their RUNNING generation runs) whose process, on this
    machine, is gone; runs of other machines are left to theirs. Returns how many were marked."""
    client = client_for(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return 0
    here, marked = socket.gethostname(), 0
    for run in find_runs(client, exp.experiment_id, f"tags.study = '{study}' and attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if tags.get("mlflow.parentRunId") or tags.get(HOST_TAG, here) != here:
            continue
        pid = int(tags.get(PID_TAG, 0) or 0)
        if pid == os.getpid() or (pid and process_alive(pid)):
            continue
        children = find_runs(client, exp.experiment_id, f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and "
                                                        "attributes.status = 'RUNNING'")
        for stale in [*children, run]:
            client.set_terminated(stale.info.run_id, "KILLED")
            marked += 1
    return marked


def defined(metrics: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """(the metrics that have a value, the names of those that are undefined: None or NaN). An undefined metric is
    left out at its step: MLflow would store NaN, and its UI hides a metric whose last value is NaN."""
    values, undefined = {}, []
    for key, value in metrics.items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            undefined.append(key)
        else:
            values[key] = float(value)
    return values, undefined


def training_metrics(info: dict[str, Any]) -> list[tuple[str, float, int]]:
    """(name, value, step) of what the fit reported: its scalar summaries (step 0) and, for estimators that keep
    one (the hypernetworks), the per-epoch history (step = epoch): how much of the loss the penalty is."""
    out = [(f"train.{k}", float(v), 0) for k, v in info.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "rows_trained_on"
           and math.isfinite(v)]
    for name, values in (info.get("history") or {}).items():
        out += [(f"train.{name}_per_epoch", float(v), epoch) for epoch, v in enumerate(values)
                if v is not None and math.isfinite(v)]
    return out


# --- what one generation records, from its manifest ------------------------------------------------------------


def dataset_input(name: str, path: str, md5: str, rows: int | None, context: str, generation: int) -> DatasetInput:
    """A dataset as an MLflow run input: DVC's md5 is its digest, its DVC path its source."""
    dataset = Dataset(name=name, digest=md5, source_type="local", source=json.dumps({"uri": path}),
                      schema=json.dumps({"mlflow_colspec": [{"name": c, "type": t} for c, t in
                                                            (("pixels", "binary"), ("label", "long"),
                                                             ("origin", "string"), ("generation", "long"),
                                                             ("lineage", "string"))]}),
                      profile=json.dumps({"num_rows": rows}) if rows is not None else None)
    return DatasetInput(dataset, [InputTag("mlflow.data.context", context),
                                  InputTag("madloop.generation", str(generation))])


class Record:
    """What a finished generation's manifest says, in MLflow's terms."""

    def __init__(self, manifest: dict[str, Any], folder: Path, project_root: Path, lineage: str):
        self.manifest, self.folder, self.lineage = manifest, folder, lineage
        self.k = k = manifest["generation"]
        outputs = manifest["outputs"]
        self.produced = folder / next(name for name in outputs if name.endswith(".parquet"))
        self.model = folder / next(name for name in outputs if name.endswith(".safetensors"))
        self.grids = [folder / name for name in outputs if name.endswith(".png")]
        self.scores, self.undefined = defined(manifest["metrics"])
        self.score_hash = manifest.get("score_hash", "")
        fit_seconds = manifest["info"].get("fit_seconds")
        if fit_seconds is not None:
            self.scores["fit_seconds"] = float(fit_seconds)
        trained_on, rows = manifest["trained_on"], manifest.get("rows") or {}
        produced_path = str(self.produced.relative_to(project_root))
        self.inputs = [
            dataset_input(f"{lineage}/{Path(trained_on['path']).stem}" if k else Path(trained_on["path"]).stem,
                          trained_on["path"], trained_on["md5"], rows.get("trained_on"), "training", k),
            dataset_input(f"{lineage}/{self.produced.stem}", produced_path, manifest["md5"][self.produced.name],
                          rows.get("produced"), "produced", k)]
        self.tags = {
            "dvc.trained_on.path": trained_on["path"], "dvc.trained_on.md5": trained_on["md5"],
            "dvc.produced.path": produced_path, "dvc.produced.md5": manifest["md5"][self.produced.name],
            "madloop.manifest": str((folder / f"gen-{k:03d}.json").relative_to(project_root)),
            SCORE_TAG: self.score_hash,
        }
        if self.undefined:
            self.tags[UNDEFINED_TAG] = ", ".join(self.undefined)


def recorded_children(client: MlflowClient, exp_id: str, parent_id: str,
                      score_hashes: dict[int, str]) -> dict[int, str]:
    """generation -> the nested run that recorded it under its current scores; half-logged attempts of a killed
    run, and runs of scores since replaced (a re-scored generation), are deleted with their logged models."""
    done: dict[int, str] = {}
    for run in find_runs(client, exp_id, f"tags.`mlflow.parentRunId` = '{parent_id}'"):
        k = int(run.data.tags.get(GENERATION_TAG, -1))
        current = run.data.tags.get(SCORE_TAG, "") == score_hashes.get(k, run.data.tags.get(SCORE_TAG, ""))
        if run.info.status == "FINISHED" and current and k not in done:
            done[k] = run.info.run_id
            continue
        for model in client.search_logged_models([exp_id], filter_string=f"source_run_id = '{run.info.run_id}'"):
            client.delete_logged_model(model.model_id)
        client.delete_run(run.info.run_id)
    return done


def logged_model_name(lineage: str, k: int) -> str:
    """MLflow's name of generation k's weights: a lineage name may hold characters a logged model's may not
    (``ple-lam0.01-s0``: MLflow refuses / : . % " '); they become ``_``."""
    return re.sub(r"[/:.%\"']", "_", f"{lineage}-gen{k:03d}")


def record_nested(client: MlflowClient, exp_id: str, parent_id: str, record: Record, params: dict[str, Any],
                  tags: dict[str, str]) -> str:
    """Generation k's nested run: params, scores at step k (linked to its logged model), the fit's own metrics,
    its two datasets as inputs, its weights as a logged model and as an artifact, its picture."""
    k, lineage = record.k, record.lineage
    run_id = client.create_run(exp_id, run_name=f"{lineage}-gen{k:03d}",
                               tags={"mlflow.parentRunId": parent_id, LINEAGE_TAG: lineage, GENERATION_TAG: str(k),
                                     **tags, **record.tags}).info.run_id
    model = client.create_logged_model(exp_id, name=logged_model_name(lineage, k), source_run_id=run_id,
                                       tags={LINEAGE_TAG: lineage, GENERATION_TAG: str(k), "format": "safetensors",
                                             "dvc.path": str(record.tags["dvc.produced.path"]).rsplit("/", 1)[0]
                                             + "/" + record.model.name})
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy2(record.model, tmp)
        client.log_model_artifacts(model.model_id, tmp)
    client.finalize_logged_model(model.model_id, "READY")
    now = int(time.time() * 1000)
    log_params(client, run_id, {**params, "generation": k})
    scores = [Metric(key, value, now, k, model_id=model.model_id) for key, value in record.scores.items()]
    log_metrics(client, run_id, scores + [Metric(key, value, now, step)
                                          for key, value, step in training_metrics(record.manifest["info"])])
    client.log_inputs(run_id, datasets=record.inputs)
    for path in [*record.grids, record.model]:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def logged_image_steps(client: MlflowClient, run_id: str) -> set[int]:
    steps = set()
    for info in client.list_artifacts(run_id, "images"):
        match = re.search(rf"/{IMAGE_KEY}[+%]step[+%](\d+)[+%]", info.path)  # MLflow's file name for a step's image
        if match:
            steps.add(int(match.group(1)))
    return steps


def record_generations(client: MlflowClient, exp_id: str, parent_id: str, records: list[Record],
                       params: dict[str, Any], tags: dict[str, str], batched: bool = False,
                       images: set[int] | None = None) -> None:
    """Record finished generations once each: unless ``batched``, a nested run for each; on the parent, every new
    step's scores in one batch, the batched ones' datasets as inputs, and the sample images of the generations in
    ``images`` (None: every one's)."""
    from PIL import Image

    parent = client.get_run(parent_id)
    done = int(parent.data.tags.get(DONE_TAG, 0))
    slow = [] if batched else records
    if slow:
        children = recorded_children(client, exp_id, parent_id, {r.k: r.score_hash for r in records})
        for record in slow:
            if record.k not in children:
                record_nested(client, exp_id, parent_id, record, params, tags)
    # a lineage re-scored under other score params logs every generation's scores again (MLflow shows the latest)
    rescored = bool(records) and parent.data.tags.get(SCORE_TAG, records[0].score_hash) != records[0].score_hash
    new = [r for r in records if r.k >= done or rescored]
    # each dataset once (MLflow keeps the first context a run logs a dataset with): the one each generation made
    cheap_inputs = [r.inputs[1] for r in new] if batched else []
    if records and records[0].k == 0 and done == 0:
        cheap_inputs = [records[0].inputs[0], *cheap_inputs]  # dataset 0, the real data: the lineage's own input
    if cheap_inputs:
        client.log_inputs(parent_id, datasets=cheap_inputs)
    shown = {r.k for r in records} if images is None else {r.k for r in records if r.k in images}
    missing = shown - logged_image_steps(client, parent_id) if shown else set()
    for record in records:
        if record.k in missing and record.grids:
            with Image.open(record.grids[0]) as image:
                client.log_image(parent_id, image.convert("RGB"), key=IMAGE_KEY, step=record.k)
    if new:
        now = int(time.time() * 1000)
        marker = [RunTag(DONE_TAG, str(max(max(r.k for r in new) + 1, done))),
                  RunTag(SCORE_TAG, new[-1].score_hash)]
        for key, tag in undefined_tags(parent.data.tags, new).items():
            marker.append(RunTag(key, tag))
        # the done-marker is logged with the last metrics batch: a step is never logged twice, even after a kill
        log_metrics(client, parent_id, [Metric(key, value, now, r.k) for r in new for key, value in r.scores.items()],
                    tags=marker)


def undefined_tags(tags: dict[str, str], records: list[Record]) -> dict[str, str]:
    """``madloop.undefined.<metric>``: the generations where a metric is undefined, so left out of its curve
    (merged with what the run's tags already say)."""
    out: dict[str, set[int]] = {}
    for r in records:
        for key in r.undefined:
            out.setdefault(f"{UNDEFINED_TAG}.{key}", set()).add(r.k)
    for key, steps in out.items():
        steps.update(int(k) for k in tags.get(key, "").split(", ") if k)
    return {key: ", ".join(map(str, sorted(steps)))[:5000] for key, steps in out.items()}


def finish_lineage(client: MlflowClient, parent_id: str, status: str = "FINISHED") -> None:
    client.set_terminated(parent_id, status)


def retry_when_locked(fn: F) -> F:
    """Retry ``fn`` while a sqlite store is locked by another writer. MLflow waits 20 s for the lock
    (busy_timeout), but sqlite fails at once when two transactions deadlock on upgrading their locks; parallel
    lineages then retry after a short, growing pause. Needs idempotent calls, which the ones below are."""

    @functools.wraps(fn)
    def retrying(*args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            for attempt in range(LOCKED_ATTEMPTS - 1):
                try:
                    return fn(*args, **kwargs)
                except Exception as err:
                    if "database is locked" not in str(err):
                        raise
                time.sleep(min(0.1 * 2 ** attempt, 5.0))
            return fn(*args, **kwargs)
        except Exception as err:  # the store itself failed (gone, replaced, locked): say so in one line
            problem = store_problem(str(args[0]), err, time.monotonic() - started) if args else None
            if problem is None:
                raise
            raise TrackingStoreError(problem) from err

    return retrying  # type: ignore[return-value]


class TrackingStoreError(RuntimeError):
    """The MLflow store failed under a study (deleted, replaced, locked): the message says which."""


# A sqlite store deleted, replaced or made read-only while a study runs surfaces from SQLAlchemy as "(raised as a
# result of Query-invoked autoflush; consider using a session.no_autoflush block ...)", one locked past every retry
# as "database is locked": store_problem says which, and that nothing on disk is lost.
SQLITE = "sqlite:///"


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len(SQLITE):]) if uri.startswith(SQLITE) else None


def store_problem(uri: str, err: BaseException, locked_seconds: float = 0.0) -> str | None:
    """What went wrong with the MLflow store at ``uri`` behind ``err`` (one line), or None when it is not the
    store itself (a bug, a bad value: left as it is)."""
    text = " ".join(str(part) for part in (err, err.__cause__, err.__context__) if part is not None).lower()
    path = sqlite_path(uri)
    kept = "finished generations are kept on disk, and the next run records them"
    if path is not None and not path.exists():
        return (f"the MLflow store {path} is gone (deleted while the study ran?): {kept} in a new store "
                "there")
    if "database is locked" in text:
        return (f"the MLflow store {path or uri} stayed locked by another writer for {locked_seconds:.0f} s (another "
                f"madloop run, `mlflow ui` or `mlflow gc` writing to it): {kept}")
    if path is not None and ("readonly database" in text or "no such table" in text or "disk i/o error" in text
                             or "file is not a database" in text or "unable to open database" in text):
        why = ("was replaced or emptied while the study ran" if "no such table" in text or "not a database" in text
               else "cannot be written here (its file's or folder's permissions, a full disk, or it was replaced "
                    "while the study ran)")
        return f"the MLflow store {path} {why}: {kept}"
    return None


# --- the calls the flow makes ---------------------------------------------------------------------------------


@retry_when_locked
def open_lineage(uri: str, experiment: str, lineage: str, recipe_hash: str, tags: dict[str, str],
                 project_root: Path, run_name: str | None = None, params: dict[str, Any] | None = None
                 ) -> tuple[str, str]:
    """(experiment id, parent run id) for a lineage: the study's experiment, the lineage's parent run."""
    client = client_for(uri)
    exp_id = experiment_id(client, experiment, project_root)
    return exp_id, lineage_run(client, exp_id, lineage, recipe_hash, {**source_tags(project_root), **tags}, run_name,
                               params)


@retry_when_locked
def open_experiment(uri: str, experiment: str, project_root: Path) -> str:
    """The study's experiment (made now if new): its page, in the model-training view."""
    return experiment_url(uri, experiment_id(client_for(uri), experiment, project_root))


@retry_when_locked
def log_generations(uri: str, exp_id: str, parent_id: str, lineage: str, manifests: list[dict[str, Any]],
                    folder: Path, project_root: Path, params: dict[str, Any], batched: bool = False,
                    images: set[int] | None = None) -> int:
    """Record finished generations from their manifests (so a resumed run can record them again, exactly), batched
    or with a nested run each, the sample images of ``images`` (None: every one's) on the parent; returns how many
    were given."""
    records = [Record(m, folder, project_root, lineage) for m in manifests]
    record_generations(client_for(uri), exp_id, parent_id, records, params, source_tags(project_root), batched,
                       images)
    return len(records)


def log_generation(uri: str, exp_id: str, parent_id: str, lineage: str, manifest: dict[str, Any],
                   folder: Path, project_root: Path, params: dict[str, Any]) -> int:
    """One generation, with its nested run."""
    return log_generations(uri, exp_id, parent_id, lineage, [manifest], folder, project_root, params)


@retry_when_locked
def close_lineage(uri: str, parent_id: str, status: str = "FINISHED") -> None:
    finish_lineage(client_for(uri), parent_id, status)


RECIPE_KIND_TAG = "madloop.kind"


@retry_when_locked
def log_recipe_runs(uri: str, experiment: str, project_root: Path, study: str,
                    recipes: list[dict[str, Any]], metrics: list[str],
                    recipe_hashes: dict[str, str] | None = None) -> list[str]:
    """A run per recipe run over several seeds, beside its seeds' lineage runs: per metric the mean over seeds
    (``fid``) and its 95% t-interval (``fid_ci_low``, ``fid_ci_high``) at step = generation; tagged ``recipe`` like
    its seeds, so the UI groups them. Made anew each time the reports are: the run it replaces is the one of the
    same recipe, made under the same params (``recipe_hashes``: recipe -> a digest of its seeds' recipes) in the
    same context (:func:`same_context`); a summary of other params or another DVC experiment stays."""
    client = client_for(uri)
    exp_id = experiment_id(client, experiment, project_root)
    context = source_tags(project_root)
    by_recipe: dict[str, list[dict[str, Any]]] = {}
    for entry in recipes:
        by_recipe.setdefault(entry["recipe"], []).append(entry)
    made = []
    for recipe, entries in by_recipe.items():
        made_under = (recipe_hashes or {}).get(recipe, "")
        for old in find_runs(client, exp_id, f"tags.`{RECIPE_KIND_TAG}` = 'recipe' and tags.recipe = '{recipe}' and "
                                              f"tags.study = '{study}'"):
            if same_context(old, context) and old.data.tags.get(RECIPE_TAG, "") == made_under:
                client.delete_run(old.info.run_id)
        seeds = max(e["seeds"] for e in entries)
        if seeds < 2:
            continue
        run_id = client.create_run(exp_id, run_name=f"{recipe} (mean of {seeds} seeds)", tags={
            RECIPE_KIND_TAG: "recipe", "recipe": recipe, "study": study, "seeds": str(seeds), RECIPE_TAG: made_under,
            **context}).info.run_id
        now = int(time.time() * 1000)
        points = []
        for e in entries:
            for metric in metrics:
                for name, value in ((metric, e[metric]), (f"{metric}_ci_low", e[f"{metric}_low"]),
                                    (f"{metric}_ci_high", e[f"{metric}_high"])):
                    if math.isfinite(value):
                        points.append(Metric(name, float(value), now, int(e["generation"])))
        log_metrics(client, run_id, points)
        client.set_terminated(run_id, "FINISHED")
        made.append(run_id)
    return made


def log_study_run(uri: str, experiment: str, run_name: str, project_root: Path, params: dict[str, Any],
                  curves: dict[str, list[tuple[int, float]]], tags: dict[str, str],
                  artifacts: list[Path] = ()) -> str:
    """One finished run of a paper study: params, metric curves (step -> value) and artifacts."""
    client = client_for(uri)
    exp_id = experiment_id(client, experiment, project_root)
    run_id = client.create_run(exp_id, run_name=run_name, tags={**source_tags(project_root), **tags}).info.run_id
    now = int(time.time() * 1000)
    items = param_items(params)
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start:start + MAX_PARAMS_PER_BATCH])
    metrics = [Metric(name, float(value), now, int(step)) for name, points in curves.items() for step, value in points]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start:start + 1000])
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")
    return run_id
