"""DVC: every lineage folder (and the real data folder) is tracked with ``dvc add``.

A folder output is content-addressed file by file (DVC's ``.dir`` object lists each file's md5), so any single
generation's dataset can be fetched again with ``dvc get`` or ``dvc pull <path>``, while one ``.dvc`` file per
lineage keeps the repository readable. Re-adding after each generation only hashes new files.

Works inside ``dvc repro`` too: DVC unlocks the repository while a stage's command runs.
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock


QUIET_LOGGERS = ("dvc", "dvc_data", "dvc_objects")


class NotADvcRepoError(RuntimeError):
    pass


def find_dvc_root(root: Path) -> Path:
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Path(Repo.find_root(str(root)))
    except NotDvcRepoError:
        raise NotADvcRepoError(f"{root} is not inside a DVC repository: run `git init && dvc init` there, "
                               "or set dvc.track: false") from None


DVC_LOCK_WAIT_SECONDS = 180.0  # how long a `dvc add` waits for DVC's repository lock held by another process


def dvc_add(root: Path, targets: list[Path], wait_seconds: float = DVC_LOCK_WAIT_SECONDS,
            on_wait=None) -> None:
    """``dvc add`` the targets, serialized across processes on this machine, waiting up to ``wait_seconds`` while
    another DVC process holds the repository's lock. Waiting is said once (who holds the lock: ``on_wait(line)``,
    by default a warning); a lock held longer fails in one line naming its holder."""
    import warnings

    from dvc.lock import LockError
    from dvc.repo import Repo

    dvc_root = find_dvc_root(root)
    (dvc_root / ".dvc" / "tmp").mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(dvc_root / ".dvc" / "tmp" / "madloop-add.lock"))
    deadline, attempt, told = time.monotonic() + wait_seconds, 0, False
    with quiet_dvc():
        while True:
            try:
                with lock, Repo(str(dvc_root)) as repo:
                    repo.add([str(t) for t in targets])
                return
            except LockError:  # a DVC process outside madloop holds the repo: say who, wait and retry
                holder = dvc_lock_holder(dvc_root)
                if time.monotonic() >= deadline:
                    raise DvcLockHeldError(
                        f"dvc add {', '.join(t.name for t in targets)}: DVC's repository lock "
                        f"({dvc_root / '.dvc' / 'tmp' / 'lock'}) is still held by {holder} after {wait_seconds:.0f} s; "
                        "the files are saved, and the next run versions them") from None
                if not told:
                    line = (f"DVC's repository lock is held by {holder}: waiting for it (up to {wait_seconds:.0f} s) "
                            f"to dvc add {', '.join(t.name for t in targets)}")
                    on_wait(line) if on_wait is not None else warnings.warn(line)
                    told = True
                time.sleep(min(0.2 * 2 ** attempt, 5.0, max(deadline - time.monotonic(), 0.0)))
                attempt += 1


@contextmanager
def quiet_dvc() -> Iterator[None]:
    """DVC says nothing unless it fails (it raises then, and the task fails saying why): not "To track the changes
    with git, run: ..." after every generation, and none of its progress bars ("Adding...", "Checking cache in ..."),
    which it draws in a terminal unless its loggers are above ERROR (``dvc.progress.Tqdm`` and dvc_data's) and
    which would draw through madloop's own."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class DvcLockHeldError(RuntimeError):
    """Another DVC process held the repository's lock for longer than a `dvc add` waits."""


def tracked_md5s(root: Path, target: Path) -> dict[str, str]:
    """relative path -> md5 of every file DVC recorded for a tracked folder (from its ``.dvc`` and cache)."""
    import yaml

    dvc_file = target.with_name(target.name + ".dvc")
    out = yaml.safe_load(dvc_file.read_text())["outs"][0]
    md5 = out["md5"]
    if not md5.endswith(".dir"):
        return {target.name: md5}
    dvc_root = find_dvc_root(root)
    obj = dvc_root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    import json

    return {entry["relpath"]: entry["md5"] for entry in json.loads(obj.read_text())}


def dvc_lock_holder(dvc_root: Path) -> str:
    """Who holds DVC's repository lock (``.dvc/tmp/lock``, held by any ``dvc`` command), as its lock file says:
    ``pid 123 (dvc exp run ...)``, or why unknown."""
    lock = dvc_root / ".dvc" / "tmp" / "lock"
    try:
        text = lock.read_text(errors="replace")
    except OSError:
        return "another DVC process (its lock file is unreadable)"
    match = re.search(r"\b(\d{1,10})\b", text)
    if match is None:
        return "another DVC process (its lock file names no pid)"
    pid = int(match.group(1))
    try:
        import psutil

        command = " ".join(" ".join(psutil.Process(pid).cmdline()).split())[:160]  # one line, however it was run
        return f"pid {pid} ({command or 'no command line'})"
    except Exception:  # noqa: BLE001 (gone, or another machine's pid under NFS: the pid is what there is)
        return f"pid {pid} (not a process on this machine now)"
