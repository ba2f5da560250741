"""A permutation-invariant hypernetwork for any torch.nn.Module (paper Eq. 6, App. H.2).

    H(X) = h2( mean_i h1(x_i) )

h1 is an MLP applied to each data point alone (no batch-dependent layers, so the mean is exactly a mean);
h2 is a set of independent linear heads, one per parameter tensor of the target module, built from the
target's ``named_parameters()``. H returns ``{name: tensor}``; the target runs with it through
``torch.func.functional_call`` (see ``models.families.run``), never by copying weights into the module.

Heads. The paper's head for a tensor with P_t entries is ``Linear(d, P_t)``; stacked, the heads are one linear
map from the embedding e (d = 96) to all P weights, with d*P parameters: 5.1M for a 53k-weight VAE, and Adam over
them dominates a training step. We keep the map linear but constrain it to rank r::

    W = b + U (V e)        b: P (the heads' biases),  U: P x r,  V: r x d

so every tensor's head is still a linear function of e (its rows of U times V), with (r + 1) P + r d
parameters: 0.5M for that VAE at r = 8, 0.27M at r = 4 (the default). Measured on the digits VAE (2-core
CPU), a step with per-tensor factorizations (each tensor its own V_t) took 1.3x as long as this shared one,
and the full heads 1.6x.
``rank=None`` gives the paper's full heads. b starts at the target module's own initialization, so H starts
where MLE training starts.

Buffers (batchnorm running statistics) are not emitted: they are statistics of activations, not parameters.
They stay the target module's buffers; use :func:`recalibrate_batchnorm` to recompute them under final weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class LowRankDelta(torch.autograd.Function):
    """``code @ basis`` for a code of r entries (one per member under vmap), with the gradient of ``basis`` as a
    broadcast product rather than the rank-1 matrix product autograd runs: the same numbers (each entry is one
    product code_i * g_j either way), but on the CPU the (r x 1) @ (1 x P) product took 5.7 ms for the MNIST VAE's
    P = 1.7M weights and the broadcast 2.1 ms (one thread), the biggest single cost of a PLE step there."""

    generate_vmap_rule = True  # the stacked estimator runs it under torch.func.vmap

    @staticmethod
    def forward(code: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        return code @ basis

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        code, basis = ctx.saved_tensors  # under bf16 autocast the product (and so grad) was bf16: compute in it
        code, basis = code.to(grad.dtype), basis.to(grad.dtype)  # no-ops in fp32; autograd casts the results back
        grad_code = grad_basis = None
        if ctx.needs_input_grad[0]:
            grad_code = grad @ basis.transpose(-1, -2)
        if ctx.needs_input_grad[1]:
            grad_basis = code.unsqueeze(-1) * grad.unsqueeze(-2)
        return grad_code, grad_basis


class SampledLowRankDelta(torch.autograd.Function):
    """``(code @ basis)[entries]`` for the penalty's sampled entries, with the gradient of ``basis`` as a sparse
    tensor (r x k values). The penalty needs k = 4096 of the P weights; through the dense product each penalized
    step also paid a full r x P product, a dense r x P gradient and its accumulation (on the CPU, for the MNIST
    VAE's P = 1.7M, the penalized step's backward took 2.6 times the plain step's, most of it that gradient).
    Autograd adds the sparse gradient in place into the dense one the emission gives ``basis`` the same step.
    Not under vmap or torch.compile (sparse gradients are not supported there): see ``HyperNetwork.difference``."""

    @staticmethod
    def forward(code: torch.Tensor, basis: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
        return code @ basis.index_select(1, entries)

    @staticmethod
    def setup_context(ctx, inputs, output):
        code, basis, entries = inputs
        ctx.save_for_backward(code, basis, entries)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        code, basis, entries = ctx.saved_tensors
        code = code.to(grad.dtype)  # bf16 autocast: as in LowRankDelta (no-ops in fp32)
        grad_code = grad_basis = None
        if ctx.needs_input_grad[0]:  # cast the k sampled columns, not the whole r x P basis
            grad_code = basis.index_select(1, entries).to(grad.dtype) @ grad
        if ctx.needs_input_grad[1]:
            rank, k = len(code), len(entries)
            rows = torch.arange(rank, device=entries.device).repeat_interleave(k)
            values = (code.unsqueeze(-1) * grad.unsqueeze(-2)).reshape(-1)
            grad_basis = torch.sparse_coo_tensor(torch.stack([rows, entries.repeat(rank)]), values, basis.shape,
                                                  check_invariants=False)  # valid by construction: entries < P
        return grad_code, grad_basis, None


class HyperNetwork(nn.Module):
    sparse_min_ratio = 32  # emitted weights per sampled penalty entry from which the sparse path pays (difference)

    def __init__(self, target: nn.Module, input_dim: int, hidden: list[int], rank: int | None,
                 emitted: dict[str, nn.Parameter] | None = None):
        super().__init__()
        # ``emitted``: the target's parameters to emit, by their names in target (default: all of them)
        params = dict(target.named_parameters()) if emitted is None else dict(emitted)
        self.names = list(params)
        self.shapes = [tuple(p.shape) for p in params.values()]
        self.sizes = [p.numel() for p in params.values()]
        self.rank = rank
        self.h1 = mlp([input_dim, *hidden])
        embed_dim = hidden[-1]
        # b: the heads' biases, i.e. the weights H emits for a zero embedding; start at the target's init.
        self.bias = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params.values()]).clone())
        total = sum(self.sizes)
        if rank is None:  # the paper's independent full linear heads, stacked (same math, one matmul)
            self.head = nn.Parameter(torch.randn(total, embed_dim) * (1e-2 / math.sqrt(embed_dim)))
        else:
            self.code = nn.Linear(embed_dim, rank, bias=False)  # V
            # U stored transposed, (r, P): the gradient of U is then an outer product running along P, 3 to 4x
            # faster on the CPU than along r = 4 (the step's costliest op when laid out as (P, r)).
            self.basis = nn.Parameter(torch.randn(rank, total) * (1e-2 / math.sqrt(rank)))  # U^T

    @property
    def num_emitted(self) -> int:
        return sum(self.sizes)

    def embed_sum(self, x: torch.Tensor) -> torch.Tensor:
        """sum_i h1(x_i) over the rows of x (flattened): the streamable part of H."""
        return self.h1(x.flatten(1)).sum(dim=0)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """mean_i h1(x_i)."""
        return self.embed_sum(x) / len(x)

    def flat_delta(self, embedding: torch.Tensor, entries: torch.Tensor | None = None) -> torch.Tensor:
        """The linear part of h2, all tensors flattened: W - b (only the given flat ``entries``, when given)."""
        if self.rank is None:  # P x d: gather the sampled rows first, the full product is what is expensive
            matrix = self.head if entries is None else self.head[entries]
            return torch.mv(matrix, embedding.to(matrix.dtype))
        code = self.code(embedding)
        # Low rank: all P entries cost one r x P product; picking the sampled entries from the result (not rows
        # of U before it) keeps the backward free of a dense (r, P) scatter. Under bf16 autocast code is bf16.
        delta = LowRankDelta.apply(code.to(self.basis.dtype), self.basis)
        return delta if entries is None else delta[entries]

    def emit(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = self.bias + self.flat_delta(embedding)
        return {name: chunk.view(shape)
                for name, chunk, shape in zip(self.names, flat.split(self.sizes), self.shapes)}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.emit(self.embed(x))

    def difference(self, embedding_a: torch.Tensor, embedding_b: torch.Tensor,
                   entries: torch.Tensor | None = None, allow_sparse: bool = False) -> torch.Tensor:
        """H_a - H_b over every emitted weight, flattened, or over the given ``entries`` only (the penalty's random
        subset). The biases cancel: only the linear part is evaluated, at the difference of the embeddings.

        ``allow_sparse`` (not under vmap or torch.compile): where the target is big next to the sample (at least
        ``sparse_min_ratio`` emitted weights per entry), compute only the sampled entries and give the basis a
        sparse gradient (:class:`SampledLowRankDelta`). Below that the dense product is cheaper: on the 2-core CPU
        a penalty step of the digits VAE (54k weights, 4,096 entries) took 4.6 ms sparse and 3.8 ms dense, one of
        the MNIST VAE (1.68M weights) 34 ms sparse and 52 ms dense (benchmarks/ple_step.py)."""
        if (allow_sparse and entries is not None and self.rank is not None
                and self.num_emitted >= self.sparse_min_ratio * entries.numel()):
            code = self.code(embedding_a - embedding_b)
            return SampledLowRankDelta.apply(code.to(self.basis.dtype), self.basis, entries)
        return self.flat_delta(embedding_a - embedding_b, entries)

    def distance(self, embedding_a: torch.Tensor, embedding_b: torch.Tensor,
                 entries: torch.Tensor | None = None, allow_sparse: bool = False) -> torch.Tensor:
        """mean |H_a - H_b| over every emitted weight, or over a random subset of ``entries`` (an unbiased estimate
        of the same mean, far cheaper for big targets): :meth:`difference`, averaged."""
        return self.difference(embedding_a, embedding_b, entries, allow_sparse).abs().mean()

    @torch.no_grad()
    def streamed_embedding(self, data: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """mean_i h1(x_i) over a whole dataset, batch by batch: independent of order and batch size."""
        total = None
        for start in range(0, len(data), batch_size):
            part = self.embed_sum(data[start:start + batch_size]).double()
            total = part if total is None else total + part
        return (total / len(data)).float()


class FixedInputHyperNetwork(HyperNetwork):
    """The re-parameterisation control: the same factorised head, W = b + U (V e), with e a fixed vector that does
    not depend on the data. Trained by the NLL alone it is MLE in H's coordinates (b, U, V): what the hypernetwork's
    parameterisation does to training, without H reading its input. e is what the freshly initialised h1 gives,
    averaged, for 64 standard normal inputs (drawn from torch's global stream, which the estimator seeds): an
    embedding of the scale H's own starts with. h1 is kept (frozen, unused) so both networks have the same
    modules."""

    def __init__(self, target: nn.Module, input_dim: int, hidden: list[int], rank: int | None,
                 emitted: dict[str, nn.Parameter] | None = None):
        super().__init__(target, input_dim, hidden, rank, emitted)
        with torch.no_grad():
            self.register_buffer("fixed_embedding", self.h1(torch.randn(64, input_dim)).mean(dim=0))
        self.h1.requires_grad_(False)

    def embed_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.fixed_embedding * len(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.fixed_embedding

    @torch.no_grad()
    def streamed_embedding(self, data: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        return self.fixed_embedding.clone()


@torch.no_grad()
def recalibrate_batchnorm(module: nn.Module, weights: dict[str, torch.Tensor] | None, data: torch.Tensor,
                          forward, batch_size: int = 256) -> None:
    """Recompute every batchnorm's running statistics as exact averages over ``data`` under ``weights``.

    ``forward(module, weights, batch)`` runs the module the way training does (so the same layers see the same
    kind of inputs). Needed after hypernetwork training: the running statistics collected during training
    belong to per-batch weights, not to the final H over the whole training set.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the exact mean over all batches
    was_training = module.training
    module.train()
    for start in range(0, len(data), batch_size):
        batch = data[start:start + batch_size]
        if len(batch) > 1:
            forward(module, weights, batch)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    module.train(was_training)

