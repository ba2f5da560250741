"""Is what is on disk what was made? Accidents against the manifests, deliberate edits against git.

Two checks, of different strength:

- **Accidents** (bit rot, a truncated copy, a hand edit that leaves a checksum stale): each manifest carries the
  sha256 of its own content and of every file it lists (``tasks.storage``). Those checksums are not keyed: anyone
  who can write the folder can edit a file and recompute them, so they prove nothing against a deliberate edit.
- **Deliberate edits, once committed**: every data folder is ``dvc add``-ed, and its ``<folder>.dvc`` file, once
  committed to git, names a DVC ``.dir`` object that lists the md5 of every file in the folder. Git keeps that
  record out of reach of the folder's writers (rewriting it shows in ``git log`` and fails on a signed or
  protected branch), and DVC's cache keeps what it names, content-addressed: an object whose bytes no longer hash
  to its name is refused here too. So a generation that a commit vouches for is checked against the commit: its
  manifest, as the commit holds it, must still say the same about the generation as the one on disk.

What a run may change after a commit, and so is not a difference: a generation made under other params
(``--overwrite`` moved the committed one to the trash), a generation re-scored (``score_hash`` differs: its
metrics may too), its fit's timing (``info``), and generations the commit does not hold yet. Anything else (the
metrics under the same scorer, a model, a dataset, what it was trained on) differing from the commit is an edit
made after it: ``madloop verify`` reports it, and a run stops before any work (``--overwrite`` moves the folder to
the trash and starts over; ``git add``/``git commit`` of the ``.dvc`` file accepts it as it is).

Not covered: generations made after the last commit (accident checks only, until committed), and the domain
classifier cache (``data/cache/``, not versioned): a swapped classifier shows as re-scored generations.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from tasks.layout import MANIFEST_GLOB, REAL, REAL_MANIFEST, generation_files, generation_of
from tasks.storage import CorruptOutputError, read_manifest, verify

CHANGES_ALLOWED = {"info", "checksum"}  # what a run rewrites in a committed manifest without changing what it made
SCORES = {"metrics", "score_hash"}  # what re-scoring rewrites (a new score_hash)


@dataclass(frozen=True)
class Commit:
    """A folder as the last commit of its ``.dvc`` file recorded it."""

    rev: str  # the commit that last changed the .dvc file (short hash)
    date: str
    author: str
    dvc_file: str  # its path in the git repository
    files: dict[str, str] | None  # path in the folder -> md5; None when DVC's cache lacks the listing
    cache: Path | None  # DVC's cache of md5-addressed files

    def describe(self) -> str:
        return f"commit {self.rev} ({self.date}, {self.author}) of {self.dvc_file}"


@dataclass
class FolderReport:
    folder: Path
    problems: list[str] = field(default_factory=list)  # each one line: a difference, or damage
    notes: list[str] = field(default_factory=list)  # what is fine but worth knowing
    generations: int = 0  # finished generations that verified (the real data folder: 1 when it did)
    commit: Commit | None = None


def git(root: Path, *args: str) -> str | None:
    """``git args`` in ``root``'s repository: its output, or None when it fails (no git, not a repository, no such
    object)."""
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


@lru_cache(maxsize=8)
def dvc_cache(root: Path) -> Path | None:
    """Where DVC keeps md5-addressed files for the repository at ``root`` (its configured cache)."""
    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            return Path(repo.cache.local.path)
    except Exception:  # noqa: BLE001 (no DVC repository: nothing is committed through DVC)
        return None


def cached(cache: Path | None, md5: str) -> bytes | None:
    """The bytes DVC's cache holds for ``md5``, when it holds them and they still hash to it."""
    if cache is None:
        return None
    oid = md5.removesuffix(".dir")
    path = cache / oid[:2] / (oid[2:] + (".dir" if md5.endswith(".dir") else ""))
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if hashlib.md5(data).hexdigest() == oid else None


def last_commit(root: Path, folder: Path, cache: Path | None = None) -> Commit | None:
    """The folder as the HEAD commit of its ``.dvc`` file records it, or None (not committed, or no git)."""
    top = git(root, "rev-parse", "--show-toplevel")
    if top is None:
        return None
    top_path = Path(top.strip())
    dvc_file = folder.with_name(folder.name + ".dvc").resolve()
    try:
        relative = dvc_file.relative_to(top_path.resolve()).as_posix()
    except ValueError:
        return None
    text = git(top_path, "show", f"HEAD:{relative}")
    log = git(top_path, "log", "-1", "--format=%h%x00%cs%x00%an", "HEAD", "--", relative)
    if text is None or not log:
        return None
    import yaml

    try:
        out = (yaml.safe_load(text) or {})["outs"][0]
        md5 = str(out["md5"])
    except (yaml.YAMLError, KeyError, IndexError, TypeError):
        return None
    rev, date, author = (log.strip().split("\x00") + ["", "", ""])[:3]
    cache = cache if cache is not None else dvc_cache(root.resolve())
    listing = cached(cache, md5)
    files = None
    if listing is not None:
        files = {entry["relpath"]: entry["md5"] for entry in json.loads(listing)}
    return Commit(rev, date, author, relative, files, cache)


def manifest_names(folder: Path) -> list[str]:
    return [REAL_MANIFEST] if folder.name == REAL else sorted(p.name for p in folder.glob(MANIFEST_GLOB))


def differences(committed: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys in which a manifest on disk differs from the committed one, beyond what a run may change; [] for
    a manifest made under other params."""
    if committed.get("recipe_hash") != current.get("recipe_hash"):
        return []
    allowed = CHANGES_ALLOWED | (SCORES if committed.get("score_hash") != current.get("score_hash") else set())
    keys = sorted((set(committed) | set(current)) - allowed)
    return [key for key in keys if committed.get(key) != current.get(key)]


def changed_values(committed: Any, current: Any, prefix: str = "") -> list[str]:
    """``key: old -> new`` for the leaves that differ (at most a few, each short)."""
    if isinstance(committed, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(committed) | set(current)):
            out += changed_values(committed.get(key), current.get(key), f"{prefix}{key}.")
        return out
    if committed == current:
        return []
    show = lambda v: (repr(v) if len(repr(v)) <= 24 else repr(v)[:12] + "...")  # noqa: E731
    return [f"{prefix.rstrip('.')}: {show(committed)} -> {show(current)}"]


def check_against_commit(root: Path, folder: Path, cache: Path | None = None) -> FolderReport:
    """How ``folder`` differs from its last commit in ways no run of madloop makes (``problems``), and what the
    commit does and does not cover (``notes``). Reads the manifests and DVC's cache; hashes no data file (the
    accident checks tie each file to its manifest)."""
    report = FolderReport(folder)
    commit = last_commit(root, folder, cache)
    report.commit = commit
    if commit is None:
        report.notes.append(f"{folder.name}: not committed to git ({folder.name}.dvc): checked against accidents "
                            "only")
        return report
    if commit.files is None:
        report.notes.append(f"{folder.name}: the listing {commit.describe()} names is not in DVC's cache (`dvc "
                            "fetch` brings it): not checked against the commit")
        return report
    uncommitted = []
    for name in manifest_names(folder):
        md5 = commit.files.get(name)
        path = folder / name
        if md5 is None:
            uncommitted.append(name)
            continue
        data = path.read_bytes()
        if hashlib.md5(data).hexdigest() == md5:
            continue  # as committed (the accident checks tie its files to it)
        held = cached(commit.cache, md5)
        if held is None:
            report.problems.append(f"{path} differs from {commit.describe()}, whose copy is not in DVC's cache "
                                   "(`dvc fetch` brings it): cannot tell what changed")
            continue
        try:
            committed, current = json.loads(held), json.loads(data)
        except ValueError:
            continue  # unreadable on disk: damage, which the accident checks report
        keys = differences(committed, current)
        if keys:
            changes = [c for key in keys for c in changed_values(committed.get(key), current.get(key), f"{key}.")]
            report.problems.append(f"{path} says other {', '.join(keys)} than {commit.describe()} under the same "
                                   f"params ({'; '.join(changes[:3])}{' ...' if len(changes) > 3 else ''}): "
                                   "edited after the commit")
        elif committed.get("recipe_hash") != current.get("recipe_hash"):
            report.notes.append(f"{path}: made under other params than {commit.describe()} (--overwrite)")
        elif committed.get("score_hash") != current.get("score_hash"):
            report.notes.append(f"{path}: re-scored since {commit.describe()}")
    if uncommitted:
        report.notes.append(f"{folder.name}: {', '.join(uncommitted)} made since {commit.describe()}: checked "
                            "against accidents only until committed")
    return report


def check_accidents(folder: Path, report: FolderReport) -> None:
    """Every manifest against its checksum, every file it lists against its sha256, each generation's training
    data against what the previous one made, and no files a manifest does not vouch for."""
    if folder.name == REAL:
        try:
            manifest = read_manifest(folder / REAL_MANIFEST)
            verify(folder / REAL_MANIFEST, manifest["outputs"])
            report.generations = 1
        except (CorruptOutputError, KeyError) as err:
            report.problems.append(str(err))
        return
    real = folder.parent / REAL / REAL_MANIFEST
    try:
        previous = read_manifest(real)["data"].get("train.parquet") if real.is_file() else None
    except CorruptOutputError:
        previous = None
    k = 0
    while (path := folder / generation_files(k)["manifest"]).is_file():
        try:
            manifest = read_manifest(path)
            if previous is not None and manifest["trained_on"].get("data_sha256") != previous:
                raise CorruptOutputError(f"{path}: generation {k} trained on other data than dataset {k} as it "
                                         "was made")
            verify(path, manifest["outputs"])
        except (CorruptOutputError, KeyError) as err:
            report.problems.append(f"{err}" if isinstance(err, CorruptOutputError) else f"{path}: no {err}")
            return
        previous = manifest["data"].get(generation_files(k)["dataset"])
        report.generations = k = k + 1
    later = sorted({j for p in folder.glob("*") if (j := generation_of(p.name)) is not None and j >= k})
    if later:
        report.problems.append(f"{folder}: files of generation(s) {later[0]}-{later[-1]} have no manifest "
                               "(a killed run's, or added by hand): the next run does not use them")


def verify_study(root: Path, data: Path) -> list[FolderReport]:
    """``madloop verify``: every data folder of a study (``data/studies/<study>/``), against accidents and
    against its last commit."""
    cache = dvc_cache(root.resolve())
    folders = sorted(d for d in data.iterdir() if d.is_dir()) if data.is_dir() else []
    reports = []
    for folder in folders:
        report = check_against_commit(root, folder, cache)
        check_accidents(folder, report)
        reports.append(report)
    return reports
