"""nn.Embedding and nn.EmbeddingBag: row idx_t of the table receives δ_t (repeated tokens of an
example add up); a bag's gradient goes to each of its indices, times its weight."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from noisescale.errors import UnsupportedModuleError
from noisescale.per_example.factors import EmbeddingFactor, Factor
from noisescale.per_example.registry import LayerRule, register_layer

# (torch.optim.SparseAdam refuses the dense gradient a lookup with sparse=False gives)
SPARSE_ADAM = (
    " — and, where torch.optim.SparseAdam trains it, replace SparseAdam (it refuses dense "
    "gradients) by Adam or AdamW"
)


def sparse_message(name: str, module: nn.Module) -> str:
    """The refusal of an embedding module constructed with sparse=True."""
    return (
        f"module '{name}' ({type(module).__name__}) has sparse=True; its sparse gradients are "
        "not supported, in any mode (per_example=False reads dense gradients too): "
        "construct it with sparse=False" + SPARSE_ADAM
    )


def by_frequency_message(what: str, fix: str) -> str:
    """The refusal of a lookup whose gradient is scaled by the batch's token frequencies
    (``what``: the module or the functional call; ``fix``: how to switch it off)."""
    return (
        f"{what}: its gradient is divided by token frequencies counted over the whole batch, so "
        f"an example's own gradient is not defined; {fix} or use per_example=False"
    )


def check(module: nn.Embedding | nn.EmbeddingBag, name: str) -> None:
    if module.sparse:
        raise UnsupportedModuleError(sparse_message(name, module))
    if module.scale_grad_by_freq:
        raise UnsupportedModuleError(
            by_frequency_message(
                f"module '{name}' ({type(module).__name__} with scale_grad_by_freq=True)",
                "construct it with scale_grad_by_freq=False",
            )
        )


def padding_row(padding_idx: int | None, rows: int) -> int | None:
    """The row a ``padding_idx`` names in a table of ``rows`` rows: torch counts a negative one
    from the end (-1 is the last row), in F.embedding and F.embedding_bag alike. Until
    2026-12-06 a negative one was compared with the indices as given — never equal —, and the
    padding row was measured with a gradient autograd does not give it (``F.embedding(ids, w,
    padding_idx=-1)``, AWD-LSTM's embedded_dropout; ``emb.padding_idx = -1`` set after
    construction): per-example norms 1.9% off, |G|² up to 73%, without a word (a hunt)."""
    if padding_idx is not None and padding_idx < 0:
        return padding_idx + rows
    return padding_idx


def embedding_factors(module: nn.Embedding, idx: Tensor, d: Tensor) -> dict[str, Factor]:
    if not module.weight.requires_grad:
        return {}
    n = idx.shape[0]
    idx2 = idx.reshape(n, -1)
    d3 = d.reshape(n, idx2.shape[1], -1)
    pad = padding_row(module.padding_idx, module.weight.shape[0])
    if pad is not None:
        # the padding row never receives a gradient — whatever its positions' output gradient
        # holds: selected away, not multiplied by 0, which kept a NaN there (Longformer pads a
        # sequence to its window inside and gives those positions NaN gradients; autograd's
        # table gradient drops them: every norm NaN without a word until 2026-12-07, a fuzzer)
        d3 = torch.where((idx2 != pad).unsqueeze(-1), d3, 0)
    return {"weight": EmbeddingFactor(idx2, d3, module.num_embeddings)}


register_layer(nn.Embedding, LayerRule(embedding_factors, check=check, params=("weight",)))


# -- EmbeddingBag -----------------------------------------------------------------------------


def _bag_check(module: nn.EmbeddingBag, name: str) -> None:
    check(module, name)
    if module.mode == "max":
        raise UnsupportedModuleError(
            f"module '{name}' (nn.EmbeddingBag with mode='max'): its gradient goes to the "
            "element that won each dimension, which noisescale does not track; use mode='sum' "
            "or 'mean', or per_example=False"
        )


#: Why an embedding bag's per_sample_weights that require grad are refused.
PER_SAMPLE_WEIGHTS = (
    "an embedding bag (nn.EmbeddingBag or F.embedding_bag) was given per_sample_weights that "
    "require grad (computed from parameters, e.g. w[text].sigmoid(), or a gate's output): their "
    "gradient comes one per looked-up index, not one per bag, and noisescale does not attribute "
    "it to the examples. Detach them if they are not trained, or use per_example=False "
    "(micro-batch norms, which any layer gives)"
)


def refuse_learned_weights(args: tuple, kwargs: dict[str, Any]) -> None:
    """Refuse an embedding bag's call whose ``per_sample_weights`` require grad (until
    2026-12-06 their gradient, one per looked-up index, was taken for rows of examples: the
    sub-batch norms up to 14% off without a word, the other modes crashed, a hunt)."""
    psw = args[2] if len(args) > 2 else kwargs.get("per_sample_weights")
    if isinstance(psw, Tensor) and psw.requires_grad and torch.is_grad_enabled():
        raise UnsupportedModuleError(PER_SAMPLE_WEIGHTS)


def _bag_batch_size(module: nn.EmbeddingBag, args: tuple, kwargs: dict[str, Any]) -> int:
    offsets = args[1] if len(args) > 1 else kwargs.get("offsets")
    return bag_count(args[0], offsets, module.include_last_offset)


def _bag_save(module: nn.EmbeddingBag, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
    """(index [N, L], weight [N, L]): each bag's indices, padded, and their weights in the sum."""
    idx = args[0]
    offsets = args[1] if len(args) > 1 else kwargs.get("offsets")
    psw = args[2] if len(args) > 2 else kwargs.get("per_sample_weights")
    refuse_learned_weights(args, kwargs)
    pad = padding_row(module.padding_idx, module.weight.shape[0])
    return bag_rows(idx, offsets, psw, module.mode, pad, module.include_last_offset)


def bag_count(idx: Tensor, offsets: Tensor | None, include_last_offset: bool) -> int:
    """The number of bags of an embedding-bag call (its output's rows)."""
    if idx.dim() == 2 or offsets is None:
        return int(idx.shape[0])
    return int(offsets.numel()) - (1 if include_last_offset else 0)


def bag_rows(
    idx: Tensor,
    offsets: Tensor | None,
    psw: Tensor | None,
    mode: str,
    padding_idx: int | None,
    include_last_offset: bool,
) -> tuple[Tensor, Tensor]:
    """(index [N, L], weight [N, L]) of an embedding-bag call (``mode`` 'sum' or 'mean'): each
    bag's indices, padded, and the weight of each in the bag's output — its per-sample weight,
    over the bag's count of non-padding indices for 'mean', zero for padding; bag n's output
    is Σ_t weight[n, t] · table[index[n, t]]. With ``include_last_offset`` there are
    N = offsets.numel() - 1 bags, without it N = offsets.numel(); either way the input's end
    closes the last bag, as in torch's kernels."""
    if psw is not None:
        psw = psw.detach()
    if idx.dim() == 2:
        bag = idx
        weight = psw if psw is not None else torch.ones(bag.shape, device=idx.device)
        valid = torch.ones_like(bag, dtype=torch.bool)
    else:
        assert offsets is not None
        n = bag_count(idx, offsets, include_last_offset)
        # the last bag runs to the input's end, also with include_last_offset=True: torch
        # reads the last offset only for the count of bags (indices after it are the last
        # bag's; before 2026-12 they were left out, the audit refusing 33%)
        ends = torch.cat([offsets[1:n], offsets.new_tensor([idx.numel()])])
        starts = offsets[:n]
        lengths = ends - starts
        width = int(lengths.max()) if n else 0  # one host read per call, in the forward
        pos = torch.arange(width, device=idx.device)
        valid = pos[None, :] < lengths[:, None]
        flat = (starts[:, None] + pos[None, :]).clamp_max(max(idx.numel() - 1, 0))
        bag = torch.where(valid, idx[flat], torch.zeros_like(flat))
        w = psw[flat] if psw is not None else torch.ones(bag.shape, device=idx.device)
        weight = torch.where(valid, w, torch.zeros_like(w))
    if padding_idx is not None:
        valid = valid & (bag != padding_idx)
    weight = weight * valid.to(weight.dtype)
    if mode == "mean":
        count = valid.sum(1, keepdim=True).clamp_min(1)
        weight = weight / count.to(weight.dtype)
    return bag, weight


def bag_factors(
    module: nn.EmbeddingBag, saved: tuple[Tensor, Tensor], d: Tensor
) -> dict[str, Factor]:
    if not module.weight.requires_grad:
        return {}
    bag, weight = saved
    # index t of bag n receives weight[n, t] · δ_n; a call shared by every example (K bags of
    # negatives, saved [N, K, L] as each example's) is each example's K bags read as one
    # (until 2026-12-06 a size mismatch here, a hunt)
    dd = weight.unsqueeze(-1).to(d.dtype if d.dtype.is_floating_point else torch.float32)
    # (where the weight is 0 — padding, an empty bag's slots — selected away, not multiplied: a
    # NaN output gradient of a bag of padding alone, which autograd's table gradient never
    # reads, read every norm NaN without a word until 2026-12-07, a review; embedding_factors)
    dd = torch.where(dd != 0, dd * d.unsqueeze(-2), 0)
    n = dd.shape[0]
    return {
        "weight": EmbeddingFactor(
            bag.reshape(n, -1), dd.reshape(n, -1, dd.shape[-1]), module.num_embeddings
        )
    }


register_layer(
    nn.EmbeddingBag,
    LayerRule(
        bag_factors,
        save=_bag_save,
        check=_bag_check,
        params=("weight",),
        batch_size=_bag_batch_size,
        name="EmbeddingBag",
    ),
)
