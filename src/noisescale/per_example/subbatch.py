"""Sub-batch gradient norms at the cost of the gradient itself.

In sub-batch mode the engine splits each pass's N examples into k random sub-batches and measures
|Σ_{i ∈ j} g_i|² for each sub-batch j instead of each example's |g_i|². Paired with the whole
batch through the paper's eq. A.2, these cancel every example's own |g_i|² exactly, as the exact
per-example mode does (the unbiased |G|² is then the mean of g_i·g_i' over pairs in different
sub-batches), so late in training — when a few examples carry most of Σ|g_i|² — they are nearly
as precise as measuring every example (pairs in different sub-batches are a fraction 1 − 1/k of
all pairs), where a per-example subset is not.

For the layers that cost most — a Linear or ``Conv1D`` applied at many positions per example, a
convolution — the sub-batch norms come almost free: the engine computes the weight's gradient
itself, as k products over the sub-batches (together the FLOPs of autograd's one product), keeps
the squared norm of each, and hands autograd their sum as the weight's gradient
(:class:`WeightBySubbatch`). The layer's forward runs on a detached view of the weight, so
autograd's own backward computes only the input gradient. Other layers (biases, norms,
embeddings, a Linear applied once per example) give their sub-batch norms from their per-example
factors, merged by sub-batch (:func:`~noisescale.per_example.factors.group_factor`).
"""

from __future__ import annotations

import math
import threading
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from noisescale.per_example.factors import (
    Subbatches,
    _acc,
    _acc_dtype,
    _sqnorm_rows,
    gram_is_cheaper,
)

__all__ = ["SubbatchGrads", "WeightBySubbatch", "conv_subbatch_grads", "linear_subbatch_grads"]

# Sub-batch products are built this many elements at a time (256 MiB in fp32).
_CHUNK_ELEMENTS = 1 << 26

# On this project's CPU (2 vCPUs, one thread, 2026-12-02), per sub-batch and layer: the
# products' extra work cost ≈ 1 ns per element of the k partial gradients (written by the
# product, added, squared), the Gram form ≈ 0.023 ns per multiply-add (bmm at 64–512 rows,
# widths 128–3136): one element ≈ 40 multiply-adds. bench/gram_vs_products.py measures both.
_CPU_ELEMENT_PER_MAC = 40


class WeightBySubbatch(torch.autograd.Function):
    """Identity on a layer's output in the forward; in the backward, the gradients of the
    layer's weight and (``None`` if not taken over) bias from the output gradient, computed by
    ``job``. The output is returned as itself (marked dirty), so in-place operations on it stay
    allowed and nothing is copied."""

    @staticmethod
    def forward(
        ctx: Any, y: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, job: Any
    ) -> Tensor:
        ctx.mark_dirty(y)
        ctx.save_for_backward(x)
        ctx.job = job
        return y

    @staticmethod
    def backward(ctx: Any, d: Tensor) -> tuple[Tensor, None, Tensor | None, Tensor | None, None]:
        (x,) = ctx.saved_tensors
        weight, bias = ctx.job.weight_grad(x, d)
        return d, None, weight, bias, None


# torch's C entry point of Function.apply and functorch's unwrapping of dead wrappers, which
# its Python wrapper does first (private: where a torch lacks them, the wrapper is used)
try:
    from torch._C._functorch import unwrap_if_dead as _unwrap_if_dead

    _RAW_APPLY: Any = super(torch.autograd.Function, WeightBySubbatch).apply
    _TRANSFORMS_ACTIVE: Any = torch._C._are_functorch_transforms_active
except (ImportError, AttributeError):  # pragma: no cover - other torch versions
    _RAW_APPLY = None


def weight_by_subbatch(y: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, job: Any) -> None:
    """``WeightBySubbatch.apply(y, x, weight, bias, job)``, through torch's own entry point
    where no torch.func transform is active: ``Function.apply``'s Python wrapper costs about as
    much again as the call itself (≈ 6 µs of a product layer's forward on this project's CPU,
    tens of layers per step), for argument binding this function does not use."""
    if _RAW_APPLY is None or _TRANSFORMS_ACTIVE():
        WeightBySubbatch.apply(y, x, weight, bias, job)
        return
    y, x = _unwrap_if_dead(y), _unwrap_if_dead(x)
    _RAW_APPLY(y, x, weight, bias, job)


class SubbatchGrads(NamedTuple):
    """What a layer's sub-batch products give: its weight gradient, the squared norm of each
    sub-batch's part of it, the k parts themselves when kept (a weight with another use), and
    the same two for the bias when the products took it over (else ``None``)."""

    grad: Tensor
    sq: Tensor
    kept: Tensor | None = None
    bias_grad: Tensor | None = None
    bias_sq: Tensor | None = None


class Readers:
    """The product layers that read one input tensor in a pass's forward (``count``), and how
    many of them have taken its gathered rows in the backward (``used``)."""

    __slots__ = ("count", "used")

    def __init__(self) -> None:
        self.count, self.used = 1, 0


class Scratch:
    """Buffers for the sub-batch products' temporaries (the gathered inputs and output
    gradients, the k partial gradients), reused from layer to layer and step to step on the CPU.

    On the CPU a fresh tensor of a few MiB costs a page fault per 4 KiB page the first time it is
    written (the allocator hands large blocks back to the system when they are freed): on this
    project's 2-vCPU machine ≈ 0.5 ms per MiB, as much as the copy itself several times over.
    The plain step's own allocations settle into reuse; these temporaries, of other sizes, would
    not. One grow-only buffer per role and thread holds the largest layer's temporaries (the
    memory they take at that layer's backward anyway, now also held between backward passes:
    on this project's small CPU models 10–25 MB, +0.2–0.5× the plain step's peak; buffers over
    :attr:`MAX_ELEMENTS` are not kept). Accelerators' caching allocators reuse memory already,
    so there every call allocates as usual (:meth:`get` returns ``None``). Convolutions do not
    use its buffers: their temporaries measured no faster from them.

    It also keeps, on every device, the rows gathered for a layer whose input other product
    layers read too (:meth:`held`, :meth:`hold`), until the last of them has taken them: such
    layers gather their input once.
    """

    #: Larger temporaries (64 MiB in float32) are allocated afresh, not held between steps.
    MAX_ELEMENTS = 1 << 24

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, str, torch.dtype], Tensor] = {}
        # the views handed out, by buffer and shape (a model asks for the same few shapes at
        # every step); dropped with their buffer when it grows
        self._views: dict[tuple[int, str, torch.dtype], dict[tuple[int, ...], Tensor]] = {}
        # the last rows gathered for a role, for the other readers of their input (:meth:`held`)
        self._held: dict[tuple[int, str], tuple[Readers, Subbatches, tuple, Tensor]] = {}

    def get(
        self, role: str, shape: tuple[int, ...], like: Tensor, dtype: torch.dtype | None = None
    ) -> Tensor | None:
        """A [shape] tensor of ``dtype`` (default ``like``'s) whose contents are overwritten by
        the caller, valid until the next :meth:`get` of the same role on this thread."""
        self._held.pop((threading.get_ident(), role), None)  # (about to be overwritten)
        if not like.is_cpu:
            return None
        key = (threading.get_ident(), role, like.dtype if dtype is None else dtype)
        views = self._views.get(key)
        if views is not None:
            view = views.get(shape)
            if view is not None:
                return view
        size = math.prod(shape)
        if size > self.MAX_ELEMENTS:
            return None
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < size:
            buf = torch.empty(size, dtype=key[2])
            self._buffers[key] = buf
            views = self._views[key] = {}
        assert views is not None
        if len(views) >= 256:  # (shapes that change at every step: variable lengths)
            views.clear()
        view = views[shape] = buf[:size].view(shape)
        return view

    def held(self, role: str, readers: Readers | None, sb: Subbatches, key: tuple) -> Tensor | None:
        """The rows gathered for ``role`` by the previous reader of one input tensor
        (``readers``: the product layers that read it in the forward, paired there), by these
        sub-batches, with this ``key`` (shape, dtype: what the rows are); else ``None``. The
        last reader takes them out (they are held no longer than needed)."""
        if readers is None or readers.count < 2:
            return None
        slot = (threading.get_ident(), role)
        entry = self._held.get(slot)
        if entry is None or entry[0] is not readers or entry[1] is not sb or entry[2] != key:
            return None
        readers.used += 1
        if readers.used >= readers.count:
            del self._held[slot]
        return entry[3]

    def hold(
        self, role: str, readers: Readers | None, sb: Subbatches, key: tuple, rows: Tensor
    ) -> None:
        """Keep ``rows`` for the other readers of their input (see :meth:`held`), until the
        next :meth:`get` of ``role`` on this thread, the last reader, or :meth:`release`."""
        if readers is None or readers.count < 2:
            return
        readers.used = 1
        self._held[(threading.get_ident(), role)] = (readers, sb, key, rows)

    def release(self) -> None:
        """Drop what :meth:`hold` kept (at the end of a step: it holds an activation)."""
        self._held.clear()

    def clear(self) -> None:
        self._buffers.clear()
        self._views.clear()
        self._held.clear()


def linear_subbatch_grads(
    a: Tensor,
    d: Tensor,
    sb: Subbatches,
    w2: Tensor | None,
    transposed: bool,
    keep: bool = False,
    scratch: Scratch | None = None,
    bias: bool = False,
    bias_w2: Tensor | None = None,
    readers: Readers | None = None,
) -> SubbatchGrads:
    """The weight gradient of a linear map, the squared norm of each sub-batch's part of it, the
    k parts [k, *weight.shape] when ``keep``; with ``bias``, the same for its bias.

    ``a``: [N, P, I] inputs and ``d``: [N, P, O] output gradients, P positions per example;
    ``w2``, ``bias_w2``: P² of a preconditioned norm (parameter layout), or ``None``. ``keep``
    is for a weight with another use in the pass (a head tied to an embedding): the cross terms
    of the two uses need each sub-batch's gradient. ``scratch``: where the temporaries may live
    (not the kept gradients, which outlive the call). The bias's sub-batch gradients are the
    gathered output gradients summed over each sub-batch's rows: one read of them, as autograd's
    own bias gradient takes. ``readers``: the product layers that read ``a`` in the forward
    (:meth:`Scratch.held`: one gather for all of them).
    """
    dtype = product_dtype(a, d)
    rows = sb.k * sb.n

    def buffer(role: str, shape: tuple[int, ...]) -> Tensor | None:
        return None if scratch is None else scratch.get(role, shape, a, dtype)

    def cast(role: str, t: Tensor) -> Tensor:
        # (bf16 autocast: the output gradient in bf16, the input in float32 — cast as autocast
        # cast it for the layer's forward)
        if t.dtype == dtype:
            return t
        out = buffer(role, tuple(t.shape))
        return t.to(dtype) if out is None else out.copy_(t)

    d = cast("d-cast", d)
    _, p, i = a.shape
    o = d.shape[2]
    key = (tuple(a.shape), dtype)
    held = None if scratch is None else scratch.held("a", readers, sb, key)
    if held is not None:  # (gathered for another layer that read this same input)
        a3 = held
    else:
        a = cast("a-cast", a)
        a3 = sb.take_rows(a, buffer("a", (rows, p, i))).view(sb.k, sb.n * p, i)  # [k, n·P, I]
        if scratch is not None:
            scratch.hold("a", readers, sb, key, a3)
    d3 = sb.take_rows(d, buffer("d", (rows, p, o))).view(sb.k, sb.n * p, o)  # [k, n·P, O]
    chunk = sb.k if keep else max(1, _CHUNK_ELEMENTS // (o * i))
    if chunk >= sb.k and not keep:
        # the whole product at once (the common case, in as few operations as it takes)
        out = buffer("g", (sb.k, o, i))
        left = d3.transpose(1, 2)
        g = torch.bmm(left, a3) if out is None else torch.bmm(left, a3, out=out)
        if g.dtype != _acc_dtype(g):
            out = None if scratch is None else scratch.get("g32", g.shape, a, torch.float32)
            g = g.float() if out is None else out.copy_(g)
        total = g.sum(0)
        sq = _subbatch_sqnorms(g, None if w2 is None else (w2.t() if transposed else w2))
        grad = total.t() if transposed else total
        if not bias:
            return SubbatchGrads(grad, sq)
        per_bias = d3.sum(1, dtype=_acc_dtype(d3))  # [k, O]
        return SubbatchGrads(grad, sq, None, per_bias.sum(0), _subbatch_sqnorms(per_bias, bias_w2))
    total: Tensor | None = None
    norms = []
    kept = None
    w = None if w2 is None else (w2.t() if transposed else w2)
    for start in range(0, sb.k, chunk):
        left, right = d3[start : start + chunk].transpose(1, 2), a3[start : start + chunk]
        out = None if keep else buffer("g", (left.shape[0], o, i))
        g = torch.bmm(left, right) if out is None else torch.bmm(left, right, out=out)
        # a 16-bit g in float32 (a scratch buffer: a fresh one costs its page faults) for the
        # squared norms and the sum: no coarser than autograd's one 16-bit product
        gf = g
        if g.dtype != _acc_dtype(g):
            out = None if keep or scratch is None else scratch.get("g32", g.shape, a, torch.float32)
            gf = g.float() if out is None else out.copy_(g)
        norms.append(_subbatch_sqnorms(gf, w))
        part = gf.sum(0)
        total = part if total is None else total + part
        if keep:
            kept = gf.transpose(1, 2) if transposed else gf
    assert total is not None
    grad = total.t() if transposed else total
    if not bias:
        return SubbatchGrads(grad, torch.cat(norms), kept)
    per_bias = d3.sum(1, dtype=_acc_dtype(d3))  # [k, O]
    return SubbatchGrads(
        grad, torch.cat(norms), kept, per_bias.sum(0), _subbatch_sqnorms(per_bias, bias_w2)
    )


def conv_subbatch_grads(
    module: nn.Module,
    x: Tensor,
    d: Tensor,
    sb: Subbatches,
    w2: Tensor | None,
    keep: bool = False,
    bias: bool = False,
    bias_w2: Tensor | None = None,
    scratch: Scratch | None = None,
    readers: Readers | None = None,
) -> SubbatchGrads:
    """:func:`linear_subbatch_grads` for a convolution (``x``, ``d``: its input and output
    gradient, [N, C, ...])."""
    from noisescale.per_example.conv import subbatch_weight_grads

    dtype = product_dtype(x, d)
    per = subbatch_weight_grads(module, x, d, sb, dtype, scratch, readers)  # [k, *w.shape]
    total = per.sum(0, dtype=_acc_dtype(per))
    if w2 is not None or keep:
        per = _acc(per)
    out = SubbatchGrads(total, _subbatch_sqnorms(per, w2), per if keep else None)
    if not bias:
        return out
    per_example = d.flatten(2).sum(2, dtype=_acc_dtype(d))  # [N, O]
    per_bias = sb.take(per_example).sum(1)  # [k, O]
    return out._replace(bias_grad=per_bias.sum(0), bias_sq=_subbatch_sqnorms(per_bias, bias_w2))


def product_dtype(x: Tensor, d: Tensor) -> torch.dtype:
    """The dtype of the sub-batch products: the output gradient's when it is a 16-bit float,
    as in autograd's own weight-gradient product under autocast (which ran the layer on a 16-bit
    copy of its float32 input), else the promoted type of the two. In float32 instead, a bf16
    step's largest products would run several times slower on hardware with bf16 matrix units
    (on a GPU, without TF32, about 15×), for a precision the layer's forward never had."""
    if d.dtype in (torch.bfloat16, torch.float16):
        return d.dtype
    return d.dtype if d.dtype == x.dtype else torch.promote_types(x.dtype, d.dtype)


def _subbatch_sqnorms(g: Tensor, w2: Tensor | None) -> Tensor:
    """|g_j|² of each sub-batch gradient g_j ([k, *weight.shape]), or Σ w2 ⊙ g_j² with the P²
    of a preconditioned norm."""
    return _sqnorm_rows(g) if w2 is None else (g.pow(2) * w2).flatten(1).sum(1)


def keeps_pay(module: nn.Module, x: Tensor, k: int) -> bool:
    """Whether a weight with another use in the pass (a head tied to an embedding) may take
    sub-batch products, which then keep its k sub-batch gradients until the other use's factor
    arrives: only for a linear map whose k weight-sized gradients take no more memory than the
    per-example factors of the call would (inputs and output gradients at every position), so
    that they are never worse than the factors they replace."""
    weight = module._parameters.get("weight")
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d) or weight is None or weight.dim() != 2:
        return False
    o, i = weight.shape
    rows = x.numel() // max(1, x.shape[-1])
    return k * o * i <= rows * (o + i)


def uses_products(module: nn.Module, x: Tensor, n: int, per_subbatch: int) -> bool:
    """Whether the sub-batch products pay off for this call: a convolution, or a linear map with
    at least 16 rows (examples × positions) per sub-batch product (``per_subbatch`` examples,
    the largest sub-batch's size) whose sub-batch norms would not be cheaper in Gram form.

    The products cost, beyond the gradient itself, k weight-sized partial gradients to square
    and add up; the per-example factors grouped by sub-batch give the same norms in Gram form,
    Σ (a·a')(δ·δ') over pairs of rows of a sub-batch, at (rows)²·(I + O) each — the form
    :meth:`LinearFactor.sqnorm <noisescale.per_example.factors.LinearFactor.sqnorm>` takes when
    :func:`~noisescale.per_example.factors.gram_is_cheaper` says so. A wide layer met once per
    example (a CNN's 3136→1024 classifier at batch 128: 16 rows per sub-batch) is far cheaper
    that way: its eight partial gradients held 100 MB and cost more than the step.

    The two costs are of different kinds: the products' extra is k·I·O elements written, added
    and squared (memory-bound), the Gram form's k·rows²·(I + O) multiply-adds on top of the
    gradient autograd still computes. On the CPU an element of the first costs about
    :data:`_CPU_ELEMENT_PER_MAC` multiply-adds of the second, so the products pay from far
    fewer rows than the FLOP count alone says (``gram_is_cheaper``, which compares the Gram
    form with materialising the gradients at rows·I·O): a 768×768 layer from ≈ 125 rows per
    sub-batch, not 384 — a ViT of width 768 on 65 tokens (4 images per sub-batch, 260 rows)
    spent 17% of its step in Gram products with the FLOP rule. Elsewhere (CUDA, unmeasured)
    the FLOP rule stays.
    """
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return True
    positions = x.numel() // max(1, n * x.shape[-1])
    rows = per_subbatch * positions
    if rows < 16:
        return False
    weight = module._parameters.get("weight")
    if weight is None or weight.dim() != 2:
        return True
    o, i = weight.shape
    if not gram_is_cheaper(rows, o, i):
        return True
    return x.device.type == "cpu" and rows * rows * (i + o) >= _CPU_ELEMENT_PER_MAC * i * o
