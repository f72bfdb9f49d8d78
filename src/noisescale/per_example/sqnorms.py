"""``per_example_sqnorms``: the engine as a context manager, for one forward/backward pass."""

from __future__ import annotations

import torch
from torch import nn

from noisescale.errors import NoiseScaleInputError
from noisescale.per_example.engine import LOSS_REDUCTIONS, PerExampleNorms
from noisescale.tokens import TokenWatcher


class per_example_sqnorms:
    """Context manager giving |∇θ ℓ_i|² for each example i of a forward/backward pass.

    Usage::

        with noisescale.per_example_sqnorms(model, loss_reduction="mean") as pe:
            loss = criterion(model(x), y)      # the forward runs inside: the hooks need it
            loss.backward()
        pe.sqnorms                             # tensor [N]: |∇θ ℓ_i|² of each example's own loss

    The pass is audited (:mod:`noisescale.per_example.audit`): a use of a parameter that cannot be
    attributed to examples raises :class:`~noisescale.errors.UnsupportedModuleError` instead of
    returning a wrong number.

    Args:
        model: The model whose trainable parameters are measured.
        loss_reduction: ``"mean"`` if the backpropagated loss averaged the examples' losses,
            ``"sum"`` if it summed them. Per-example norms are those of each example's own loss.

    After the block, ``sqnorms`` is a tensor [N] (examples of several passes are concatenated).
    """

    def __init__(self, model: nn.Module, loss_reduction: str = "mean") -> None:
        if loss_reduction not in LOSS_REDUCTIONS:
            raise NoiseScaleInputError(
                f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}"
            )
        self.loss_reduction = loss_reduction
        self.engine = PerExampleNorms(model)
        # (for the audit: the logits a Hugging Face loss was computed from, a root of its replay
        # when the model returns only its loss; the token counts are not used here)
        self._tokens = TokenWatcher(model, self.engine.current_pass)
        self.sqnorms: torch.Tensor | None = None

    def __enter__(self) -> per_example_sqnorms:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                collected = self.engine.collect(learn=False)
                passes = [p for p in collected if p.raw_sqnorms is not None]
                if collected and all(p.batch_size == 0 for p in collected):
                    self.sqnorms = torch.zeros(0)  # an empty batch (e.g. Poisson sampling)
                    return
                if not passes:
                    raise NoiseScaleInputError(
                        "no per-example gradient was computed: run the forward pass and "
                        "loss.backward() after creating per_example_sqnorms(model) (e.g. both "
                        "inside the `with` block)"
                    )
                parts = []
                for p in passes:
                    scale = float(p.batch_size) ** 2 if self.loss_reduction == "mean" else 1.0
                    parts.append(p.raw_sqnorms * scale)
                self.sqnorms = torch.cat(parts)
        finally:
            self._tokens.remove()
            self.engine.remove()
