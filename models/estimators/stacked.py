"""Many lineages' fits as one batched computation: S datasets, one model each (S seeds of one recipe).

Not a registry entry (it fits several lineages at once): :func:`fit_stacked` takes the name of an estimator that
trains by minibatches (``mle`` on a family without a closed form, ``ple``, ``hyper_nopenalty``), S datasets of
one shape and S seeds, and returns S :class:`FittedTorchModel`, each as that estimator's own fit would return it.

How. The S models' weights (and batchnorm buffers) are stacked along a leading axis
(``torch.func.stack_module_state``) and one step evaluates every member's loss with ``torch.func.vmap`` over
``functional_call`` of the very loss the single-run estimator uses (the family's ``nll``; PLE's
``objective``): one kernel per layer for all S members instead of S. For models this small a GPU step is
launch-bound, so S members cost about what one does; on the CPU it saves S - 1 passes of Python and dispatch
overhead (docs/performance.md has both measured). vmap was chosen over hand-grouped weights (``bmm`` per layer):
it serves any family through the same ``nll`` seam, and it measured as fast or faster on the CPU at S = 8 and 32.

What each member keeps of its own single run, exactly: its initialization (``torch.manual_seed(seed)`` before it
is built), its minibatch order (a CPU generator per member), its Adam (Adam is elementwise, so one Adam over the
stacked weights is S Adams), its batchnorm statistics (stacked buffers, updated in place under vmap; then
recomputed per member, ``train.recalibrate_batchnorm``). What it shares: the streams of the noise (the VAE's
reparameterization noise, PLE's synthetic sets and sampled entries) are the first member's streams, drawn for
all members at once (``randomness="different"``: independent draws per member). Every member's noise is
therefore i.i.d. standard normal (uniform entries) as in its own run: each fit is identical in distribution to
its single run, and with S = 1 it *is* the single run, to float tolerance. ``randomness="same"`` gives every
member the first member's draws (tests use it: S copies of one seed then each reproduce the single run).
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from models.estimators import (ESTIMATORS, TrainSettings, adam, compiled, estimator_settings, mixed_precision,
                               weighted_mean)
from models.estimators.mle import fit_mle
from models.estimators.ple import (PLESettings, diagnostics, final_weights, fit_ple, objective, penalty_entries,
                                   summary)
from models.families import FittedTorchModel, TorchFamily
from models.hypernet import HyperNetwork

Tensors = dict[str, torch.Tensor]


# Hooks by which a family trains otherwise than by its NLL alone (a GAN's discriminator step, a subset of weights):
# a family that overrides one is fitted alone, since the stacked step runs the NLL only.
OWN_TRAINING_HOOKS = ("auxiliary_step", "trained_parameters")


def stackable(name: str, family: TorchFamily) -> bool:
    """Whether :func:`fit_stacked` can fit ``family`` with the named estimator: it trains the family by minibatches
    of its NLL with plain Adam (no closed form, no training hooks of the family's own, the default training recipe:
    no learning-rate decay, weight average or early stopping)."""
    obj = ESTIMATORS.entry(name).obj
    own_hooks = any(getattr(type(family), hook, None) is not getattr(TorchFamily, hook, None)
                    for hook in OWN_TRAINING_HOOKS)
    minibatches = obj is fit_ple or (obj is fit_mle and not hasattr(family, "fit_mle"))
    return not own_hooks and family.training_recipe().plain and minibatches


def fit_stacked(name: str, family: TorchFamily, xs: Sequence[np.ndarray], *, seeds: Sequence[int],
                device: torch.device | str = "cpu", sample_weights: Sequence[np.ndarray] | None = None,
                randomness: str = "different", groups: Sequence[np.ndarray] | None = None,
                **sections: BaseModel | Mapping[str, Any]) -> list[FittedTorchModel]:
    """Fit member s on ``xs[s]`` with seed ``seeds[s]``, all at once; settings (and ``groups``, member s's class
    labels for the hypernetworks' diagnostics) as for ``models.estimators.fit``."""
    if not stackable(name, family):
        raise ValueError(f"estimator {name!r} cannot fit the {family.name} family stacked (it does not train it by "
                         f"minibatches); fit each lineage alone")
    if randomness not in ("different", "same"):
        raise ValueError(f"stacked fit: randomness {randomness!r} is not 'different' or 'same'")
    if len(xs) != len(seeds) or not xs:
        raise ValueError(f"stacked fit: {len(xs)} datasets for {len(seeds)} seeds (one each, at least one)")
    shapes = sorted({tuple(np.shape(x)) for x in xs})
    if len(shapes) != 1:
        raise ValueError(f"stacked fit: every member's data must have one shape, got {shapes}")
    if sample_weights is not None and len(sample_weights) != len(xs):
        raise ValueError(f"stacked fit: {len(sample_weights)} weight vectors for {len(xs)} datasets")
    device = torch.device(device)
    data = torch.as_tensor(np.stack(xs), dtype=torch.float32, device=device)
    weight = None if sample_weights is None else torch.as_tensor(np.stack(sample_weights), dtype=torch.float32,
                                                                 device=device)
    kwargs = estimator_settings(name, sections)
    if ESTIMATORS.entry(name).obj is fit_ple:
        return stacked_ple(family, data, weight, list(seeds), device, randomness, groups=groups, **kwargs)
    return stacked_mle(family, data, weight, list(seeds), device, randomness, **kwargs)


# --- shared pieces -----------------------------------------------------------------------------------------------


def build_members(seeds: list[int], build) -> list:
    """``build()`` for each seed after ``torch.manual_seed(seed)``, as each single run initializes. Built last to
    first, so the global stream (the VAE's reparameterization noise) goes on from the first member's state."""
    members = []
    for seed in reversed(seeds):
        torch.manual_seed(seed)
        members.append(build())
    return members[::-1]


def stacked_minibatches(n: int, batch_size: int, generators: list[torch.Generator], device: torch.device):
    """[S, B] index batches: row s is exactly what ``minibatches`` gives member s's generator, copied to the
    device once per epoch."""
    order = torch.stack([torch.randperm(n, generator=g) for g in generators]).to(device)
    stop = n - n % batch_size if n > batch_size else n
    for start in range(0, stop, batch_size):
        yield order[:, start:start + batch_size]


def stack(modules: list[nn.Module], prefix: str, parameters: bool = True) -> Tensors:
    """The modules' parameters (leaves that train; unless ``parameters`` is false) and buffers, stacked along a new
    leading member axis, named as in the wrapper that holds the module at ``prefix``."""
    params, buffers = stack_module_state(modules)
    return {f"{prefix}.{k}": v for k, v in ({**params, **buffers} if parameters else buffers).items()}


@torch.no_grad()
def unstack(module: nn.Module, stacked: Tensors, prefix: str, s: int) -> None:
    """Copy member s's slice of the stacked tensors back into its own module."""
    own = dict(module.named_parameters()) | dict(module.named_buffers())
    for name, value in stacked.items():
        if name.startswith(prefix + "."):
            own[name[len(prefix) + 1:]].copy_(value[s])


def gather(tensor: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    """Member s's rows idx[s] of tensor[s]: [S, n, ...] -> [S, B, ...]."""
    if tensor is None:
        return None
    return tensor[torch.arange(len(idx), device=idx.device)[:, None], idx]


def vmapped(wrapper: nn.Module, randomness: str, *batched: bool):
    """``f(tensors, *args)``: ``functional_call(wrapper, tensors, args)`` for every member at once (vmap over the
    leading axis of ``tensors``, and of each argument whose ``batched`` flag is set)."""
    def member(tensors: Tensors, *args):
        return functional_call(wrapper, tensors, args, tie_weights=False)  # no tied weights: skip the search
    return vmap(member, in_dims=(0, *(0 if b else None for b in batched)), randomness=randomness)


@torch.no_grad()
def recalibrate(base: nn.Module, tensors: Tensors, data: torch.Tensor, forward, train: TrainSettings,
                batch_size: int = 256) -> None:
    """``models.hypernet.recalibrate_batchnorm`` for every member at once (``train.recalibrate_batchnorm``): member
    s's statistics become exact averages over data[s], from the same batches in the same order as in its single
    run. ``forward(batch)`` runs every member on its [S, B] batch. Momentum 1/k on the k-th batch is the
    cumulative average that momentum None gives (which reads the count with ``float()``, impossible under vmap)."""
    norms = [m for m in base.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not train.recalibrate_batchnorm or not norms:
        return
    for name, value in tensors.items():
        if name.endswith((".running_mean", ".num_batches_tracked")):
            value.zero_()
        elif name.endswith(".running_var"):
            value.fill_(1.0)
    saved, was_training = [m.momentum for m in norms], base.training
    base.train()
    batches = [start for start in range(0, data.shape[1], batch_size) if len(data[0, start:start + batch_size]) > 1]
    for k, start in enumerate(batches, 1):
        for m in norms:
            m.momentum = 1.0 / float(k)
        forward(data[:, start:start + batch_size])
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    base.train(was_training)


def timing(models: list[FittedTorchModel], started: float) -> list[FittedTorchModel]:
    """Each member's fit_seconds is its share of the stacked fit; the whole is kept too."""
    seconds = time.perf_counter() - started
    for model in models:
        model.info.update(fit_seconds=seconds / len(models), stacked_members=len(models), stacked_seconds=seconds)
    return models


# --- MLE -----------------------------------------------------------------------------------------------------------


class MemberLoss(nn.Module):
    """One member's loss on its batch: what ``fit_mle`` minimizes."""

    def __init__(self, family: TorchFamily, module: nn.Module):
        super().__init__()
        self.family, self.module = family, module

    def forward(self, batch: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        return weighted_mean(self.family.nll(self.module, batch), weight)


def stacked_mle(family: TorchFamily, data: torch.Tensor, weight: torch.Tensor | None, seeds: list[int],
                device: torch.device, randomness: str, *, train: TrainSettings) -> list[FittedTorchModel]:
    modules = build_members(seeds, lambda: family.build().to(device))
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    tensors = stack(modules, "module")
    optimizer = adam([t for t in tensors.values() if t.requires_grad], train.lr, device)
    wrapper = MemberLoss(family, modules[0])  # the template every member's tensors run through
    step = compiled(vmapped(wrapper, randomness, True, weight is not None), train.compile)

    started, losses = time.perf_counter(), torch.full((len(seeds),), float("nan"))
    wrapper.train()
    for _ in range(train.epochs):
        for idx in stacked_minibatches(data.shape[1], train.batch_size, generators, device):
            with mixed_precision(device, train.precision):
                losses = step(tensors, gather(data, idx), gather(weight, idx))
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()  # member s's weights get member s's gradient alone
            optimizer.step()
    final_losses = losses.detach().float().cpu().tolist()
    forward = vmapped(wrapper, randomness, True, False)
    recalibrate(wrapper, tensors, data, lambda batch: forward(tensors, batch, None), train)
    models = []
    for s, module in enumerate(modules):
        unstack(module, tensors, "module", s)
        module.eval()
        models.append(FittedTorchModel(family, module, info={"train_loss": final_losses[s]}))
    return timing(models, started)


# --- PLE and the lambda = 0 control ----------------------------------------------------------------------------


class MemberObjective(nn.Module):
    """One member's PLE objective on its batch (``ple.objective``): (loss, nll) or (loss, nll, penalty)."""

    def __init__(self, family: TorchFamily, target: nn.Module, hyper: HyperNetwork, ple: PLESettings, dims: float,
                 generator: torch.Generator, penalize: bool):
        super().__init__()
        self.family, self.target, self.hyper = family, target, hyper
        self.ple, self.dims, self.generator, self.penalize = ple, dims, generator, penalize

    def forward(self, batch: torch.Tensor, weight: torch.Tensor | None, entries: torch.Tensor | None):
        loss, nll, value = objective(self.family, self.target, self.hyper, batch, weight, self.ple, self.dims,
                                     self.generator, entries, self.penalize)
        return (loss, nll) if value is None else (loss, nll, value)


class MemberNLL(nn.Module):
    """One member's target run with given weights (batchnorm recalibration under the final H)."""

    def __init__(self, family: TorchFamily, target: nn.Module):
        super().__init__()
        self.family, self.target = family, target

    def forward(self, batch: torch.Tensor, weights: Tensors) -> torch.Tensor:
        return self.family.nll(self.target, batch, weights)


def stacked_ple(family: TorchFamily, data: torch.Tensor, weight: torch.Tensor | None, seeds: list[int],
                device: torch.device, randomness: str, *, train: TrainSettings, ple: PLESettings,
                groups: Sequence[np.ndarray] | None = None) -> list[FittedTorchModel]:
    members = len(seeds)
    feature_dim = family.hyper_features(data[0, :2]).flatten(1).shape[1]

    def build() -> tuple[nn.Module, HyperNetwork]:
        target = family.build().to(device)
        return target, HyperNetwork(target, feature_dim, list(ple.hidden), ple.rank).to(device)

    targets, hypers = zip(*build_members(seeds, build))
    order_generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    sample_generator = torch.Generator(device=device).manual_seed(seeds[0] + 1)  # fit_ple's streams, of member 0
    entry_generator = torch.Generator(device=device).manual_seed(seeds[0] + 2)
    hyper_tensors, buffers = stack(list(hypers), "hyper"), stack(list(targets), "target", parameters=False)
    tensors = {**hyper_tensors, **buffers}  # the targets' own weights are never used: H emits them
    optimizer = adam(list(hyper_tensors.values()), train.lr, device)
    dims = float(np.prod(data.shape[2:]))
    wrappers = {penalize: MemberObjective(family, targets[0], hypers[0], ple, dims, sample_generator, penalize)
                for penalize in (False, True)}
    steps_of: dict[tuple[bool, bool], Any] = {}  # (penalize, entries drawn) -> the vmapped step
    own_entries = members if randomness == "different" else None  # "same": every member gets member 0's entries

    started = time.perf_counter()
    history = [{"nll": [], "penalty": []} for _ in seeds]
    targets[0].train()
    step = 0
    for _ in range(train.epochs):
        nll_sum, penalty_sum = torch.zeros(members, device=device), torch.zeros(members, device=device)
        steps, penalty_steps = 0, 0
        for idx in stacked_minibatches(data.shape[1], train.batch_size, order_generators, device):
            step += 1
            penalize = ple.lam > 0 and step % ple.penalty_every == 0
            entries = penalty_entries(ple, hypers[0], entry_generator, device, own_entries) if penalize else None
            key = (penalize, entries is not None)
            if key not in steps_of:
                steps_of[key] = compiled(vmapped(wrappers[penalize], randomness, True, weight is not None,
                                                 entries is not None and own_entries is not None), train.compile)
            with mixed_precision(device, train.precision):
                out = steps_of[key](tensors, gather(data, idx), gather(weight, idx), entries)
            optimizer.zero_grad(set_to_none=True)
            out[0].sum().backward()  # member s's hypernetwork gets member s's gradient alone
            optimizer.step()
            if penalize:
                penalty_sum, penalty_steps = penalty_sum + out[2].detach().float(), penalty_steps + 1
            nll_sum, steps = nll_sum + out[1].detach().float(), steps + 1
        nll_sums, penalty_sums = torch.stack([nll_sum, penalty_sum]).cpu().tolist()  # one read per epoch
        for s in range(members):
            history[s]["nll"].append(nll_sums[s] / max(steps, 1))
            history[s]["penalty"].append(penalty_sums[s] / penalty_steps if penalty_steps else float("nan"))

    finals = []
    for s, hyper in enumerate(hypers):
        unstack(hyper, hyper_tensors, "hyper", s)
        finals.append(final_weights(family, hyper, data[s]))
    stacked_finals = {name: torch.stack([f[name] for f in finals]) for name in finals[0]}
    forward = vmapped(MemberNLL(family, targets[0]), randomness, True, True)
    recalibrate(targets[0], buffers, data, lambda batch: forward(buffers, batch, stacked_finals), train)
    models = []
    for s, (target, hyper) in enumerate(zip(targets, hypers)):
        unstack(target, buffers, "target", s)
        target.eval()
        info = summary(ple, history[s], started, hyper)
        info.update(diagnostics(family, target, hyper, data[s], ple, train.batch_size, seeds[s],
                                None if groups is None else groups[s]))  # each member's, as its single run's
        models.append(FittedTorchModel(family, target, finals[s], info=info, hyper=hyper))
    return timing(models, started)
