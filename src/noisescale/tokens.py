"""What an example is: sequences, or the tokens a loss counts.

A language model's loss is usually a mean over *tokens*, not over sequences: Hugging Face's
causal-LM loss divides the sum of its token losses by the number of tokens whose label is not
``-100`` (or by ``num_items_in_batch``, the step's token count, under the Trainer). With padded
sequences of different lengths each sequence then weighs by its token count, and the noise scale of
that objective is a noise scale *per token*. The paper's eq. A.2 still applies with tokens as the
unit: the step's gradient is Ĝ = Σ_i x_i / Σ_i T_i over sequences i with summed token gradients x_i
and T_i counted tokens, and a small batch of sequences is a small batch of b = Σ T_i tokens. What
the tracker measures is the noise scale of the summed token loss normalised by the *expected*
token count, for which eq. A.2 is exactly unbiased:

    |G|² = |E x|²/T̄²,    tr Σ_tok = tr Cov(x)/T̄,    B_simple = T̄·tr Cov(x)/|E x|² tokens,

with T̄ = E[T], the run's mean tokens per sequence; divided by T̄ it reads in sequences. A loss
normalised by each batch's *realised* count (Hugging Face's mean, ``num_items_in_batch``) has, to
first order in 1/b, tr Σ_tok = E|x − T·G|²/T̄ instead (a ratio estimator's noise): the two differ
by terms in the covariance of the gradient with the sequence length (0.1% on the tests' pool;
for a classifier whose unlabelled examples count no token, T ∈ {0, 1}, B_simple reads 1 − p
labelled examples higher, p the labelled fraction). ``docs/language_models.md`` has the details.

A loss that averages *sequences* (each sequence's own token mean, equally weighted) has the
per-sequence noise scale, in sequences; times the tokens per sequence it reads in tokens. The two
are different quantities when lengths vary (``tests/test_tokens.py`` measures both against the
exact truth on padded data): the tracker measures the one whose objective is backpropagated, and
writes which into every estimate and history line.

How the tracker learns the weights (:class:`PassUnits`, one per backward pass):

* **Hugging Face models, measured.** The tracker wraps the model's own ``loss_function`` (causal
  LM, masked LM, token and sequence classification): the wrapper reads the labels the loss counts
  (shifted for causal LMs, or ``shift_labels``), the divisor (``num_items_in_batch`` or the
  counted tokens), and hooks the returned loss, so the gradient that reaches it in the backward
  gives the exact weight of each token in what was backpropagated — whatever the accumulation
  divisor, loss scaler or Trainer scaling. A loss the model computes itself from ``labels=``
  (T5, BART) is refused with the fix.
* **Declared.** ``loss_reduction="token_mean"`` (each micro-batch's token mean, divided by the
  number of micro-batches) or ``"num_items_in_batch"`` (the sum over the step's tokens divided by
  their number), with :meth:`~noisescale.GradientNoiseTracker.count_tokens` after each forward.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from noisescale.errors import NoiseScaleInputError
from noisescale.module_hooks import Hook, WrappedLoss, foreign_thread

__all__ = ["PassUnits", "TokenWatcher", "count_units", "refuse_wrapped_loss"]

IGNORE_INDEX = -100


@dataclass
class PassUnits:
    """How one backward pass's loss weighs its examples.

    Attributes:
        counts: Units per example, shape [N] (float64, on the labels' device): counted tokens,
            or ones when the loss averages examples.
        unit: ``"token"``, ``"example"``, or ``"labelled"``: a classifier's labels, one per
            example, counted as tokens of one each (its loss the mean over the labelled
            examples), the estimate given per labelled example, in examples.
        origin: What counted them (``"ForCausalLMLoss"``, ``"count_tokens"``, …).
        denominator: What the model's loss divided its sum over units by (measured losses only).
        grad: The gradient that reached the model's loss in the backward (0-d), so each unit of
            the pass weighs ``grad / denominator`` in what was backpropagated; ``None`` until the
            backward reaches it (and for declared counts).
        measured: Whether the weights come from the model's own loss (else from
            ``loss_reduction``).
        own: Where it differs from ``counts / denominator``: each example's weight in the
            model's loss per unit of ``grad`` — a classifier's mean over the examples whose
            label is not -100 gives 1/(their number) to those and 0 to the others (the
            tracker refuses it under ``loss_reduction="mean"`` where a label is -100, and
            measures it per labelled example under ``"token_mean"``:
            ``docs/per_example.md``). The one-shot norms of each example's own loss
            (:class:`~noisescale.per_example.sqnorms.per_example_sqnorms`) divide by these.
    """

    counts: Tensor
    unit: str
    origin: str
    denominator: Tensor | float | None = None
    grad: Tensor | None = None
    measured: bool = False
    own: Tensor | None = None
    # the model's own loss is one term of what was backpropagated (dpo + α·out.loss): its
    # token weights describe that term alone (_on_backward)
    one_term: bool = False
    # a classifier's mean over its labelled examples (not divided by num_items_in_batch): a
    # device bool, whether some label was -100 — the tracker refuses such a pass under
    # loss_reduction="mean" on audited steps (messages.counted_mean_message)
    ignored: Tensor | None = None
    # a classifier's mean over its labelled examples divided by their own count (the label
    # smoother without num_items_in_batch): where every label counts, a mean over the pass's
    # examples, its weight fixed by the pass's size (StepNorms.size_weighted)
    own_mean: bool = False

    def coefficient(self, scale: float) -> Tensor:
        """The weight of one unit in the backpropagated loss, loss scale divided out."""
        assert self.grad is not None and self.denominator is not None
        d = self.denominator
        if isinstance(d, Tensor):
            d = d.to(device=self.grad.device, dtype=torch.float64)
        return self.grad.detach().to(torch.float64) / (d * scale)


# transformers models whose own loss from floating-point labels is a mean over the examples of
# equal-sized terms: VQA heads (ViLT: BCE over the answers, times their number; VisualBERT: KL
# divergence, 'batchmean'), audio frame classifiers (cross-entropy over every frame of [N, T]
# one-hot labels; their problem_type is never set)
_FLOAT_LABEL_MEANS = ("ViltForQuestionAnswering", "VisualBertForQuestionAnswering")


def _mean_over_examples(module: nn.Module) -> bool:
    """Whether a transformers model's own loss from floating-point labels is known to be a
    mean over the examples: a classifier (``…ForSequenceClassification``, ``…ForImage…``,
    ``…ForAudioClassification``) with ``problem_type`` multi-label or regression, an audio
    frame classifier, ViLT's and VisualBERT's question answering."""
    name = type(module).__name__
    if name in _FLOAT_LABEL_MEANS or name.endswith("ForAudioFrameClassification"):
        return True
    problem = getattr(getattr(module, "config", None), "problem_type", None)
    return problem in ("multi_label_classification", "regression") and name.endswith(
        "Classification"
    )


def _ignore_index(module: nn.Module) -> int:
    """The label a segmentation model's own cross-entropy leaves out: its config's
    ``semantic_loss_ignore_index`` (Segformer, BEiT, DPT: 255 by default) or
    ``loss_ignore_index`` (UperNet), else -100 (until 2026-12-06 always -100: a Segformer's
    ignored pixels were counted as tokens, tr Σ 1.7× too large on a hunt's batch). With one
    label the loss is a binary cross-entropy averaged over every pixel (Segformer's
    ``(bce * valid).mean()``): -100, as before (a review)."""
    config = getattr(module, "config", None)
    for name in ("semantic_loss_ignore_index", "loss_ignore_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return IGNORE_INDEX if getattr(config, "num_labels", 2) == 1 else value
    return IGNORE_INDEX


def count_units(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Tokens per example from labels [N, ...] (those not ``ignore_index``) or a mask [N, ...]
    (those true / non-zero), as float64 [N]."""
    if not isinstance(labels, Tensor) or labels.dim() < 1:
        raise NoiseScaleInputError(
            "count_tokens() needs the labels or the loss mask of the micro-batch as a tensor "
            f"[examples, tokens…], got {type(labels).__name__}"
            + (f" of shape {tuple(labels.shape)}" if isinstance(labels, Tensor) else "")
        )
    if labels.dtype == torch.bool:
        counted = labels
    elif labels.is_floating_point():
        counted = labels != 0
    else:
        counted = labels != ignore_index
    if counted.dim() == 1:
        return counted.to(torch.float64)
    return counted.flatten(1).sum(1, dtype=torch.float64)


# -- Hugging Face: the model's own loss, measured ---------------------------------------------


def _is_hf_model(module: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" for c in type(module).__mro__) and hasattr(
        type(module), "loss_function"
    )


def refuse_wrapped_loss(model: nn.Module) -> None:
    """Refuse a second tracker on a Hugging Face model whose ``loss_function`` a live tracker
    has wrapped. The new wrapper would find no loss it knows under the first one's — its
    tracker measuring per example where it measures per token, the first tracker's step
    refused with a message about the model's layout (a helper's hunt, 2026-12-05) — and the
    two engines' hooks on one transformer do not measure alike. A tracker dropped without
    ``remove()`` takes its wrapper with it once collected."""
    for m in model.modules():
        if _is_hf_model(m) and isinstance(m.__dict__.get("_loss_function"), WrappedLoss):
            raise NoiseScaleInputError(
                f"{type(m).__name__}'s loss_function is already wrapped by another live "
                "noisescale tracker (or per_example_sqnorms block) on this model, and two on "
                "one Hugging Face model cannot both measure its loss: call remove() on the "
                "first one before creating this one (in a notebook, run tracker.remove() "
                "before running the cell that creates it again; after a Trainer.train() or "
                "fit() that stopped with an exception, its callback's tracker still holds the "
                "model: callback.tracker.remove(), or give that callback to the new trainer)"
            )


def _loss_kinds() -> dict[Callable, str]:
    from transformers.loss import loss_utils as lu

    kinds = {
        lu.ForCausalLMLoss: "causal",
        lu.ForMaskedLMLoss: "masked",
        lu.ForTokenClassification: "tokens",
        lu.ForSequenceClassificationLoss: "sequence",
    }
    return kinds


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


#: The origin of token counts taken from a model's ``labels=`` (see :class:`TokenWatcher`).
LABELS_ORIGIN = "labels="


class TokenWatcher:
    """Wraps the ``loss_function`` of every Hugging Face model in ``model`` to learn each pass's
    token counts and weights (see the module docstring). No-op for other models.

    Args:
        model: The tracked model.
        current_pass: Returns the engine's open pass (where the units are attached).
        count_labels: The loss is declared a mean over tokens (``loss_reduction="token_mean"``
            or ``"num_items_in_batch"``): a model that computes its loss itself from
            ``labels=`` (BERT's masked LM, T5, BART) has its tokens counted from those labels
            (those not -100, unshifted) unless ``count_tokens()`` counts them — under the
            Trainer nothing can call it between the forward and the backward.
    """

    def __init__(
        self, model: nn.Module, current_pass: Callable[[], Any], count_labels: bool = False
    ) -> None:
        self._current_pass = current_pass
        self.count_labels = count_labels
        self._thread = threading.get_ident()  # the measured thread (module_hooks)
        self._wrapped: list[tuple[nn.Module, Any]] = []
        self._handles: list[Any] = []
        self._calls: list[dict[str, Any]] = []
        hf = [m for m in model.modules() if _is_hf_model(m)]
        if not hf:
            return
        kinds = _loss_kinds()
        for m in hf:
            original = m.loss_function
            kind = kinds.get(original)
            previous = m.__dict__.get("_loss_function", _MISSING)
            self._wrapped.append((m, previous))
            m.loss_function = self._wrap(original, kind)
            # a copy of the model (an EMA, AveragedModel) gets inert hooks and its own
            # loss_function back (module_hooks)
            self._handles.append(m.register_forward_pre_hook(Hook(self._on_call), with_kwargs=True))
            self._handles.append(m.register_forward_hook(Hook(self._on_return), with_kwargs=True))

    @property
    def active(self) -> bool:
        return bool(self._wrapped)

    def remove(self) -> None:
        for m, previous in self._wrapped:
            if previous is _MISSING:
                m.__dict__.pop("_loss_function", None)
            else:
                m._loss_function = previous
        self._wrapped.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._calls.append({"module": module, "handled": False})

    def _on_return(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call = self._calls.pop() if self._calls else {"handled": False}
        labels = kwargs.get("labels")
        loss = getattr(output, "loss", None) if not isinstance(output, dict) else output.get("loss")
        if call["handled"] and isinstance(loss, Tensor) and loss.requires_grad:
            current = self._current_pass()
            if current is not None:
                _note_returned_loss(current, loss)
        if (
            call["handled"]
            or not isinstance(loss, Tensor)
            or not loss.requires_grad
            or not torch.is_grad_enabled()
        ):
            return
        pass_ = self._current_pass()
        if pass_ is None:
            return
        if loss.dim() == 0:
            self._measure_multiplier(pass_, loss)
        if (
            isinstance(labels, Tensor)
            and labels.dim() == 1
            and not labels.is_floating_point()
            and labels.shape[0] == pass_.batch_size
            and loss.grad_fn is not None
        ):
            # a classifier's loss computed in its forward (BERT's CrossEntropyLoss): a mean
            # over the examples whose label is not -100 (refused under "mean" as any counted
            # mean, and under "sum" as the model's own: messages.own_labels_message). Flagged on
            # every step (until a review of 2026-12-07 on audited steps only: the others were
            # recorded (N/C)² off without a word), and only once a backward runs through the
            # model's loss — a loss written by hand from the logits beside labels= (a Trainer's
            # compute_loss) is no counted mean (it was refused for a while that day)
            flag = (labels == IGNORE_INDEX).any()

            def counted(_grads: Any, pass_: Any = pass_, flag: Tensor = flag) -> None:
                pass_.counted_mean = pass_.counted_labels = flag

            loss.grad_fn.register_prehook(counted)
        if not isinstance(labels, Tensor) or labels.dim() < 2:
            return
        name = type(module).__name__
        if labels.is_floating_point():
            # Scores or targets, not token ids. Counting their non-zero entries as tokens would
            # weigh examples by how many labels they score: 'token_mean' is refused with them.
            if self.count_labels:
                raise NoiseScaleInputError(
                    f"{name} computed its loss itself from floating-point labels= of shape "
                    f"{tuple(labels.shape)} (scores or targets, not token ids), but "
                    "loss_reduction declares a loss over tokens, which would be counted as "
                    "the labels' non-zero entries. A classifier's multi-label or regression "
                    "loss is a mean over the examples: use loss_reduction='mean', the default; "
                    "another loss, compute it yourself from the model's outputs"
                )
            if _mean_over_examples(module):
                # transformers' classifiers with problem_type multi_label_classification
                # (BCEWithLogitsLoss) or regression (MSELoss): a mean over every element of
                # [N, C], each example weighing 1/N — the "mean" reduction
                return
            pass_.float_labels = True

            def refuse(grad: Tensor) -> None:
                pass_.units_error = (
                    f"{name} computed its loss itself from floating-point labels= of shape "
                    f"{tuple(labels.shape)} (scores or targets), and noisescale cannot tell how "
                    "that loss weighs the examples: a mean over them (a multi-label "
                    "classifier's BCEWithLogitsLoss) or not (a loss over the valid pixels of "
                    "the whole batch, as GLPN's and DPT's depth losses; a scale-invariant loss "
                    "that couples the examples). Compute the loss yourself from the model's "
                    "outputs without passing labels=, as a mean over the examples of each "
                    "one's own loss"
                )

            loss.register_hook(refuse)
            return
        if self.count_labels:
            if getattr(pass_, "units", None) is None and labels.shape[0] == pass_.batch_size:
                pass_.units = PassUnits(
                    count_units(labels, _ignore_index(module)), "token", LABELS_ORIGIN
                )
            return

        if labels.shape[0] == pass_.batch_size:
            pass_.label_counts = count_units(labels, _ignore_index(module))

        def hook(grad: Tensor) -> None:
            pass_.units_error = (
                f"{name} computed its loss itself from labels= (not through its loss_function), "
                "so noisescale cannot tell how it weighs tokens (typically a mean over the "
                "tokens whose label is not -100: sequences weigh by their length). Declare it: "
                "pass loss_reduction='token_mean' (each micro-batch's mean over its tokens, as "
                "BERT, T5 and BART compute it — also under the Trainer, which passes them "
                "num_items_in_batch they do not use; 'num_items_in_batch' only for a loss that "
                "divides by it) — the tokens (pixels) are then counted from labels= (those not "
                "-100, or not the model's config.semantic_loss_ignore_index), or "
                "by tracker.count_tokens(labels) after each forward where the loss shifts its "
                "labels; under the Trainer: NoiseScaleCallback(loss_reduction='token_mean'). Or "
                "compute the loss yourself from the logits without passing labels= to the model"
            )

        loss.register_hook(hook)

    def watch_loss(self, loss: Any, divided_by: Any = 1.0) -> None:
        """Measure the multiplier the step puts on ``loss``, a micro-batch's loss about to be
        scaled and backpropagated (:meth:`~noisescale.GradientNoiseTracker.watch_loss`);
        ``divided_by``: what it was already divided by (or a callable that says so at the
        step)."""
        if not isinstance(loss, Tensor) or loss.dim() != 0 or not loss.requires_grad:
            return
        pass_ = self._current_pass()
        if pass_ is not None and torch.is_grad_enabled():
            self._measure_multiplier(pass_, loss, divided_by, explicit=True)

    def _measured_pass(self, loss: Any) -> Any:
        """The pass a loss that a wrapped loss function returned is measured on, or ``None``
        where it is not measured: not a tensor with gradients, gradients off, another
        thread's forward (:mod:`noisescale.module_hooks`), no pass open."""
        if (
            foreign_thread(self._thread)
            or not isinstance(loss, Tensor)
            or not loss.requires_grad
            or not torch.is_grad_enabled()
        ):
            return None
        return self._current_pass()

    def measure_items_loss(
        self, loss: Any, labels: Any, items: Any, model: nn.Module | None = None
    ) -> bool:
        """A ``transformers`` ``compute_loss_func`` declared ``"num_items_in_batch"`` with one
        label per example: the Trainer's form, a sum over the examples whose label is not -100
        divided by the step's ``num_items_in_batch`` (which then counts examples), measured as
        the label smoother is: each counted example weighs grad / ``num_items_in_batch``.
        ``model``: the loss is that model's own, computed in its forward from ``labels=`` and
        divided by the ``num_items_in_batch`` it was given (the Trainer's callback checks it
        does): token labels [examples, tokens…] are counted too, those not the ignore index,
        unshifted — as the Trainer counts ``num_items_in_batch`` for a model with no loss of
        its own kind. ``False`` where that does not apply (labels that are no class labels
        or token ids; a ``compute_loss_func``'s token labels, which the function may shift:
        their tokens are not counted, and the step is refused as uncounted)."""
        if not isinstance(labels, Tensor) or labels.is_floating_point() or items is None:
            return False
        if labels.dim() != 1 and (model is None or labels.dim() < 2):
            return False
        pass_ = self._measured_pass(loss)
        if pass_ is None or loss.dim() != 0 or labels.shape[0] != pass_.batch_size:
            return False
        if labels.dim() == 1:
            # each labelled example a unit, as the label smoother's (wrap_label_smoother)
            counts, unit = (labels != IGNORE_INDEX).to(torch.float64), "labelled"
        else:
            counts, unit = count_units(labels, _ignore_index(model)), "token"  # type: ignore[arg-type]
        origin = "compute_loss_func" if model is None else "num_items_in_batch"
        if getattr(pass_.units, "origin", None) == LABELS_ORIGIN:
            pass_.units = None  # (counted from labels= under a declared token loss: replaced)
        units = PassUnits(counts, unit, origin, items, measured=True)
        _attach_measured(pass_, units, loss, f"{origin} and another measured loss ran")
        if model is not None and pass_.units is units:
            _watch_terms(pass_, units, loss)  # (the model's loss may be one term of the loss)
        return True

    def wrap_label_smoother(self, smoother: Callable) -> Callable:
        """The ``transformers`` Trainer's ``LabelSmoother`` (``label_smoothing_factor``),
        measured as the model's own ``loss_function`` is: the labels it counts (those not
        ``ignore_index``, shifted for causal LMs), its divisor (``num_items_in_batch``, or the
        counted labels) and the gradient that reaches its loss. Its loss, (1 − ε)·NLL + ε·(the
        mean of −log p over the vocabulary), is a sum over the counted tokens divided by that
        divisor, so each counted token weighs grad/divisor."""
        ignore = getattr(smoother, "ignore_index", IGNORE_INDEX)

        def label_smoother(
            model_output: Any, labels: Tensor, shift_labels: bool = False, **kwargs: Any
        ) -> Any:
            out = smoother(model_output, labels, shift_labels=shift_labels, **kwargs)
            pass_ = self._measured_pass(out)
            if pass_ is None or not isinstance(labels, Tensor):
                return out
            counts = count_units(labels[..., 1:] if shift_labels else labels, ignore)
            # one label per example (a classifier): each labelled example a unit, as a declared
            # token mean over labels of one token each (_units) — its loss is the mean over the
            # labelled examples —, given in examples ("labelled"). (Until 2026-12-06 read per
            # example fed, the -100 ones counted as examples of zero gradient: b_big the batch,
            # B_simple +108% on a hunt's batch; then, for a few hours, in "tokens": a
            # classifier's unit switched with label_smoothing_factor, a review)
            nib = kwargs.get("num_items_in_batch")
            denominator = nib if nib is not None else counts.sum()
            unit = "token" if labels.dim() >= 2 else "labelled"
            units = PassUnits(counts, unit, "LabelSmoother", denominator, measured=True)
            # (until 2026-12-07 micro-batches of 3 and 2 examples, every one labelled, were
            # taken for token means whose counts differ and measured within, less precisely,
            # with a warning naming token means: the integrations fuzzer)
            units.own_mean = unit == "labelled" and nib is None
            _attach_measured(
                pass_, units, out, "the Trainer's label smoother and another measured loss ran"
            )
            return out

        label_smoother.__wrapped__ = smoother  # type: ignore[attr-defined]
        return label_smoother

    @staticmethod
    def _measure_multiplier(
        pass_: Any, loss: Tensor, divided_by: Any = 1.0, explicit: bool = False
    ) -> None:
        """Hook a loss the model computed itself (not through its ``loss_function``): the
        gradient that reaches it in the backward is the multiplier the step put on it — 1/k
        with k accumulation micro-batches, 1 where the Trainer leaves the division to a loss
        normalised over the step (``num_items_in_batch``) that this model does not apply, a
        loss scale — so that the weights ``loss_reduction`` gives within the loss are scaled
        by what was measured, not by an assumed 1/k. The outermost model's loss counts (a
        model inside another returns first; its hook is replaced). ``explicit``: the loss was
        passed to ``watch_loss`` — it is the whole micro-batch loss, and a model's loss seen
        returned afterwards (or before) does not replace it; a model's loss seen returned may
        be one term of a larger loss, and the tracker takes less from it (``_weights_of``)."""
        if pass_.loss_grad_explicit and not explicit:
            return
        if pass_.loss_grad_hook is not None:
            pass_.loss_grad_hook.remove()
        pass_.loss_grad, pass_.loss_grad_explicit = None, explicit
        # (a number is divided out here; a callable where the step reads loss_grad)
        pass_.loss_divided_by = divided_by if callable(divided_by) else 1.0

        def hook(grad: Tensor) -> None:
            if not callable(divided_by) and divided_by != 1.0:
                grad = grad / divided_by
            pass_.loss_grad = grad if pass_.loss_grad is None else pass_.loss_grad + grad

        pass_.loss_grad_hook = loss.register_hook(hook)

    def _wrap(self, original: Callable, kind: str | None) -> Callable:
        def loss_function(*args: Any, **kwargs: Any) -> Tensor:
            out = original(*args, **kwargs)
            if foreign_thread(self._thread):
                return out  # (another thread's forward: not measured, see module_hooks)
            if self._calls:
                self._calls[-1]["handled"] = True
            if kind is None or not isinstance(out, Tensor) or not torch.is_grad_enabled():
                return out
            pass_ = self._current_pass()
            if pass_ is None or not out.requires_grad:
                return out
            # what the loss was computed from: the audit replays from it when the model's own
            # outputs are not on the loss's path (a wrapper that returns only the loss)
            logits = (
                _arg(args, kwargs, 1, "pooled_logits")
                if kind == "sequence"
                else _arg(args, kwargs, 0, "logits")
            )
            if isinstance(logits, Tensor) and logits.requires_grad:
                # (its gradient edge and shape: holding the logits would keep them alive)
                edge = torch.autograd.graph.get_gradient_edge(logits)
                pass_.loss_inputs.append((edge, tuple(logits.shape)))
            units = self._units(kind, args, kwargs, original, self.count_labels)
            if units is not None:
                _attach_measured(pass_, units, out, "the model's loss_function ran twice")
                if pass_.units is units:
                    _watch_terms(pass_, units, out)
            return out

        return WrappedLoss(original, loss_function)

    @staticmethod
    def _units(
        kind: str, args: tuple, kwargs: dict, original: Callable, tokens: bool = False
    ) -> PassUnits | None:
        """The units a wrapped ``loss_function`` weighs. ``tokens``: the loss is declared a
        mean over what it counts (``"token_mean"``, ``"num_items_in_batch"``), and a
        classifier's mean over its examples whose label is not -100 is measured as one: each
        labelled example a unit, each micro-batch divided by its own count (or by
        ``num_items_in_batch``), as a declared token mean over labels of one token each."""
        origin = getattr(original, "__name__", kind)
        if kind == "sequence":
            labels = _arg(args, kwargs, 0, "labels")
            logits = _arg(args, kwargs, 1, "pooled_logits")
            config = _arg(args, kwargs, 2, "config")
            if not isinstance(labels, Tensor) or not isinstance(logits, Tensor):
                return None
            n = logits.shape[0]
            counts = torch.ones(n, dtype=torch.float64, device=logits.device)
            nib = kwargs.get("num_items_in_batch")
            ce = getattr(config, "problem_type", None) == "single_label_classification"
            denominator = nib if (ce and nib is not None) else float(n)
            units = PassUnits(counts, "example", origin, denominator, measured=True)
            if ce and labels.numel() == n:
                # a mean over the examples whose label is not ignore_index (-100: examples to
                # leave out), or a sum over them divided by num_items_in_batch
                ignore = kwargs.get("ignore_index", IGNORE_INDEX)
                counted = count_units(labels.reshape(n), ignore).to(logits.device)
                divisor = nib if nib is not None else counted.sum()
                if tokens:
                    # (until 2026-12-06 read per example fed, as under "mean": each example's
                    # gradient rescaled by N/(labelled), biased — a hunt)
                    return PassUnits(counted, "token", origin, divisor, measured=True)
                units.own = counted / divisor
                if nib is None:
                    # (a device bool: read on audited steps only, counted_mean_message)
                    units.ignored = (counted == 0).any()
            return units
        labels = _arg(args, kwargs, 1, "labels")
        if not isinstance(labels, Tensor) or labels.dim() < 2:
            return None
        ignore = kwargs.get("ignore_index", IGNORE_INDEX)
        if kind == "causal":
            shifted = kwargs.get("shift_labels")
            if isinstance(shifted, Tensor):
                counted = shifted.reshape(labels.shape[0], -1) != ignore
            else:
                counted = labels[..., 1:] != ignore
        else:
            counted = labels != ignore
        counts = counted.flatten(1).sum(1, dtype=torch.float64)
        nib = kwargs.get("num_items_in_batch")
        denominator = nib if nib is not None else counts.sum()
        return PassUnits(counts, "token", origin, denominator, measured=True)


_MISSING = object()


# The passes whose units a model's own loss_function measured, until a backward decides
# whether that loss is all of what is backpropagated (_on_backward): (the pass, weakly; its
# units; the gradient edges, as (sequence number, output), that are the model's loss — what
# loss_function returned, and the loss the model returned built from it)
_PENDING: list[tuple[Any, PassUnits, set[tuple[int, int]]]] = []


def _edge(t: Tensor) -> tuple[int, int] | None:
    node = t.grad_fn
    return None if node is None else (node._sequence_nr(), t.output_nr)


def _watch_terms(pass_: Any, units: PassUnits, loss: Tensor) -> None:
    edge = _edge(loss)
    if edge is None:
        return
    _PENDING[:] = [e for e in _PENDING if e[0]() is not None][-63:]
    _PENDING.append((weakref.ref(pass_), units, {edge}))


def _note_returned_loss(pass_: Any, loss: Tensor) -> None:
    """The loss the model returned, built from what its loss_function returned (an auxiliary
    loss added in the forward, a scale): part of the model's loss, not another term."""
    edge = _edge(loss)
    for ref, _, edges in _PENDING:
        if ref() is pass_ and edge is not None:
            edges.add(edge)


def _on_backward(roots: Any) -> None:
    """A backward starts from ``roots``: for each pending pass it reaches, whether it reaches
    the pass's outputs other than through the model's own loss (``PassUnits.one_term``).

    DPO with TRL's RPO term, ``dpo(out.logits) + α * out.loss``: the units the model's loss
    measures (its tokens, its multiplier α) describe that term alone, and the tracker divided
    the whole step's gradient by α — |G|², tr Σ 1/α² too large, in a meaningless unit of
    tokens, until 2026-12-06 (a hunt). Such a loss is measured over the examples, as the same
    loss written by hand is."""
    if not _PENDING:
        return
    # (here, not at the top: noisescale.per_example imports this module)
    from noisescale.per_example.graph import reaches_pass

    tensors = [roots] if isinstance(roots, Tensor) else list(roots or ())
    for entry in list(_PENDING):
        pass_ = entry[0]()
        if pass_ is None:
            _PENDING.remove(entry)
            continue
        verdict = reaches_pass(tensors, [pass_], entry[2])
        if verdict is None:
            continue  # (another graph's backward: not this pass's)
        entry[1].one_term = verdict
        _PENDING.remove(entry)


def _attach_measured(pass_: Any, units: PassUnits, loss: Tensor, twice: str) -> None:
    """Give the pass the units a loss it computed measures, and hook that loss: the gradient
    that reaches it is their weight's numerator (:meth:`PassUnits.coefficient`). A pass that
    has measured units already is refused (``twice``: what ran twice): two losses' token
    weights cannot be told apart."""
    if getattr(pass_, "units", None) is not None:
        pass_.units_error = (
            f"{twice} in one forward pass; noisescale cannot tell how the two losses weigh tokens"
        )
        return

    def hook(grad: Tensor) -> None:
        units.grad = grad if units.grad is None else units.grad + grad

    loss.register_hook(hook)
    pass_.units = units


def mean_units(total_units: float, total_examples: float) -> float:
    """Units (tokens) per example, ``nan`` when unknown."""
    return total_units / total_examples if total_examples > 0 else math.nan


def _install() -> None:
    from noisescale.per_example import audit

    if _on_backward not in audit.BACKWARD_STARTS:
        audit.BACKWARD_STARTS.append(_on_backward)


_install()
