"""Failures of the stores a study writes to, said in one line that names the cause.

- The MLflow store: a sqlite file deleted, replaced or made read-only while a study runs surfaces from SQLAlchemy
  as "(raised as a result of Query-invoked autoflush; consider using a session.no_autoflush block ...)", and one
  locked past every retry as "database is locked". :func:`store_problem` says which it is, and that nothing on disk
  is lost: the next run records every finished generation from its manifest.
- DVC's repository lock (``.dvc/tmp/lock``, held by any ``dvc`` command): :func:`dvc_lock_holder` says who holds it
  (the pid its lock file records, and that process's command line), so that a run waiting for it can say so.
"""

from __future__ import annotations

import re
from pathlib import Path

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


def dvc_lock_holder(dvc_root: Path) -> str:
    """Who holds DVC's repository lock, as its lock file says: ``pid 123 (dvc exp run ...)``, or why unknown."""
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
