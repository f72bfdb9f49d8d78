"""``per_example_sqnorms``: the engine as a context manager, for one forward/backward pass."""

from __future__ import annotations

import torch
from torch import nn

from noisescale.errors import NoiseScaleInputError
from noisescale.per_example.engine import (
    LOSS_REDUCTIONS,
    PerExampleNorms,
    refuse_complex_parameters,
)
from noisescale.per_example.messages import (
    loss_kind_message,
    own_labels_message,
    submodule_called_message,
    transform_message,
)
from noisescale.per_example.passes import PassNorms
from noisescale.tokens import TokenWatcher


def _loss_scale(p: PassNorms) -> float:
    """The GradScaler's scale the pass's backward ran with (read then: an ``update()`` inside
    the block may have changed the scaler's since), 1.0 without one."""
    if p.grad_scaler is None:
        return 1.0
    if p.grad_scale is not None:
        return float(p.grad_scale)
    return float(p.grad_scaler.get_scale())


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
            A Hugging Face model called with ``labels=`` weighs its tokens itself (a mean over
            the batch's counted tokens, or over ``num_items_in_batch``): its weights are
            measured, whatever ``loss_reduction`` says, and each example's own loss is the
            model's loss on that example alone (the mean over its own counted tokens, times any
            constant the loss was multiplied by; an example with none has norm 0). T5 and BART
            compute that loss themselves: refused when the examples count different numbers of
            tokens, a plain mean over the examples (held to ``loss_reduction``) when as many;
            so is BERT's classifier over labels of which some are -100 (under either).

    A loss scaled by a ``torch.amp.GradScaler`` (``scaler.scale(loss).backward()``) has the
    scale divided out (the scale its backward ran with).

    After the block, ``sqnorms`` is a tensor [N] (examples of several passes are concatenated).
    """

    def __init__(self, model: nn.Module, loss_reduction: str = "mean") -> None:
        if loss_reduction not in LOSS_REDUCTIONS:
            raise NoiseScaleInputError(
                f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}"
            )
        self.loss_reduction = loss_reduction
        refuse_complex_parameters(model, one_shot=True)
        self.engine = PerExampleNorms(model)
        # (a mean over a slice of the rows is refused here, as uneven: no warning first)
        self.engine._loss_watch.rows_left_warned = True
        # (for the audit: the logits a Hugging Face loss was computed from, a root of its replay
        # when the model returns only its loss; the token counts are not used here)
        self._tokens = TokenWatcher(model, self.engine.current_pass)
        self.sqnorms: torch.Tensor | None = None

    def __enter__(self) -> per_example_sqnorms:
        return self

    def _own(self, p: PassNorms) -> torch.Tensor:
        """The squared norms of each example's own loss from the pass's measured ones.

        A Hugging Face model's own loss (``labels=``) is a mean over the pass's counted tokens
        (or over ``num_items_in_batch``): example i weighs c_i/D in it, not 1/N, when its c_i
        counted tokens differ from the others' (labels -100 on padding) — the weights the
        wrapped ``loss_function`` measured give each example's own loss, the model's loss on
        that example alone (its own token mean). A model that computes such a loss itself
        (T5, BART) cannot be weighed: refused unless every example counts as many tokens."""
        raw = p.raw_sqnorms
        assert raw is not None
        units = p.units
        if units is not None and units.measured and units.one_term:
            # The model's own loss (labels=) is one term of what was backpropagated — an RPO
            # or SFT term beside a policy loss, term + β·out.loss —: its token weights describe
            # that term alone, and dividing the whole gradient by them read every norm 1/β²
            # off (×4 at β = 0.5, up to ×13 with padding, 0 for an example without labels)
            # until 2026-12-06, a hunt. Read by loss_reduction, as the tracker does — exact
            # where every example counts as many tokens; refused where they do not (each then
            # weighs by its count in that term).
            counts = units.counts
            if counts.numel() and bool((counts != counts[0]).any()):
                raise NoiseScaleInputError(
                    "the model's own loss (labels=) is one term of the loss backpropagated "
                    "here (another term beside out.loss), and the examples count different "
                    f"numbers of tokens in it ({counts.tolist()[:8]}…): each example weighs "
                    "by its token count in that term, not 1/N, so the norms of each example's "
                    "own loss cannot be read from it. Compute that term yourself from the "
                    "logits, per example (each sequence's token mean, then the mean over the "
                    "examples), give every example as many counted tokens, or measure with "
                    "GradientNoiseTracker, which takes such a step over the examples"
                )
            units = None
        if units is not None and units.measured and units.grad is not None:
            # Example i's weight in the model's loss, not in what was backpropagated: a
            # constant the user put on it (0.5 · out.loss, out.loss / k) is part of each
            # example's loss, as for any loss (and as in raw_sqnorms) — until 2026-12-07 the
            # gradient that reached the model's loss was divided out with it, and the norms
            # were those of out.loss alone (c² off, a hunt). A GradScaler's scale is not the
            # user's: divided out.
            # (a classifier's mean over its examples not labelled -100 has weights of its own)
            shares = units.own
            if shares is None:
                shares = units.counts / units.denominator  # type: ignore[operator]
            scale = _loss_scale(p)
            weight = (shares * scale).to(device=raw.device, dtype=raw.dtype)
            own = raw / weight.square()
            # an example with no counted token has no loss of its own and no gradient: 0
            return torch.where(weight != 0, own, torch.zeros_like(own))
        counts = p.label_counts
        if p.units_error and p.float_labels:
            raise NoiseScaleInputError(p.units_error)
        if p.units_error and counts is not None and bool((counts != counts[0]).any()):
            raise NoiseScaleInputError(
                "the model computed its loss itself from labels= (not through its "
                "loss_function), as a mean over the tokens (pixels) whose label is not -100 "
                "(or the model's config.semantic_loss_ignore_index), and the "
                f"examples count different numbers of them ({counts.tolist()[:8]}…): each "
                "example weighs by its token count in that loss, not 1/N, so the per-example "
                "norms of each example's own loss cannot be read from it. Compute the loss "
                "yourself from the logits, per example (e.g. the mean over each sequence's "
                "tokens, then the mean over the examples), or give every example as many "
                "counted tokens"
            )
        counted = p.counted_mean is not None and bool(p.counted_mean)
        counted = counted or (p.counted_slice is not None and bool(p.counted_slice))
        # (the model's own loss measured, as one term or all of it: its counts decide)
        if p.counted_inside is not None and p.label_counts is None and p.units is None:
            counted = counted or bool(p.counted_inside)
        # (a counted mean is no plain mean over the examples: loss_kind_message passes it, and
        # "sum" takes it as given, as (x * m).sum() / m.sum() — until 2026-12-06 refused under
        # "sum" as well, x[mask].mean() with the wrong cause, a hunt)
        # (the model's own token mean, every example counting as many tokens: a plain mean over
        # the examples of each one's own loss, as with no label -100 — held to the declaration;
        # until 2026-12-07 taken as given under "sum", N² below each example's own loss without
        # a word, a hunt)
        evenly = p.units_error is not None and counts is not None
        wrong_kind = own_labels_message(self.loss_reduction, [p]) or loss_kind_message(
            self.loss_reduction, [p], evenly=evenly
        )
        if wrong_kind is not None:
            raise NoiseScaleInputError(wrong_kind)
        if counted and self.loss_reduction == "mean":
            raise NoiseScaleInputError(
                "the loss is averaged over what it counts, not over the examples — a "
                "cross_entropy / nll_loss with targets equal to ignore_index (-100: examples or "
                "tokens to leave out) or with class weights, or a sum divided by a tensor that "
                "is not the number of examples (a mask's sum; a constant divisor can be given "
                "as a Python number), or a mean over rows picked from the examples' so that "
                "some have more rows there than others (a mean over o[mask] with masks of "
                "different sizes — a masked image model's masked patches —, o[:k], "
                "torch.cat([o, o[:1]]); per-sequence pieces of a packed stream of tokens, "
                "tok.split(lens), whose sizes are not each example's rows in order: compute "
                "each sequence's term on the padded [N, T] grid, (tok * mask).sum(1) / "
                "mask.sum(1)) — so each example's own loss "
                "cannot be read from it with loss_reduction='mean'. Use reduction='sum' and "
                "divide by the number of examples yourself, or reduction='none' and average "
                "each example's terms (its own mean), then the examples. A Hugging Face model "
                "whose loss goes through its loss_function (GPT-2, Llama, … called with "
                "labels=) has these weights measured; BERT's classifier computes its loss "
                "itself: compute it from the logits as above"
            )
        scale = float(p.batch_size) ** 2 if self.loss_reduction == "mean" else 1.0
        if p.grad_scaler is not None:
            # a GradScaler scaled the loss: its scale is not the user's (until 2026-12-07 a
            # loss written by hand kept it, the norms S² too large without a word, ×64 at a
            # scale of 8 — a review; the model's own loss above divided it out already)
            # (divided twice: S² at a scale of 2⁶³ is near float32's limit and 1/S² under its
            # normal range, StepNorms.mean_grad_sq)
            s = _loss_scale(p)
            return raw / s / s * scale
        return raw * scale

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                collected = self.engine.collect(learn=False)
                passes = [p for p in collected if p.raw_sqnorms is not None]
                if collected and all(p.batch_size == 0 for p in collected):
                    self.sqnorms = torch.zeros(0)  # an empty batch (e.g. Poisson sampling)
                    return
                if not passes and not collected and self.engine.unopened is not None:
                    if self.engine.unopened_transform:  # (named otherwise until 2026-12-06)
                        raise NoiseScaleInputError(transform_message(self.engine.unopened))
                    raise NoiseScaleInputError(
                        submodule_called_message(
                            "call the model given to per_example_sqnorms",
                            self.engine.model,
                            self.engine.unopened,
                        )
                    )
                if not passes:
                    raise NoiseScaleInputError(
                        "no per-example gradient was computed: run the forward pass and "
                        "loss.backward() after creating per_example_sqnorms(model) (e.g. both "
                        "inside the `with` block)"
                    )
                self.sqnorms = torch.cat([self._own(p) for p in passes])
        finally:
            self._tokens.remove()
            self.engine.remove()
