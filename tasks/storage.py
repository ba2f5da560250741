"""Atomic files and manifests: a generation is finished exactly when its manifest exists and verifies.

Every output is written to a temporary file in the same folder and renamed into place, so a crash or kill
leaves either the old file or the new one, never half a file. The manifest, written last, records the params
hash the outputs were made under and the sha256 of each output; resuming trusts nothing the manifest does not
vouch for.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once at import: os.umask can only be read by setting it
FILE_MODE = 0o666 & ~_UMASK  # what open() would give (0644 under the usual umask), not mkstemp's private 0600


class CorruptOutputError(RuntimeError):
    """An output's bytes no longer match the sha256 its manifest recorded."""


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, FILE_MODE)  # readable by the other users of a shared filesystem (docs/scale-out.md)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_atomic(path: Path, writer: Callable[[Path], None]) -> str:
    """Write ``path`` through ``writer(tmp)`` atomically; return its sha256."""
    with atomic_path(path) as tmp:
        writer(tmp)
        digest = file_digest(tmp)
    return digest


def write_json_atomic(path: Path, obj: Any) -> str:
    return write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str)))


def write_csv_atomic(path: Path, rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A CSV with a header: ``columns``, or every key the rows carry, in first-seen order."""
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    return write_atomic(path, write)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def verify(manifest_path: Path, outputs: dict[str, str]) -> None:
    """Check every output named in a manifest against its recorded sha256 (paths relative to the manifest)."""
    for name, expected in outputs.items():
        path = manifest_path.parent / name
        if not path.is_file():
            raise CorruptOutputError(f"{path} is missing (listed in {manifest_path})")
        actual = file_digest(path)
        if actual != expected:
            raise CorruptOutputError(f"{path} is corrupt: sha256 {actual[:12]}... does not match "
                                     f"{expected[:12]}... recorded in {manifest_path}")
