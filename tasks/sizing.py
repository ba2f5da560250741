"""Will a study fit on this machine? Its memory and disk, estimated from its sizes before any work.

A study too big for the machine used to start, fit, then die of memory after minutes (or wake the OOM killer on a
shared machine). :func:`check_fits` refuses it first, naming the key that makes it too big and the estimate;
``madloop run --force`` runs it anyway. The estimate is simple and errs on the large side:

- **rows held at once** by one lineage (they run one after another in a process): the real data (train and test
  splits, and the full training split the classifier learns from: twice the source's rows), the lineage's largest
  dataset (the real rows plus ``loop.synthetic_size`` samples; with a mode that ``accumulates``, plus every
  generation's samples), the samples a generation draws to keep ``loop.synthetic_size`` of them (its
  mitigation's ``candidates``: ``verify`` draws n / keep, ``curation`` n * k), and the scoring samples
  (``score.samples``, or ``score.mc_samples`` for the 1-D families);
- **memory** = ``BASE_MEMORY`` (Python, torch, Prefect, MLflow, the classifier) + rows x (``ROW_COPIES`` x the
  bytes of a row's pixels + ``ROW_OVERHEAD``). Measured on the team's 2-core VM (peak RSS of a lineage run as plain
  functions, ``tests.kit``, one torch thread), per row held: 1-D draws (4 bytes) 378 bytes; digits (256 bytes)
  1,010; 28x28 MNIST (3,136 bytes) 9,840. Pixels are held about three times over (samples, the dataset
  they join, its Parquet table), and every row has columns of provenance besides. The constants here are above
  each measurement. Model weights and their optimizer state are left out (the built-in families' are under
  100 MB, PLE's hypernetwork included), and so is GPU memory;
- **disk** = every generation's dataset file (rows x (the bytes of a row + 8), Parquet barely compresses
  samples) and model file, twice when DVC tracks them (its cache holds a copy), models once more in MLflow's
  artifact store. A resumed study counts its finished generations again: the estimate stays an upper bound.

``train.epochs`` (and the other knobs of training) cost time, not memory or disk: they are not estimated.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path

from tasks.params import (LineageParams, Params, ParamsError, core_loop, declared_settings, lineage_params,
                          lineage_seed)
from tasks.registries import MITIGATIONS, MODES, SOURCES

BASE_MEMORY = 3 << 29  # 1.5 GiB: a study's process before its lineages' data (1.0-1.6 GB measured)
ROW_COPIES = 4  # a row's pixels are held this many times over at the peak (3.1-3.9 measured)
ROW_OVERHEAD = 512  # bytes per row beside its pixels: provenance columns, indices (370-380 measured)
DISK_OVERHEAD = 8  # bytes per row on disk beside its pixels (Parquet: label, origin, generation, lineage)
PICTURE_BYTES = 1 << 20  # a generation's sample grid (PNG), at most


@dataclass(frozen=True)
class Need:
    """Bytes of memory or disk that one params key is responsible for."""

    key: str
    bytes: int
    what: str


def size_text(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} EB"


def candidates_per_sample(lp: Params, spec: LineageParams) -> float:
    """How many samples a generation draws per sample it keeps: the mitigation's ``candidates`` rule, asked with
    the lineage's params alone, before any data exist (a mitigation that needs more to answer counts as drawing
    what it keeps)."""
    from tasks.mitigations import MitigationContext

    try:
        entry = MITIGATIONS.entry(spec.mitigation)
        params_alone = MitigationContext(seed=lineage_seed(lp, spec), real=None, family=None, loop=core_loop(lp),
                                         data=lp.data, settings=declared_settings(lp, entry.settings), scorer=None,
                                         mode=None, device=None, study_seed=lp.seed)
        mitigation = entry.obj(params_alone)
        return max(1.0, mitigation.candidates(1_000_000) / 1_000_000)
    except Exception:  # noqa: BLE001 (its constructor wanted the real data: it draws no more than it keeps)
        return 1.0


def model_bytes(lp: Params, shape: tuple[int, ...]) -> int:
    """The bytes of one saved model: its family's weights (float32), built without memory on torch's meta device."""
    import torch

    from models.families import build_family

    try:
        with torch.device("meta"):
            module = build_family(lp.model.family, shape, lp.model).build()
        return 4 * sum(t.numel() for t in module.state_dict().values())
    except Exception:  # noqa: BLE001 (a family that cannot be built before its data: counted as nothing)
        return 0


def lineage_needs(p: Params, spec: LineageParams) -> tuple[list[Need], list[Need]]:
    """(memory, disk) of one lineage, each split by the key responsible."""
    lp = lineage_params(p, spec)
    bound = SOURCES.get(lp.data.source).size_bound(lp.data)
    real_rows, shape, real_key = bound if bound is not None else (0, (3, 32, 32), "data.source")
    pixels = 4
    for d in shape:
        pixels *= d
    per_row = ROW_COPIES * pixels + ROW_OVERHEAD
    generations = lp.loop.generations
    synthetic_key = "loop.synthetic_size" if lp.loop.synthetic_size else real_key
    synthetic = lp.loop.synthetic_size or real_rows
    accumulates = getattr(MODES.get(lp.loop.mode), "accumulates", False)
    draws = round(synthetic * candidates_per_sample(lp, spec))
    memory = [Need(real_key, 2 * real_rows * per_row, f"{2 * real_rows:,} real rows"),
              Need(synthetic_key, (synthetic + draws) * per_row,
                   f"{synthetic:,} samples per generation, {draws:,} drawn"),
              Need("loop.generations", (generations - 1) * synthetic * per_row if accumulates else 0,
                   f"{generations} generations of accumulated samples")]
    for key, n in scoring_samples(lp).items():
        memory.append(Need(key, n * per_row, f"{n:,} scoring samples"))

    copies = 2 if lp.dvc.track else 1
    on_disk = pixels + DISK_OVERHEAD
    rows_written = generations * real_rows + (synthetic * generations * (generations + 1) // 2 if accumulates
                                              else synthetic * generations)
    model = model_bytes(lp, shape)
    disk = [Need(synthetic_key, copies * rows_written * on_disk,
                 f"{generations} datasets of up to {real_rows + synthetic * (generations if accumulates else 1):,} "
                 "rows"),
            Need("loop.generations", generations * ((copies + 1) * model + PICTURE_BYTES),
                 f"{generations} models of {size_text(model)}")]
    return memory, disk


def scoring_samples(lp: Params) -> dict[str, int]:
    """``{params key: samples}`` of the scorer this family uses: ``score.samples`` for images, ``score.mc_samples``
    for the 1-D families (the fields of that name its declared settings hold)."""
    from models.families import FAMILIES
    from tasks.registries import SCORERS

    scorer = SCORERS.get(FAMILIES.get(lp.model.family).kind)
    out = {}
    for path, cls in scorer.settings().items():
        for field in cls.model_fields:
            value = getattr(section_of(lp, path), field, None)
            if field in ("samples", "mc_samples") and isinstance(value, int) and not isinstance(value, bool):
                out[f"{path}.{field}"] = value
    return out


def section_of(p: Params, path: str):
    node = p
    for key in path.split("."):
        node = getattr(node, key)
    return node


def free_space(root: Path) -> int:
    here = (root / "data").resolve()
    while not here.exists():
        here = here.parent
    return shutil.disk_usage(here).free


SIZED_KEYS = ("loop.synthetic_size", "loop.generations", "data.size", "score.samples", "score.mc_samples",
              "mitigation.verify.keep", "mitigation.curation.k", "mitigation.entropy.pool")


def estimate(p: Params, lineages: list[LineageParams]) -> dict[str, int]:
    """Bytes of memory (the hungriest lineage at its peak, plus ``BASE_MEMORY``) and of disk (every lineage)."""
    needs = [lineage_needs(p, spec) for spec in lineages]
    return {"memory": BASE_MEMORY + max(sum(n.bytes for n in memory) for memory, _ in needs),
            "disk": sum(n.bytes for _, disk in needs for n in disk)}


def responsible_key(p: Params, lineages: list[LineageParams], what: str, total: int) -> str:
    """The key that makes the study this big: the one whose default value would shrink the estimate most (when no
    key is off its default, the key of the estimate's largest part)."""
    from tasks.params import set_dotted, validate

    defaults, raw = validate({}), p.model_dump(mode="json")
    best, saved = None, 0
    for key in SIZED_KEYS:
        try:
            default, value = section_of(defaults, key), section_of(p, key)
        except AttributeError:
            continue
        if value == default:
            continue
        changed = copy.deepcopy(raw)
        set_dotted(changed, key, default)
        try:
            q = validate(changed)
        except ParamsError:
            continue
        smaller = total - estimate(q, [q.lineage(spec.name) for spec in lineages])[what]
        if smaller > saved:
            best, saved = key, smaller
    if best is not None:
        return best
    parts = [n for spec in lineages for n in lineage_needs(p, spec)[0 if what == "memory" else 1]]
    return max(parts, key=lambda n: n.bytes).key


def check_fits(p: Params, root: Path, lineages: list[LineageParams], force: bool = False) -> None:
    """Refuse (ParamsError naming the key) a study whose estimated memory or disk exceeds what this machine has
    available now; with ``force``, only warn."""
    import warnings

    import psutil

    if not lineages:
        return
    need = estimate(p, lineages)
    have = {"memory": psutil.virtual_memory().available, "disk": free_space(root)}
    for what in ("memory", "disk"):
        if need[what] <= have[what]:
            continue
        key = responsible_key(p, lineages, what, need[what])
        try:
            value = f" = {section_of(p, key):,}"
        except (AttributeError, TypeError, ValueError):
            value = ""
        message = (f"invalid params: {key}: the study needs about {size_text(need[what])} of {what} ({key}{value}; "
                   f"{len(lineages)} lineage(s)), this machine has {size_text(have[what])} available (the "
                   "estimate: tasks/sizing.py)")
        if force:
            warnings.warn(f"--force: {message.removeprefix('invalid params: ')}")
            continue
        raise ParamsError(f"{message}; change it, or run with --force")
