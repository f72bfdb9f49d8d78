"""Affine normalisation layers: LayerNorm, RMSNorm, GroupNorm, InstanceNorm, and BatchNorm in
eval mode.

Their weight gradient is Σ δ ⊙ x̂ and their bias gradient Σ δ over the positions of an example,
where x̂ is the normalised input, recomputed here from the saved input. BatchNorm in training mode
normalises with statistics of the whole batch, so an example's gradient depends on the others and
a per-example gradient is not defined: it is refused.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from noisescale.errors import UnsupportedModuleError
from noisescale.per_example.factors import DenseFactor, Factor, _acc, acc_sum
from noisescale.per_example.registry import LayerRule, register_layer

_BatchNorm = nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d
_InstanceNorm = nn.InstanceNorm1d | nn.InstanceNorm2d | nn.InstanceNorm3d


def check_built(module: nn.Module, name: str) -> None:
    """What is refused when the engine is made: a BatchNorm that keeps no running statistics
    (batch statistics in every mode). Its mode is checked where it runs (:func:`check`, at each
    call): a model is built in training mode, and a loop that freezes its BatchNorms before
    every forward (``model.train(); model.apply(freeze_bn)``) — or one that never calls a
    BatchNorm (an unused head) — was refused when the tracker was made, until 2026-12-05 (a
    hunt)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.track_running_stats:
        check(module, name)


def check(module: nn.Module, name: str) -> None:
    if (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and not module.training
        and not module.track_running_stats
    ):
        raise UnsupportedModuleError(
            f"module '{name}' ({type(module).__name__}) was built with "
            "track_running_stats=False, so it normalises with statistics of the whole batch in "
            "eval mode too (it keeps no running statistics to use instead), and a per-example "
            "gradient is not defined. Build it with track_running_stats=True and freeze it "
            "(module.eval() with requires_grad_(False)), replace it with GroupNorm/LayerNorm, or "
            "measure without per-example norms: GradientNoiseTracker(model, per_example=False) "
            "with gradient-accumulation micro-batches"
        )
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
        module.training or not module.track_running_stats
    ):
        raise UnsupportedModuleError(
            f"module '{name}' ({type(module).__name__}) normalises with statistics of the whole "
            "batch in training mode, so a per-example gradient is not defined. Replace it with "
            "GroupNorm/LayerNorm, freeze it (module.eval() with requires_grad_(False) — and "
            "eval() again after every model.train(), which puts it back in training mode), or "
            "measure without per-example norms: GradientNoiseTracker(model, per_example=False) "
            "with gradient-accumulation micro-batches"
        )


def check_call(module: nn.Module, name: str, args: tuple) -> None:
    """:func:`check` at a call of a norm layer without a hook of its own (frozen: none of its
    parameters measured), through which no gradient may pass: with gradients off, or none of
    its parameters and none of its inputs requiring one — a frozen teacher (``requires_grad_(
    False)``) with BatchNorm in training mode run on the data with gradients on, inside a
    distillation wrapper —, its batch statistics weigh nothing any measured parameter's
    gradient goes through: constants, like any detached batch statistic (until 2026-12-06
    refused as coupling the examples, where the same teacher under no_grad was exact; a
    hunt). A call whose input carries a gradient (a student's frozen BatchNorm, its input
    computed from trainable layers) is checked as before."""
    if (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        # (read only where check would refuse: an evaluation-mode BatchNorm, the common frozen
        # one, pays nothing more)
        and (module.training or not module.track_running_stats)
    ) and (
        not torch.is_grad_enabled()
        or not (
            any(p.requires_grad for p in module.parameters(recurse=False))
            or any(isinstance(a, Tensor) and a.requires_grad for a in args)
            # (an input given by keyword, bn(input=h), is not among ``args``: checked, a review)
            or not any(isinstance(a, Tensor) for a in args)
        )
    ):
        return
    check(module, name)


@functools.lru_cache(maxsize=64)
def _ones(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A CPU tensor of ones (never written: read as a LayerNorm weight; a normal tensor even
    when first asked for under inference mode)."""
    with torch.inference_mode(False):
        return torch.ones(shape, dtype=dtype, device="cpu")  # (not the default device)


def _normalised(module: nn.Module, x: Tensor) -> Tensor:
    x = _acc(x)
    # the fused kernels (no bias; a weight only where it is faster, below): several times
    # faster than mean/var by hand
    if isinstance(module, nn.LayerNorm):
        shape = tuple(module.normalized_shape)
        # on the CPU with a weight of ones: torch's kernel without affine parameters takes a
        # slower path (0.5–0.7× the time with the ones in float32 at this project's shapes,
        # 0.7–0.95× in float64; the values are identical, × 1 being exact)
        ones = _ones(shape, x.dtype) if x.is_cpu else None
        return torch.layer_norm(x, shape, ones, eps=module.eps)  # (F's, less Python)
    if isinstance(module, nn.RMSNorm):
        return F.rms_norm(x, module.normalized_shape, eps=module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, eps=module.eps)
    if isinstance(module, _InstanceNorm) and (module.training or not module.track_running_stats):
        # each example's own statistics per channel: a GroupNorm with one channel per group
        return F.group_norm(x, x.shape[1], eps=module.eps)
    # BatchNorm (and InstanceNorm tracking them) in eval mode: the running statistics, per
    # channel (dim 1)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = module.running_mean.reshape(shape).to(x.dtype)
    var = module.running_var.reshape(shape).to(x.dtype)
    return (x - mean) * torch.rsqrt(var + module.eps)


def _times(d: Tensor, module: nn.Module, x: Tensor) -> Tensor:
    """d ⊙ x̂, written into the freshly computed x̂ (one tensor the size of the input fewer to
    allocate and fault in: ≈ 20% of a LayerNorm's factor on this project's CPU)."""
    xh = _normalised(module, x)
    if xh.shape == d.shape and xh.dtype == torch.promote_types(xh.dtype, d.dtype):
        return xh.mul_(d)
    return d * xh


def factors(module: nn.Module, x: Tensor, d: Tensor) -> dict[str, Factor]:
    n = x.shape[0]
    d = _acc(d)
    out: dict[str, Factor] = {}
    weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
    if isinstance(module, nn.LayerNorm | nn.RMSNorm):
        feat = tuple(module.normalized_shape)
        if weight is not None and weight.requires_grad:
            out["weight"] = DenseFactor(acc_sum(_times(d, module, x).reshape(n, -1, *feat), 1))
        if bias is not None and bias.requires_grad:
            out["bias"] = DenseFactor(acc_sum(d.reshape(n, -1, *feat), 1))
        return out
    # GroupNorm / InstanceNorm / BatchNorm: one affine parameter per channel (dim 1)
    c = x.shape[1]
    if weight is not None and weight.requires_grad:
        out["weight"] = DenseFactor(acc_sum(_times(d, module, x).reshape(n, c, -1), 2))
    if bias is not None and bias.requires_grad:
        out["bias"] = DenseFactor(acc_sum(d.reshape(n, c, -1), 2))
    return out


def shared_rows(module: nn.Module, x: object) -> bool:
    """Whether dim 0 of ``x`` is a batch: always for GroupNorm and BatchNorm, for InstanceNorm
    when the input has one (it also takes unbatched input); LayerNorm and RMSNorm treat leading
    dimensions alike, so their rule takes a shared input whole."""
    if not isinstance(x, Tensor) or isinstance(module, nn.LayerNorm | nn.RMSNorm):
        return False
    if isinstance(module, _InstanceNorm):
        return x.dim() == {nn.InstanceNorm1d: 3, nn.InstanceNorm2d: 4}.get(type(module), 5)
    return True


def flattened(module: nn.Module) -> bool:
    """LayerNorm and RMSNorm treat every leading dimension alike: the examples may come
    flattened together with positions (``LayerRule.flattened``); the others normalise per
    channel, dim 1."""
    return isinstance(module, nn.LayerNorm | nn.RMSNorm)


def unbatched(module: nn.Module, x: Tensor) -> bool:
    """An input that is one item's features and nothing else (a LayerNorm's [D], an
    InstanceNorm's [C, L]) has no batch (``LayerRule.unbatched``)."""
    if isinstance(module, nn.LayerNorm | nn.RMSNorm):
        return x.dim() == len(module.normalized_shape)
    return isinstance(module, _InstanceNorm) and not shared_rows(module, x)


_RULE = LayerRule(
    factors,
    check=check,
    shared_rows=shared_rows,
    flattened=flattened,
    unbatched=unbatched,
    name="norm",
)
for _type in (
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
):
    register_layer(_type, _RULE)
