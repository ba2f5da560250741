"""DVC: every lineage folder (and the real data folder) is tracked with ``dvc add``.

A folder output is content-addressed file by file (DVC's ``.dir`` object lists each file's md5), so any single
generation's dataset can be fetched again with ``dvc get`` or ``dvc pull <path>``, while one ``.dvc`` file per
lineage keeps the repository readable. Re-adding after each generation only hashes new files.

Works inside ``dvc repro`` too: DVC unlocks the repository while a stage's command runs.
"""

from __future__ import annotations

import logging
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


def dvc_add(root: Path, targets: list[Path], attempts: int = 20) -> None:
    """``dvc add`` the targets, serialized across processes on this machine and retried while DVC is busy."""
    from dvc.lock import LockError
    from dvc.repo import Repo

    dvc_root = find_dvc_root(root)
    (dvc_root / ".dvc" / "tmp").mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(dvc_root / ".dvc" / "tmp" / "madloop-add.lock"))
    with quiet_dvc():
        for attempt in range(attempts):
            try:
                with lock, Repo(str(dvc_root)) as repo:
                    repo.add([str(t) for t in targets])
                return
            except LockError:  # a DVC process outside madloop holds the repo: wait and retry
                if attempt == attempts - 1:
                    raise
                time.sleep(min(0.2 * 2 ** attempt, 5.0))


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
