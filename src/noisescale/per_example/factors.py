"""Per-example gradient *factors*: exact, compact forms of per-example gradients.

A per-example gradient is never materialised when a cheaper exact form exists. A layer rule hands
back, for each of its parameters, one factor per use; a factor knows

* its per-example squared norms (``sqnorm()``, shape [N]),
* its per-example gradients in the parameter's layout when they must be materialised
  (``dense(shape)``, shape [N, *shape]: cross terms of odd pairs, preconditioned norms),
* the sum of its per-example gradients (``summed(shape)``): what autograd itself accumulated for
  this use, which the engine's coverage audit compares with the parameter's gradient,

and :func:`dot` gives the per-example inner product of two uses of one parameter (a parameter used
more than once — tied embeddings, a module called twice — has the sum of the uses as its
per-example gradient, whose norm has cross terms).

These classes are public: a rule registered with :func:`noisescale.register_layer` returns them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# Norm arithmetic is done in float32 at least: bfloat16 squares lose too many digits.


def _acc_dtype(x: Tensor) -> torch.dtype:
    """The dtype sums of ``x`` are accumulated in: its own at float32 and up, else float32."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _acc(x: Tensor) -> Tensor:
    return x if x.dtype == _acc_dtype(x) else x.float()


def acc_sum(x: Tensor, dim: int) -> Tensor:
    """``x.sum(dim)`` accumulated in float32 for 16-bit ``x``: a bias's per-example gradient
    summed over positions in bfloat16 was rounded per example, and where the examples' gradients
    cancel the audit's sum of those rows missed autograd's (summed in float32) by more than its
    tolerance — a step refused, blaming a missed use, partway through a run (a hunt,
    2026-12-05: a per-token value head, 8 audits in 100 in bf16)."""
    return x.sum(dim, dtype=_acc_dtype(x))


# vector_norm is one fused pass without the temporary of pow(2).sum(), but on CPU it sums
# sequentially, so its relative error grows with the length (2e-5 at 10⁶ elements, 1e-3 at
# 1.6·10⁷). There, long rows are cut into pieces of this many elements whose norms are summed.
_CPU_PIECE = 1 << 14


def _flat_rows(x: Tensor) -> Tensor:
    """[N, …] as [N, L]; a 0-d parameter's per-example values [N] as [N, 1] (a learnable
    scalar: a temperature, a gate, weight_norm's g with dim=None)."""
    return x.unsqueeze(1) if x.dim() == 1 else x.flatten(1)


def _sqnorm_rows(x: Tensor) -> Tensor:
    """|x_i|² per row of dim 0, accumulated in float32 at least, accurate at any length."""
    rows = _flat_rows(x)
    dtype = _acc_dtype(rows)
    n, length = rows.shape
    if length <= _CPU_PIECE or not rows.is_cpu:
        if dtype == rows.dtype:
            return torch.linalg.vector_norm(rows, dim=1).square()
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
        # short tensors in one fused call (the sequential sum is accurate at their length)
        dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
        if all(x.numel() <= _CPU_PIECE and x.dtype == tensors[0].dtype for x in tensors):
            return torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype)).square()
        return torch.stack([sqnorm(x) for x in tensors])
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype)).square()


def sqnorm_total(tensors: list[Tensor]) -> Tensor:
    """Σ |t|² over the tensors (0-d), as :func:`sqnorms` would sum it. On the CPU, long tensors
    are cut into pieces of :data:`_CPU_PIECE` elements (views) and every piece and short tensor
    goes through one fused call: a model's batch-gradient norm in one operation instead of
    four or five per parameter (ViT of the bench, 40 parameters: 0.55 → 0.18 ms a step)."""
    first = tensors[0]
    if first.device.type != "cpu" or any(x.dtype != first.dtype for x in tensors):
        return sqnorms(tensors).sum()
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    parts: list[Tensor] = []
    for x in tensors:
        size = x.numel()
        if size <= _CPU_PIECE:
            parts.append(x)
            continue
        flat = x.reshape(-1)
        cut = size - size % _CPU_PIECE
        parts.extend(flat[:cut].view(-1, _CPU_PIECE).unbind(0))
        if cut < size:
            parts.append(flat[cut:])
    return torch.stack(torch._foreach_norm(parts, 2, dtype=dtype)).square().sum()


def _rows_each(x: Tensor, idx: Tensor) -> Tensor:
    """``x[b, idx[b, m]]`` for x [B, R, …] and idx [B, M]: [B, M, …], taken as rows of the
    flattened [B·R, …] by ``index_select`` (``torch.gather`` with an index expanded over the
    width reads element by element: ≈ 13× slower on a [32, 64, 128] tensor on this CPU)."""
    b, r = x.shape[0], x.shape[1]
    flat = idx + torch.arange(0, b * r, r, device=x.device)[:, None]
    return (
        x.reshape(b * r, *x.shape[2:])
        .index_select(0, flat.reshape(-1))
        .view(b, idx.shape[1], *x.shape[2:])
    )


@dataclass
class DenseFactor:
    """Materialised per-example gradients, shape [N, *param.shape]."""

    grads: Tensor

    def sqnorm(self) -> Tensor:
        return _sqnorm_rows(_acc(self.grads))

    def dense(self, shape: torch.Size) -> Tensor:
        return _acc(self.grads).reshape(self.grads.shape[0], *shape)

    def summed(self, shape: torch.Size) -> Tensor:
        return _acc(self.grads).sum(0).reshape(shape)


def gram_is_cheaper(rows: int, inputs: int, outputs: int) -> bool:
    """Whether |Σ_t δ_t a_tᵀ|² over ``rows`` rows is cheaper in Gram form, Σ_{t,s} (a_t·a_s)
    (δ_t·δ_s) at rows²·(I + O), than materialised, at rows·I·O."""
    return rows * (inputs + outputs) < inputs * outputs


@dataclass
class LinearFactor:
    """Per-example gradient Σ_t δ_t a_tᵀ of a weight of shape [O, I] (Linear, unfolded conv).

    ``a``: [N, T, I] inputs; ``d``: [N, T, O] output gradients; T may be 1. For grouped
    convolutions the G groups are folded into the example dimension ([N·G, T, ·]) and ``groups``
    says how to fold them back. ``transposed``: the parameter is stored as [I, O] (Hugging Face's
    ``Conv1D``, ``x @ W``), so its per-example gradient is Σ_t a_t δ_tᵀ; norms are the same.
    """

    a: Tensor
    d: Tensor
    groups: int = 1
    transposed: bool = False

    def sqnorm(self) -> Tensor:
        a, d = _acc(self.a), _acc(self.d)
        t, i = a.shape[1:]
        o = d.shape[2]
        if t == 1:
            out = _sqnorm_rows(a) * _sqnorm_rows(d)
        elif gram_is_cheaper(t, i, o):
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
        g = g.reshape(n, self.groups * g.shape[1], g.shape[2])
        return (g.transpose(1, 2) if self.transposed else g).reshape(n, *shape)

    def summed(self, shape: torch.Size) -> Tensor:
        a, d = _acc(self.a), _acc(self.d)
        g = self.groups
        # (explicit N: an expert no token reached, T = 0, crashed a -1 here, a hunt)
        a4 = a.reshape(a.shape[0] // g, g, *a.shape[1:])  # [N, G, T, I']
        d4 = d.reshape(d.shape[0] // g, g, *d.shape[1:])  # [N, G, T, O/G]
        total = torch.einsum("ngto,ngti->goi", d4, a4).reshape(-1, a.shape[2])
        return (total.t() if self.transposed else total).reshape(shape)


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
        sorted_d = _rows_each(d, order).reshape(n * t, -1)
        summed = d.new_zeros(n * t, d.shape[-1]).index_add_(0, run.reshape(-1), sorted_d)
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

    def summed(self, shape: torch.Size) -> Tensor:
        d = _acc(self.d)
        out = d.new_zeros(self.num_rows, d.shape[-1])
        out.index_add_(0, self.idx.reshape(-1), d.reshape(-1, d.shape[-1]))
        return out.reshape(shape)


@dataclass
class SliceFactor:
    """A factor of the rows ``start:stop`` (dim 0) of a larger parameter; the other rows are zero.

    Packed projections use one weight in row blocks (``nn.MultiheadAttention``'s ``in_proj_weight``
    split into query, key and value): each block is one use, and uses of disjoint blocks have no
    cross terms.
    """

    inner: Factor
    start: int
    stop: int

    def _shape(self, shape: torch.Size) -> torch.Size:
        return torch.Size((self.stop - self.start, *shape[1:]))

    def sqnorm(self) -> Tensor:
        return self.inner.sqnorm()

    def dense(self, shape: torch.Size) -> Tensor:
        block = self.inner.dense(self._shape(shape))
        out = block.new_zeros(block.shape[0], *shape)
        out[:, self.start : self.stop] = block
        return out

    def summed(self, shape: torch.Size) -> Tensor:
        block = self.inner.summed(self._shape(shape))
        out = block.new_zeros(shape)
        out[self.start : self.stop] = block
        return out


Factor = Any  # DenseFactor | LinearFactor | EmbeddingFactor | SliceFactor | NormFactor | …


def dot(f: Factor, h: Factor, shape: torch.Size) -> Tensor:
    """Per-example inner products ⟨g_i(f), g_i(h)⟩ of two uses of one parameter, shape [N]."""
    if isinstance(f, SliceFactor) and isinstance(h, SliceFactor):
        if f.stop <= h.start or h.stop <= f.start:  # disjoint row blocks
            return torch.zeros(num_examples(f), device=_device(f), dtype=torch.float64)
        if (f.start, f.stop) == (h.start, h.stop):
            return dot(f.inner, h.inner, f._shape(shape))
    if (
        isinstance(f, LinearFactor)
        and isinstance(h, LinearFactor)
        and f.groups == h.groups == 1
        and f.transposed == h.transposed
    ):
        aa = torch.bmm(_acc(f.a), _acc(h.a).transpose(1, 2))
        dd = torch.bmm(_acc(f.d), _acc(h.d).transpose(1, 2))
        return (aa * dd).sum((1, 2))
    if isinstance(h, NormFactor) and h.grads is not None:
        f, h = h, f
    if isinstance(f, NormFactor) and f.grads is not None:
        return _dot_kept(f.dense(shape), h, shape)
    if isinstance(f, LinearFactor) and isinstance(h, EmbeddingFactor):
        f, h = h, f
    if (
        isinstance(f, EmbeddingFactor)
        and isinstance(h, LinearFactor)
        and h.groups == 1
        and not h.transposed
    ):
        # Σ_t Σ_s δ^lin_s[idx_t] (a_s · δ^emb_t): a tied input embedding and output projection
        ad = torch.bmm(_acc(h.a), _acc(f.d).transpose(1, 2))  # [N, S, T]
        gathered = torch.gather(_acc(h.d), 2, f.idx.unsqueeze(1).expand(-1, h.d.shape[1], -1))
        return (ad * gathered).sum((1, 2))
    if isinstance(f, EmbeddingFactor) and isinstance(h, EmbeddingFactor):
        same = (f.idx.unsqueeze(2) == h.idx.unsqueeze(1)).to(_acc(f.d).dtype)
        return (same * torch.bmm(_acc(f.d), _acc(h.d).transpose(1, 2))).sum((1, 2))
    return (_flat_rows(f.dense(shape)) * _flat_rows(h.dense(shape))).sum(1)


def _dot_kept(g: Tensor, h: Factor, shape: torch.Size) -> Tensor:
    """⟨G_j, g_j(h)⟩ per sub-batch j of kept sub-batch gradients G [k, *shape] and another use."""
    if isinstance(h, EmbeddingFactor) and len(shape) == 2:
        # Σ_t G_j[idx_t] · δ_t: the rows the embedding touched, gathered (k·T·D, not k·V·D)
        rows = _rows_each(g, h.idx)
        return torch.linalg.vecdot(rows.flatten(1), _acc(h.d).flatten(1))
    if isinstance(h, LinearFactor) and h.groups == 1 and len(shape) == 2:
        # Σ_r δ_r · (G a_r) for G [O, I] (or a_r G · δ_r for a transposed layout [I, O])
        m = g if h.transposed else g.transpose(1, 2)
        return (torch.bmm(_acc(h.a), m) * _acc(h.d)).sum((1, 2))
    return torch.linalg.vecdot(_flat_rows(g), _flat_rows(h.dense(shape)))


def sqnorm_of_sum(factors: list[Factor], shape: torch.Size) -> Tensor:
    """Per-example |Σ_u g_i(u)|² over the uses u of one parameter, cross terms included."""
    total = factors[0].sqnorm()
    for u in range(1, len(factors)):
        total = total + factors[u].sqnorm()
        for v in range(u):
            total = total + 2.0 * dot(factors[u], factors[v], shape)
    return total


def num_examples(f: Factor) -> int:
    """N, the number of examples (rows) a factor holds."""
    if isinstance(f, NormFactor):
        return f.sq.shape[0]
    if isinstance(f, SliceFactor):
        return num_examples(f.inner)
    if isinstance(f, LinearFactor):
        return f.a.shape[0] // f.groups
    if isinstance(f, EmbeddingFactor):
        return f.idx.shape[0]
    return f.grads.shape[0]


def _device(f: Factor) -> torch.device:
    if isinstance(f, NormFactor):
        return f.sq.device
    if isinstance(f, SliceFactor):
        return _device(f.inner)
    if isinstance(f, LinearFactor):
        return f.a.device
    if isinstance(f, EmbeddingFactor):
        return f.d.device
    return f.grads.device


# Materialised per-example weight gradients are built this many elements at a time (1 GiB in fp32).
_MATERIALISE_ELEMENTS = 1 << 28


def weighted_sqnorm(factor: Factor, w2: Tensor) -> Tensor:
    """Per-example Σ w2 ⊙ g_i² of one parameter: the preconditioned norm |P ⊙ g_i|² for w2 = P².

    An elementwise P (Adam's 1/(√v̂ + ε), a full matrix for a weight) breaks the Gram trick
    |Σ_t δ_t a_tᵀ|² = Σ_{t,s}(a_t·a_s)(δ_t·δ_s), so a Linear/conv weight's per-example gradient
    δᵀa is materialised, N·O·I elements (in chunks of examples to bound memory) — the cost of a
    dense per-example gradient of that layer. Embeddings stay sparse: only the rows an example
    touches are weighted.
    """
    if isinstance(factor, SliceFactor):
        return weighted_sqnorm(factor.inner, w2[factor.start : factor.stop])
    if isinstance(factor, LinearFactor):
        a, d = _acc(factor.a), _acc(factor.d)
        groups, o, i = factor.groups, d.shape[2], a.shape[2]
        w = (w2.t() if factor.transposed else w2).reshape(groups, o, i)
        n = a.shape[0] // groups
        chunk = max(1, _MATERIALISE_ELEMENTS // (groups * o * i))
        out = []
        for start in range(0, n, chunk):
            rows = slice(start * groups, (start + chunk) * groups)
            g = torch.bmm(d[rows].transpose(1, 2), a[rows])  # [chunk·G, O/G, I']
            out.append((g.pow(2).view(-1, groups, o, i) * w).sum((1, 2, 3)))
        return torch.cat(out)
    if isinstance(factor, EmbeddingFactor):
        rows, summed = factor.row_sums()
        return (summed.pow(2) * w2[rows]).sum((1, 2))
    return _flat_rows(_acc(factor.grads).pow(2) * w2).sum(1)


# -- sub-batches ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Subbatches:
    """A pass's N examples split at random into k sub-batches of balanced sizes (⌈N/k⌉ or
    ⌊N/k⌋). ``index`` [k·n] lists, sub-batch after sub-batch, the examples of each (n the largest
    size); the slots of a shorter sub-batch (``pad``) hold zero rows, which add nothing to a
    gradient. Everything stays on the device: splitting needs no host synchronisation."""

    index: Tensor
    pad: Tensor
    k: int
    n: int
    sizes: tuple[int, ...]

    @staticmethod
    def split(
        num: int,
        k: int,
        generator: torch.Generator,
        device: torch.device,
        pairs: str | int | None = None,
    ) -> Subbatches:
        """``pairs="flip"``: row i and row N − 1 − i share data (timm's Mixup and CutMix mix each
        image with the batch's flipped order) and go to the same sub-batch: the N/2 pairs are
        split at random instead of the rows, so the cross terms left in eq. A.2 are between
        independent pairs only (``paired_rows`` of the tracker). ``"halves"``: row i and row
        i + N/2 (a batch made of two strata, ``torch.cat([real, fake])``), so that every
        sub-batch holds as many of each. ``num`` must then be even. An integer G: blocks of G
        consecutive rows (GRPO's G completions of one prompt, a query's G candidates) go to one
        sub-batch each, the N/G blocks split at random (``grouped_rows``); ``num`` a multiple
        of G."""
        if isinstance(pairs, int) and not isinstance(pairs, bool):
            g = pairs
            blocks = Subbatches.split(num // g, k, generator, device)
            offsets = torch.arange(g, device=blocks.index.device)
            index = (blocks.index[:, None] * g + offsets).reshape(-1)
            pad = (blocks.pad[:, None] * g + offsets.to(blocks.pad.device)).reshape(-1)
            return Subbatches(
                index, pad, blocks.k, g * blocks.n, tuple(g * s for s in blocks.sizes)
            )
        if pairs in ("flip", "halves"):
            half = Subbatches.split(num // 2, k, generator, device)
            other = num - 1 - half.index if pairs == "flip" else half.index + num // 2
            index = torch.stack((half.index, other), 1).reshape(-1)
            pad = torch.stack((2 * half.pad, 2 * half.pad + 1), 1).reshape(-1)
            return Subbatches(index, pad, half.k, 2 * half.n, tuple(2 * s for s in half.sizes))
        k = min(k, num)
        q, r = divmod(num, k)
        n = q + (r > 0)
        perm = torch.randperm(num, generator=generator, device=device)
        if r == 0:  # equal sizes: sub-batch j is perm[j·q : (j+1)·q]
            return Subbatches(perm, perm.new_zeros(0), k, q, (q,) * k)
        j = torch.arange(k, device=device)[:, None]
        pos = torch.arange(n, device=device)[None, :]
        start = j * q + torch.clamp(j, max=r)
        flat = (start + pos).clamp_max(num - 1)
        index = perm[flat].reshape(-1)
        # the last slot of each of the k − r shorter sub-batches (computed, not searched for:
        # torch.nonzero would wait for the device)
        pad = torch.arange(r, k, device=device) * n + q
        sizes = tuple(q + 1 if i < r else q for i in range(k))
        return Subbatches(index, pad, k, n, sizes)

    def sizes_tensor(self, like: Tensor) -> Tensor:
        """The sub-batch sizes as a tensor on ``like``'s device (no host-to-device copy)."""
        # the larger sub-batches come first: sizes (q + d)·r, then q — d = 1 for rows, 2 for
        # pairs of rows (``pairs``)
        q, d = self.sizes[-1], self.sizes[0] - self.sizes[-1]
        r = sum(1 for s in self.sizes if s > q)
        return q + d * (torch.arange(self.k, device=like.device) < r).to(like.dtype)

    def take_rows(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """Rows of ``x`` (dim 0 = examples) as [k·n, ...], sub-batch after sub-batch,
        zero-padded (:meth:`take` without its view); written into ``out`` when given."""
        index = self.index
        if index.device != x.device:
            index = index.to(x.device)
        rows = x.index_select(0, index) if out is None else torch.index_select(x, 0, index, out=out)
        if self.sizes[0] != self.sizes[-1]:
            pad = self.pad if self.pad.device == x.device else self.pad.to(x.device)
            rows = rows.index_fill_(0, pad, 0)
        return rows

    def take(self, x: Tensor, out: Tensor | None = None, interleaved: bool = False) -> Tensor:
        """Rows of ``x`` (dim 0 = examples) as [k, n, ...], in sub-batch order, zero-padded;
        written into ``out`` ([k·n, ...] of ``x``'s dtype) when given. ``interleaved``: as
        [n, k, ...] instead (slot i of every sub-batch, then slot i + 1), the layout a grouped
        convolution over the sub-batches reads, gathered in one copy."""
        if not interleaved:
            rows = self.take_rows(x, out)
            return rows.view(self.k, self.n, *rows.shape[1:])
        index = self.index.view(self.k, self.n).t().reshape(-1)
        pad = (self.pad % self.n) * self.k + self.pad // self.n  # slot j·n + i is now i·k + j
        index = index if index.device == x.device else index.to(x.device)
        rows = x.index_select(0, index) if out is None else torch.index_select(x, 0, index, out=out)
        if pad.numel():
            pad = pad if pad.device == x.device else pad.to(x.device)
            rows = rows.index_fill_(0, pad, 0)
        return rows.view(self.n, self.k, *rows.shape[1:])


class MergedSubbatches:
    """The groups of a pass merged from passes one backward ran through (several forwards
    backpropagated together): each pass's sub-batches, or its examples where it was measured
    per example (``parts`` holds its example count), in the passes' order — a partition of the
    merged pass's examples, which is all eq. A.2 asks of sub-batches. What the sources read:
    ``sizes``, ``k`` and :meth:`sizes_tensor`."""

    def __init__(self, parts: list[Subbatches | int]) -> None:
        self.parts = parts
        self.sizes = tuple(
            s for p in parts for s in (p.sizes if isinstance(p, Subbatches) else (1,) * p)
        )
        self.k = len(self.sizes)

    def sizes_tensor(self, like: Tensor) -> Tensor:
        return torch.cat(
            [
                p.sizes_tensor(like) if isinstance(p, Subbatches) else like.new_ones(p)
                for p in self.parts
            ]
        )


@dataclass
class NormFactor:
    """Sub-batch squared norms computed where the gradient itself was (a weight whose gradient
    the engine computes as k sub-batch products); ``total`` is that gradient, kept for audits;
    ``grads`` [k, *shape] the sub-batch gradients themselves, kept for a weight with another use
    in the pass (a head tied to an embedding: the norm of the sum has cross terms)."""

    sq: Tensor
    total: Tensor | None = None
    grads: Tensor | None = None

    def sqnorm(self) -> Tensor:
        return self.sq

    def summed(self, shape: torch.Size) -> Tensor:
        assert self.total is not None, "the sub-batch gradient was not kept (no audit)"
        return self.total.reshape(shape)

    def dense(self, shape: torch.Size) -> Tensor:
        if self.grads is None:
            raise NotImplementedError(
                "a weight measured by sub-batch products has no per-sub-batch gradient kept; it "
                "cannot be combined with another use of the same weight"
            )
        return self.grads.reshape(self.grads.shape[0], *shape)


def fold_rows(f: Any, k: int) -> Any:
    """The factor of each example's k rows summed, from a factor of their N·k rows, each
    example's k in turn: a rule of its own layout (an RNN cell) called on the examples
    flattened together with positions (``LayerRule.flattened``)."""
    if isinstance(f, LinearFactor) and f.groups == 1:
        a, d = f.a, f.d  # [N·k, T, ·] -> [N, k·T, ·]
        return LinearFactor(
            a.reshape(a.shape[0] // k, k * a.shape[1], a.shape[2]),
            d.reshape(d.shape[0] // k, k * d.shape[1], d.shape[2]),
            1,
            f.transposed,
        )
    if type(f) is DenseFactor:
        g = f.grads
        return DenseFactor(acc_sum(g.reshape(g.shape[0] // k, k, *g.shape[1:]), 1))
    raise TypeError(f"no sum over an example's rows for a {type(f).__name__}")


def group_factor(f: Any, sb: Subbatches) -> Any:
    """The factor of sub-batch gradients Σ_{i ∈ sub-batch j} g_i from per-example factors."""
    if isinstance(f, NormFactor):
        return f
    if isinstance(f, SliceFactor):
        return SliceFactor(group_factor(f.inner, sb), f.start, f.stop)
    if isinstance(f, LinearFactor):
        g = f.groups
        # (sizes spelled out, no -1: an expert no token reached, T = 0, crashed, a hunt)
        a = f.a.reshape(f.a.shape[0] // g, g, *f.a.shape[1:])  # [N, G, T, I']
        d = f.d.reshape(f.d.shape[0] // g, g, *f.d.shape[1:])

        def fold(x: Tensor) -> Tensor:
            x = sb.take(x).transpose(1, 2)  # [k, G, n, T, ·]
            return x.reshape(sb.k * g, x.shape[2] * x.shape[3], x.shape[-1])

        return LinearFactor(fold(a), fold(d), g, f.transposed)
    if isinstance(f, EmbeddingFactor):
        idx = sb.take(f.idx).reshape(sb.k, -1)
        d = sb.take(f.d).reshape(sb.k, idx.shape[1], -1)
        return EmbeddingFactor(idx, d, f.num_rows)
    grouped = getattr(f, "grouped", None)
    if grouped is not None:
        return grouped(sb)
    return DenseFactor(sb.take(f.grads).sum(1))
