"""nn.Conv1d/2d/3d (stride, padding, dilation, groups, any padding mode) via an exact unfold.

The input is unfolded into patches so that the per-example weight gradient of each group is
Σ_l δ_l u_lᵀ over output positions l — the same algebra as a Linear on a sequence, with the Gram
or the materialised form chosen by cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from noisescale.per_example.factors import DenseFactor, Factor, LinearFactor

ConvNd = nn.Conv1d | nn.Conv2d | nn.Conv3d


def save(module: ConvNd, args: tuple, output: Tensor) -> Tensor:
    return args[0]


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


def factors(module: ConvNd, x: Tensor, d: Tensor) -> dict[str, Factor]:
    n, g = x.shape[0], module.groups
    out: dict[str, Factor] = {}
    d3 = d.reshape(n, d.shape[1], -1)  # [N, O, L]
    if module.weight.requires_grad:
        u = unfold(module, x)  # [N, C·K, L]
        ck, length = u.shape[1] // g, u.shape[2]
        o = d3.shape[1] // g
        a = u.reshape(n, g, ck, length).permute(0, 1, 3, 2).reshape(n * g, length, ck)
        dd = d3.reshape(n, g, o, length).permute(0, 1, 3, 2).reshape(n * g, length, o)
        out["weight"] = LinearFactor(a, dd, groups=g)
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = DenseFactor(d3.sum(2))
    return out
