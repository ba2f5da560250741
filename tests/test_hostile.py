"""Hostile and oversized input, tried as an attacker would (issue 27's table, one test per row): each is refused
before any work, exit code 2 and one line naming the key or file, or, for edited outputs, detected. Real DVC
repositories, git commits, MLflow stores and Prefect servers throughout."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import save_file

from flows.cli import main as cli
from tasks.params import ParamsError, load, shown
from tasks.storage import CHECKSUM, FILE_MODE, content_checksum, file_digest, write_atomic
from tests.conftest import BIN, REPO, git_dvc_repo

ONE_D = {"study": {"name": "g"}, "model": {"family": "gaussian"}, "data": {"source": "model", "size": 50},
         "loop": {"generations": 3}, "lineages": ["mle", "ple_closed"]}  # a study of seconds


def refused(capsys, project: Path, *args: str, naming: str) -> str:
    """``madloop run ARGS`` in-process: exit code 2, one line on stderr that names ``naming``, nothing written."""
    before = sorted(p.name for p in project.iterdir())
    started = time.perf_counter()
    code = cli(["run", "--quiet", "--root", str(project), *args])
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, (code, err)
    assert naming in err[0] and len(err[0]) < 1000, err[0]
    assert sorted(p.name for p in project.iterdir()) == before  # no data/, reports/, mlflow.db, lock file
    assert seconds < 120, seconds  # refused at once, not after work (the machine is shared: a generous bound)
    return err[0]


# --- row 1: edited outputs -----------------------------------------------------------------------------------------


def recompute(path: Path, change) -> None:
    """Edit a manifest as someone who knows its format would: change it, then recompute its checksum."""
    manifest = json.loads(path.read_text())
    change(manifest)
    manifest[CHECKSUM] = content_checksum({k: v for k, v in manifest.items() if k != CHECKSUM})
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))


def git_commit(project: Path) -> None:
    git = ["git", "-c", "user.name=tester", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "add", "-A"], cwd=project, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "the study"], cwd=project, check=True, capture_output=True)


@pytest.mark.slow
def test_1_outputs_edited_after_their_commit_are_detected_by_verify_and_not_used(project, prefect_server, capsys):
    from flows.loop import run_study
    from tasks.params import validate

    p = validate(ONE_D)
    run_study(p, project)
    git_commit(project)
    data = project / "data" / "studies" / "g"
    assert cli(["verify", "g", "--root", str(project)]) == 0
    assert "nothing differs" in capsys.readouterr().out

    # the review's edits: kl = 999 with the checksum recomputed; a model swapped between lineages, sha256s updated
    recompute(data / "mle" / "gen-001.json", lambda m: m["metrics"].__setitem__("kl", 999.0))
    shutil.copy(data / "mle" / "model-002.safetensors", data / "ple_closed" / "model-002.safetensors")
    swapped = data / "ple_closed" / "model-002.safetensors"

    def swap(m):
        m["outputs"][swapped.name], m["md5"][swapped.name] = file_digest(swapped), file_digest(swapped, "md5")

    recompute(data / "ple_closed" / "gen-002.json", swap)
    assert cli(["show", "g", "--root", str(project)]) == 0  # the accident checks pass: the edit is consistent
    capsys.readouterr()

    assert cli(["verify", "g", "--root", str(project)]) == 1
    out = capsys.readouterr().out
    assert "mle/gen-001.json says other metrics than commit" in out and "metrics.kl:" in out and "-> 999.0" in out
    assert "ple_closed/gen-002.json says other md5, outputs than commit" in out, out

    report = project / "reports" / "g" / "generations.csv"
    before = report.read_text()
    err = refused_run(capsys, project)
    assert "gen-001.json says other metrics than commit" in err and "(and 1 more: `madloop verify g`)" in err
    assert report.read_text() == before and 999.0 not in kls(report)  # the edited score reached no report

    # --overwrite moves the edited folders aside and redoes them; the 1-D fits are exact: the commit's files again
    with pytest.warns(UserWarning, match="edited since their commit"):
        run_study(p, project, overwrite=True)
    assert cli(["verify", "g", "--root", str(project)]) == 0
    assert 999.0 not in kls(report) and len(kls(report)) == 6


def kls(report: Path) -> list[float]:
    import csv

    return [float(row["kl"]) for row in csv.DictReader(report.open())]


def refused_run(capsys, project: Path) -> str:
    code = cli(["run", "--quiet", "--root", str(project), "--params", str(write(project, ONE_D))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def write(folder: Path, params, name: str = "params.yaml") -> Path:
    path = folder / name
    path.write_text(params if isinstance(params, str) else yaml.safe_dump(params))
    return path


def test_1_what_a_run_may_change_after_a_commit_is_not_an_edit():
    from tasks.integrity import differences

    committed = {"recipe_hash": "r", "score_hash": "s", "metrics": {"kl": 0.1}, "outputs": {"m": "a"},
                 "info": {"fit_seconds": 0.1}, "checksum": "c"}
    assert differences(committed, {**committed, "info": {"fit_seconds": 0.2}, "checksum": "d"}) == []  # redone
    assert differences(committed, {**committed, "score_hash": "t", "metrics": {"kl": 0.2}}) == []  # re-scored
    assert differences(committed, {**committed, "recipe_hash": "q", "outputs": {"m": "b"}}) == []  # --overwrite
    assert differences(committed, {**committed, "metrics": {"kl": 999.0}}) == ["metrics"]
    assert differences(committed, {**committed, "outputs": {"m": "b"}}) == ["outputs"]
    assert differences(committed, {**committed, "score_hash": "t", "outputs": {"m": "b"}}) == ["outputs"]


# --- rows 2-7: params refused before any work ---------------------------------------------------------------------


def alias_bomb(under: str) -> str:
    """The review's bomb: 10 lines, 9 levels of 9 aliases (9^9 = 387 million strings when expanded)."""
    levels = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    anchors = "anchors:\n" + "".join(f"  {line}\n" for line in levels)
    return anchors + ("study:\n  name: *l8\n" if under == "study.name" else "lineages: *l8\n")


@pytest.mark.parametrize("under", ["study.name", "lineages"])
def test_2_an_alias_bomb_is_refused_at_once_naming_its_key(under, project, capsys):
    path = write(project, alias_bomb(under), "bomb.yaml")
    started = time.perf_counter()
    with pytest.raises(ParamsError, match=f"invalid params: anchors, {under}: params file .*: its aliases expand to "
                                          r"\d[\d,]+ values, more than the 100,000"):
        load(path)
    assert time.perf_counter() - started < 5  # the walk counts shared nodes once: no expansion is built
    refused(capsys, project, "--params", str(path), naming=under)


def test_2_error_messages_quote_a_short_prefix_of_any_input():
    with pytest.raises(ParamsError) as err:
        load(None, ["train.epochs=" + "x" * 100_000])
    assert str(err.value).startswith("invalid params: train.epochs: Input should be a valid integer (got 'xxx")
    assert len(str(err.value)) < 200
    with pytest.raises(ParamsError) as err:
        load(None, ["lineages=[" + ", ".join(f"nope{i}" for i in range(5000)) + "]"])
    assert len(str(err.value)) < 2000 and "and 4995 more problem(s)" in str(err.value)
    nested = [[[[["deep"] * 1000] * 1000]]]  # a million leaves, shared: its repr alone would be megabytes
    assert len(shown(nested)) <= 60 and len(shown(10 ** 5000)) <= 60


@pytest.mark.parametrize("text, got", [("[]\n", "got list []"), ("0\n", "got int 0"), ("false\n", "got bool false"),
                                       ("null\n", "got null"), ("# only a comment\n", "is empty")])
def test_3_a_params_file_that_is_not_a_mapping_is_refused_not_the_default_study(text, got, project, capsys):
    path = write(project, text, "falsy.yaml")
    line = refused(capsys, project, "--params", str(path), naming=str(path))
    assert got in line, line


def test_4_duplicate_keys_are_refused_as_dvc_refuses_them(project, capsys):
    from dvc.utils.serialize import YAMLFileCorruptedError, load_yaml

    path = write(project, "train:\n  epochs: 2\n  epochs: 3\n", "dup.yaml")
    line = refused(capsys, project, "--params", str(path), naming="train.epochs")
    assert "duplicate key (lines 2 and 3" in line
    with pytest.raises(YAMLFileCorruptedError):  # `dvc repro` reads params.yaml with this: it refuses the same file
        load_yaml(str(path))
    merged = write(project, "train: &t {epochs: 2}\nclassifier:\n  <<: {epochs: 1}\n  epochs: 3\n", "merge.yaml")
    assert load(merged).classifier.epochs == 3  # a merge key's values may be overridden: not a duplicate


@pytest.mark.parametrize("override, key", [("study.name=" + "s" * 300, "study.name"),
                                           ("lineages=[{name: " + "m" * 252 + ", estimator: mle}]", "lineages.0.name")])
def test_5_names_too_long_for_a_file_are_refused_before_any_work(override, key, project, capsys):
    line = refused(capsys, project, "--set", override, naming=f"invalid params: {key}: String should have at most 200")
    assert "s" * 100 not in line and "m" * 100 not in line  # quoted as a short prefix


def test_5_names_are_checked_against_the_filesystem_the_project_is_on(tmp_path):
    from tasks.layout import file_name_problem
    from tasks.resume import check_world

    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    assert file_name_problem(tmp_path, "s", ["m" * (name_max - 4)]) is None  # <lineage>.dvc just fits
    key, why = file_name_problem(tmp_path, "s", ["m" * (name_max - 3)])
    assert key == "lineages" and f"takes at most {name_max}" in why
    deep = tmp_path
    while len(str(deep)) < os.pathconf(tmp_path, "PC_PATH_MAX") - 400:  # a real folder, 200 characters a level
        deep = deep / ("d" * 200)
    deep.mkdir(parents=True)
    root = git_dvc_repo(deep / "project")
    with pytest.raises(ParamsError, match=r"^invalid params: lineages: 'mle' makes paths of \d+ bytes"):
        check_world(load(None, ["study.name=" + "s" * 150, "lineages=[mle]"]), root)


def test_6_a_lineage_named_like_another_ones_dvc_file_is_refused(project, capsys):
    line = refused(capsys, project, "--set", "lineages=[mle, {name: mle.dvc, estimator: mle}]", naming="lineages")
    assert "'mle.dvc' ends in .dvc" in line
    refused(capsys, project, "--set", "lineages=[mle, {name: MLE, estimator: mle}]", naming="differ only in case")


def test_7_a_relative_or_malformed_plugin_name_is_refused_naming_plugins(project, capsys):
    line = refused(capsys, project, "--set", "plugins=[.evil]", naming="invalid params: plugins:")
    assert "'.evil' is not a module name" in line
    refused(capsys, project, "--set", "plugins=[os path]", naming="invalid params: plugins:")
    refused(capsys, project, "--set", "plugins=3", naming="invalid params: plugins: expected a list")


# --- row 8: sizes against the machine ---------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, key", [
    (["loop.synthetic_size=1000000000"], "loop.synthetic_size"),  # the table's example, on digits
    (["model.family=gaussian", "data.source=model", "lineages=[mle]", "loop.synthetic_size=1000000000"],
     "loop.synthetic_size"),  # and on the 1-D Gaussian the review ran it on
    (["loop.generations=100000000"], "loop.generations"),
    (["score.samples=1000000000"], "score.samples"),
    (["model.family=gaussian", "data.source=model", "lineages=[mle]", "data.size=2000000000"], "data.size"),
])
def test_8_a_study_too_big_for_this_machine_is_refused_naming_the_key(overrides, key, project, capsys):
    args = [a for o in overrides for a in ("--set", o)]
    line = refused(capsys, project, *args, naming=f"invalid params: {key}: the study needs about")
    assert "available" in line and "--force" in line


def test_8_a_normal_study_fits_and_force_overrides(tmp_path):
    from tasks.sizing import BASE_MEMORY, check_fits, estimate

    default = load(REPO / "params.yaml")
    check_fits(default, tmp_path, default.lineages)  # the default study fits (and so on any machine that runs it)
    for path in [REPO / "params.yaml", *sorted((REPO / "examples").glob("*.yaml"))]:
        p = load(path)  # every shipped study: well under 2 GiB beyond a process's own
        assert estimate(p, p.lineages)["memory"] < BASE_MEMORY + (2 << 30), path
    huge = load(None, ["loop.synthetic_size=1000000000"])
    with pytest.warns(UserWarning, match="--force: loop.synthetic_size: the study needs about"):
        check_fits(huge, tmp_path, huge.lineages, force=True)

    def need(*overrides: str) -> dict[str, int]:
        p = load(None, list(overrides))
        return estimate(p, p.lineages)

    small, big = need("loop.synthetic_size=1000"), need("loop.synthetic_size=100000")
    assert big["memory"] > small["memory"] and big["disk"] > small["disk"]
    assert need("loop.mode=accumulate", "loop.synthetic_size=100000")["memory"] > big["memory"]  # holds them all
    assert need("loop.synthetic_size=100000", "loop.generations=50")["disk"] > big["disk"]
    assert need("loop.synthetic_size=100000", "lineages=[{name: v, estimator: mle, mitigation: verify}]")["memory"] > \
        need("loop.synthetic_size=100000", "lineages=[mle]")["memory"]  # verify draws n / keep to keep n


MEASURE = """
import json, resource, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from tests.kit import open_study, run_lineage
study = open_study(json.loads(sys.argv[1]), Path(sys.argv[2]))
run_lineage(study, "mle", study.p.loop.generations)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


@pytest.mark.slow
def test_8_the_memory_estimate_is_above_what_a_lineage_really_takes(tmp_path):
    """Peak RSS of a real lineage (1,000,000 samples a generation of the 1-D Gaussian) against the estimate."""
    from tasks.params import validate
    from tasks.sizing import estimate

    params = {**ONE_D, "lineages": ["mle"], "loop": {"generations": 2, "synthetic_size": 1_000_000},
              "dvc": {"track": False}}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(params), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    peak = int(done.stdout.strip().splitlines()[-1])
    p = validate(params)
    estimated = estimate(p, p.lineages)["memory"]
    assert peak < estimated < 4 * peak, (peak, estimated)  # above, and not absurdly so


# --- row 9: the MLflow store vanishes mid-study ------------------------------------------------------------------


@pytest.mark.slow
def test_9_a_deleted_mlflow_store_is_named_in_one_line_and_the_next_run_records_everything(project, subprocess_env,
                                                                                          tmp_path):
    from mlflow.tracking import MlflowClient

    from tests.test_crash import madloop

    write(project, ONE_D)
    paused, go = tmp_path / "paused", tmp_path / "go"
    proc = madloop(project, subprocess_env, hook={"point": "replace", "match": "mle/gen-001.json",
                                                  "action": "pause", "marker": str(paused), "go": str(go)})
    deadline = time.time() + 600
    while not paused.exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    (project / "mlflow.db").unlink()
    go.touch()
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"madloop: the MLflow store {project / 'mlflow.db'} is gone"), out[-3000:]
    assert "autoflush" not in out and "Traceback" not in out, out[-3000:]

    again = madloop(project, subprocess_env)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("madloop/g").experiment_id])
    assert sorted(r.data.tags["lineage"] for r in runs) == ["mle", "ple_closed"]
    assert all(len(client.get_metric_history(r.info.run_id, "kl")) == 3 for r in runs)


# --- row 10: files as documented --------------------------------------------------------------------------------


def test_10_models_are_written_readable_by_others_though_safetensors_makes_them_anew(tmp_path):
    write_atomic(tmp_path / "model-000.safetensors", lambda tmp: save_file({"w": torch.zeros(3)}, str(tmp)))
    assert os.stat(tmp_path / "model-000.safetensors").st_mode & 0o777 == FILE_MODE  # 0644 under the usual umask


@pytest.mark.slow
def test_10_every_file_of_a_study_and_the_cached_classifier_has_the_documented_mode(project, prefect_server):
    from flows.loop import run_study
    from tasks.params import validate
    from tests.conftest import tiny

    run_study(validate(tiny(study__name="modes")), project)
    files = [p for base in ("data/studies", "data/cache", "reports") for p in (project / base).rglob("*")
             if p.is_file() and not p.name.endswith(".lock")]
    assert any(p.suffix == ".safetensors" and "cache" in p.parts for p in files)
    assert any(p.name == "model-001.safetensors" for p in files)
    wrong = {str(p.relative_to(project)): oct(os.stat(p).st_mode & 0o777) for p in files
             if os.stat(p).st_mode & 0o777 != FILE_MODE}
    assert not wrong, wrong


# --- row 11: plug-ins run code: only what whoever runs madloop allows ----------------------------------------------


def test_11_params_cannot_import_a_module_the_environment_does_not_allow(project, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "evil_parts.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("MADLOOP_PLUGINS", raising=False)
    for module in ("evil_parts", "os"):
        line = refused(capsys, project, "--set", f"plugins=[{module}]", naming="invalid params: plugins:")
        assert f"'{module}' is not allowed here" in line and "MADLOOP_PLUGINS" in line
    assert cli(["params", "--set", "plugins=[evil_parts]"]) == 2  # validation alone imports nothing either
    assert not marker.exists() and "evil_parts" not in sys.modules
    monkeypatch.setenv("MADLOOP_PLUGINS", "evil_parts")  # the person running madloop allows it
    try:
        assert cli(["params", "--set", "plugins=[evil_parts]"]) == 0
        assert marker.read_text() == "ran"
    finally:
        sys.modules.pop("evil_parts", None)
    assert cli(["params", "--set", "plugins=[tasks.modes]"]) == 0  # madloop's own packages are always allowed


# --- row 12: a DVC lock held by another process ------------------------------------------------------------------

HOLD_DVC_LOCK = """
import sys, time
import zc.lockfile
lock = zc.lockfile.LockFile(sys.argv[1])  # as DVC itself holds its repository lock
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


@pytest.mark.slow
def test_12_a_held_dvc_lock_is_said_with_its_holder_while_waiting_then_fails_in_one_line(tmp_path):
    from tasks.versioning import DvcLockHeldError, dvc_add

    root = git_dvc_repo(tmp_path / "project")
    (root / "d").mkdir()
    (root / "d" / "f").write_text("x")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_DVC_LOCK, str(root / ".dvc" / "tmp" / "lock"), "20"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        said = []
        with pytest.raises(DvcLockHeldError) as err:
            dvc_add(root, [root / "d"], wait_seconds=5, on_wait=said.append)
        message = str(err.value)
        assert f"held by pid {holder.pid} (" in message and "after 5 s" in message and "\n" not in message
        assert len(said) == 1 and f"held by pid {holder.pid}" in said[0] and "waiting for it" in said[0]
        started = time.monotonic()
        dvc_add(root, [root / "d"], wait_seconds=120, on_wait=said.append)  # the holder ends: the add goes through
        assert time.monotonic() - started < 60 and (root / "d.dvc").is_file() and len(said) == 2
    finally:
        holder.kill()
        holder.wait()


# --- row 13: nothing a test started outlives a killed pytest ---------------------------------------------------------

INNER_TEST = """
import os, sys, time
from pathlib import Path

from tests.test_deploy import child


def test_hangs_like_a_deployment_test(prefect_server, tmp_path):
    worker = [sys.executable, "-c", "import time; time.sleep(600)"]  # a worker: its own session, like the real ones
    with child(worker, dict(os.environ), tmp_path, tmp_path / "worker.log") as proc:
        Path(os.environ["MARK"]).write_text(str(proc.pid))
        time.sleep(600)  # the CI timeout kills pytest here
"""


@pytest.mark.slow
def test_13_a_killed_pytest_leaves_no_prefect_server_or_worker_running(tmp_path):
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER_TEST))
    mark = tmp_path / "mark"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MARK": str(mark)}
    env.pop("PREFECT_API_URL", None)
    inner = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                              str(tmp_path / "test_inner.py")], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not mark.exists():
            assert inner.poll() is None and time.time() < deadline, inner.stdout.read()[-3000:]
            time.sleep(0.5)
        family = psutil.Process(inner.pid).children(recursive=True)
        worker = psutil.Process(int(mark.read_text()))
        servers = [p for p in family if "uvicorn" in " ".join(p.cmdline())]
        assert len(servers) == 1 and worker.is_running()
        os.kill(inner.pid, signal.SIGKILL)  # as a CI timeout does
        inner.wait()
        _, alive = psutil.wait_procs([*servers, worker], timeout=60)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        inner.kill()
        inner.wait()
