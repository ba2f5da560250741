"""Eq. 5's penalty, in one place: every PLE path (the per-lineage estimator ``models/estimators/ple.py``, the stacked
one that vmaps it, and the 1-D batched hypernetworks of Fig. 3 and Fig. 4 in ``models/batched.py``) builds its
objective from :func:`penalty` and :func:`penalized`.

The paper (Eq. 3-5)::

    H* = argmin_H  -log P(X; H(X))  +  lambda/m sum_j |H(Y_j) - H(X)|,      Y_j ~ P(.; H(X))

The printed text leaves two things open, so both are settings here, each with the paper's literal reading one
value away (docs/ple.md has the conversion table per family and dataset):

* **The norm |.|** over the P emitted outputs: ``reduction="sum"`` is the L1 norm (the literal reading of a
  vector's |.|), ``"mean"`` the L1 norm divided by P (a per-weight quantity, so lambda means the same for a
  6-output GMM and a 1.7M-weight VAE). When only k of the P entries are evaluated (a random subset, an unbiased
  estimate), ``"sum"`` is estimated as P times their mean.
* **Where the sum over j sits**: ``form="per_set"`` is Eq. 5 as printed, (1/m) sum_j |H(Y_j) - H(X)|; it also
  penalizes the spread of H(Y_j) around their mean. ``form="mean"`` is |(1/m) sum_j H(Y_j) - H(X)|, the
  Lagrangian relaxation of Eq. 4's constraint E[H(Y)] - H(X) = 0, the one the closed forms of App. E-F solve.
  With m = 1 the two are the same.

The NLL's units (per data dimension, or the whole set's) are the caller's (``ple.nll_reduction``), since only it
knows the family's NLL; the conversion is ``lambda_code = lambda_literal * P / (B * D)`` (B points in the set, D
data dimensions per point; docs/ple.md).
"""

from __future__ import annotations

import torch

FORMS = ("per_set", "mean")
REDUCTIONS = ("mean", "sum")


def penalty(differences: torch.Tensor, form: str = "per_set", reduction: str = "mean",
            outputs: int | None = None) -> torch.Tensor:
    """Eq. 5's penalty from ``differences`` = H(Y_j) - H(X), shape [..., m, k] (m synthetic sets, k of H's outputs):
    one value per leading index, shape [...].

    ``outputs``: how many outputs H has in all (P) when ``differences`` holds a random subset of k of them; the
    ``"sum"`` reduction is then P times the subset's mean (unbiased). None: the k given are all of them."""
    if form == "per_set":
        distance = differences.abs()  # [..., m, k]: each set's distance, averaged over j below
    elif form == "mean":
        distance = differences.mean(dim=-2, keepdim=True).abs()  # [..., 1, k]: the distance of the sets' mean
    else:
        raise ValueError(f"unknown penalty form {form!r} (one of {', '.join(FORMS)})")
    per_output = distance.mean(dim=-1)  # [..., m or 1]
    if reduction == "sum":
        per_output = per_output * (differences.shape[-1] if outputs is None else outputs)
    elif reduction != "mean":
        raise ValueError(f"unknown penalty reduction {reduction!r} (one of {', '.join(REDUCTIONS)})")
    return per_output.mean(dim=-1)


def penalized(nll: torch.Tensor, penalty_value: torch.Tensor, weight: float) -> torch.Tensor:
    """The objective PLE minimizes: NLL plus ``weight`` (lambda, times k on a lazy step) times the penalty. The sign
    is what the tests in tests/test_ple.py protect: a penalty that is subtracted rewards H for reading its input
    differently from its own samples, the opposite of Eq. 4's constraint."""
    return nll + weight * penalty_value


def literal_factor(outputs: int, set_size: int, dims: float) -> float:
    """lambda in the code's default units (NLL per point and dimension, mean |.| per output) per unit of lambda in
    the paper's literal ones (NLL of the whole set, L1 norm over the outputs): P / (B * D). Both objectives are
    then proportional (the literal one is B * D times the other), so Adam, invariant to the objective's scale but
    for its epsilon, trains the same H under either."""
    return outputs / (set_size * dims)
