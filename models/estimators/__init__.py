"""Estimators turn (family, dataset, settings) into a fitted model.

An estimator is registered by name (a lineage's ``estimator`` in params.yaml) with the params sections it reads::

    @ESTIMATORS.register("mle", settings={"train": TrainSettings})
    def fit_mle(family, x, *, train: TrainSettings, seed, device, sample_weight=None) -> FittedTorchModel: ...

It receives exactly those settings (keyword = the section's last name), validated, with any values the entry
``fixed`` applied (the lambda = 0 control is ``ple`` with ``fixed={"ple.lam": 0.0}``). :func:`fit` is the one way
to call an estimator. Each module of this package holds one estimator (or a pair that share code) and is found
on first lookup.
"""

from __future__ import annotations

import inspect
import math
import time
from contextlib import contextmanager
from typing import Any, Callable, Mapping

import numpy as np
import torch
from pydantic import BaseModel, Field, PositiveFloat, PositiveInt

from models.families import FittedTorchModel, TorchFamily, TrainingRecipe
from models.hypernet import recalibrate_batchnorm
from models.registry import Registry, Settings

Estimator = Callable[..., FittedTorchModel]
Progress = Callable[[int, int], None]  # (epochs done, epochs in all), called once per epoch by estimators that train
ESTIMATORS: Registry[Estimator] = Registry("estimator", package="models.estimators")


class TrainSettings(Settings):
    """Gradient training of each generation's model (every estimator that trains by minibatches reads these)."""

    epochs: PositiveInt = 500
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 1e-3
    precision: str = Field("fp32", pattern=r"^(fp32|bf16)$")  # bf16: autocast forward passes (weights stay fp32)
    # torch.compile of the training step's loss, meant for GPUs (benchmarks/gpu.py measures it; on the team's CPU
    # it did not pay, docs/performance.md). In the resume hash: the compiled step draws its random numbers (the
    # VAE's reparameterization noise) differently, so the weights differ (up to 0.2 after 3 epochs, tested).
    compile: bool = False
    # After training, recompute every batchnorm's statistics exactly over the training set under the final
    # weights. Every estimator does the same, so no estimator is favoured by its batchnorm statistics.
    recalibrate_batchnorm: bool = True


def section_values(cls: type[Settings], given: BaseModel | Mapping[str, Any] | None) -> dict[str, Any]:
    """The fields of ``cls`` found in ``given`` (a settings object, possibly a composed section, or a dict)."""
    if given is None:
        return {}
    values = given.model_dump() if isinstance(given, BaseModel) else dict(given)
    return {k: v for k, v in values.items() if k in cls.model_fields or not isinstance(given, BaseModel)}


def fit(name: str, family: TorchFamily, x: np.ndarray, *, seed: int, device: torch.device | str = "cpu",
        sample_weight: np.ndarray | None = None, progress: Progress | None = None, groups: np.ndarray | None = None,
        **sections: BaseModel | Mapping[str, Any]) -> FittedTorchModel:
    """Fit ``family`` to x with the named estimator. ``sections`` hold its settings by section name (``train``,
    ``ple``, ...), as params sections or dicts; what is not given takes the settings class's default.
    ``progress(done, total)`` is called after each epoch by estimators that take it (closed forms do not).
    ``groups``: a class label per row (-1 unknown), for estimators that report per-class diagnostics (the
    hypernetworks' input dependence); it never changes the fit."""
    entry = ESTIMATORS.entry(name)
    kwargs = estimator_settings(name, sections)
    accepts = inspect.signature(entry.obj).parameters
    if progress is not None and "progress" in accepts:
        kwargs["progress"] = progress
    if groups is not None and "groups" in accepts:
        kwargs["groups"] = groups
    return entry.obj(family, x, seed=seed, device=torch.device(device), sample_weight=sample_weight, **kwargs)


def estimator_settings(name: str, sections: dict[str, BaseModel | Mapping[str, Any]]) -> dict[str, Settings]:
    """The named estimator's settings, validated, by keyword (``train``, ``ple``), with its ``fixed`` values."""
    entry = ESTIMATORS.entry(name)
    sections = dict(sections)
    kwargs = {}
    for path, cls in entry.settings.items():
        key = path.rsplit(".", 1)[-1]
        values = section_values(cls, sections.pop(key, None))
        values.update({k.rsplit(".", 1)[1]: v for k, v in entry.fixed.items() if k.rsplit(".", 1)[0] == path})
        kwargs[key] = cls.model_validate(values)
    if sections:
        raise TypeError(f"estimator {name!r} reads no settings {sorted(sections)} (it reads {sorted(kwargs)})")
    return kwargs


def minibatches(n: int, batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu"):
    """Shuffled index batches covering 0..n-1 once; the last short batch is dropped unless it is the only one.

    BatchNorm needs more than one row per batch, and a ragged last batch of 1 would crash it. The order is drawn
    on the CPU generator (the same batches on every device) and copied to ``device`` once per epoch: a copy per
    step would make the host wait for the GPU at every step.
    """
    order = torch.randperm(n, generator=generator).to(device)
    stop = n - n % batch_size if n > batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


def adam(parameters, lr: float, device: torch.device, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
    """Adam with the fused kernel (one pass over all parameters; 6x faster than the default step on CPU here)."""
    return torch.optim.Adam(parameters, lr=lr, betas=betas, fused=device.type in ("cpu", "cuda"))


def batches_per_epoch(n: int, batch_size: int) -> int:
    """How many batches :func:`minibatches` gives for n rows."""
    return n // batch_size if n > batch_size else 1


def hold_out(recipe: TrainingRecipe, data: torch.Tensor, weight: torch.Tensor | None, seed: int):
    """(rows to fit, their weights, rows held out, their weights): ``recipe.holdout`` of the rows (rounded, at least
    one, leaving at least two to fit), drawn with a stream of the fit's seed of their own, held out for early
    stopping; none without it (the held-out parts are then None). The rows to fit keep their order."""
    if recipe.holdout <= 0:
        return data, weight, None, None
    n = len(data)
    held = min(max(1, round(recipe.holdout * n)), n - 2)
    if held < 1:
        raise ValueError(f"early stopping: {n} training rows are too few to hold out any (holdout {recipe.holdout})")
    stream = int(np.random.SeedSequence([seed, 1]).generate_state(1)[0] >> 1)  # not the minibatch order's stream
    order = torch.randperm(n, generator=torch.Generator().manual_seed(stream))
    fit_rows, held_rows = order[held:].sort().values.to(data.device), order[:held].to(data.device)
    return (data[fit_rows], None if weight is None else weight[fit_rows],
            data[held_rows], None if weight is None else weight[held_rows])


@torch.no_grad()
def held_out_nll(family: TorchFamily, module: torch.nn.Module, weights, held: torch.Tensor,
                 held_weight: torch.Tensor | None, seed: int = 0) -> float:
    """Mean NLL per row of held-out rows (weighted like training), the module in eval mode, the family's own
    randomness (a flow's dequantization noise) drawn from ``seed`` and the global streams left as they were: every
    check of one fit sees the same draws, and training goes on as if none had run."""
    was_training = module.training
    module.eval()
    devices = [held.device.index or 0] if held.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return float(weighted_mean(family.nll(module, held, weights), held_weight))
    finally:
        module.train(was_training)


class FamilyOptimizer:
    """Adam (:func:`adam`) over ``parameters`` as the family's :class:`~models.families.TrainingRecipe` asks: its
    learning rate (``lr`` when the recipe sets none) and betas, its learning-rate decay over the fit's ``steps``,
    an exponential moving average of the weights, early stopping on held-out rows. An estimator uses it as its
    optimizer (``zero_grad``, ``step``), asks :meth:`stop` after every epoch and calls :meth:`finish` when
    training ends: the parameters then hold the weights the fit returns.

    The average starts at the initial weights with a warm-up of its decay, min(ema_decay, (1 + k) / (10 + k)) at
    update k (as TensorFlow's ExponentialMovingAverage with num_updates): at 1,000 steps and decay 0.999 a plain
    average would still hold 37% of the random initialization. Early stopping checks the held-out NLL of the
    weights the fit would return at that point (the average, when there is one) and restores the best ones."""

    def __init__(self, recipe: TrainingRecipe, parameters, lr: float, device: torch.device, steps: int):
        self.recipe, self.parameters = recipe, list(parameters)
        self.optimizer = adam(self.parameters, recipe.lr or lr, device, tuple(recipe.betas))
        self.schedule = None
        if recipe.lr_decay == "cosine":
            self.schedule = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda k: 0.5 * (1.0 + math.cos(math.pi * min(k, steps) / max(steps, 1))))
        self.average = None if recipe.ema_decay is None else [p.detach().clone() for p in self.parameters]
        self.updates, self.epochs = 0, 0
        self.best: list[torch.Tensor] | None = None
        self.best_nll, self.best_epoch = math.inf, 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.optimizer.step()
        if self.schedule is not None:
            self.schedule.step()
        if self.average is not None:
            self.updates += 1
            decay = min(self.recipe.ema_decay, (1 + self.updates) / (10 + self.updates))
            torch.optim.swa_utils.get_ema_multi_avg_fn(decay)(self.average, self.parameters, None)

    @contextmanager
    def fitted_weights(self):
        """The parameters hold the weights the fit would return now (the average, if any) inside the block."""
        if self.average is None:
            yield
            return
        saved = [p.detach().clone() for p in self.parameters]
        copy_into(self.parameters, self.average)
        try:
            yield
        finally:
            copy_into(self.parameters, saved)

    def stop(self, held_out: Callable[[], float]) -> bool:
        """After each epoch: every ``check_every`` epochs, ``held_out()`` (the held-out NLL) of the weights the fit
        would return now; keep them if they are the best yet; True once ``patience`` epochs passed without a better
        one. Always False without early stopping."""
        self.epochs += 1
        r = self.recipe
        if r.holdout <= 0 or self.epochs % r.check_every:
            return False
        with self.fitted_weights():
            nll = held_out()
            if nll < self.best_nll:
                self.best_nll, self.best_epoch = nll, self.epochs
                self.best = [p.detach().clone() for p in self.parameters]
        return self.epochs - self.best_epoch >= r.patience

    @torch.no_grad()
    def finish(self) -> dict[str, float]:
        """Put the fitted weights into the parameters (the best held-out check's, else the average, else the last
        step's) and return what the fit's info should say about them."""
        chosen = self.best if self.best is not None else self.average
        if chosen is not None:
            copy_into(self.parameters, chosen)
        if self.recipe.holdout <= 0:
            return {}
        return {"held_out_nll": self.best_nll, "best_epoch": float(self.best_epoch), "epochs_run": float(self.epochs)}


@torch.no_grad()
def copy_into(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    for target, source in zip(targets, sources):
        target.copy_(source)


def compiled(fn, enabled: bool):
    """``torch.compile(fn)`` when ``train.compile`` asks for it; every step has the same batch shape (the ragged
    last batch is dropped), so one static graph serves the whole fit."""
    return torch.compile(fn, dynamic=False) if enabled else fn


def mixed_precision(device: torch.device, precision: str):
    """bf16 autocast of forward passes and losses (weights, gradients and Adam state stay fp32; bf16 needs no
    loss scaling). ``fp32``: a no-op context."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r} (fp32 or bf16)")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def weighted_mean(per_sample: torch.Tensor, sample_weight: torch.Tensor | None) -> torch.Tensor:
    """Mean loss; with weights, a weighted mean normalized per batch (weights sum to 1 in the batch)."""
    if sample_weight is None:
        return per_sample.mean()
    return (per_sample * sample_weight).sum() / sample_weight.sum()


def finish_batchnorm(family: TorchFamily, module: torch.nn.Module, weights, data: torch.Tensor,
                     train: TrainSettings) -> None:
    """Batchnorm statistics after training, the same rule for every estimator (``train.recalibrate_batchnorm``):
    exact averages over the training set under the final weights, or the running averages training left."""
    if train.recalibrate_batchnorm:
        recalibrate_batchnorm(module, weights, data, lambda m, w, batch: family.nll(m, batch, w))


def timed(fit_fn, x, **kwargs) -> FittedTorchModel:
    started = time.perf_counter()
    model = fit_fn(x, **kwargs)
    model.info.setdefault("fit_seconds", time.perf_counter() - started)
    return model
