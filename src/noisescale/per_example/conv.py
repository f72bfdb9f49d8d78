"""nn.Conv1d/2d/3d (stride, padding, dilation, groups, any padding mode), exactly.

The per-example weight gradient of each group is Σ_l δ_l u_lᵀ over output positions l, with u_l
the input patch at l — the same algebra as a Linear on a sequence, so the cheaper of two forms is
used. Materialised (L·CK·O per example): the batch is folded into the convolution's groups and one
grouped weight-gradient convolution yields every example's gradient, with no patch matrix in
memory. Gram (L²·(CK+O) per example, cheaper for small feature maps): the input is unfolded into
patches and Σ_{l,m} (u_l·u_m)(δ_l·δ_m) is summed.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from noisescale.errors import UnsupportedModuleError
from noisescale.per_example.factors import (
    DenseFactor,
    Factor,
    LinearFactor,
    _acc,
    _sqnorm_rows,
    acc_sum,
)
from noisescale.per_example.registry import LayerRule, register_layer

ConvNd = nn.Conv1d | nn.Conv2d | nn.Conv3d


def _pad(module: ConvNd, x: Tensor) -> Tensor:
    k, dil = module.kernel_size, module.dilation
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return x
        # 'same': the total padding dil·(k−1), the odd one at the end, as torch does
        pads = []
        for kd, dd in zip(k, dil, strict=True):
            total = dd * (kd - 1)
            pads.append((total // 2, total - total // 2))
    else:
        pads = [(p, p) for p in module.padding]
    flat = [p for pair in reversed(pads) for p in pair]  # F.pad wants the last dim first
    if not any(flat):
        return x
    if module.padding_mode == "zeros":
        return F.pad(x, flat)
    return F.pad(x, flat, mode=module.padding_mode)


def unfold(module: ConvNd, x: Tensor) -> Tensor:
    """Patches [N, C·∏k, L] in the layout of ``weight.flatten(1)`` (channel, then kernel dims)."""
    x = _pad(module, x)
    dims = len(module.kernel_size)
    if dims == 2:
        # the im2col kernel writes the patches once, already in this layout
        return F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
    for j, (kd, sd, dd) in enumerate(
        zip(module.kernel_size, module.stride, module.dilation, strict=True)
    ):
        x = x.unfold(2 + j, (kd - 1) * dd + 1, sd)
        if dd > 1:
            x = x[..., ::dd]
    n, c = x.shape[:2]
    spatial = x.shape[2 : 2 + dims]
    # [N, C, L1..Ld, k1..kd] -> [N, C, k1..kd, L1..Ld]
    perm = [0, 1, *range(2 + dims, 2 + 2 * dims), *range(2, 2 + dims)]
    x = x.permute(perm)
    return x.reshape(
        n, c * int(torch.tensor(module.kernel_size).prod()), int(torch.tensor(spatial).prod())
    )


_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight}
_WEIGHT_GRAD[3] = torch.nn.grad.conv3d_weight


def per_example_weight_grads(module: ConvNd, x: Tensor, d: Tensor) -> Tensor:
    """Every example's weight gradient, [N, *weight.shape], from one grouped convolution.

    Example n's input channels and output gradients become groups n·G … n·G + G − 1 of a
    convolution with N·G groups over a batch of one, whose weight gradient is then exactly the
    stack of the per-example weight gradients.
    """
    n, w = x.shape[0], module.weight
    x, d = _acc(x), _acc(d)
    if x.dim() > w.dim():
        # [N, T, C, …]: each example's T frames (LayerRule.flattened) become the batch of that
        # convolution, whose weight gradient sums over it: [T, N·C, …]
        x, d = x.transpose(0, 1).flatten(1, 2), d.transpose(0, 1).flatten(1, 2)
    else:
        x = x.reshape(1, n * x.shape[1], *x.shape[2:])
        d = d.reshape(1, n * d.shape[1], *d.shape[2:])
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        padding = module.padding
    else:
        x, padding = _pad(module, x), 0
    grads = _WEIGHT_GRAD[x.dim() - 2](
        x,
        (n * w.shape[0], *w.shape[1:]),
        d,
        stride=module.stride,
        padding=padding,
        dilation=module.dilation,
        groups=n * module.groups,
    )
    return grads.view(n, *w.shape)


# Fewer input channels per group than this (an RGB stem): k weight-gradient convolutions of one
# sub-batch each, not one grouped convolution, whose CPU kernel is several times slower there
# (3→16 channels, 3×3, batch 64, k = 8 on this project's CPU: 5.0 ms grouped, 1.2 ms as k calls,
# 0.8 ms for the whole batch's one gradient).
_GROUPED_MIN_CHANNELS = 8


def subbatch_weight_grads(
    module: ConvNd,
    x: Tensor,
    d: Tensor,
    sb: Any,
    dtype: torch.dtype | None = None,
    scratch: Any = None,
    readers: Any = None,
) -> Tensor:
    """The weight gradient of each sub-batch, [k, *weight.shape], from one grouped convolution.

    Sub-batch j's channels become groups j·G … j·G + G − 1 of a convolution over a batch of its
    n examples (the examples of different sub-batches share the batch dimension), gathered in
    that layout in one copy. ``dtype``: what the convolution runs in (default: float32 at
    least). ``scratch``, ``readers``: a :class:`~noisescale.per_example.subbatch.Scratch` and
    the product layers that read ``x`` in the forward: convolutions that read one input (a
    residual block's first convolution and its projection shortcut) gather it once.
    """
    w = module.weight
    # [N, T, C, …]: each example's T frames (LayerRule.flattened), padded as [N·T, C, …]
    frames = x.shape[1] if x.dim() > w.dim() else 0
    if frames:
        x, d = x.flatten(0, 1), d.flatten(0, 1)
    if dtype is None:
        x, d = _acc(x), _acc(d)
    else:
        x, d = x.to(dtype), d.to(dtype)
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        padding = module.padding
    else:  # (padded here, as this module pads: not shared with another layer)
        x, padding, readers = _pad(module, x), 0, None
    if frames:
        x, d = x.unflatten(0, (-1, frames)), d.unflatten(0, (-1, frames))
    k, n = sb.k, sb.n
    grouped = module.in_channels // module.groups >= _GROUPED_MIN_CHANNELS
    if not grouped and _patchify(module):
        return _patchify_subbatch_grads(module, x, d, sb)

    role, key = ("conv-interleaved" if grouped else "conv-blocks"), (tuple(x.shape), x.dtype)
    xs = None if scratch is None else scratch.held(role, readers, sb, key)
    if xs is None:
        xs = sb.take(x, interleaved=grouped)
        if scratch is not None:
            scratch.hold(role, readers, sb, key, xs)
    ds = sb.take(d, interleaved=grouped)
    if frames:
        # the frames of a sub-batch's examples join its convolution's batch:
        # [n, k, T, C, …] -> [n·T, k, C, …] grouped, [k, n, T, C, …] -> [k, n·T, C, …] not
        if grouped:
            xs, ds = xs.transpose(1, 2).flatten(0, 1), ds.transpose(1, 2).flatten(0, 1)
        else:
            xs, ds = xs.flatten(1, 2), ds.flatten(1, 2)
        x, d, n = x[:, 0], d[:, 0], n * frames  # (their shapes, one frame's)
    conv = functools.partial(
        _WEIGHT_GRAD[x.dim() - 2],
        stride=module.stride,
        padding=padding,
        dilation=module.dilation,
    )
    if not grouped:  # [k, n, C, ...]: one convolution per sub-batch
        return torch.stack([conv(xs[j], w.shape, ds[j], groups=module.groups) for j in range(k)])
    xf = xs.view(n, k * x.shape[1], *x.shape[2:])  # [n, k, C, ...] -> [n, k·C, ...]
    df = ds.view(n, k * d.shape[1], *d.shape[2:])
    grads = conv(xf, (k * w.shape[0], *w.shape[1:]), df, groups=k * module.groups)
    return grads.view(k, *w.shape)


def _patchify(module: ConvNd) -> bool:
    """Whether the convolution cuts its input into non-overlapping patches and maps each
    linearly (kernel = stride, no padding or dilation, one group): the stem of ViT, Swin,
    ConvNeXt, CLIP's vision tower."""
    return (
        module.groups == 1
        and tuple(module.kernel_size) == tuple(module.stride)
        and not isinstance(module.padding, str)
        and not any(module.padding)
        and all(dd == 1 for dd in module.dilation)
    )


def _patchify_subbatch_grads(module: ConvNd, x: Tensor, d: Tensor, sb: Any) -> Tensor:
    """:func:`subbatch_weight_grads` of a patchify convolution: it is a Linear on the patches,
    so the k sub-batch gradients are one batched product of the gathered output gradients
    [k, O, n·L] with the gathered patches [k, n·L, C·∏K]. Taken for inputs with fewer channels
    than the grouped convolution wants (an RGB stem), where it replaces k weight-gradient
    convolutions: the bench ViT's stem (3→128, 4×4, 32 images of 32×32) 1.65 → 0.71 ms, where
    autograd's one convolution takes 0.59 ms; with more channels the grouped convolution is
    faster than copying the patches (16→32 at 16×16: 0.70 against 2.4 ms). Input beyond the
    last whole patch is left out, as the convolution leaves it."""
    kernel = tuple(module.kernel_size)
    dims = len(kernel)
    k, n = sb.k, sb.n
    xs = sb.take_rows(x)  # [k·n, C, S1..Sd]
    ds = sb.take_rows(d)  # [k·n, O, L1..Ld]
    if xs.dim() > dims + 2:  # [k·n, T, C, …]: each example's T frames (LayerRule.flattened)
        n *= xs.shape[1]
        xs, ds = xs.flatten(0, 1), ds.flatten(0, 1)
    c, o = xs.shape[1], ds.shape[1]
    grid = ds.shape[2:]
    crop = tuple(slice(0, g * kk) for g, kk in zip(grid, kernel, strict=True))
    xs = xs[(slice(None), slice(None), *crop)]
    # [k·n, C, L1, K1, ..., Ld, Kd] -> [k·n, L1..Ld, C, K1..Kd]
    split = [k * n, c]
    for g, kk in zip(grid, kernel, strict=True):
        split += [g, kk]
    perm = [0, *range(2, 2 + 2 * dims, 2), 1, *range(3, 3 + 2 * dims, 2)]
    positions = math.prod(grid)
    patches = xs.reshape(split).permute(perm).reshape(k, n * positions, -1)
    left = ds.reshape(k, n, o, positions).transpose(1, 2).reshape(k, o, n * positions)
    return torch.bmm(left, patches).view(k, *module.weight.shape)


# Per-example gradients up to this many elements (4 MiB in fp32) are always built in one
# grouped convolution: below it, one call per few examples costs more than the memory saved.
_CHUNK_FLOOR = 1 << 20


class ConvWeightFactor(DenseFactor):
    """A conv weight's per-example gradients, materialised only when asked for.

    Its squared norms are computed a chunk of examples at a time, so the per-example gradients
    alive at once never outgrow the layer's own input or output gradient (or 4 MiB), and the
    smaller grouped convolutions are faster, too. Cross terms and preconditioned norms use
    ``grads``.
    """

    def __init__(self, module: ConvNd, x: Tensor, d: Tensor) -> None:
        self.module, self.x, self.d = module, x, d

    @property
    def grads(self) -> Tensor:  # type: ignore[override]
        return per_example_weight_grads(self.module, self.x, self.d)

    def sqnorm(self) -> Tensor:
        budget = max(self.x.numel(), self.d.numel(), _CHUNK_FLOOR)
        chunk = max(1, budget // self.module.weight.numel())
        parts = [
            _sqnorm_rows(per_example_weight_grads(self.module, x, d))
            for x, d in zip(self.x.split(chunk), self.d.split(chunk), strict=True)
        ]
        return torch.cat(parts)

    def grouped(self, sb: Any) -> DenseFactor:
        """Sub-batch gradients (see :func:`subbatch_weight_grads`)."""
        return DenseFactor(subbatch_weight_grads(self.module, self.x, self.d, sb))

    def summed(self, shape: torch.Size) -> Tensor:
        """The weight gradient of the whole batch (one ungrouped weight-gradient convolution)."""
        m = self.module
        x, d = _acc(self.x), _acc(self.d)
        if x.dim() > m.weight.dim():  # [N, T, C, …]: the frames flattened back
            x, d = x.flatten(0, 1), d.flatten(0, 1)
        if m.padding_mode == "zeros" and not isinstance(m.padding, str):
            padding = m.padding
        else:
            x, padding = _pad(m, x), 0
        return _WEIGHT_GRAD[x.dim() - 2](
            x,
            m.weight.shape,
            d,
            stride=m.stride,
            padding=padding,
            dilation=m.dilation,
            groups=m.groups,
        ).reshape(shape)


def factors(module: ConvNd, x: Tensor, d: Tensor) -> dict[str, Factor]:
    _check_channels(module, x)
    if x.dim() > len(module.kernel_size) + 2:
        return _frame_factors(module, x, d)
    n, g = x.shape[0], module.groups
    out: dict[str, Factor] = {}
    d3 = d.reshape(n, d.shape[1], -1)  # [N, O, L]
    if module.weight.requires_grad:
        length, ck, o = d3.shape[2], module.weight[0].numel(), module.out_channels // g
        if length * (ck + o) >= ck * o:
            out["weight"] = ConvWeightFactor(module, x, d)
        elif g == 1:
            # transposed views: bmm reads them in place, no copy of the patches
            u = unfold(module, x)  # [N, C·K, L]
            out["weight"] = LinearFactor(u.transpose(1, 2), d3.transpose(1, 2))
        else:
            u = unfold(module, x)
            a = u.reshape(n, g, ck, length).permute(0, 1, 3, 2).reshape(n * g, length, ck)
            dd = d3.reshape(n, g, o, length).permute(0, 1, 3, 2).reshape(n * g, length, o)
            out["weight"] = LinearFactor(a, dd, groups=g)
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = DenseFactor(acc_sum(d3, 2))
    return out


def _frame_factors(module: ConvNd, x: Tensor, d: Tensor) -> dict[str, Factor]:
    """:func:`factors` of a call on [N·T, C, …] rows, each example's T frames in turn — a 2-D
    CNN over a video's frames folded into the batch, ``cnn(x.flatten(0, 1))`` (TSN, CNN-LSTM) —
    given as x [N, T, C, …], d [N, T, O, …] (``LayerRule.flattened``). An example's gradient is
    the sum of its frames', that of one convolution whose output positions are its T frames'
    together (refused as a shared call until 2026-12-06, a hunt)."""
    n, t, g = x.shape[0], x.shape[1], module.groups
    d4 = d.reshape(n, t, d.shape[2], -1)  # [N, T, O, L]
    out: dict[str, Factor] = {}
    if module.weight.requires_grad:
        length, ck, o = t * d4.shape[3], module.weight[0].numel(), module.out_channels // g
        if length * (ck + o) >= ck * o:
            out["weight"] = ConvWeightFactor(module, x, d)
        else:
            # the patches of an example's frames side by side: [N·G, T·L, C·K/G]
            u = unfold(module, x.flatten(0, 1))  # [N·T, C·K, L]
            pos = u.shape[2]
            a = u.reshape(n, t, g, ck, pos).permute(0, 2, 1, 4, 3).reshape(n * g, t * pos, ck)
            dd = d4.reshape(n, t, g, o, pos).permute(0, 2, 1, 4, 3).reshape(n * g, t * pos, o)
            out["weight"] = LinearFactor(a, dd, groups=g)
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = DenseFactor(acc_sum(acc_sum(d4, 3), 1))
    return out


def _check_channels(module: ConvNd, x: Tensor) -> None:
    """Refuse a call whose examples' rows are not a batch's: an unbatched convolution ([C, …],
    its channels in dim 0) on the examples flattened together with another dimension, which
    the engine hands over as [N, C/N, …] — its channels mixed across the examples."""
    dims = len(module.kernel_size)
    if x.dim() >= dims + 2 and x.shape[-dims - 1] != module.in_channels:
        raise UnsupportedModuleError(
            f"a {type(module).__name__} was called unbatched ([C, …] input, dim 0 its "
            f"{module.in_channels} channels) on rows that hold the examples flattened together "
            "with another dimension: it mixes the examples' rows as channels, and a per-example "
            "gradient is not defined. Call it with a batch ([N·T, C, …]: each example's rows in "
            "turn), or use per_example=False"
        )


def frames(module: nn.Module) -> bool:
    """A convolution treats the images of a batch alike: the examples may come flattened
    together with another dimension, [N·T, C, …] — a video's frames folded into the batch —
    each example's T images in turn (``LayerRule.flattened``)."""
    return True


def batched(module: nn.Module, x: Any) -> bool:
    """Whether ``x`` has a batch dimension (a convolution also takes one unbatched input)."""
    return isinstance(x, Tensor) and x.dim() == len(module.kernel_size) + 2


def unbatched(module: nn.Module, x: Tensor) -> bool:
    """``LayerRule.unbatched``: one image, [C, …], no batch."""
    return not batched(module, x)


CONV_RULES = tuple(
    register_layer(
        _type,
        LayerRule(
            factors,
            shared_rows=batched,
            flattened=frames,
            unbatched=unbatched,
            name=_type.__name__,
        ),
    )
    for _type in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
)


# -- transposed convolutions -------------------------------------------------------------------
#
# conv_transpose(x, W) is the adjoint of conv(·, W) with the same stride, padding, dilation and
# groups: ⟨conv_transpose(x, W), δ⟩ = ⟨x, conv(δ, W)⟩. So an example's gradient of a transposed
# convolution's weight is the weight gradient of the convolution that maps δ (its output
# gradient, C_out channels) to x (its input, C_in channels), whose weight [C_in, C_out/g, k…] is
# stored exactly as the transposed convolution's: the rule above with the roles of input and
# output gradient exchanged. (output_padding only adds trailing output positions the forward
# convolution's floor drops again.) The bias is Σ δ over positions, per output channel.

ConvTransposeNd = nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d


class _AsConv:
    """A transposed convolution seen as the convolution it is the adjoint of (no bias)."""

    def __init__(self, module: ConvTransposeNd) -> None:
        self.weight = module.weight
        self.bias = None
        self.groups = module.groups
        self.out_channels = module.weight.shape[0]  # the transposed layer's in_channels
        self.in_channels = module.weight.shape[1] * module.groups
        self.kernel_size = tuple(module.kernel_size)
        self.stride, self.dilation = tuple(module.stride), tuple(module.dilation)
        self.padding = tuple(module.padding)
        self.padding_mode = "zeros"


def check_transposed(module: nn.Module, name: str) -> None:
    if module.padding_mode != "zeros":  # torch itself accepts only zeros today
        raise UnsupportedModuleError(
            f"module '{name}' ({type(module).__name__}) pads with {module.padding_mode!r}; "
            "noisescale's rule for transposed convolutions assumes zero padding. Use "
            "per_example=False"
        )
    check_output_padding(module.stride, module.output_padding, f"module '{name}'")


def check_output_padding(stride: Any, output_padding: Any, what: str) -> None:
    """The adjoint convolution of a transposed one has L_in + ⌊output_padding/stride⌋
    positions per dimension: with ``output_padding`` ≥ ``stride`` (torch allows it below the
    dilation) more than the input's, and the rule does not hold — refused (the factors
    crashed on a size mismatch, a review, 2026-12-05)."""
    strides = tuple(stride) if isinstance(stride, list | tuple) else (stride,)
    pads = tuple(output_padding) if isinstance(output_padding, list | tuple) else (output_padding,)
    if len(pads) == 1 and len(strides) > 1:
        pads = pads * len(strides)
    if len(strides) == 1 and len(pads) > 1:
        strides = strides * len(pads)
    if any(int(p) >= int(st) for p, st in zip(pads, strides, strict=False)):
        raise UnsupportedModuleError(
            f"{what} is a transposed convolution with output_padding {list(pads)} not below its "
            f"stride {list(strides)} (torch allows it below the dilation): noisescale's rule, "
            "the adjoint convolution's, does not cover the extra output positions. Use an "
            "output_padding below the stride (or crop the output), or per_example=False"
        )


def transposed_factors(module: ConvTransposeNd, x: Tensor, d: Tensor) -> dict[str, Factor]:
    out = factors(_AsConv(module), d, x)  # type: ignore[arg-type]
    if module.bias is not None and module.bias.requires_grad:
        if d.dim() > len(module.kernel_size) + 2:
            # [N, T, O, …]: each example's T frames (LayerRule.flattened) summed with its
            # positions (refused on frames folded into the batch until a review of 2026-12-06)
            d = d.transpose(1, 2)
        out["bias"] = DenseFactor(acc_sum(d.reshape(d.shape[0], d.shape[1], -1), 2))
    return out


TRANSPOSED_CONV_RULES = tuple(
    register_layer(
        _type,
        LayerRule(
            transposed_factors,
            check=check_transposed,
            shared_rows=batched,
            flattened=frames,
            unbatched=unbatched,
            name=_type.__name__,
        ),
    )
    for _type in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
)
