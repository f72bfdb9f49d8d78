"""Per-example gradient *factors*: exact, compact forms of per-example gradients.

A per-example gradient is never materialised when a cheaper exact form exists. A layer hands back,
for each of its parameters, one factor; a factor knows its per-example squared norm and its
per-example inner product with another factor of the same parameter (needed when a parameter is
used more than once — tied embeddings, a module called twice — where the per-example gradient is
the sum of the uses and its norm has cross terms).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Norm arithmetic is done in float32 at least: bfloat16 squares lose too many digits.


def _acc(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


# vector_norm is one fused pass without the temporary of pow(2).sum(), but on CPU it sums
# sequentially, so its relative error grows with the length (2e-5 at 10⁶ elements, 1e-3 at
# 1.6·10⁷). There, long rows are cut into pieces of this many elements whose norms are summed.
_CPU_PIECE = 1 << 14


def _sqnorm_rows(x: Tensor) -> Tensor:
    """|x_i|² per row of dim 0, accumulated in float32 at least, accurate at any length."""
    rows = x.flatten(1)
    dtype = rows.dtype if rows.dtype in (torch.float32, torch.float64) else torch.float32
    n, length = rows.shape
    if rows.device.type != "cpu" or length <= _CPU_PIECE:
        return torch.linalg.vector_norm(rows, dim=1, dtype=dtype).square()
    cut = length - length % _CPU_PIECE
    pieces = rows[:, :cut].reshape(n, -1, _CPU_PIECE)
    out = torch.linalg.vector_norm(pieces, dim=2, dtype=dtype).square().sum(1)
    if cut < length:
        out = out + torch.linalg.vector_norm(rows[:, cut:], dim=1, dtype=dtype).square()
    return out


def sqnorm(x: Tensor) -> Tensor:
    """|x|² of a whole tensor (0-d), accumulated in float32 at least, accurate at any size."""
    return _sqnorm_rows(x.reshape(1, -1))[0]


def sqnorms(tensors: list[Tensor]) -> Tensor:
    """|t|² of each tensor, as a float32 (or float64) vector, accurate at any size.

    Accelerators use one fused multi-tensor kernel accumulating in float32 (bfloat16 norms
    would keep three digits, and |G|² is a small difference of such norms); the CPU goes
    through :func:`sqnorm`, whose pieces keep the sequential sum accurate.
    """
    if tensors[0].device.type == "cpu":
        return torch.stack([sqnorm(x) for x in tensors])
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype)).square()


@dataclass
class DenseFactor:
    """Materialised per-example gradients, shape [N, *param.shape]."""

    grads: Tensor

    def sqnorm(self) -> Tensor:
        return _sqnorm_rows(_acc(self.grads))

    def dense(self, shape: torch.Size) -> Tensor:
        return _acc(self.grads).reshape(self.grads.shape[0], *shape)


@dataclass
class LinearFactor:
    """Per-example gradient Σ_t δ_t a_tᵀ of a weight of shape [O, I] (Linear, unfolded conv).

    ``a``: [N, T, I] inputs; ``d``: [N, T, O] output gradients; T may be 1. For grouped
    convolutions the G groups are folded into the example dimension ([N·G, T, ·]) and ``groups``
    says how to fold them back.
    """

    a: Tensor
    d: Tensor
    groups: int = 1

    def sqnorm(self) -> Tensor:
        a, d = _acc(self.a), _acc(self.d)
        t, i = a.shape[1:]
        o = d.shape[2]
        if t == 1:
            out = _sqnorm_rows(a) * _sqnorm_rows(d)
        elif t * (i + o) < i * o:
            # Gram form: Σ_{t,s} (a_t·a_s)(δ_t·δ_s), cost T²(I+O) per example
            aa, dd = torch.bmm(a, a.transpose(1, 2)), torch.bmm(d, d.transpose(1, 2))
            out = torch.linalg.vecdot(aa.flatten(1), dd.flatten(1))
        else:
            # materialised form: |δᵀa|², cost T·I·O per example
            out = _sqnorm_rows(torch.bmm(d.transpose(1, 2), a))
        return out.view(-1, self.groups).sum(1)

    def dense(self, shape: torch.Size) -> Tensor:
        a, d = _acc(self.a), _acc(self.d)
        g = torch.bmm(d.transpose(1, 2), a)  # [N·G, O/G, I']
        n = g.shape[0] // self.groups
        return g.reshape(n, self.groups * g.shape[1], g.shape[2]).reshape(n, *shape)


@dataclass
class EmbeddingFactor:
    """Per-example gradient of an embedding table [V, D]: row idx_t receives δ_t.

    ``idx``: [N, T] token ids (positions equal to ``padding_idx`` already removed by the layer
    setting their δ to zero); ``d``: [N, T, D].
    """

    idx: Tensor
    d: Tensor
    num_rows: int

    def row_sums(self, with_ids: bool = True) -> tuple[Tensor | None, Tensor]:
        """The gradient rows each example touches: (row ids [N, T], summed δ [N, T, D]).

        Repeated tokens of an example are summed into one row: |g_i|² = Σ_v |Σ_{t: idx_t = v} δ_t|².
        Sorting each example's ids puts repeats next to each other, and each run of equal ids is
        one row. Unlike torch.unique this never needs the number of distinct ids on the host, so
        there is no device synchronisation; slots past an example's last run hold zeros (with
        the id of its last run, so weighting them by any row keeps them zero). The ids are
        ``None`` when ``with_ids`` is false (a plain norm needs the sums only).
        """
        n, t = self.idx.shape
        d = _acc(self.d)
        ids, order = torch.sort(self.idx, dim=1)
        new_run = torch.ones_like(ids, dtype=torch.bool)
        new_run[:, 1:] = ids[:, 1:] != ids[:, :-1]
        slot = torch.cumsum(new_run, 1) - 1
        run = slot + torch.arange(0, n * t, t, device=d.device)[:, None]
        sorted_d = torch.gather(d, 1, order.unsqueeze(-1).expand_as(d))
        summed = d.new_zeros(n * t, d.shape[-1]).index_add_(
            0, run.reshape(-1), sorted_d.reshape(n * t, -1)
        )
        if not with_ids:
            return None, summed.view(n, t, -1)
        row_ids = torch.zeros_like(ids).scatter_(1, slot, ids)
        last = slot[:, -1:]
        row_ids = torch.where(torch.arange(t, device=ids.device) > last, ids[:, -1:], row_ids)
        return row_ids, summed.view(n, t, -1)

    def sqnorm(self) -> Tensor:
        return _sqnorm_rows(self.row_sums(with_ids=False)[1])

    def dense(self, shape: torch.Size) -> Tensor:
        n, t = self.idx.shape
        d = _acc(self.d)
        out = d.new_zeros(n, self.num_rows, d.shape[-1])
        rows = torch.arange(n, device=d.device).unsqueeze(1).expand(n, t)
        out.index_put_(
            (rows.reshape(-1), self.idx.reshape(-1)), d.reshape(n * t, -1), accumulate=True
        )
        return out.reshape(n, *shape)


Factor = DenseFactor | LinearFactor | EmbeddingFactor


def dot(f: Factor, h: Factor, shape: torch.Size) -> Tensor:
    """Per-example inner products ⟨g_i(f), g_i(h)⟩ of two uses of one parameter, shape [N]."""
    if isinstance(f, LinearFactor) and isinstance(h, LinearFactor) and f.groups == h.groups == 1:
        aa = torch.bmm(_acc(f.a), _acc(h.a).transpose(1, 2))
        dd = torch.bmm(_acc(f.d), _acc(h.d).transpose(1, 2))
        return (aa * dd).sum((1, 2))
    if isinstance(f, LinearFactor) and isinstance(h, EmbeddingFactor):
        f, h = h, f
    if isinstance(f, EmbeddingFactor) and isinstance(h, LinearFactor) and h.groups == 1:
        # Σ_t Σ_s δ^lin_s[idx_t] (a_s · δ^emb_t): a tied input embedding and output projection
        ad = torch.bmm(_acc(h.a), _acc(f.d).transpose(1, 2))  # [N, S, T]
        gathered = torch.gather(_acc(h.d), 2, f.idx.unsqueeze(1).expand(-1, h.d.shape[1], -1))
        return (ad * gathered).sum((1, 2))
    if isinstance(f, EmbeddingFactor) and isinstance(h, EmbeddingFactor):
        same = (f.idx.unsqueeze(2) == h.idx.unsqueeze(1)).to(_acc(f.d).dtype)
        return (same * torch.bmm(_acc(f.d), _acc(h.d).transpose(1, 2))).sum((1, 2))
    return (f.dense(shape).flatten(1) * h.dense(shape).flatten(1)).sum(1)


def sqnorm_of_sum(factors: list[Factor], shape: torch.Size) -> Tensor:
    """Per-example |Σ_u g_i(u)|² over the uses u of one parameter, cross terms included."""
    total = factors[0].sqnorm()
    for u in range(1, len(factors)):
        total = total + factors[u].sqnorm()
        for v in range(u):
            total = total + 2.0 * dot(factors[u], factors[v], shape)
    return total
