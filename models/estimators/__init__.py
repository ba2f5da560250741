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
import time
from typing import Any, Callable, Mapping

import numpy as np
import torch
from pydantic import BaseModel, Field, PositiveFloat, PositiveInt

from models.families import FittedTorchModel, TorchFamily
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


def adam(parameters, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam with the fused kernel (one pass over all parameters; 6x faster than the default step on CPU here)."""
    return torch.optim.Adam(parameters, lr=lr, fused=device.type in ("cpu", "cuda"))


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
