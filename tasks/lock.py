"""One writer per study: a lock file in the study's data folder (``tasks.layout``: data/studies/<study>/.madloop.lock).

Two runs of one study at once would write the same lineage folders and reports; the one that comes second is
told who holds the lock (pid, host, since when, which command) and stops before any work, or, with ``wait``, waits
for it. The lock is an advisory ``flock`` on the file, so the kernel releases it when its holder dies, however it
dies (kill -9 included): a stale lock file never blocks anyone, and its content is only a note about the last
holder. The lock is re-entrant within a process (``madloop run`` takes it before its checks; the study flow it
then runs takes it again).

``flock`` works across processes of one machine and, on Linux, across machines over NFS (v4, or v3 with lockd);
lineage flow runs fanned out to other machines write only their own lineage's folder and do not take it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

_held: dict[str, int] = {}  # lock path -> depth, for the locks this process holds


class StudyLockedError(RuntimeError):
    """Another process is running this study."""


def holder_note() -> dict[str, object]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}


def describe_holder(path: Path) -> str:
    try:
        note = json.loads(path.read_text())
        return f"pid {note['pid']} on {note['host']} since {note['started']} ({note['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its details yet)"


@contextmanager
def study_lock(path: Path, study: str, *, wait: bool = False, poll_seconds: float = 1.0,
               on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the study's lock for the block. Held by another process: raise :class:`StudyLockedError`, or with
    ``wait`` call ``on_wait(who)`` once and wait until it is free."""
    key = str(path.resolve())
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                who = describe_holder(path)
                if not wait:
                    raise StudyLockedError(
                        f"study {study!r} is already being run by {who}: wait for it to end, or run again with "
                        f"--wait to start when it does (lock: {path})") from None
                if not told and on_wait is not None:
                    on_wait(f"study {study!r} is being run by {who}: waiting for it to end")
                    told = True
                time.sleep(poll_seconds)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_note()).encode(), 0)
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock
