"""The GPU benchmark of issue 17, prepared to run once on a lent GPU: it prints one table (and writes it to --out).

    timeout 480 python3 benchmarks/gpu.py --out $OUT/gpu.md   # on a GPU machine: 6 to 7 minutes on an H100
    python benchmarks/gpu.py --quick                           # the CPU, tiny sizes, seconds (a test runs it)
    python benchmarks/gpu.py --cpu-sizes --threads 1           # docs/performance.md's CPU table (15 minutes here)

On the GPU machines' image (no Prefect, pydantic or torch-fidelity) first run ``bash benchmarks/gpu_wheels.sh``
here and carry ``.whl``: docs/performance.md, "The GPU benchmark: what a GPU session runs", has the one command.

Rows, in order of priority (an internal budget, --budget seconds, skips what no longer fits; each row is written
to --out as soon as it is measured, so a run cut short still leaves its table):

1. **MNIST-sized throughput**: images per second per training epoch of the paper's VAE (5 blocks per side,
   Linear -> BatchNorm -> LeakyReLU, hidden 512, 512, 256, 128, 64, latent 16: ``model.vae``) on 60,000
   synthetic 784-pixel images, MLE and PLE (default ``ple.*``), in variants: eager with PyTorch's default Adam at
   batch 1,024 (the reference's baseline), fused Adam (madloop's default) at batch 4,096, bf16 autocast, and
   ``train.compile``. Per-epoch time is the difference of two fits of ``short`` and ``long`` epochs, so set-up,
   the final batchnorm pass and compilation cancel out. The PLE/MLE ratio is of epoch times.
2. **Lineages per hour**: digits lineages of the default study (MLE, 500 epochs, batch 64, all of a generation:
   fit, sample, score, save), one at a time vs S = 1, 8, 32 seeds in lockstep with stacked fits
   (``tasks.lockstep``). Measured over ``generations`` generations and scaled to the default study's 5. With the
   compiled rows: one at a time vs S = 32, both with ``train.compile``.
3. **The default study's time per generation**: generation 0 of the MLE and PLE lineages on this device and on
   this host's CPU, next to the figure measured on the team's 2-core CPU VM (README, "Speed of PLE").

Targets (issue 17, on one H100): MLE >= 1M images/s per epoch; a PLE epoch <= 1.3x an MLE epoch; batched digits
lineages >= 20x the lineages per hour of one at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
import traceback
import types
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def without_prefect() -> None:
    """Let ``tasks`` import where Prefect is not installed: the GPU machines' image has PyTorch but no Prefect
    (nor MLflow or DVC, which this benchmark does not import). Its steps are plain functions, so Prefect's task
    decorator, used at import time to make the flow's steps, may as well be the identity."""
    try:
        import prefect  # noqa: F401
    except ImportError:
        stub, policies = types.ModuleType("prefect"), types.ModuleType("prefect.cache_policies")
        stub.task = lambda fn, **_: fn
        policies.NO_CACHE = None
        sys.modules.update({"prefect": stub, "prefect.cache_policies": policies})


without_prefect()

import models.estimators as estimators_module  # noqa: E402  (FamilyOptimizer's Adam, swapped by default_adam)
from models.estimators import fit  # noqa: E402
from tasks.generation import PLAIN, resolve_device, run_generation  # noqa: E402
from tasks.lockstep import lockstep_groups, run_lockstep_generation  # noqa: E402
from tasks.params import load_raw, validate  # noqa: E402
from tasks.study import Study  # noqa: E402

# The default study on the team's 2-core x86_64 CPU VM, `python benchmarks/ple_overhead.py --repeats 5` (README,
# "Speed of PLE"): one generation (fit, sample, score, save) of the MLE and PLE lineages, seconds.
TEAM_CPU_GENERATION = {"mle": 3.62, "ple": 6.54}
STUDY_GENERATIONS = 5  # a default-study lineage (params.yaml loop.generations)


@dataclass(frozen=True)
class Sizes:
    rows: int  # MNIST-sized throughput: synthetic images
    hidden: list[int]
    latent: int
    small_batch: int
    large_batch: int
    short: int  # epochs of the short and the long fit (their difference is what is timed)
    long: int
    lineages: tuple[int, ...]  # S of the batched lineages
    generations: int  # generations measured per lineage
    study: list[str] = field(default_factory=list)  # --set overrides of params.yaml for sections 2 and 3
    compile_rows: bool = True
    cpu_baseline: bool = True


FULL = Sizes(rows=60_000, hidden=[512, 512, 256, 128, 64], latent=16, small_batch=1024, large_batch=4096, short=1,
             long=6, lineages=(1, 8, 32), generations=2)
# The CPU table of docs/performance.md: the same model, batches and lineages, a fifth of the images per epoch.
CPU = Sizes(rows=12_288, hidden=[512, 512, 256, 128, 64], latent=16, small_batch=1024, large_batch=4096, short=1,
            long=3, lineages=(1, 8, 32), generations=1, cpu_baseline=False)
QUICK = Sizes(rows=256, hidden=[64, 64, 32, 32, 16], latent=4, small_batch=64, large_batch=128, short=1, long=4,
              lineages=(1, 2), generations=1,
              study=["train.epochs=3", "classifier.epochs=1", "score.samples=80", "score.kid_subset_size=40"],
              compile_rows=False, cpu_baseline=False)


class Table:
    """The one table: rows of (measurement, value, target, notes), rewritten to ``out`` after every row."""

    def __init__(self, out: Path | None, header: list[str]):
        self.out, self.header, self.rows = out, header, []

    def add(self, measurement: str, value: str, target: str = "", notes: str = "") -> None:
        self.rows.append((measurement, value, target, notes))
        print(f"  {measurement}: {value}  {notes}", flush=True)
        if self.out is not None:
            self.out.write_text(self.render())

    def render(self) -> str:
        lines = [*self.header, "", "| measurement | value | target | notes |", "| --- | --- | --- | --- |"]
        lines += [f"| {' | '.join(row)} |" for row in self.rows]
        return "\n".join(lines) + "\n"


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    @property
    def left(self) -> float:
        return self.deadline - time.monotonic()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def default_adam():
    """PyTorch's default (for-each) Adam instead of madloop's fused one: the reference's eager baseline."""
    saved = estimators_module.adam
    estimators_module.adam = lambda params, lr, device, betas=(0.9, 0.999): torch.optim.Adam(params, lr=lr,
                                                                                            betas=betas)
    try:
        yield
    finally:
        estimators_module.adam = saved


def timed_fit(estimator: str, family, x: np.ndarray, device: torch.device, train: dict) -> float:
    sync(device)
    started = time.perf_counter()
    fit(estimator, family, x, seed=0, device=device, train=train)
    sync(device)
    return time.perf_counter() - started


def images_per_second(estimator: str, family, x: np.ndarray, device: torch.device, sizes: Sizes,
                      train: dict) -> float:
    """Images trained per second in an epoch: (long - short) epochs' images over the difference of the fits' times
    (after a warm-up fit, which also compiles when train.compile is set, both of PLE's steps: with and without
    the penalty)."""
    timed_fit(estimator, family, x, device, {**train, "epochs": 2})  # 2: PLE's lazy penalty step is reached
    short = timed_fit(estimator, family, x, device, {**train, "epochs": sizes.short})
    long = timed_fit(estimator, family, x, device, {**train, "epochs": sizes.long})
    if long <= short:
        raise TimingError(f"the {sizes.long}-epoch fit took no longer than the {sizes.short}-epoch one "
                          f"({long:.2f} s, {short:.2f} s): too noisy to time")
    batch = train["batch_size"]
    per_epoch = len(x) - len(x) % batch if len(x) > batch else len(x)
    return (sizes.long - sizes.short) * per_epoch / (long - short)


class TimingError(RuntimeError):
    pass


def paper_vae(sizes: Sizes):
    from models.families.vae import VAEFamily, VAESettings

    family = VAEFamily((784,), VAESettings(hidden=sizes.hidden, latent_dim=sizes.latent))
    return family, np.random.default_rng(0).random((sizes.rows, 784), dtype=np.float32)


def variant_rows(table: Table, budget: Budget, device: torch.device, sizes: Sizes, name: str, train: dict,
                 plain_adam: bool = False, needs: float = 20.0) -> None:
    """MLE and PLE images/s per epoch in one variant, and their ratio; a failure is a row, not the end of the run
    (compiling, for one, may fail on a new software stack)."""
    family, x = paper_vae(sizes)
    speed: dict[str, float | None] = {}
    for estimator in ("mle", "ple"):
        measurement = f"{estimator.upper()} images/s per epoch, {name}"
        speed[estimator] = None
        if budget.left < needs:
            table.add(measurement, "skipped", "", "out of --budget")
            continue
        try:
            with default_adam() if plain_adam else contextlib.nullcontext():
                speed[estimator] = images_per_second(estimator, family, x, device, sizes, train)
        except Exception as err:
            traceback.print_exc()
            table.add(measurement, "failed", "", f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:150]}")
            continue
        table.add(measurement, f"{speed[estimator]:,.0f}", ">= 1M (H100)" if estimator == "mle" else "")
    if speed["mle"] and speed["ple"]:
        table.add(f"PLE/MLE epoch time, {name}", f"{speed['mle'] / speed['ple']:.2f}x", "<= 1.3x (H100)")


def throughput_rows(table: Table, budget: Budget, device: torch.device, sizes: Sizes, root: Path) -> None:
    big = sizes.large_batch
    variant_rows(table, budget, device, sizes, f"eager, default Adam, batch {sizes.small_batch:,}",
                 {"batch_size": sizes.small_batch}, plain_adam=True)
    variant_rows(table, budget, device, sizes, f"fused Adam, batch {big:,}", {"batch_size": big})
    variant_rows(table, budget, device, sizes, f"bf16, fused Adam, batch {big:,}",
                 {"batch_size": big, "precision": "bf16"})


def compiled_rows(table: Table, budget: Budget, device: torch.device, sizes: Sizes, root: Path) -> None:
    """The torch.compile variants come last: compiling costs the most and is the likeliest to fail."""
    big = sizes.large_batch
    variant_rows(table, budget, device, sizes, f"compiled, fused Adam, batch {big:,}",
                 {"batch_size": big, "compile": True}, needs=60.0)
    if budget.left < 90:
        table.add("digits lineages/hour, compiled", "skipped", "", "out of --budget")
    else:
        try:
            lineage_rows(table, budget, device, sizes, root, compiled=True)
        except Exception as err:
            traceback.print_exc()
            table.add("digits lineages/hour, compiled", "failed", "",
                      f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:150]}")
    variant_rows(table, budget, device, sizes, f"compiled + bf16, batch {big:,}",
                 {"batch_size": big, "compile": True, "precision": "bf16"}, needs=60.0)


def open_study(overrides: list[str], device: torch.device, root: Path) -> Study:
    raw = load_raw(REPO / "params.yaml", overrides)
    raw.pop("studies", None)  # the paper studies' sizes: registered by flows/, which needs Prefect, and unused here
    return Study.open(validate({**raw, "device": str(device)}), root, check=False)


def run_alone(lineage, dataset, generations: int) -> tuple[float, float]:
    """A lineage's generations with the ordinary estimator: (seconds, of which fitting)."""
    started, fitting = time.perf_counter(), 0.0
    for k in range(generations):
        generation = run_generation(lineage, k, dataset, PLAIN)
        fitting += generation.model.info["fit_seconds"]
        dataset = generation.next_dataset
    return time.perf_counter() - started, fitting


def run_batched(lineages, generations: int) -> tuple[float, float]:
    """The lineages' generations in lockstep (each from its own dataset 0), fits stacked: (seconds, of which
    fitting)."""
    assert len(lockstep_groups(lineages)) == 1, "the seeds of one recipe must share a stacked fit"
    started, fitting, datasets = time.perf_counter(), 0.0, [lin.real.train for lin in lineages]
    for k in range(generations):
        made = run_lockstep_generation(lineages, k, datasets)
        fitting += made[0].model.info["stacked_seconds"]
        datasets = [g.next_dataset for g in made]
    return time.perf_counter() - started, fitting


def lineage_rows(table: Table, budget: Budget, device: torch.device, sizes: Sizes, root: Path,
                 compiled: bool = False) -> None:
    """Lineages per hour of the default study's lineage (MLE), one at a time and S seeds in lockstep; with
    ``compiled``, both with ``train.compile`` (the largest S only: compiling the stacked step removes vmap's
    per-operation host overhead, which a launch-bound GPU step pays in full)."""
    counts = (max(sizes.lineages),) if compiled else sizes.lineages
    label = ", compiled" if compiled else ""
    seeds = ", ".join(str(s) for s in range(max(counts)))
    study = open_study([*sizes.study, f"loop.generations={sizes.generations}", f"train.compile={str(compiled).lower()}",
                        f"lineages=[{{name: mle, seeds: [{seeds}]}}]"], device, root)
    lineages = [study.lineage(spec.name) for spec in study.lineages]
    per_hour = lambda count, seconds: count * 3600 / (seconds * STUDY_GENERATIONS / sizes.generations)  # noqa: E731

    run_alone(lineages[0], lineages[0].real.train, 1)  # warm-up (and compilation)
    seconds, fitting = run_alone(lineages[0], lineages[0].real.train, sizes.generations)
    alone, alone_fit = per_hour(1, seconds), per_hour(1, fitting)
    table.add(f"digits lineages/hour, one at a time{label}", f"{alone:,.0f}", "",
              f"fits alone: {alone_fit:,.0f}/h; {sizes.generations} generations timed, scaled to 5")
    for count in counts:
        name = f"digits lineages/hour, S = {count} batched{label}"
        if budget.left < (60 if compiled else 30):
            table.add(name, "skipped", "", "out of --budget")
            continue
        if compiled or count == counts[0]:
            run_batched(lineages[:count], 1)  # warm-up (a compiled graph is specialized to S)
        seconds, fitting = run_batched(lineages[:count], sizes.generations)
        batched, batched_fit = per_hour(count, seconds), per_hour(count, fitting)
        table.add(name, f"{batched:,.0f}", ">= 20x one at a time (H100)",
                  f"{batched / alone:.1f}x one at a time; fits alone: {batched_fit:,.0f}/h "
                  f"({batched_fit / alone_fit:.1f}x)")


def study_rows(table: Table, budget: Budget, device: torch.device, sizes: Sizes, root: Path) -> None:
    """Generation 0 of the default study's MLE and PLE lineages on this device (and this host's CPU)."""
    devices = [device] + ([torch.device("cpu")] if sizes.cpu_baseline and device.type != "cpu" else [])
    for where in devices:
        if budget.left < 40:
            table.add(f"default study, one generation on {where}", "skipped", "", "out of --budget")
            continue
        study = open_study([*sizes.study, "lineages=[mle, ple]"], where, root)
        for estimator in ("mle", "ple"):
            lineage = study.lineage(estimator)
            started = time.perf_counter()
            generation = run_generation(lineage, 0, lineage.real.train, PLAIN)
            seconds = time.perf_counter() - started
            table.add(f"default study, {estimator.upper()} generation on {where}", f"{seconds:.2f} s", "",
                      f"fit {generation.model.info['fit_seconds']:.2f} s; team's 2-core CPU VM: "
                      f"{TEAM_CPU_GENERATION[estimator]} s (README)")


def header(device: torch.device, command: list[str]) -> list[str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    load1, load5, _ = os.getloadavg()
    return [f"# python benchmarks/gpu.py {' '.join(command)}".rstrip(),
            "",
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; device {device} ({name}); torch {torch.__version__}; "
            f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; load average {load1:.2f} / "
            f"{load5:.2f} (1 / 5 min) at the start; fp32 matmuls as madloop runs them (no tf32)."]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the CPU (seconds)")
    parser.add_argument("--cpu-sizes", action="store_true",
                        help="the CPU table's sizes: 12,288 images per epoch, 1 generation per lineage (20+ minutes)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N")
    parser.add_argument("--out", type=Path, help="also write the table here (rewritten after every row)")
    parser.add_argument("--budget", type=float, default=390.0, help="seconds; rows that no longer fit are skipped")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    sizes = QUICK if args.quick else CPU if args.cpu_sizes else FULL
    device = resolve_device(args.device)
    budget = Budget(args.budget)
    table = Table(args.out, header(device, sys.argv[1:] if argv is None else argv))
    print("\n".join(table.header), flush=True)
    started = time.perf_counter()
    compiling = sizes.compile_rows and not args.no_compile
    sections = [throughput_rows, lineage_rows, study_rows] + ([compiled_rows] if compiling else [])
    with tempfile.TemporaryDirectory() as tmp:  # one project for every study: the classifier is trained once
        for section in sections:
            section_started = time.perf_counter()
            section(table, budget, device, sizes, Path(tmp))
            print(f"({section.__name__}: {time.perf_counter() - section_started:.0f} s)", flush=True)
    if not compiling:
        table.add("compiled variants", "not run", "",
                  "--quick: compiling takes a minute on a CPU" if args.quick else "--no-compile")
    table.header.append(f"Wall time {time.perf_counter() - started:.0f} s.")
    if args.out is not None:
        args.out.write_text(table.render())
    print()
    print(table.render())
    return table.render()


if __name__ == "__main__":
    main()
