"""Atomic files and manifests: a generation is finished exactly when its manifest exists and verifies.

Every output is written to a temporary file in the same folder (``.<name>.<pid>-<random>.tmp``) and renamed into
place, so a crash or kill leaves either the old file or the new one, never half a file; a kill between the two
leaves the temporary file, which the next run of the study removes (:func:`remove_stray_temps`) and DVC ignores
(``.dvcignore``). The manifest, written last, records the params hash the outputs were made under and the sha256
of each output, and carries a checksum of its own content, so a bit-rotten manifest, or one edited by hand, is
caught too; resuming trusts nothing the manifest does not vouch for. These checksums are not keyed: they catch
accidents, not an edit whose author recomputes them (``tasks.integrity`` checks outputs against git for that).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


TEMP_SUFFIX = ".tmp"
TEMP_PATTERN = f".*{TEMP_SUFFIX}"  # what .dvcignore must hold: every temporary file of an atomic write
CHECKSUM = "checksum"  # the manifest's own sha256, over its canonical JSON without this key
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once at import: os.umask can only be read by setting it
FILE_MODE = 0o666 & ~_UMASK  # what open() would give (0644 under the usual umask), not mkstemp's private 0600


class CorruptOutputError(RuntimeError):
    """An output's bytes no longer match the sha256 its manifest recorded, or a manifest is not what was written."""


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=TEMP_SUFFIX, dir=path.parent)
    os.fchmod(fd, FILE_MODE)  # readable by the other users of a shared filesystem (docs/scale-out.md)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # again: a writer may have made the file anew (safetensors does, 0600), so the mode set above is gone
        os.chmod(tmp_path, FILE_MODE)
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


# --- manifests: JSON with a checksum of their own ---------------------------------------------------------------

NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
MEASURED = ("metrics", "info")  # the sections of a manifest whose numbers may be undefined (FID of no samples)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float spelled as a string ("NaN", "Infinity"), so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def from_json_safe(obj: Any) -> Any:
    if isinstance(obj, str):
        return NON_FINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {k: from_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_json_safe(v) for v in obj]
    return obj


def content_checksum(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_manifest(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write a manifest atomically, as strict JSON with the checksum of its content; return what was written."""
    body = json.loads(json.dumps(json_safe({k: v for k, v in manifest.items() if k != CHECKSUM}), default=str))
    written = {**body, CHECKSUM: content_checksum(body)}
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(written, indent=2, sort_keys=True, allow_nan=False)))
    return read_back(written)


def read_back(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest as the code uses it: undefined measurements as float NaN / inf again, no checksum."""
    return {k: from_json_safe(v) if k in MEASURED else v for k, v in manifest.items() if k != CHECKSUM}


def read_manifest(path: Path) -> dict[str, Any]:
    """A manifest, verified against its own checksum: an edited, truncated or bit-rotten one raises
    :class:`CorruptOutputError` (so does one without a checksum, from before manifests had one)."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CorruptOutputError(f"{path} is unreadable ({err})") from None
    if not isinstance(manifest, dict) or CHECKSUM not in manifest:
        raise CorruptOutputError(f"{path} has no checksum (not written by this madloop, or cut short)")
    body = {k: v for k, v in manifest.items() if k != CHECKSUM}
    try:
        actual = content_checksum(body)
    except ValueError:  # a NaN or Infinity token: not what write_manifest writes
        actual = ""
    if actual != manifest[CHECKSUM]:
        raise CorruptOutputError(f"{path} was edited or is corrupt: its content does not match its checksum")
    return read_back(manifest)


def move_to_trash(root: Path, trash: Path, targets: list[Path]) -> Path | None:
    """Keep what is replaced or not trusted: move it under ``trash``/<timestamp>/, at its path relative to ``root``."""
    targets = [t for t in targets if t.exists()]
    if not targets:
        return None
    bin_ = trash / time.strftime("%Y%m%d-%H%M%S")
    for target in targets:
        dest = bin_ / target.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(target), str(dest))
    return bin_


# --- leftovers ----------------------------------------------------------------------------------------------------


def remove_stray_temps(*folders: Path) -> list[Path]:
    """Delete the temporary files that killed atomic writes left under ``folders`` (only ever call this while no
    other process can be writing there: under the study lock)."""
    removed = []
    for folder in folders:
        if folder.is_dir():
            for path in folder.rglob(TEMP_PATTERN):
                if path.is_file():
                    path.unlink(missing_ok=True)
                    removed.append(path)
    return removed


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
