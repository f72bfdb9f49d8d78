"""nn.Embedding: row idx_t of the table receives δ_t; repeated tokens in one example add up."""

from __future__ import annotations

from torch import Tensor, nn

from noisescale.errors import UnsupportedModuleError
from noisescale.per_example.factors import EmbeddingFactor, Factor


def check(module: nn.Embedding, name: str) -> None:
    if module.scale_grad_by_freq:
        raise UnsupportedModuleError(
            f"module '{name}' (nn.Embedding with scale_grad_by_freq=True): its gradient is divided "
            "by token frequencies counted over the whole batch, so an example's own gradient is "
            "not defined; construct it with scale_grad_by_freq=False or use per_example=False"
        )


def save(module: nn.Embedding, args: tuple, output: Tensor) -> Tensor:
    return args[0]


def factors(module: nn.Embedding, idx: Tensor, d: Tensor) -> dict[str, Factor]:
    if not module.weight.requires_grad:
        return {}
    n = idx.shape[0]
    idx2 = idx.reshape(n, -1)
    d3 = d.reshape(n, idx2.shape[1], -1)
    if module.padding_idx is not None:
        # the padding row never receives a gradient
        d3 = d3 * (idx2 != module.padding_idx).unsqueeze(-1).to(d3.dtype)
    return {"weight": EmbeddingFactor(idx2, d3, module.num_embeddings)}
