"""`dvc repro` of the repository's own dvc.yaml, in a temporary git + DVC repo."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess

import pytest
import yaml
from pathlib import Path

from tasks.storage import file_digest, read_json
from tests.conftest import BIN, REPO, tiny



def dvc(project, env, *args, check=True):
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=project, env=env, capture_output=True, text=True,
                          timeout=600)
    if check:
        assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def git(project, env, *args):
    subprocess.run(["git", *args], cwd=project, env=env, check=True, capture_output=True)


@pytest.mark.slow
def test_dvc_repro_runs_resumes_versions_and_skips(project, subprocess_env, tmp_path):
    env = {**subprocess_env, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@x"}
    for name in ("flows", "tasks", "models"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    shutil.copytree(REPO / "reports", project / "reports")  # the committed evidence, which experiments must not touch
    shutil.copytree(REPO / ".dvc" / "plots", project / ".dvc" / "plots")  # templates and the offline page
    dvc(project, env, "config", "plots.html_template", "plots/offline.html")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in tiny().items():
        params[section] = {**params[section], **values} if isinstance(values, dict) else values
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    dvc(project, env, "remote", "add", "-d", "store", str(tmp_path / "store"))

    first = dvc(project, env, "repro", "study")  # the paper studies are stages too, at full size
    assert "Running stage 'study'" in first.stdout
    folder = project / "data" / "studies" / "tiny" / "mle"
    assert (folder / "dataset-002.parquet").is_file() and (folder.parent / "mle.dvc").is_file()
    metrics = json.loads((project / "reports" / "tiny" / "metrics.json").read_text())
    assert metrics["mle"]["generation"] == 1 and "fid" in metrics["mle"]

    second = dvc(project, env, "repro", "study")
    assert "Running stage" not in second.stdout and "didn't change" in second.stdout

    # plots: FID, recall, minority share and R_Fair vs generation, one line per recipe; the page needs no network
    plots = json.loads(dvc(project, env, "plots", "show", "--json").stdout)
    assert not plots.get("errors") and set(plots["data"]) == {"fid", "recall", "minority_share", "r_fair"}
    dvc(project, env, "plots", "show", "--out", "plots-page")
    page = (project / "plots-page" / "index.html").read_text()
    assert page.count("vegaEmbed(") == 4 and "cdn.jsdelivr" not in page and "vega-lite 5.23.0" in page

    # a scoring param changes the metrics, not the models: the stage re-runs, generations are re-scored only
    model_sha = file_digest(folder / "model-001.safetensors")
    old_fid = read_json(folder / "gen-001.json")["metrics"]["fid"]
    params["score"]["samples"] = 150
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    third = dvc(project, env, "repro", "study")
    assert "Running stage 'study'" in third.stdout
    assert file_digest(folder / "model-001.safetensors") == model_sha
    assert read_json(folder / "gen-001.json")["metrics"]["fid"] != old_fid

    # any single generation can be fetched again from the remote
    git(project, env, "add", "-A")
    git(project, env, "commit", "-qm", "study")
    dvc(project, env, "push")
    expected = file_digest(folder / "dataset-001.parquet")
    (folder / "dataset-001.parquet").unlink()
    dvc(project, env, "pull", "data/studies/tiny/mle/dataset-001.parquet")
    assert file_digest(folder / "dataset-001.parquet") == expected
    out = tmp_path / "fetched.parquet"
    dvc(project, env, "get", str(project), "data/studies/tiny/mle/dataset-001.parquet", "-o", str(out))
    assert file_digest(out) == expected

    # an experiment on the default study's training params re-runs that study only: the paper studies carry
    # their own frozen params (studies.<name>.params), so their stages and committed reports stay as they are
    evidence = {p: file_digest(p) for p in (project / "reports").rglob("*")
                if p.is_file() and not p.is_relative_to(project / "reports" / "tiny")}
    experiment = dvc(project, env, "exp", "run", "study", "-S", "train.epochs=2", "-n", "two-epochs")
    assert "Running stage 'study'" in experiment.stdout
    assert {p: file_digest(p) for p in evidence} == evidence
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["epochs"] == 2
    assert "two-epochs" in dvc(project, env, "exp", "list", "--name-only").stdout.split()
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    paper = [name for name, stage in stages.items() if "studies.%s" % name in stage.get("params", [])]
    assert paper and all("train" not in stages[name]["params"] for name in paper)


@pytest.mark.slow
@pytest.mark.repo
def test_the_paper_stages_are_locked_to_this_code(subprocess_env):
    """dvc.lock records the paper stages (and the mitigations comparison) as built from the code in this checkout,
    so `dvc repro` on a fresh clone runs only the default study and not the 80 minutes of paper studies whose
    reports are committed. After a code change that leaves their outputs as they are: `dvc commit -f table1 fig2
    ...` (the stages concerned), then `dvc repro -s results` (without -s, repro would re-run every stage upstream of
    it)."""
    from flows.studies import STUDIES

    stale = json.loads(dvc(REPO, subprocess_env, "status", "--json", *STUDIES.names(), "mitigations", "results").stdout)
    assert stale == {}, f"dvc.lock is behind the code for: {stale}"


@pytest.mark.repo
def test_a_frozen_stage_says_why_and_its_results_section_says_it_was_not_re_run():
    """A stage frozen in dvc.yaml (its reports made by an earlier revision; `dvc status` no longer compares it with
    the code) must say why (meta.frozen_because), and RESULTS.md must say so in that study's section."""
    from flows.studies import STUDIES, frozen_stages

    frozen = frozen_stages(REPO)
    results = (REPO / "reports" / "RESULTS.md").read_text()
    for name, why in frozen.items():
        assert len(why) > 40, f"stage {name} is frozen without saying why (meta.frozen_because in dvc.yaml)"
        if name in STUDIES:
            assert f"`dvc unfreeze {name}`" in results, f"RESULTS.md does not say that {name} was not re-run"


# --- each paper stage depends on its own code -----------------------------------------------------------------------

PACKAGES = ("models", "tasks", "flows")
PLUGIN_PACKAGES = ["models/families", "models/estimators", "tasks/sources", "tasks/modes", "tasks/mitigations",
                   "tasks/metrics", "tasks/scorers"]  # found at run time (models.registry), not by import


def module_file(module: str) -> Path | None:
    base = REPO.joinpath(*module.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def imported_files(module: str) -> set[str]:
    """Every project file ``module`` imports, directly or not (its parent packages included)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen or module_file(name) is None:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        path = module_file(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")
                    base = ".".join(up[:len(up) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and module_file(target) is None:
                    target = target.rpartition(".")[0]
                if target.split(".")[0] in PACKAGES:
                    todo.append(target)
    return {str(module_file(name).relative_to(REPO)) for name in seen}


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.repo
def test_each_paper_stage_depends_on_its_own_module_and_what_it_imports():
    """Editing one study's module stales its stage only; editing code a study runs stales it."""
    from flows.studies import STUDIES

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    module_file = lambda study: study.__module__.replace(".", "/") + ".py"  # noqa: E731
    modules = {e.name: module_file(e.obj) for e in STUDIES.entries()}
    for name, study in ((e.name, e.obj) for e in STUDIES.entries()):
        stage = stages[name]
        needed = imported_files(study.__module__)
        if "flows/loop.py" in needed:  # the loop finds its parts at run time
            needed |= {str(f.relative_to(REPO)) for pkg in PLUGIN_PACKAGES for f in (REPO / pkg).glob("*.py")}
        missing = sorted(f for f in needed if not covered(f, stage["deps"]))
        assert not missing, f"stage {name} does not depend on code it runs: {missing}"
        others = [m for other, m in modules.items() if m != modules[name] and covered(m, stage["deps"])]
        assert not others, f"stage {name} depends on other studies' modules: {others}"
        assert stage["params"] == ["seed", *study.params, f"studies.{name}"], name
        assert stage["cmd"] == f"madloop study {name}"
