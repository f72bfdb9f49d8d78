"""GradientNoiseTracker: the simple noise scale of a training run, measured every step.

Two lines in a training loop::

    tracker = noisescale.GradientNoiseTracker(model)          # before the first forward
    ...
    loss.backward()          # after all accumulation micro-batches
    tracker.step(loss=loss)  # before gradient clipping and optimizer.step()
    ...
    tracker.estimate()       # B_simple with its interval, |G|², tr Σ, steps used

Each step pairs small-batch gradient norms with the big batch — the accumulated ``.grad`` of all
of the step's examples — through the unbiased eq. A.2 of the paper. The tracker is a shell: the
hook engine (:mod:`noisescale.per_example`) measures the step's backward passes, the sources
(:mod:`noisescale.sources`) turn them into small batches — by default k random sub-batches of
each pass, measured inside its one backward; per-example norms on request; the micro-batches of
gradient accumulation; the processes of data parallelism — and a pure update
(:mod:`noisescale.state`) combines the sources with minimum-variance weights, averages |G|² and
tr Σ with bias-corrected EMAs, and gives B_simple with a Fieller interval (:mod:`estimators`).

Conventions:
    * ``loss_reduction="mean"`` (default): each backward pass's loss is the mean over its
      examples, divided by the number of micro-batches when accumulating; ``"sum"``: the sum over
      examples. B_simple does not depend on the accumulation divisor; |G|² and tr Σ do.
    * What an example is: a loss that averages *tokens* (Hugging Face's language-model losses,
      measured from the model's own ``loss_function``; or ``loss_reduction="token_mean"`` /
      ``"num_items_in_batch"`` with :meth:`~GradientNoiseTracker.count_tokens`) gives the noise
      scale per token, in tokens; one that averages examples gives it per example (sequence).
      The estimate and every history line say which (:mod:`noisescale.tokens`), and
      ``estimate().to("tokens")`` / ``to("examples")`` converts where tokens were counted.
    * Norms are read before clipping; with ``torch.amp.GradScaler`` (pass ``scaler=``) they are
      unscaled (whether or not ``scaler.unscale_`` already ran) and steps with non-finite
      gradients are skipped.
    * Statistics stay on the device; the host reads them once every ``sync_every`` measured
      steps, or when an estimate, the history or a state_dict is asked for.
"""

from __future__ import annotations

import functools
import json
import math
import secrets
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import Tensor, nn

from noisescale import estimators as est
from noisescale import state as state_mod
from noisescale.errors import (
    GradientsChangedError,
    NoiseScaleInputError,
    UnsupportedModuleError,
)
from noisescale.module_hooks import registrations as _registrations
from noisescale.param_groups import parameter_groups
from noisescale.per_example import PerExampleNorms
from noisescale.per_example.engine import refuse_complex_parameters
from noisescale.per_example.factors import sqnorm_total
from noisescale.per_example.messages import (
    SECOND_ORDER,
    class_weighted_message,
    counted_mean_message,
    loss_kind_message,
    new_parameters_message,
    own_labels_message,
    submodule_called_message,
    transform_message,
)
from noisescale.per_example.pass_checks import takes_second_order, written_tasks
from noisescale.preconditioning import (
    StepWatch,
    check_preconditioner,
    learning_rate,
    optimizer_steps,
    preconditioner_weights,
    stateless_parameters,
    unwrap_optimizer,
)
from noisescale.sources.base import Observation, Source, StepNorms
from noisescale.sources.distributed import (
    LEFT_OUT,
    OVERFLOWED,
    PASS_MISSING,
    PICKED,
    DataParallelSource,
    ReducedStep,
    step_kind,
    watch_late_wrapper,
)
from noisescale.sources.microbatch import MicroBatchSource
from noisescale.sources.per_example import PerExampleSource
from noisescale.sources.subbatch import SubbatchSource
from noisescale.tokens import (
    IGNORE_INDEX,
    LABELS_ORIGIN,
    PassUnits,
    TokenWatcher,
    count_units,
    refuse_wrapped_loss,
)

__all__ = ["GradientNoiseTracker"]

# how the backpropagated loss combines the examples' (or tokens') own losses
LOSS_REDUCTIONS = ("mean", "sum", "token_mean", "num_items_in_batch")
UNITS = {"example": "examples", "token": "tokens", "labelled": "examples"}
# the definitions measured per counted unit (noisescale.tokens): tokens, or a classifier's
# labelled examples (labels of -100 not counted), each one unit, the estimate given in examples
_COUNTED = ("token", "labelled")
# What a step of one example may be in language-model training (the warning that skips it)
_PACKED = (
    "A batch packed into one row (padding-free packing: position_ids restarting inside the "
    "row, DataCollatorWithFlattening, TRL's padding_free=True) is one example here: keep the "
    "documents in rows of their own, or measure with per_example=False and several "
    "accumulation micro-batches"
)

#: Why a step of one example is skipped (said once, in every mode).
_ONE_EXAMPLE = (
    "this step has one example and no other small-batch source, so the noise cannot be "
    "separated from the gradient (small batch = big batch); the step is skipped. Use more than "
    "one example per step or accumulate several micro-batches. " + _PACKED
)

HISTORY_KIND = "noisescale.history"
# the header's keys a continued history must share with the tracker continuing it
_HISTORY_MEANING = (
    "version", "loss_reduction", "beta", "confidence", "definition", "unit", "paired_rows",
    "grouped_rows", "dataset_size",
)  # fmt: skip
HISTORY_VERSION = 1
# how every header's line begins ("kind" is its first key): a cut line that begins so is a header
_HEADER_START = json.dumps({"kind": HISTORY_KIND})[:-1]
# 4 since 2026-12-07: the combiner's statistics are of the sources' changes between steps over the
# level (estimators.update_combiner); a version-3 checkpoint's, of the raw estimates, restart.
# 5 since 2026-12-08: the loss forms the audits passed (graph.shape_key), and those waiting for
# one — an earlier checkpoint has none, and the engine learns them again (a step whose form it
# meets first after the resume withheld, with a warning, as before); and the combiner's changes
# over a scale of the levels before the two steps, not the step before's level (which shares
# that step's noise and bent the weights) — a version-4 checkpoint's combiner restarts
STATE_VERSION = 5
# warn when the interval has stayed unbounded for this many steps with a cheap, less precise mode
UNBOUNDED_WARNING_STEPS = 500
# warn when the averaged tr Σ rests on fewer steps' worth of noise than this, and on under this
# share of the steps averaged (a few examples carry the noise: the interval under-covers)
FEW_NOISE_STEPS = 15
FEW_NOISE_SHARE = 0.25


def _free_name_beside(path: Path) -> Path:
    """The first of ``stem-2.suffix``, ``stem-3.suffix``, … beside ``path`` that does not exist."""
    k = 2
    while True:
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
        if not candidate.exists():
            return candidate
        k += 1


def _history_lines(
    path: Path,
) -> tuple[dict[str, Any] | None, list[tuple[int, str]], str | None] | None:
    """The header, the lines (step, line; the header's step 0) of the history at ``path`` and
    what keeps it from being continued (None: nothing); None where there is no file. Read as
    ``load_history`` reads (a byte-order mark, CRLF, blank lines); an unfinished last line (a
    kill while writing it) is left out; a file that is not a noisescale history, or a corrupt
    line elsewhere, is named as the problem (``write_history`` then writes beside it: a review
    of 2026-12-07 found such files replaced, or the run's records lost with a refusal)."""
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return None, [], "it is not a text file"
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    lines.pop()  # ("" after the last line feed, or a line a kill cut)
    lines = [line for line in lines if line.strip()]
    try:
        header = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("kind") != HISTORY_KIND:
        return None, [], "it is not a noisescale history"
    records = [(0, lines[0] + "\n")]
    for number, line in enumerate(lines[1:], start=2):
        try:
            step = int(json.loads(line)["step"])
        except (json.JSONDecodeError, TypeError, KeyError, ValueError):
            return header, records, f"its line {number} is not a step record"
        records.append((step, line + "\n"))
    return header, records, None


@dataclass
class _Pending:
    """One step's statistics, still on the device."""

    step: int
    lr: float | None
    scale: float
    b_big: float | Tensor = math.nan
    sqnorm_big: Tensor | None = None
    observations: dict[str, Observation] | None = None
    loss: Tensor | float | None = None
    examples: int = 0
    group_big: Tensor | None = None
    preconditioned: bool | None = None
    reduced: ReducedStep | None = None  # data parallel: the step's all-reduce
    tokens: Tensor | None = None  # tokens the step's loss counted
    # measure_every: the unmeasured steps since the last measured one (count, examples, tokens)
    unmeasured: tuple[int, int, Tensor | float | None] = state_mod.NOTHING_UNMEASURED
    # False: a step measure_every left unmeasured (data parallel: its counts' all-reduce),
    # which does not count toward sync_every
    measured: bool = True
    # layer inputs picked by index tensors not read on the accelerator when the layer ran:
    # (layer, how, device flag "not the examples"), read with the rest (engine.unread_picks)
    picks: tuple[tuple[str, str, Tensor], ...] = ()
    # whether the passes weighed their examples by weights that depend on the data (device
    # bool; the step is then measured within its passes: StepNorms.weights_vary), why nothing
    # could ever be measured there, if so (per_example=False), and whether each pass held
    # one example (this step skipped)
    vary: tuple[Tensor, str | None, bool] | None = None


def _within_passes(
    vary: Tensor,
    within: tuple[Tensor, Tensor | None, float],
    big: Tensor,
    group_big: Tensor | None,
    b_big: Any,
) -> tuple[Tensor, Tensor | None, Any]:
    """Where the passes' weights vary with the data, the big batch within each pass
    (:meth:`~noisescale.sources.base.StepNorms.within_passes`) in place of the step's gradient,
    chosen on the device."""
    w_big, w_group, w_b = within
    big = torch.where(vary, w_big.to(torch.float64), big.to(torch.float64))
    if group_big is not None:
        alt = w_group if w_group is not None else torch.full_like(group_big, math.nan)
        group_big = torch.where(vary, alt.to(torch.float64), group_big.to(torch.float64))
    b_big = torch.where(vary, torch.full_like(big, w_b), torch.as_tensor(b_big).to(big))
    return big, group_big, b_big


def _without_pass_norms(vary: Tensor, observations: dict[str, Observation]) -> dict[str, Any]:
    """The micro-batch source left out where the passes' weights vary with the data: its small
    batches are the passes themselves, which the big batch within each pass already is (its
    count set to 0 on the device; :meth:`GradientNoiseTracker._read` drops a source of none)."""
    obs = observations.get("microbatch")
    if obs is None:
        return observations
    keep = (~vary).to(torch.float64)
    return {
        **observations,
        "microbatch": replace(obs, count=keep * obs.count, inv_size_sum=keep * obs.inv_size_sum),
    }


# how the refusal of a step that nothing can measure begins (GradientNoiseTracker._nothing_within)
_NOTHING_WITHIN = "nothing in this step can be measured without bias"
# the fix for a loss whose micro-batches divide by their own token counts (the refusal above,
# and the warning that such steps are measured within their micro-batches)
_STEP_DIVISOR = (
    "divide each micro-batch's summed token loss by the step's total count: a Hugging Face "
    "model called with num_items_in_batch=n (n the step's counted tokens, as the Trainer "
    "passes it to the models that accept it), or your own loss declared "
    "loss_reduction='num_items_in_batch'"
)


def _compiled_submodules(model: nn.Module) -> list[str]:
    """Names of ``torch.compile`` wrappers (``OptimizedModule``) below the model's root (the
    root itself compiled is supported, and so is a submodule compiled in place with
    ``module.compile()``, which stays a plain module: tested exact against eager)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is None:  # Dynamo never imported: nothing was compiled
        return []
    wrapper = eval_frame.OptimizedModule
    root = model._orig_mod if isinstance(model, wrapper) else model
    if isinstance(root, nn.parallel.DistributedDataParallel):
        root = root.module  # (DDP of a compiled model has its own refusal, with its own fix)
    # (a frozen one — a compiled teacher, a VAE — has no gradient to measure: measured exactly)
    return [
        name
        for name, m in model.named_modules()
        if m is not model
        and m is not root
        and isinstance(m, wrapper)
        and any(p.requires_grad for p in m.parameters())
    ]


def _dynamo_compiled() -> bool:
    """Whether Dynamo has compiled a graph in this process (it is imported by more than
    torch.compile: building an optimizer imports it)."""
    if "torch._dynamo" not in sys.modules:
        return False
    from torch._dynamo.utils import counters

    return bool(counters["stats"].get("unique_graphs"))


class GradientNoiseTracker:
    """Measures B_simple = tr(Σ)/|G|² (paper eq. 2.9) during training, every step, unbiased.

    Args:
        model: The model being trained: plain, wrapped in ``DistributedDataParallel``, or an
            FSDP2 (``fully_shard``) root; create the tracker after wrapping.
        loss_reduction: How the backpropagated loss combined the examples' own losses:
            ``"mean"`` or ``"sum"`` over examples (``"mean"``: each micro-batch's mean over
            its own examples, divided by the number of micro-batches; a sum divided by the
            step's total of examples, as with micro-batches of unequal sizes, is ``"sum"``
            times a constant, which B_simple does not depend on); or, for a loss over tokens
            (declare it when the model does not compute the loss itself, and call
            :meth:`count_tokens` after each forward), ``"token_mean"`` (each micro-batch's
            mean over its counted tokens, divided by the number of micro-batches) or
            ``"num_items_in_batch"`` (the sum over the step's tokens divided by their number,
            as the ``transformers`` Trainer does; under data parallelism the divisor must be
            given, ``count_tokens(num_items_in_batch=)``). A Hugging
            Face model called with ``labels=`` needs nothing: the weights of its own loss are
            measured (:mod:`noisescale.tokens`). The division by the number of micro-batches
            is measured wherever it can be — a loss passed to :meth:`watch_loss`, the Trainer's
            and Lightning's callbacks, a Hugging Face model's own loss left undivided — and
            assumed only elsewhere.
        per_example: Measure with the module hooks (sub-batches by default, per-example norms
            with ``per_example_fraction``). ``False`` relies on accumulation micro-batches only
            (no layer support needed).
        subbatches: The default source: each backward pass's examples are split at random into
            this many sub-batches and the norm of each sub-batch's gradient is measured inside
            the one backward (for Linear, ``Conv1D`` and convolution weights at the cost of the
            gradient itself; :mod:`noisescale.per_example.subbatch`). Like every-example norms,
            they cancel each example's own |g_i|² in eq. A.2, so late in training, when a few
            examples carry most of the noise, the interval is nearly as narrow as with every
            example — where a per-example subset's is not (``bench/precision.py``). A model in
            which no weight's gradient comes from sub-batch products (an MLP on a small batch)
            is measured per example instead, which is cheaper there and more precise. With
            accumulation, one micro-batch per step — at a random position among the last
            step's, drawn before the step — is split (or measured per example); the others run
            plain and give their micro-batch norms.
        per_example_fraction: Measure per-example norms instead of sub-batches: ``1.0`` every
            example exactly; a fraction f draws ⌈f·N⌉ of a step's N examples with
            probabilities that favour large output gradients, weighted back (unbiased, but far
            less precise late in training; with accumulation, from one micro-batch at a random
            position). ``None`` (default): sub-batches.
        microbatch: Use micro-batch gradient norms when a step accumulates several backward
            passes.
        beta: EMA decay for |G|² and tr Σ (paper App. A.1); ``1.0`` averages all steps equally.
        confidence: Coverage of the B_simple interval.
        scaler: A ``torch.amp.GradScaler`` whose loss scale is divided out.
        optimizer: If given, its first parameter group's learning rate is recorded each step
            (for the temperature ε/B, paper App. C).
        history_path: Stream the per-step history to this JSON Lines file (appended at each
            sync, so an interrupted run keeps what was measured). An existing history there is
            continued only by a tracker resumed with :meth:`load_state_dict` whose header (loss
            reduction, unit, beta, source) is the file's; otherwise the first write is refused
            (the file is left as it was).
        sync_every: Measured steps between host reads of the device statistics
            (``measure_every``'s unmeasured steps do not count).
        fallback: Allow the torch.func fallback for modules whose parameters meet the batch in
            an operation without a per-example rule.
        precondition: An Adam, AdamW or RMSprop optimizer: measure the noise scale of the
            preconditioned gradient P ⊙ g with P = 1/(√v̂ + ε) from its second-moment state
            (paper footnote 7, App. E.2), in the big batch and every small-batch source alike.
            Until the optimizer has taken ``precondition_from`` steps norms are plain, the
            history says ``"preconditioned": false``, :meth:`estimate` is unavailable
            (``nan``, interval [0, ∞), a ``reason`` saying preconditioning has not started),
            and the averages start at the first preconditioned step. accelerate's
            ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer`` and Fabric's optimizer
            are unwrapped; a subclass that overrides ``step`` or ``_init_group`` is refused (its
            preconditioner may differ).
        precondition_from: Optimizer steps before P is used (early v̂ averages only a few
            squared gradients, and 1/ε-sized P would dominate the averages;
            ``docs/beyond_b_simple.md``). ``1`` starts as soon as there is state.
        groups: Also report B_simple per parameter group (:meth:`estimate_groups`, history key
            ``"groups"``): ``True`` or ``"children"`` (each top-level child module),
            ``"param_groups"`` (the optimizer's), or a mapping ``{name: [parameters, modules or
            their names]}``; parameters left out form ``"(other)"``. Per step, the groups' g2
            and tr Σ add up to the total's.
        process_group: The group gradients are averaged over. Under ``torch.distributed``
            a DDP or FSDP2 model is detected and uses its own group; give this for a plain
            model whose gradients you average yourself after the last backward pass.
            Each process's local gradient (before averaging) is then a small batch and the
            averaged one the big batch (paper App. A.1), at the cost of one all-reduce of a few
            numbers per step; every process must call ``step()`` (:mod:`noisescale.sources`).
        tokens_per_example: Every example has this many tokens (fixed-length sequences with a
            loss of your own): estimates can then be given in tokens as well
            (``estimate().to("tokens")``) without :meth:`count_tokens`.
        measure_every: Measure one step in this many (steps 1, 1 + m, 1 + 2m, …); the others
            run plain — their layers' hooks do nothing — and count only their examples and
            tokens. For a tracker left on through a long run: the measured steps' estimates
            are the same unbiased ones, with m times fewer of them per step trained, at about
            1/m of the extra time (``bench/steady.py``) — late in training, when |G|² is barely
            resolved, at a far wider interval for the time spent (m = 4: 3× the exact mode's
            at equal wall-clock, ``bench/precision.py``). ``beta`` weighs measured steps, so the
            averages span m times as many steps trained. Call :meth:`step` at every step as
            usual. Under data parallelism every process must use the same m (steps are
            counted per process; a mismatch is refused when the statistics are read). With
            ``torch.compile`` the model compiles into one more graph (the unmeasured steps',
            which has no hooks in it but the one that counts the examples).
        paired_rows: ``"flip"`` when row i of every batch is mixed with row N − 1 − i (timm's
            ``Mixup`` and ``CutMix``: ``x.flip(0)``): such rows share data, so their gradients
            are not independent and, paired in eq. A.2 as different examples, read B_simple
            2.5–3.3× low with a tight interval (``docs/per_example.md``). Each pair is then kept
            in one sub-batch, and B_simple is the loop's own noise scale in rows (a pair's
            shared data counted in its variance). Batches must be even. Mixing along other
            orders (``torch.randperm``, torchvision's ``MixUp``/``CutMix``, which roll the
            batch by one) chains the rows together and has no such split: measure it with
            ``per_example=False`` on accumulation micro-batches each mixed within itself.
            ``"halves"`` when every batch is two strata of N/2 rows each, row i of the first
            paired with row i + N/2 of the second — a GAN discriminator on
            ``torch.cat([real, fake])``: each sub-batch then holds as many of each, and
            B_simple is the noise scale of such batches (measured as one population, the
            difference between the strata would count as noise). Also preference pairs —
            DPO or a reward model on ``torch.cat([chosen, rejected])`` — whose loss combines
            row i with row i + N/2: the loss may then combine a pair's rows (nothing across
            pairs), and B_simple and the batch are counted in rows, two a pair.
        grouped_rows: ``G`` when the rows come in consecutive blocks of G that share data —
            GRPO's G completions of each prompt (their advantages normalised within the
            group), a query's G candidates under a listwise loss: rows of one block are not
            independent draws, and eq. A.2 pairing them as different examples reads B_simple
            off with a tight interval. Each block is then kept in one sub-batch, the loss may
            combine a block's rows (nothing across blocks), and B_simple and the batch are
            counted in rows, G a block. Batches must hold whole blocks.
        examples: With ``per_example=False``, a function of the model's call ``(args,
            kwargs)`` giving the number of examples in it, where they are not dim 0 of its
            first tensor argument (the default count): a batch of graphs, whose node features
            come first — ``examples=lambda args, kwargs: args[0].num_graphs`` for a PyG
            ``Batch`` passed whole, or ``int(args[2].max()) + 1`` from the ``batch`` vector of
            ``model(x, edge_index, batch)`` (a host read per forward). Counted in nodes, B_simple
            and tr Σ would be read in nodes, 5× too large with graphs of 5 nodes.
        dataset_size: The number of examples N of the data set when each step's batch is drawn
            from it without replacement (a shuffled epoch: ``DataLoader(shuffle=True)``,
            ``DistributedSampler``: the global batch), counted as batch sizes are (rows).
            Distinct examples of a finite set are negatively correlated, which biases eq. A.2's
            |G|² low by tr Σ/N and reads B_simple ≈ 1/(1 − B_simple/N) high; given N, each
            step's |G|² and tr Σ are corrected before they are averaged
            (:func:`noisescale.estimators.finite_population`) and tr Σ is that of i.i.d. draws
            from the data set (the paper's). Negligible when N ≫ B_simple; ``None`` (default):
            no correction (right for sampling with replacement or an endless stream).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_reduction: str = "mean",
        *,
        per_example: bool = True,
        subbatches: int = 8,
        per_example_fraction: float | None = None,
        microbatch: bool = True,
        beta: float = 0.99,
        confidence: float = 0.95,
        scaler: Any | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        history_path: str | Path | None = None,
        sync_every: int = 32,
        fallback: bool = True,
        precondition: torch.optim.Optimizer | None = None,
        precondition_from: int = 100,
        groups: bool | str | Mapping[str, Any] | None = None,
        process_group: Any | None = None,
        tokens_per_example: int | None = None,
        measure_every: int = 1,
        paired_rows: str | None = None,
        grouped_rows: int | None = None,
        examples: Callable[[tuple, dict], Any] | None = None,
        dataset_size: int | None = None,
    ) -> None:
        if loss_reduction not in LOSS_REDUCTIONS:
            raise NoiseScaleInputError(
                f"loss_reduction must be one of {', '.join(map(repr, LOSS_REDUCTIONS))}, got "
                f"{loss_reduction!r}"
            )
        if tokens_per_example is not None and not (
            isinstance(tokens_per_example, int) and tokens_per_example >= 1
        ):
            raise NoiseScaleInputError(
                f"tokens_per_example must be a positive integer, got {tokens_per_example!r}"
            )
        if not 0.0 < beta <= 1.0:
            raise NoiseScaleInputError(f"beta must be in (0, 1], got {beta}")
        if not 0.0 < confidence < 1.0:
            raise NoiseScaleInputError(f"confidence must be in (0, 1), got {confidence}")
        self.dataset_size = est.check_dataset_size(dataset_size)
        if sync_every < 1:
            raise NoiseScaleInputError(f"sync_every must be at least 1, got {sync_every}")
        if per_example_fraction is not None and not 0.0 < per_example_fraction <= 1.0:
            raise NoiseScaleInputError(
                f"per_example_fraction must be in (0, 1], got {per_example_fraction}"
            )
        if not (isinstance(measure_every, int) and measure_every >= 1):
            raise NoiseScaleInputError(
                f"measure_every must be a positive integer, got {measure_every!r}"
            )
        if not (isinstance(subbatches, int) and subbatches >= 2):
            raise NoiseScaleInputError(f"subbatches must be an integer ≥ 2, got {subbatches!r}")
        if precondition_from < 1:
            raise NoiseScaleInputError(
                f"precondition_from must be at least 1, got {precondition_from}"
            )
        if paired_rows not in (None, "flip", "halves"):
            raise NoiseScaleInputError(
                "paired_rows must be None, 'flip' (row i mixed with row N − 1 − i, as timm's "
                "Mixup and CutMix do) or 'halves' (row i with row i + N/2: two strata, "
                f"torch.cat([real, fake])), got {paired_rows!r}"
            )
        if grouped_rows is not None and not (
            isinstance(grouped_rows, int)
            and not isinstance(grouped_rows, bool)
            and grouped_rows >= 2
        ):
            raise NoiseScaleInputError(
                "grouped_rows must be None or the number of consecutive rows that share data, "
                f"at least 2 (GRPO's completions per prompt), got {grouped_rows!r}"
            )
        if grouped_rows is not None and paired_rows is not None:
            raise NoiseScaleInputError(
                "give paired_rows or grouped_rows, not both: each says how the rows of a batch "
                "are tied together"
            )
        if grouped_rows is not None and (not per_example or per_example_fraction is not None):
            raise NoiseScaleInputError(
                "grouped_rows keeps each block of rows in one sub-batch of the default source; "
                "drop per_example_fraction (per-example norms would pair rows that share data) "
                "— or, with per_example=False, drop grouped_rows and give each accumulation "
                "micro-batch whole groups: each is then an independent draw"
            )
        if paired_rows is not None and (not per_example or per_example_fraction is not None):
            raise NoiseScaleInputError(
                "paired_rows keeps each pair of mixed rows in one sub-batch of the default "
                "source; drop per_example_fraction (per-example norms would pair rows that "
                "share data) — or, with per_example=False, drop paired_rows: each accumulation "
                "micro-batch mixed within itself is already an independent group"
            )
        if examples is not None and (per_example or not callable(examples)):
            raise NoiseScaleInputError(
                "examples= counts the examples of a model whose examples are not dim 0 of its "
                "first tensor argument (the graphs of a batch of graphs), which the per-example "
                "hooks cannot measure — they read every layer's examples in dim 0 —, so it goes "
                "with per_example=False (micro-batch norms from gradient accumulation); and it "
                "is a function (args, kwargs) -> the number of examples of the model's call"
                if callable(examples)
                else f"examples must be a function (args, kwargs) -> int, got {examples!r}"
            )
        if not per_example and not microbatch:
            raise NoiseScaleInputError(
                "per_example=False and microbatch=False leave no small-batch source to compare "
                "with the big batch; enable at least one"
            )
        refuse_wrapped_loss(model)  # (before any hook is put on the model)
        self.model = model
        self.loss_reduction = loss_reduction
        self.confidence = confidence
        self.scaler = scaler
        self.sync_every = sync_every
        self.history_path = Path(history_path) if history_path is not None else None
        trainable = [p for p in model.parameters() if p.requires_grad]
        refuse_complex_parameters(model)
        compiled_inside = _compiled_submodules(model) if per_example else []
        if compiled_inside:
            # (until 2026-12-05 the first compiled step crashed inside Dynamo: "... is already
            # tracked for mutation", an AssertionError naming no cause, a hunt found)
            raise NoiseScaleInputError(
                f"the submodule{'s' if len(compiled_inside) > 1 else ''} {compiled_inside} "
                "of the measured model "
                f"{'are' if len(compiled_inside) > 1 else 'is'} torch.compile(...)'s wrapper "
                "(an OptimizedModule), inside which Dynamo cannot trace the tracker's "
                "per-example hooks on the layers (it fails at the first compiled step); compile "
                "the whole model instead (torch.compile(model) or model.compile(), then the "
                "tracker), compile the submodule in place (submodule.compile(), which keeps it "
                "a plain module; measured exactly), or measure with per_example=False "
                "(micro-batch norms from gradient accumulation)"
            )
        if precondition is not None:
            precondition = unwrap_optimizer(precondition)
        self.precondition = precondition
        self.precondition_from = precondition_from
        if precondition is not None:
            check_preconditioner(model, precondition, trainable)
            if optimizer is None:
                optimizer = precondition
        self.optimizer = optimizer
        self._group_names, group_params = parameter_groups(model, groups, optimizer, trainable)
        group_of = {id(p): g for g, ps in enumerate(group_params) for p in ps}
        self._group_index = [group_of[id(p)] for p in trainable] if group_params else []
        if not per_example:
            self.mode = "microbatch"
        elif per_example_fraction is None:
            self.mode = "subbatch"
        else:
            self.mode = "per_example"
        self._weights: dict[int, Tensor] | None = None
        self._weights_step = -1
        self._weights_taken = 0  # the optimizer's steps when P was read (_preconditioner_weights)
        # parameters without optimizer state when the weights were read (weight zero)
        self._stateless: list[nn.Parameter] = []
        self.engine = PerExampleNorms(
            model,
            per_example=per_example,
            fallback=fallback,
            groups=group_params or None,
            # (weakly: the engine's hooks on the model must not keep the tracker alive)
            precondition=_weakly(self._preconditioner_weights)
            if precondition is not None
            else None,
            per_example_fraction=per_example_fraction or 1.0,
            subbatches=subbatches if self.mode == "subbatch" else 0,
            pairs=paired_rows if grouped_rows is None else grouped_rows,
            examples=examples,
        )
        # What puts hooks on the model (the engine, the token watcher, the data-parallel
        # watches), removed when the tracker is collected: a tracker dropped without remove()
        # (`del tracker`, a notebook cell run again that rebinds the name) kept its hooks
        # opening passes and holding their activations on every forward, for good (+607 MB
        # over 300 steps, a helper's hunt, 2026-12-05). Nothing on the model refers to the
        # tracker itself, so once the user's last reference goes the hooks go with it.
        self._hooked: list[Any] = [self.engine]
        self._finalizer = weakref.finalize(self, _release, self._hooked, self.engine)
        self._finalizer.atexit = False  # (at the interpreter's exit the model goes too)
        self.paired_rows = paired_rows
        self.grouped_rows = grouped_rows
        self.subbatches = subbatches
        self.per_example_fraction = per_example_fraction
        self._sources: list[Source] = []
        if self.mode == "subbatch":
            # (a model in which no weight's gradient comes from sub-batch products is measured
            # per example: cheaper and more precise; see PerExampleNorms._split)
            self._sources += [SubbatchSource(), PerExampleSource(unsplit_only=True)]
        elif self.mode == "per_example":
            self._sources.append(PerExampleSource())
        if microbatch:
            self._sources.append(MicroBatchSource())
        self._params = [p for p in model.parameters() if p.requires_grad]
        # every parameter at construction, frozen ones too (unfreezing has its own message)
        self._known_params = {id(p) for p in model.parameters()}
        self._frozen_new: list[nn.Parameter] = []  # (see _check_new_parameters)
        self._stale: set[int] = set()  # (see _stale_grads)
        self._registrations_seen = _registrations()
        # DDP, FSDP2 or process_group=: local gradients against the averaged one (App. A.1)
        self._dist = DataParallelSource.detect(
            model, self.engine, self._params, process_group, microbatch=microbatch
        )
        self._late_wrapper = watch_late_wrapper(model, self.engine) if self._dist is None else None
        self._hooked += [self._dist, self._late_wrapper]
        # DDP(static_graph=True) (compiled or not) learns on its first iteration which
        # parameters it will all-reduce; with the per-example hooks in that backward it took
        # every parameter for unused and never averaged again — each process trained apart,
        # and the tracker read its own gradient for the average, +135-299% (a helper's hunt,
        # 2026-12-05). That iteration runs with the hooks idle: the step is counted, not
        # measured (as measure_every's are) — also after a resume (a review found the first
        # fix undone by load_state_dict).
        ddp = getattr(model, "_orig_mod", model)
        self._static_ddp = (
            ddp
            if isinstance(ddp, nn.parallel.DistributedDataParallel)
            and getattr(ddp, "static_graph", False)
            and per_example
            else None
        )
        self.engine.idle = self._static_first()
        if self._dist is not None:
            # the data-parallel source needs each pass's local norm as the backward computes it
            self.engine.lazy_first_pass = False
            if precondition is not None or group_params:
                self._refuse(
                    "precondition= and groups= are not supported under data parallelism yet"
                )
        self.measure_every = measure_every
        # the unmeasured steps since the last measured one: their count, examples and tokens
        # (None once a step's tokens were not counted), added to the next measured step
        self._unmeasured: tuple[int, int, Tensor | float | None] = state_mod.NOTHING_UNMEASURED
        self.tokens_per_example = tokens_per_example
        self.definition: str | None = None  # "example", "token" or "labelled": the first step's
        self._tokens = TokenWatcher(
            model,
            self.engine.current_pass,
            count_labels=loss_reduction in ("token_mean", "num_items_in_batch"),
        )
        self._hooked.append(self._tokens)
        self._header_written = False
        self._unwritten: list[dict[str, Any]] = []  # records a failed write left for the next
        self._state = state_mod.init(beta, tuple(self._group_names))
        self._pending: list[_Pending] = []
        self._history: list[dict[str, Any]] = []
        self.steps = 0
        self._warned: set[str] = set()
        # (tracker step, optimizer steps) when the precondition optimizer's count last moved
        self._optimizer_seen: tuple[int, int] | None = None
        # its per-parameter step counts, read to the host once per measured step (StepWatch)
        self._step_watch: StepWatch | None = None
        # tracker.step() calls begun, and the one in which the counts were last read (0: outside)
        self._step_calls = 0
        self._counts_read_in = -1
        self._unscale_bump: dict[torch.device, int] = {}  # _unscale_versions
        self._unbounded_since: int | None = None
        # Σ w tr⁺, Σ w² tr⁺², Σ w, Σ w² over the folded steps (_watch_tails)
        self._tails = (0.0, 0.0, 0.0, 0.0)
        # set by the transformers callback (noisescale.integrations.transformers): what
        # computes the loss outside the model under the Trainer, if anything (for messages)
        self._trainer_loss_outside: str | None = None
        # set by the callbacks: the examples of the training set their loader draws from without
        # replacement, where they can tell (integrations.drawn_without_replacement)
        self._drawn_from: int | None = None
        # the previous step's micro-batches, and whether this step's divisor is unknown
        # (_weights_of: a short window without a measured multiplier)
        self._passes_before = 0
        # whether a step's passes have weighed their examples by weights that vary with the
        # data (a device bool, sticky: StepNorms.weights_vary); None until a step could tell
        self._weights_varied: Tensor | None = None
        self._varied_before = False  # ... in the run this tracker resumed (load_state_dict)
        self._divisor_unknown = False
        # load_state_dict's step: an existing history may be continued (its records up to it)
        self._resumed_at: int | None = None
        self._histories_written: set[Path] = set()  # write_history's files (rewritten freely)
        # the run's identity in its history's header, carried by state_dict: a resumed tracker
        # continues only its own run's file (until a review of 2026-12-07 any file whose header
        # meant the same, another run's too — its records past the checkpoint's step replaced)
        self._run_id = secrets.token_hex(8)
        if self.history_path is not None:
            self._start_history_file()

    # -- the training-loop API ----------------------------------------------------------------

    def step(self, loss: Tensor | float | None = None, lr: float | None = None) -> None:
        """Record this optimizer step: call after the last ``backward()``, before clipping.

        Args:
            loss: The step's training loss (kept for the history and reports; no host sync).
            lr: The learning rate, if no ``optimizer`` was given (a number; a scheduler's
                ``get_last_lr()`` list is read where its groups share one rate).
        """
        self._step_calls += 1
        loss, lr = _checked_step_args(loss, lr)
        scale, grads_unscaled = self._loss_scale()
        step = self.steps + 1
        registrations = _registrations()
        if (
            registrations != self._registrations_seen
            or (step & (step - 1) == 0 and step <= 1024)
            or step % 1024 == 0
        ):
            # a walk over the model: when a module or parameter was registered anywhere since
            # the last check, and on the audits' steps (what no registration shows)
            self._registrations_seen = registrations
            self._check_new_parameters()
        elif self._frozen_new and any(p.requires_grad for p in self._frozen_new):
            self._check_new_parameters()
        self._check_grads_untouched(scale if grads_unscaled else None, scale)
        unmeasured = self.engine.idle
        passes = self.engine.collect(grad_rescale=scale if grads_unscaled else 1.0)
        picks = tuple(self.engine.unread_picks)
        if not passes:
            self._no_passes()
        self._check_grad_scaler(passes)
        if self.engine.unzeroed is not None:
            # every step, by .grad's version (the audited steps below also by value)
            raise NoiseScaleInputError(
                "call optimizer.zero_grad() (or model.zero_grad()) after each optimizer step: "
                f"the gradient of {self.engine.unzeroed!r} was not zeroed since the last step, "
                "so .grad sums this step's gradient and the last one's and its norm is not this "
                "step's big batch (or a pass under tracker.paused() left its gradients there: "
                "zero them before the measured passes). Nothing of this step was recorded"
            )
        if self.engine.handset is not None:
            # every step, where .grad is not the tensor the last step left
            raise NoiseScaleInputError(
                "call loss.backward() for every micro-batch, or set .grad to None before the "
                f"step's first backward: the gradient of {self.engine.handset!r} held values "
                "that no backward of this step put there when a backward accumulated into it "
                "(torch.autograd.grad's result assigned to .grad for one micro-batch, "
                "backward() for the next), so .grad sums gradients noisescale did not measure "
                "with those it did. Nothing of this step was recorded"
            )
        if unmeasured:
            self._unmeasured_step(passes, scale)
            return
        stale = next((p.stale_sqnorm for p in passes if p.stale_sqnorm is not None), None)
        if stale is not None and float(stale) > 0:  # an audited step: it reads back anyway
            raise NoiseScaleInputError(
                "call optimizer.zero_grad() (or model.zero_grad()) after each optimizer step, "
                "and create the tracker before the first backward pass: the parameters' .grad "
                "already held gradients when this step's first backward began, so .grad sums "
                "several steps (or a pass under tracker.paused() left its gradients there: "
                "zero them before the measured passes; or torch.autograd.grad's result was "
                "assigned to .grad before a backward accumulated into it: call loss.backward() "
                "for every micro-batch) and its norm is not this step's big batch"
            )
        self.steps += 1
        self._stale = self._stale_grads(passes)
        if self._dist is not None:
            self._dist.stale = self._stale
        self._remember_grads()
        norms, definition, tokens = self._weights_of(passes, scale)
        self._check_definition(definition)
        self._schedule_next()
        # (here and at _first_gradients: precondition= is refused under data parallelism, so
        # neither returns before the all-reduce below on one process alone)
        if self._precondition_stale():
            self._left_out(passes, tokens)
            return
        # (until 2026-12-06 |G_big|² read 0 from 2^64 on — S² is inf in float32 — and the
        # step was recorded, tr Σ 25% off, a hunt; below, the squares S²·|g_i|² overflowed
        # for gradients of norm > 2^64/S and the step was recorded nan, no word, a review).
        # The norms are this process's own: under data parallelism the step is left out on
        # every process, when read (until 2026-12-06 the process returned before its all-reduce
        # alone, and the collectives were paired wrongly from there; a review)
        overflowed = (
            scale > _SCALE_CHECKED
            and any(p.dtype != torch.float64 for p in self._params)
            and (scale > _LARGEST_LOSS_SCALE or not _norms_finite(passes))
        )
        if overflowed and self._dist is None:
            self._warn_once("loss-scale", _loss_scale_message(scale))
            self._left_out(passes, tokens)
            return
        if self._divisor_unknown and self._dist is None:
            self._warn_once(
                "short-window",
                _short_window_message(
                    f"a step had {len(passes)} accumulation micro-batches, fewer"
                ),
            )
            self._left_out(passes, tokens)
            return
        if passes[0].weights is not None and self._first_gradients():
            self._left_out(passes, tokens)
            return
        observations = {}
        with torch.no_grad():
            for source in self._sources:
                obs = source.observe(norms)
                if obs is not None:
                    observations[source.name] = obs
        if lr is None and self.optimizer is not None:
            lr = learning_rate(self.optimizer)
        grad_scale = 1.0 if grads_unscaled else scale
        if self._dist is not None:
            # (a short window on this process is left out on every process, when read: until
            # 2026-12-06 it returned before the all-reduce, and the other processes' was paired
            # with the next collective — DDP's gradient all-reduce: training changed, or a
            # crash; a hunt)
            reduced = self._dist.launch(
                norms,
                observations,
                grad_scale,
                loss,
                tokens,
                self.steps,
                picks,
                left_out=self._divisor_unknown,
                overflowed=overflowed,
            )
            self._pending.append(_Pending(self.steps, lr, scale, reduced=reduced, picks=picks))
        else:
            self._warn_about_sources(passes, observations)
            sum_c = norms.sum_c
            if not isinstance(sum_c, Tensor) and sum_c <= 0:  # an empty batch
                self._warn_once("empty", "a step had no examples; it is left out")
                self._left_out(passes, tokens)
                return
            weights = passes[0].weights
            with torch.no_grad():
                # (divided twice: the square overflows float32 at a large loss scale on a
                # summed loss, StepNorms.mean_grad_sq)
                # (and past 2³² the gradients are unscaled before they are squared: |S·Σ g_i|²
                # overflowed float32 from S·|Σ g_i| ≈ 2⁶⁴ on — a scale of 2⁶⁰ on a summed loss
                # of 16 examples — and the step was left out as skipped without a word until
                # 2026-12-07, a fuzzer)
                pre = grad_scale if grad_scale > _SCALE_CHECKED else 1.0
                d = grad_scale / pre * norms.sum_c
                big = self._grad_sqnorm(weights, pre) / d / d
                group_big = (
                    self._group_grad_sqnorms(weights, pre) / d / d if self._group_names else None
                )
                b_big, vary = norms.b_big, norms.weights_vary()
                if vary is not None:
                    # once the weights have varied, every later step is measured within its
                    # passes: choosing by each step's own counts would select steps on their
                    # data (a Monte Carlo with one sequence a micro-batch read tr Σ 90% low
                    # from the steps whose two counts happened to be equal)
                    if self._weights_varied is not None:
                        vary = vary | self._weights_varied
                    elif self._varied_before:  # a resumed run's (no copy to the device)
                        vary = torch.ones_like(vary)
                    self._weights_varied = vary
                within = None if vary is None else norms.within_passes()
                if vary is not None and within is not None:
                    big, group_big, b_big = _within_passes(vary, within, big, group_big, b_big)
                    observations = _without_pass_norms(vary, observations)
            self._pending.append(
                _Pending(
                    self.steps,
                    lr,
                    scale,
                    b_big,
                    big,
                    observations,
                    loss.detach() if isinstance(loss, Tensor) else loss,
                    sum(p.batch_size for p in passes),
                    group_big,
                    None if self.precondition is None else weights is not None,
                    tokens=tokens,
                    unmeasured=self._unmeasured,
                    picks=picks,
                    vary=None
                    if vary is None
                    else (
                        vary,
                        self._nothing_to_compare(missing_norm=within is None),
                        all(p.batch_size <= 1 for p in passes),
                    ),
                )
            )
            self._unmeasured = state_mod.NOTHING_UNMEASURED
        # (measured steps only: until 2026-12-06 a data-parallel tracker's unmeasured steps
        # counted too, and measure_every=m read the host m times as often; a review)
        if sum(p.measured for p in self._pending) >= self.sync_every:
            self.sync()

    def discard(self) -> None:
        """Drop what was measured since the last :meth:`step`: a step abandoned after its
        forward or backward, which :meth:`step` will not be called for. Call it before
        ``optimizer.zero_grad()``; the next step is measured as if the abandoned one never ran.
        Without it the next :meth:`step` finds the abandoned backward's gradient zeroed under
        it, as if between two micro-batches of one step, and refuses the step::

            loss = criterion(model(x), y)
            loss.backward()
            if not torch.isfinite(loss):      # a bad batch: skip it
                tracker.discard()
                optimizer.zero_grad()
                continue
            tracker.step(loss=loss)

        Also after a step interrupted by an exception caught in the loop (a KeyboardInterrupt,
        an out-of-memory error). To measure only some steps, call :meth:`step` every step and
        pass ``measure_every=``."""
        self.engine.discard()
        if self._dist is not None:
            self._dist.discard()

    def _first_gradients(self) -> bool:
        """Whether a parameter the preconditioner had no state for got a gradient in this step
        (its first: the optimizer makes state for every parameter with a ``.grad``): its P is
        not defined yet, so the step is left out, with a warning. The next step has it."""
        first = [p for p in self._stateless if p.grad is not None]
        if not first:
            return False
        names = {id(p): n for n, p in self.model.named_parameters()}
        self._warn_once(
            "first-gradient",
            f"parameters {sorted(names.get(id(p), '?') for p in first)} got their first gradient "
            "in this step, so the optimizer has no second-moment state for them yet and their "
            "preconditioner is not defined; the step is left out of the preconditioned estimate "
            "(parameters that never get a gradient add nothing to it)",
        )
        return True

    def _refuse(self, message: str) -> NoReturn:
        """Refuse a setting in the constructor, leaving no hook on the model."""
        _remove_hooks(self._hooked)
        raise NoiseScaleInputError(message)

    def _check_new_parameters(self) -> None:
        """Refuse trainable parameters the tracker was not built on (every mode; in the
        per-example modes the engine's audit checks too)."""
        known = self._known_params
        params = list(self.model.named_parameters())
        new = [n for n, p in params if p.requires_grad and id(p) not in known]
        if new:
            raise NoiseScaleInputError(new_parameters_message(new))
        # new parameters registered while frozen: unfrozen later (progressive unfreezing after
        # load_state_dict(..., assign=True)), no registration shows it — watched at every step
        # (until 2026-12-06 left out of per_example=False's norms until the next walk, a hunt)
        self._frozen_new = [p for _, p in params if id(p) not in known]

    def _no_passes(self) -> None:
        """Refuse a step that found no pass of the model, naming the likely misuse."""
        self._check_new_parameters()
        if self.steps > 0 and self._params and self._grads_unchanged():
            raise NoiseScaleInputError(
                "call tracker.step() once per optimizer step: it was called again with no "
                "forward and backward pass of the model since the last call"
            )
        unopened = self.engine.unopened
        if (
            unopened is not None
            and self.engine.unopened_transform
            and any(p.grad is not None for p in self._params)
        ):
            raise NoiseScaleInputError(
                transform_message(unopened) + ". Nothing of this step was recorded"
            )
        if unopened is not None and any(p.grad is not None for p in self._params):
            raise NoiseScaleInputError(
                submodule_called_message(
                    "call the model the tracker was given", self.model, unopened
                )
                + ". Nothing of this step was recorded"
            )
        if any(p.grad is not None for p in self._params):
            compiled_late = ""
            if self.engine.dynamo_after_creation and _dynamo_compiled():
                compiled_late = (
                    "the model's compiled code seems to have run without the tracker's hooks: "
                    "torch.compile was first used after the tracker was created, and Dynamo, "
                    "which by default does not check a module's hooks, shares the graphs it "
                    "compiles between instances of the model's class, with the hooks or "
                    "without them (a copy compiled too: a reference model, a teacher, an EMA "
                    "model). Run `import torch._dynamo` before creating the tracker (or create "
                    "it after the first torch.compile call): the tracker then has Dynamo check "
                    "hooks. Also possible: "
                )
            raise NoiseScaleInputError(
                compiled_late
                + "create the tracker before the model's first forward pass (it measures "
                "through hooks on the forward): tracker.step() found gradients but saw no "
                "forward pass with gradients enabled. If it was created first, the forward "
                "ran where the hooks cannot see it (torch.utils.checkpoint.checkpoint(model, "
                "..., use_reentrant=True) around the whole model: checkpoint blocks inside "
                "the model instead; or a submodule called by itself, model.model(...): call "
                "the model, or give the tracker the module you call)"
            )
        raise NoiseScaleInputError(
            "call tracker.step() once per optimizer step, after loss.backward(): no "
            "backward pass of the model given to the tracker ran since the last step (a copy "
            "of it — copy.deepcopy, an EMA, AveragedModel — is not measured: create the "
            "tracker on the model you train; nor are tensors put in place of its parameters, "
            "torch.func.functional_call(model, other_params, ...): train its own parameters)"
        )

    def _check_definition(self, definition: str) -> None:
        if self.definition is None:
            self.definition = definition
        elif definition != self.definition:
            raise NoiseScaleInputError(
                f"step {self.steps}'s loss weighs {UNITS[definition]} but the earlier steps' "
                f"weighed {UNITS[self.definition]}: the noise scales of the two objectives "
                "differ and cannot be averaged; keep one loss for the run (or a new tracker)"
            )

    def _unmeasured_step(self, passes: list[Any], scale: float) -> None:
        """A step ``measure_every`` leaves unmeasured: its passes ran plain; count the step,
        its examples and tokens (checked as a measured step's are), for the next measured
        step's record. Under data parallelism they are summed over the processes first (an
        all-reduce, read with the next measured step's): until 2026-12-06 each process kept
        its own, and a checkpoint saved on one process resumed with its count on every
        process (``examples`` off; a hunt)."""
        self.steps += 1
        if self.precondition is not None:
            # the stale-precondition rule counts the steps since the optimizer's count last
            # moved: watched at measured steps only, a count that moved before the optimizer
            # stopped read as moving at the next measured step (until 2026-12-07, measure_every=4
            # and the optimizer replaced after step 4: step 9 measured with P frozen five steps,
            # no word; a review of tests/fuzz_beyond.py). Noted without a device sync, read with
            # the next measured step's (StepWatch)
            self._steps_watched().note(self.steps)
        self._remember_grads()
        _, definition, tokens = self._weights_of(passes, scale)
        self._check_definition(definition)
        examples = sum(p.batch_size for p in passes)
        if self._dist is not None:
            reduced = self._dist.launch_unmeasured(examples, tokens, self.steps)
            self._pending.append(_Pending(self.steps, None, scale, reduced=reduced, measured=False))
        else:
            self._count_unmeasured(examples, None if tokens is None else tokens.detach())
        self._schedule_next()

    def _left_out(self, passes: list[Any], tokens: Tensor | None) -> None:
        """Count a step left out of the estimate with a warning (its divisor unknown, its norms
        overflowed under the loss scale, its preconditioner stale or not yet defined): it was
        trained on, so its examples and tokens are counted with the next recorded step, as an
        unmeasured step's are. Until 2026-12-07 they were lost from every later record's
        ``examples`` and ``tokens_seen`` (and T̄, the report's E), without a word (a fuzzer)."""
        examples = sum(p.batch_size for p in passes)
        self._count_unmeasured(examples, None if tokens is None else tokens.detach())

    def _count_unmeasured(self, examples: int, tokens: Tensor | float | None) -> None:
        """Add an unmeasured step (its examples and tokens; ``None``: not counted) to those
        since the last measured step."""
        count, seen_examples, seen = self._unmeasured
        seen = None if tokens is None or seen is None else seen + tokens
        self._unmeasured = (count + 1, seen_examples + examples, seen)

    def _schedule_next(self) -> None:
        """Whether the next step is measured (steps 1, 1 + m, 1 + 2m, … of measure_every=m)."""
        self.engine.idle = self.steps % self.measure_every != 0 or self._static_first()

    def _static_first(self) -> bool:
        """Whether the next forward is a static-graph DDP's first iteration (see __init__)."""
        ddp = self._static_ddp
        return ddp is not None and not getattr(ddp, "_static_graph_delay_allreduce_enqueued", True)

    def count_tokens(
        self,
        labels: Tensor,
        ignore_index: int = IGNORE_INDEX,
        num_items_in_batch: Tensor | float | None = None,
    ) -> None:
        """Tell the tracker how many tokens each example of this micro-batch counts in the loss.

        Call after each forward (the pass it counts is the last one the model ran), with the
        labels ``[examples, tokens…]`` the loss used (tokens equal to ``ignore_index`` are not
        counted — shift them first if your loss shifts) or a boolean mask of counted tokens.
        Needed with ``loss_reduction="token_mean"`` or ``"num_items_in_batch"``; with a loss
        over examples the counts only give estimates in tokens too. Not needed for a Hugging
        Face model called with ``labels=``. No host synchronisation. Inside
        :meth:`paused` it does nothing (the forward there is not the step's).

        ``num_items_in_batch`` (with ``loss_reduction="num_items_in_batch"``): the number this
        micro-batch's summed token loss was divided by, in the loss passed to
        :meth:`watch_loss` (or backpropagated, without it) — each of its tokens then weighs
        1/that. Without it the divisor is taken to be the step's counted tokens, which is
        right in one process only; under data parallelism it is required. A loss divided by
        the step's tokens over all W processes and multiplied by W (as the Trainer does with
        ``average_tokens_across_devices``) divides by that count / W. The Trainer's callback
        passes the ``num_items_in_batch`` the Trainer gives ``compute_loss``. A tensor is
        not read on the host.
        """
        if self.engine.is_paused:
            return
        pass_ = self.engine.current_pass()
        if pass_ is None:
            raise NoiseScaleInputError(
                "count_tokens() was called before the model's forward pass: call it after each "
                "forward (and before tracker.step())"
            )
        if num_items_in_batch is not None and self.loss_reduction != "num_items_in_batch":
            raise NoiseScaleInputError(
                "count_tokens(num_items_in_batch=) gives the divisor of a loss declared "
                "loss_reduction='num_items_in_batch' (a sum over tokens divided by it), but this "
                f"tracker's loss_reduction is {self.loss_reduction!r}: declare the loss the "
                "tracker is given, or leave num_items_in_batch out"
            )
        counts = count_units(labels, ignore_index)
        if counts.shape[0] != pass_.batch_size:
            raise NoiseScaleInputError(
                f"count_tokens() got labels for {counts.shape[0]} examples but the model's last "
                f"forward pass had {pass_.batch_size}; give this micro-batch's labels "
                "[examples, tokens…]"
            )
        from_labels = pass_.units is not None and pass_.units.origin == LABELS_ORIGIN
        if pass_.units is not None and not pass_.units.measured and not from_labels:
            raise NoiseScaleInputError(
                "count_tokens() was called twice for one forward pass; call it once per micro-batch"
            )
        if pass_.units is None or from_labels:  # (the user's count over the labels= one)
            pass_.units = PassUnits(counts, "token", "count_tokens", num_items_in_batch)

    def watch_loss(self, loss: Tensor, divided_by: float = 1.0) -> None:
        """Measure how the step scales this micro-batch's loss before backpropagating it.

        Call right after computing the loss of a forward of the tracked model, before
        dividing it by the accumulation or scaling it. The gradient that reaches ``loss`` in
        the backward is then taken as the multiplier on the weights ``loss_reduction`` gives
        the examples within it — 1/k with k micro-batches divided as usual, 1 where the loop
        does not divide, a loss scale — instead of the assumed 1/k (``"mean"``,
        ``"token_mean"``) or 1 (``"sum"``, ``"num_items_in_batch"``). |G|² and tr Σ depend on
        it; B_simple does not. The Trainer's and Lightning's callbacks measure it themselves.
        A Hugging Face model's own loss (``labels=``) is watched without this call, but in a
        loop of your own it may be one term of the loss backpropagated, so only whether it was
        left undivided is taken from it.

        ``divided_by``: what ``loss`` was already divided by, for a framework that hands over
        the loss after its own division (Lightning's callback passes
        ``accumulate_grad_batches``). Where nothing is measured and a step has fewer
        micro-batches than the step before (an epoch's short last accumulation window, which
        most loops still divide by the full count), the divisor cannot be told: the step is
        left out, with a warning."""
        self._tokens.watch_loss(loss, divided_by)

    def expect_micro_batches(self, k: int) -> None:
        """Say that from the next step the loop accumulates ``k`` micro-batches and divides
        each one's loss by ``k`` (:class:`~noisescale.schedule.AdaptiveBatchSize` calls it when
        it changes the accumulation): a step of ``k`` after steps of more is then not taken for
        an epoch's short last window, whose divisor is unknown and which is left out."""
        self._passes_before = int(k)

    def wrap_label_smoother(self, smoother: Any) -> Any:
        """The ``transformers`` Trainer's ``label_smoother``, its weights measured
        (:meth:`noisescale.tokens.TokenWatcher.wrap_label_smoother`; the Trainer's callback
        installs it)."""
        return self._tokens.wrap_label_smoother(smoother)

    def _weights_of(self, passes: list[Any], scale: float) -> tuple[StepNorms, str, Tensor | None]:
        """The step's normalisation: each pass's weight per unit, the units (examples or
        tokens) and the tokens counted (see :mod:`noisescale.tokens`)."""
        declared = self.loss_reduction in ("token_mean", "num_items_in_batch")
        wrong_kind = (
            loss_kind_message(self.loss_reduction, passes, accumulated=len(passes) > 1)
            or class_weighted_message(passes)
            or counted_mean_message(self.loss_reduction, passes)
            or own_labels_message(self.loss_reduction, passes)
        )
        if wrong_kind is not None:
            raise NoiseScaleInputError(wrong_kind)
        for p in passes:
            counted_by_user = p.units is not None and not p.units.measured
            if p.units_error and not (declared and counted_by_user):
                raise NoiseScaleInputError(p.units_error)
        k = len(passes)
        one_term = [p.units is not None and p.units.one_term for p in passes]
        if any(one_term) and declared:
            raise NoiseScaleInputError(
                f"loss_reduction={self.loss_reduction!r} declares a loss over tokens, but the "
                "model's own loss (labels=), whose tokens noisescale counts, is one term of the "
                "loss backpropagated (another term computed from the model's outputs, as DPO "
                "with an NLL term α·out.loss): its tokens do not describe the whole loss. Use "
                "loss_reduction='mean' (the loss as a mean over the examples: measured so), or "
                "compute the whole loss over tokens yourself and count them with "
                "tracker.count_tokens()"
            )
        # a model's own loss that is one term of the loss backpropagated: its units and its
        # multiplier describe that term alone — the step is measured over the examples, as the
        # same loss written by hand is (until 2026-12-06 the whole step's gradient was divided
        # by the term's factor α: |G|² and tr Σ 1/α² too large, in tokens; a hunt)
        units: list[PassUnits | None] = [
            None if alone else p.units for p, alone in zip(passes, one_term, strict=True)
        ]
        if self.tokens_per_example is not None:
            units = [
                u
                if u is not None
                else PassUnits(
                    torch.full(
                        (p.batch_size,),
                        float(self.tokens_per_example),
                        dtype=torch.float64,
                        device=self._params[0].device,
                    ),
                    "token",
                    "tokens_per_example",
                )
                for u, p in zip(units, passes, strict=True)
            ]
        measured = [u is not None and u.measured and u.grad is not None for u in units]
        counted = all(u is not None and u.unit in _COUNTED for u in units)
        tokens = torch.stack([u.counts.sum() for u in units]).sum() if counted else None  # type: ignore[union-attr]
        if any(measured):
            if not all(measured):
                raise NoiseScaleInputError(
                    "in this step the model's own loss (labels=) was backpropagated in some "
                    "micro-batches and not in others, so their examples weigh differently in "
                    "unknown ways; backpropagate the same loss in every micro-batch"
                )
            kinds = {u.unit for u in units}  # type: ignore[union-attr]
            if len(kinds) > 1:
                raise NoiseScaleInputError(
                    "this step's micro-batches mix a loss over tokens and one over examples; "
                    "backpropagate the same loss in every micro-batch"
                )
            definition = kinds.pop()
            coef: list[Any] = [u.coefficient(scale) for u in units]  # type: ignore[union-attr]
            # a loss over tokens divides each pass's sum by a count of its own (or by the
            # step's, num_items_in_batch: then the weights do not differ); over examples, the
            # weights are fixed by the passes' sizes
            data = definition in _COUNTED
            own_mean = all(u.own_mean for u in units)  # type: ignore[union-attr]
            norms = StepNorms(passes, coef, scale, data_weights=data, size_weighted=own_mean)
            return norms, definition, tokens
        # the multiplier on each pass's loss: measured where a Hugging Face model computed the
        # loss itself and it was backpropagated, or the Trainer's compute_loss returned it (the
        # gradient that reached it), else what loss_reduction says: 1/k for the means, 1 for
        # the sums
        divided = self.loss_reduction in ("mean", "token_mean")
        assumed = 1.0 / k if divided else 1.0
        outer: list[Any] = [assumed] * k
        trusted = False
        if all(p.loss_grad is not None for p in passes) and not any(one_term):
            outer, trusted = [], True
            for p in passes:
                m = p.loss_grad.detach().double() / scale
                if callable(p.loss_divided_by):  # (decided at the step: Lightning's manual)
                    m = m / p.loss_divided_by()
                if not p.loss_grad_explicit:
                    # a model's own loss, seen returned: it may be one term of the loss
                    # backpropagated (α·loss + (1 − α)·distillation), whose multiplier is not
                    # the examples'. Only "not divided" (1) is taken from it — a loop, or the
                    # Trainer, that does not divide by the accumulation; anything else keeps
                    # the assumption (on the device: no host read)
                    m = torch.where((m - 1.0).abs() <= 1e-6, torch.ones_like(m), assumed)
                    trusted = False
                outer.append(m)
        # fewer micro-batches than the step before (an epoch's short last window, which loops,
        # Lightning and accelerate usually still divide by the full count) and no multiplier
        # known: left out (step())
        self._divisor_unknown = divided and k < self._passes_before and not trusted
        self._passes_before = k
        if declared:
            if not counted:
                raise NoiseScaleInputError(
                    f"loss_reduction={self.loss_reduction!r} weighs tokens, but this step has "
                    "micro-batches whose tokens were not counted: call "
                    "tracker.count_tokens(labels) after each forward (or call a Hugging Face "
                    "model with labels=, whose loss is measured)" + self._labels_popped_hint()
                )
            own_counts = self.loss_reduction == "token_mean"
            if own_counts:
                coef = [m / u.counts.sum() for m, u in zip(outer, units, strict=True)]  # type: ignore[union-attr]
            else:
                divisors = self._items_divisors(units, tokens)  # type: ignore[arg-type]
                coef = [m / d for m, d in zip(outer, divisors, strict=True)]
            return StepNorms(passes, coef, scale, data_weights=own_counts), "token", tokens
        sizes = [p.batch_size for p in passes]
        if self.loss_reduction == "mean" and not trusted and len(set(sizes)) > 1:
            # (a review found a sum over the step divided by its total, left at "mean", read
            # B_simple -9 for 87: the weights 1/(k·n_j) assumed are not the loss's 1/Σn)
            self._warn_once(
                "unequal-mean",
                "a step's micro-batches hold unequal numbers of examples "
                f"({', '.join(map(str, sizes))}) and loss_reduction='mean' takes each "
                "micro-batch's loss for the mean over its own examples divided by the number "
                f"of micro-batches ({k}); if your loss instead divides the step's sum by its "
                f"total of examples ({sum(sizes)}), every example weighing the same, declare "
                "loss_reduction='sum' (a constant factor changes no B_simple): with the wrong "
                "declaration the estimate is wrong. The examples are counted along dim 0 of "
                "the model's first tensor argument; if that is not them (the nodes of a batch "
                "of graphs), say how many a call holds with examples= (per_example=False)",
            )
        coef = [
            m / p.batch_size if self.loss_reduction == "mean" and p.batch_size else m
            for m, p in zip(outer, passes, strict=True)
        ]
        return StepNorms(passes, coef, scale), "example", tokens

    def _items_divisors(self, units: list[Any], tokens: Tensor) -> list[Any]:
        """What each pass's summed token loss was divided by, under the declared
        ``"num_items_in_batch"``: the divisor given with ``count_tokens(num_items_in_batch=)``
        (the Trainer's callback gives the one the Trainer passed), else the step's counted
        tokens — which is what a loss divides by only in one process: under data parallelism
        a loss divided by the step's tokens over all processes weighs every token alike, one
        divided by each process's own count weighs them by the process, and the tracker could
        not tell the two apart (until 2026-12-05 it took the second, and a Trainer-style loss
        read b_big, |G_big|² and tr Σ up to 91% off without a word). In one process the
        Trainer counts num_items_in_batch over unshifted labels for GPT-2 where its loss
        shifts them: its own number is the divisor, not the tokens counted."""
        given = [u.denominator for u in units]
        if all(d is not None for d in given):
            # (a number 0 — a step that counts no token — divides as a tensor 0 does: the step
            # is left out with a warning when read, state.update; until 2026-12-07 a bare
            # ZeroDivisionError from step())
            zero = torch.zeros((), dtype=torch.float64, device=tokens.device)
            return [
                d.detach().to(device=tokens.device, dtype=torch.float64)
                if isinstance(d, Tensor)
                else float(d) or zero
                for d in given
            ]
        if any(d is not None for d in given):
            raise NoiseScaleInputError(
                "count_tokens() was given num_items_in_batch= in some of this step's "
                "micro-batches and not in others; give it in every micro-batch (the number "
                "that micro-batch's summed token loss was divided by)"
            )
        if self._dist is not None and self._dist.world_size > 1:
            raise NoiseScaleInputError(
                "loss_reduction='num_items_in_batch' under data parallelism needs the number "
                "the loss divided its sum over tokens by: divided by the step's tokens over all "
                f"{self._dist.world_size} processes (as the Trainer does with "
                "average_tokens_across_devices) every token weighs the same, divided by each "
                "process's own count they weigh by process, and the tokens this process "
                "counted cannot tell which. Give it: tracker.count_tokens(labels, "
                "num_items_in_batch=n), n the divisor of this micro-batch's summed loss (a loss "
                "divided by the step's tokens over all processes and multiplied by their "
                "number divides by that count / the number of processes); or call a Hugging "
                "Face model with labels= and num_items_in_batch= (its loss is measured); or "
                "divide each micro-batch's summed loss by its own tokens, "
                "loss_reduction='token_mean'"
            )
        return [tokens] * len(units)

    def _labels_popped_hint(self) -> str:
        if self._trainer_loss_outside is None:
            return ""
        return (
            f". Under the Trainer with {self._trainer_loss_outside}, the labels are taken out of "
            "the batch before the model's forward, so they cannot be counted there: compute "
            "the loss in the model (call it with labels=), or override Trainer.compute_loss "
            "and call callback.tracker.count_tokens(labels) after the model's forward"
        )

    def estimate(self) -> est.NoiseEstimate:
        """B_simple with its interval, |G|², tr Σ and the number of steps used (App. A.1), in
        the unit the loss defines (``unit``: examples or tokens; ``.to()`` converts)."""
        self.sync()
        not_yet = self._not_preconditioned_yet()
        if not_yet:
            return self._in_units(self._unavailable(not_yet))
        return self._in_units(est.b_simple_interval(self._state.noise, self.confidence))

    def _unavailable(self, reason: str) -> est.NoiseEstimate:
        """An estimate that is not there: ``nan``, an interval [0, ∞) that does not look like a
        tight one, no steps, and ``reason``."""
        nan = math.nan
        return est.NoiseEstimate(nan, nan, nan, 0.0, math.inf, self.confidence, 0, 0.0, reason)

    def _in_units(self, e: est.NoiseEstimate) -> est.NoiseEstimate:
        t = self._state.tokens_per_example
        if self.definition == "labelled":  # (per labelled example: no tokens to convert to)
            return replace(state_mod.per_token(e, t), unit="examples", tokens_per_example=math.nan)
        if self.definition == "token":
            return state_mod.per_token(e, t)
        return replace(e, tokens_per_example=t)

    def estimate_groups(self) -> dict[str, est.NoiseEstimate]:
        """B_simple of each parameter group (``groups=``): eq. A.2 with the group's own norms.

        A group's big batch is its part of the step's gradient, its small batches the same
        examples' gradients restricted to the group.
        """
        self.sync()
        not_yet = self._not_preconditioned_yet()
        return {
            n: self._in_units(
                self._unavailable(not_yet) if not_yet else est.b_simple_interval(s, self.confidence)
            )
            for n, s in self._state.groups.items()
        }

    def paused(self) -> AbstractContextManager[None]:
        """A block whose forward/backward passes are not part of training (e.g. B_noise HVPs)."""
        return self.engine.paused()

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per step (format: docs and :func:`write_history`), synced on access."""
        self.sync()
        return self._history

    @property
    def b_simple(self) -> float:
        """The current B_simple estimate in examples (``nan`` while not available)."""
        return self.estimate().b_simple

    @property
    def examples(self) -> int:
        """Examples of the steps folded into the estimate so far (synced on access); with
        ``measure_every``, the unmeasured steps' too, once the next measured step is folded."""
        self.sync()
        return self._state.examples

    @property
    def examples_trained(self) -> int:
        """Examples of every step so far, measured or not: :attr:`examples` plus those of the
        steps not folded into it yet — the pending measured steps and the steps
        ``measure_every`` left unmeasured or the tracker left out (a short accumulation window,
        an overflowed loss scale: trained on, counted as unmeasured ones are) since the last
        measured one. What a schedule driven by the tracker counts (the integrations'
        callbacks, at every step).

        On one process it reads nothing from the device: the examples of a step are known on
        the host from its batch shapes. Under data parallelism the count is global, summed
        over the processes by each step's all-reduce, so it syncs (a host read) while steps
        are pending."""
        if self._dist is not None:
            self.sync()
        pending = sum(p.examples + p.unmeasured[1] for p in self._pending)
        return self._state.examples + pending + self._unmeasured[1]

    @property
    def skipped_steps(self) -> int:
        """Steps left out of the estimate (non-finite gradients, no small batch)."""
        self.sync()
        return self._state.skipped_steps

    def remove(self) -> None:
        """Read what is pending and remove the hooks from the model (also when what was
        pending is refused: the error is raised after the hooks are gone). What was measured
        stays readable.

        A tracker that is no longer referenced (``del tracker``, its name bound to a new
        tracker) has its hooks removed when Python collects it, and ``with
        GradientNoiseTracker(model) as tracker:`` removes them at the end of the block."""
        try:
            self.sync()
        finally:
            _remove_hooks(self._hooked)

    def __enter__(self) -> GradientNoiseTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.remove()
        else:
            # (the block's own error is the one to see; what was pending stays pending)
            _remove_hooks(self._hooked)

    # -- host side ----------------------------------------------------------------------------

    def sync(self) -> None:
        """Fold the pending steps into the estimate (one host read for all of them)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        stats, refused = self._read(pending)
        if refused is not None and refused[1].startswith(_NOTHING_WITHIN):
            # (what the step shows about the loss, not about a module)
            kind: type[Exception] = NoiseScaleInputError
        else:
            kind = UnsupportedModuleError
        records = []
        for p, s in zip(pending, stats, strict=True):
            if refused is not None and p.step >= refused[0]:
                break
            if s is None:  # (data parallel: a step unmeasured or left out on every process)
                continue
            if self.dataset_size is not None and s.b_big > self.dataset_size:
                self._warn_once(
                    "dataset-size",
                    f"step {s.step}'s batch of {s.b_big:g} examples is larger than "
                    f"dataset_size={self.dataset_size}: it cannot have been drawn without "
                    "replacement from that data set, and the correction for such draws is then "
                    "wrong; give the number of examples the batches are drawn from, or no "
                    "dataset_size (sampling with replacement needs none)",
                )
            self._state, record = state_mod.update(
                self._state, s, self.confidence, self.dataset_size
            )
            self._after_update(p, record)
            records.append(record)
        self._history.extend(records)
        if self.history_path is not None:
            self._write_lines(records)
        if refused is not None:
            raise kind(refused[1])

    @staticmethod
    def _picked_message(p: _Pending, count: int) -> str:
        """Why step ``p`` is refused: in ``count`` processes, a layer's input rows were picked
        by index tensors none of which is the examples in order."""
        where = "" if p.reduced is None else f" (on {count} of the processes)"
        whole = [how for label, how, _ in p.picks if not label]
        if whole:  # (a whole cause: a multimodal model's items not one in each example)
            return (
                f"step {p.step}{where}: {whole[0]}. Read on the device with the step's "
                "statistics: this step and the unread ones after it were not recorded (the "
                "steps before it were)"
            )
        layers = sorted({f"'{label}' ({how})" for label, how, _ in p.picks if label})
        named = ", ".join(layers) if layers else "a layer on another process"
        if p.reduced is not None and len(layers) > 1:
            named = "one or more of " + named  # (this process's flags are read summed)
        return (
            f"step {p.step}{where}: the input rows of {named} were picked by index tensors, "
            "none of them the examples in order — h[idx], or h[b, t] with b, t from "
            "mask.nonzero(); a batch sorted inside the forward: pack it with "
            "enforce_sorted=False — so "
            "their count equals the batch's by coincidence and which example each row belongs "
            "to changes with the data. On an accelerator these indices are compared on the "
            "device when the layer runs and read here, with the step's statistics: this step "
            "and the unread ones after it were not recorded (the steps before it were). Pick "
            "one row per example with an index along the examples, h[torch.arange(N), t], or "
            "measure with per_example=False"
        )

    def _read(
        self, pending: list[_Pending]
    ) -> tuple[list[state_mod.StepStats | None], tuple[int, str] | None]:
        """Every pending step's numbers, read from the device in one transfer, and the first
        step refused by what they show (its number and why), if any. Under data parallelism
        a step unmeasured or left out on every process has no numbers (``None``): an
        unmeasured one's examples and tokens are counted for the next measured step."""
        refused: tuple[int, str] | None = None
        if self._dist is not None:
            values = torch.cat([p.reduced.values() for p in pending]).cpu().numpy()
            width = values.size // len(pending)
            out: list[state_mod.StepStats | None] = []
            for i, p in enumerate(pending):
                row = values[i * width : (i + 1) * width]
                kind = step_kind(row, p.step)
                if kind != "measured":
                    # (a step left out on every process was trained on too: its examples and
                    # tokens count, as an unmeasured one's; _left_out)
                    if refused is None:
                        self._count_unmeasured(*self._dist.resolve_unmeasured(row))
                    if refused is None and kind == "left out" and row[OVERFLOWED] > 0:
                        where = (
                            f"on {round(float(row[OVERFLOWED]))} of the "
                            f"{self._dist.world_size} processes at step {p.step}, "
                        )
                        self._warn_once("loss-scale", _loss_scale_message(p.scale, where))
                    elif refused is None and kind == "left out":
                        had = (
                            f"on {round(float(row[LEFT_OUT]))} of the {self._dist.world_size} "
                            f"processes, step {p.step} had fewer accumulation micro-batches"
                        )
                        self._warn_once("short-window", _short_window_message(had))
                    out.append(None)
                    continue
                if refused is None and row[PICKED] > 0:
                    refused = (p.step, self._picked_message(p, round(float(row[PICKED]))))
                b_big, big, examples, loss, sources, tokens = self._dist.resolve(row)
                if self._dist.weights_varied:
                    why = self._nothing_to_compare(missing_norm=row[PASS_MISSING] > 0)
                    if refused is None and why is not None:
                        refused = (p.step, self._nothing_within(p.step, why))
                    self._warn_weights_vary(p.step)
                # (the processes' unmeasured steps since the last measured one, summed)
                unmeasured = self._unmeasured
                if refused is None:
                    self._unmeasured = state_mod.NOTHING_UNMEASURED
                if not sources:
                    self._warn_once(
                        "small-equals-big",
                        "this step has one example over all processes and no other small-batch "
                        "source (small batch = big batch); the step is skipped. " + _PACKED,
                    )
                out.append(
                    state_mod.StepStats(
                        p.step,
                        b_big,
                        big,
                        sources,
                        examples,
                        loss,
                        p.lr,
                        p.scale,
                        tokens=tokens,
                        definition=self.definition or "example",
                        unmeasured=unmeasured,
                    )
                )
            return out, refused
        flat: list[Tensor] = []

        def later(x: Any) -> None:  # a device number, read with the rest
            if isinstance(x, Tensor):
                flat.append(x.reshape(1))

        for p in pending:
            assert p.sqnorm_big is not None and p.observations is not None
            flat.append(p.sqnorm_big.reshape(1))
            later(p.b_big)
            later(p.tokens)
            later(p.unmeasured[2])
            if p.vary is not None:
                flat.append(p.vary[0].reshape(1))
            for obs in p.observations.values():
                flat.append(obs.sqnorm_sum.reshape(1))
                later(obs.count)
                later(obs.inv_size_sum)
                if obs.group_sqnorm_sum is not None:
                    flat.append(obs.group_sqnorm_sum.reshape(-1))
            if isinstance(p.loss, Tensor):
                flat.append(p.loss.reshape(1))
            if p.group_big is not None:
                flat.append(p.group_big.reshape(-1))
            flat += [flag.reshape(1) for _, _, flag in p.picks]
        device = flat[0].device
        values = torch.cat([f.to(device=device, dtype=torch.float64) for f in flat]).cpu().numpy()
        out, pos = [], 0
        g = len(self._group_names)

        def read(x: Any) -> float:
            nonlocal pos
            if not isinstance(x, Tensor):
                return float(x)
            pos += 1
            return float(values[pos - 1])

        for p in pending:
            big = float(values[pos])
            pos += 1
            b_big, tokens = read(p.b_big), None if p.tokens is None else read(p.tokens)
            unmeasured_steps, unmeasured_examples, unmeasured_tokens = p.unmeasured
            if unmeasured_tokens is not None:
                unmeasured_tokens = read(unmeasured_tokens)
            if p.vary is not None and read(p.vary[0]):
                if refused is None and p.vary[1] is not None:
                    refused = (p.step, self._nothing_within(p.step, p.vary[1]))
                self._warn_weights_vary(p.step)
                if p.vary[2]:
                    self._warn_once(
                        "token-mean-one-each",
                        f"step {p.step} is skipped: measured within its micro-batches (their "
                        "token-mean weights vary with the data), and each holds one example, "
                        "so there is nothing to compare; hold several examples a micro-batch, "
                        "or divide by the step's tokens (num_items_in_batch=)",
                    )
            sources = {}
            for name, obs in p.observations.items():
                total = float(values[pos])
                pos += 1
                count, inv = read(obs.count), read(obs.inv_size_sum)
                group_sum = None
                if obs.group_sqnorm_sum is not None:
                    group_sum = values[pos : pos + g].copy()
                    pos += g
                if count > 0:
                    sources[name] = state_mod.SmallBatches(count, inv, total, group_sum)
            loss = p.loss
            if isinstance(loss, Tensor):
                loss = float(values[pos])
                pos += 1
            group_big = None
            if p.group_big is not None:
                group_big = values[pos : pos + g].copy()
                pos += g
            if p.picks:
                picked = values[pos : pos + len(p.picks)]
                pos += len(p.picks)
                if refused is None and picked.any():
                    bad = [pick for pick, flag in zip(p.picks, picked, strict=True) if flag]
                    refused = (p.step, self._picked_message(replace(p, picks=tuple(bad)), 1))
            out.append(
                state_mod.StepStats(
                    p.step,
                    b_big,
                    big,
                    sources,
                    p.examples,
                    loss,
                    p.lr,
                    p.scale,
                    group_big,
                    p.preconditioned,
                    tokens=tokens,
                    definition=self.definition or "example",
                    unmeasured=(unmeasured_steps, unmeasured_examples, unmeasured_tokens),
                )
            )
        return out, refused

    def _after_update(self, p: _Pending, record: dict[str, Any]) -> None:
        if record.get("left_out") == state_mod.NO_TOKEN:
            self._warn_once(
                "no-token",
                f"step {p.step} counts no token (every label of its examples is ignored, -100: "
                "a batch that is all prompt, completions truncated away, sequences of one "
                "token): its loss over tokens is 0/0, so it is left out (its examples counted, "
                "with no token). Its rows' summed token gradients are 0, observations that "
                "leaving it out drops: with a fraction q of the steps counting no token, |G|² "
                "and tr Σ each read 1/(1 − q) too high (B_simple, their ratio, stays unbiased). "
                "Such batches train nothing: leave them out of the loader",
            )
        if record["skipped"] and not math.isfinite(record["sqnorm_big"]) and self.scaler is None:
            self._warn_once("non-finite", f"step {p.step} has non-finite gradients; it is left out")
        if not record["skipped"]:
            self._watch_tails(p, record)
            self._watch_draws()
        unbounded = record["b_simple_high"] is None or not math.isfinite(
            record["b_simple_high"] or math.inf
        )
        if not unbounded:
            self._unbounded_since = None
        elif self._unbounded_since is None:
            self._unbounded_since = p.step
        elif p.step - self._unbounded_since >= UNBOUNDED_WARNING_STEPS and self.mode != "subbatch":
            self._warn_once(
                "unbounded",
                f"B_simple's interval has stayed unbounded for {UNBOUNDED_WARNING_STEPS} steps "
                f"with the {self.mode} source; the default sub-batch source (subbatches=8, no "
                "per_example_fraction) separates |G|² from the noise far more precisely late in "
                "training, at about the same cost (bench/precision.py)",
            )

    def _watch_draws(self) -> None:
        """Warn where the callback's loader draws from a data set of N examples without
        replacement, no ``dataset_size`` corrects for those draws, and B_simple corrected for
        them is over 5% of N: uncorrected it reads about 1/(1 − B_simple/N) high — or nan, |G|²
        not positive, from B_simple ≈ N on, where an interval's end could not tell."""
        n, noise = self._drawn_from, self._state.noise
        if self.dataset_size is not None or not n or noise.count < 8:
            return
        g2, tr = est.finite_population(noise.g2_sum, noise.trace_sum, n)  # (the EMAs' ratio)
        if not (g2 > 0 and tr > 0.05 * n * g2):
            return
        b = float(tr / g2)
        self._warn_once(
            "drawn-without-replacement",
            f"the training loader draws its batches without replacement from {n} examples (a "
            f"shuffled epoch), and B_simple corrected for such draws is about {b:.3g} "
            f"examples, {100 * b / n:.0f}% of them: uncorrected, the estimate reads about "
            "1/(1 − B_simple/N) high (nan once B_simple nears N); pass dataset_size="
            f"{n} with the callback's tracker arguments to correct each step (README: the "
            "examples of a step must be independent draws)",
        )

    def _watch_tails(self, p: _Pending, record: dict[str, Any]) -> None:
        """Warn once when the averaged tr Σ rests on a few steps: n_eff = (Σ w_t tr_t)² /
        Σ w_t² tr_t² (tr_t the step's estimate, clipped at 0; w_t its weight in the average)
        under :data:`FEW_NOISE_STEPS` and under :data:`FEW_NOISE_SHARE` of the steps' own
        effective count. That is a noise carried by a few examples (heavy tails, late in
        training), and the interval, which takes the average as near-normal, then covers less
        than it says, on the side that reads B_simple too low: 72% for a nominal 95% with
        ≈ 4 steps' worth (0.5% of the examples carrying 91% of tr Σ, 50 steps of 16; 200 runs,
        re-measured 2026-12-06 with the skewness-corrected interval; 81% in a helper's
        measurement of 2026-12-05), 91% with ≈ 11. A run that has not yet met one of
        those examples cannot be told from one without them: nothing warns there."""
        if record.get("preconditioned") and self._state.preconditioned_from == p.step:
            self._tails = (0.0, 0.0, 0.0, 0.0)  # the averages restarted
        tr = record["trace_sigma"]
        if not math.isfinite(tr):
            return
        tr = max(tr, 0.0)
        b = self._state.noise.beta
        s1, s2, w1, w2 = self._tails
        s1, s2, w1, w2 = b * s1 + tr, b * b * s2 + tr * tr, b * w1 + 1, b * b * w2 + 1
        self._tails = (s1, s2, w1, w2)
        if s2 <= 0 or "few-noise-steps" in self._warned:
            return
        n_eff, steps = s1 * s1 / s2, w1 * w1 / w2
        bounded = record["b_simple_high"] is not None and math.isfinite(record["b_simple_high"])
        if bounded and steps >= 10 and n_eff < FEW_NOISE_STEPS and n_eff < FEW_NOISE_SHARE * steps:
            self._warn_once(
                "few-noise-steps",
                f"step {p.step}: the averaged tr Σ rests on about {n_eff:.1f} steps' worth of "
                f"noise out of {steps:.0f} (a few examples carry most of it: heavy tails, as "
                "late in training); B_simple's interval takes the average for near-normal and "
                "then covers less than it says, reading B_simple too low (72% for a nominal 95% "
                "at about 4 steps' worth in a test): let the run go on before deciding on this "
                "interval — it recovers as more of those examples are seen",
            )

    def _warn_about_sources(self, passes: list[Any], observations: dict[str, Any]) -> None:
        for p in passes:
            if p.withheld:
                # an audit taught the engine something; this step's per-example norms are not used
                self._warn(
                    f"step {self.steps}: {p.withheld}; this step's per-example norms are left out"
                    + (" (its micro-batch norms still count)" if observations else "")
                )
        if observations and sum(p.batch_size for p in passes) == 1:
            # (every example measured, one in the step: the exact mode skipped such steps
            # without the word the default gives until 2026-12-06, a hunt)
            self._warn_once(
                "small-equals-big",
                _ONE_EXAMPLE,
            )
        elif observations or any(p.withheld for p in passes):
            pass
        elif self.mode == "microbatch" and len(passes) == 1:
            self._warn_once(
                "microbatch-alone",
                "accumulate several micro-batches per optimizer step, or drop per_example=False: "
                "per_example=False measures only between the backward passes of one step, and "
                "this step had a single backward pass, so it has no small batch and is skipped",
            )
        elif any(p.skipped for p in passes):
            self._warn_once(
                "subset-missed",
                "this step had fewer micro-batches than the one before, and the micro-batch "
                "drawn for its per-example subset (or sub-batches) did not occur, so it has no "
                "small-batch norm and is skipped (this happens on the step where accumulation "
                "shrinks to one micro-batch; per_example_fraction=1.0, or keeping micro-batch "
                "norms on, avoids it)",
            )
        else:
            self._warn_once(
                "small-equals-big",
                _ONE_EXAMPLE,
            )
        if self.precondition is None or passes[0].weights is not None:
            return
        taken = self._watch_optimizer(in_step=True)
        if self._weights_step == self.steps - 1 and self._weights_taken != taken:
            # P was read during this step's backward, when the optimizer had taken fewer steps:
            # optimizer.step() ran before tracker.step(). The norms are right (they use the state
            # read then), and so is the count said (until 2026-12-07 the count of now: "taken 1
            # step, fewer than precondition_from=1", a review of tests/fuzz_beyond.py)
            taken = self._weights_taken
            self._warn_once(
                "optimizer-before-tracker",
                f"the optimizer stepped between this step's backward and tracker.step() (it had "
                f"taken {_steps(taken)} when its second moments were read for this step's norms): "
                "call tracker.step() after backward and before optimizer.step(); the norms use "
                "the state read during backward, so they stay right",
            )
        since = self._preconditioned_since()
        if since is not None:
            # (until 2026-12-05 this blamed missing state also where the state was restored
            # and a larger precondition_from held the steps back)
            cause = (
                "the optimizer holds no second-moment state (a fresh optimizer after resuming "
                "the tracker? restore its state_dict too)"
                if taken == 0
                else f"the optimizer has taken {_steps(taken)}, fewer than precondition_from="
                f"{self.precondition_from} (larger than the resumed run's? give the tracker "
                "the precondition_from the run was measured with)"
            )
            self._warn_once(
                "not-preconditioned-after",
                f"{cause}, so this step's norms are not preconditioned; the estimate has been "
                f"preconditioned since step {since}, so the step is "
                "left out",
            )
            return
        self._warn_once(
            "not-preconditioned",
            f"the optimizer has taken {_steps(taken)}, fewer than precondition_from="
            f"{self.precondition_from}, so this step's norms are not preconditioned; "
            "estimate() is unavailable "
            "(nan, with the reason) until the first preconditioned step, where the averages "
            "start",
        )
        stalled = self._optimizer_stalled()
        if stalled >= self._stall_limit():
            self._warn_once(
                "optimizer-stalled",
                f"the optimizer given as precondition= has not stepped in the {stalled} steps "
                "the tracker counted (it stays at step "
                f"{taken} of precondition_from={self.precondition_from}), so preconditioning "
                "never starts and estimate() stays unavailable: is it the optimizer that "
                "trains this model? Pass the one whose step() updates it (under the Trainer's "
                "callback, precondition=True)",
            )

    def _watch_optimizer(self, in_step: bool = False) -> int:
        """The precondition optimizer's step count now, noting the tracker step at which it
        last moved (:meth:`_optimizer_stalled`). ``in_step``: within ``tracker.step()``, where
        a read made earlier in the same call serves (no user code ran between), never the
        backward's: ``optimizer.step()`` may have run since, and a step replayed from a CUDA
        graph writes the counts without moving their version counters (until 2026-12-07 the
        backward's read served where they had not moved: with optimizer.step() before
        tracker.step() and the counters held, the count seen stayed a step behind, 2 for 3)."""
        assert self.precondition is not None
        reuse = in_step and self._counts_read_in == self._step_calls
        taken = optimizer_steps(self.precondition, self._params, self._step_counts(reuse))
        self._seen_at(self.steps, taken)
        return taken

    def _seen_at(self, step: int, taken: int) -> None:
        """The precondition optimizer had taken ``taken`` steps at tracker step ``step``."""
        if self._optimizer_seen is None or self._optimizer_seen[1] != taken:
            self._optimizer_seen = (step, taken)

    def _steps_watched(self) -> StepWatch:
        assert self.precondition is not None
        if self._step_watch is None or self._step_watch.optimizer is not self.precondition:
            self._step_watch = StepWatch(self.precondition, self._params)
        return self._step_watch

    def _step_counts(self, reuse: bool = False) -> list[float | None]:
        """The precondition optimizer's per-parameter step counts now, the counts noted at the
        unmeasured steps since the last read seen first (at most one device sync)."""
        noted, counts = self._steps_watched().read(reuse)
        self._counts_read_in = self._step_calls
        for step, taken in noted:
            self._seen_at(step, taken)
        return counts

    def _nothing_to_compare(self, missing_norm: bool) -> str | None:
        """Why a step measured within its passes could never be measured there, or ``None``:
        no small batch but the passes themselves (``per_example=False``: every such step is
        refused), or a pass's gradient norm missing (its backward reached no parameter). A
        step whose micro-batches hold one example each is skipped instead, with a warning
        (:meth:`_warn_weights_vary`): other steps of the run may hold more (a review found
        one such step killing a run of measurable ones)."""
        if self.mode == "microbatch":
            return "with per_example=False the only small batches are the micro-batches themselves"
        if missing_norm:
            return (
                "a micro-batch's gradient norm is missing (its backward reached no parameter), "
                "so the micro-batches cannot be taken on their own"
            )
        return None

    def _nothing_within(self, step: int, where: str) -> str:
        """Why a step whose passes' weights vary with the data cannot be measured at all."""
        return (
            f"{_NOTHING_WITHIN} (step {step}): its micro-batches' losses each divide their sum "
            "by their own token count and the counts differ, so the step's gradient weighs them "
            "by weights that depend on the data and is no big batch for eq. A.2 (B_simple "
            "20–45% too high when taken for one, in tests); the step can then be measured only "
            f"within each micro-batch, and {where}. Instead, {_STEP_DIVISOR}"
        )

    def _warn_weights_vary(self, step: int) -> None:
        """Once, at the first step whose passes weighed their examples by weights that depend on
        the data (:meth:`~noisescale.sources.base.StepNorms.weights_vary`): a loss that divides
        each micro-batch's summed token loss by that micro-batch's own count. The step's
        gradient is then no big batch for eq. A.2 — taken as one, a Monte Carlo read |G|²
        16% low and tr Σ 22% high (B_simple 45% high; BERT's masked LM with two micro-batches
        a step, about 20% high), warned about and left so until 2026-12-05 — and the step is
        measured within its passes (``tests/test_tokens.py``)."""
        what = (
            "each step is measured within its micro-batches (each the big batch of its own "
            "sub-batches or examples; the micro-batch norms are left out): unbiased, but "
            "without the pairs of examples across micro-batches, so less precise"
        )
        self._warn_once(
            "token-mean-weights",
            f"step {step}: its micro-batches' losses each divide their sum by their own count, "
            "and the counts differ (loss_reduction='token_mean' or a Hugging Face model's own "
            "mean loss over its labels, each micro-batch's tokens): the step's gradient weighs "
            "the micro-batches by weights that depend on the "
            f"data drawn, so it is not a big batch eq. A.2 can use; {what}. More precise: "
            f"{_STEP_DIVISOR}, so that every token weighs the same; or measure every example "
            "(per_example_fraction=1.0), which loses little within micro-batches "
            "(bench/token_mean_precision.py)",
        )

    def _stall_limit(self) -> int:
        """Tracker steps with the optimizer's count unmoved before it is named as perhaps not
        the one training the model (a loop that calls ``tracker.step()`` before
        ``optimizer.step()`` sees one such step every step)."""
        return max(2 * self.precondition_from, 10)

    def _precondition_stale(self) -> bool:
        """Whether this step is left out because the precondition optimizer stopped stepping
        after preconditioning started: two tracker steps in a row without a step of it (three
        with a ``scaler=``, which skips a step on overflow; one alone is a skipped step, a
        review found it left out) — a new optimizer created mid-run trains the model, and this
        one's second moments are stale. Until 2026-12-06 its frozen state went on weighing the
        norms without a word (g2 −7.6 against 1,876, a hunt); said once. Preconditioning has
        started once a preconditioned step was measured, read or not: until 2026-12-07 only the
        state folded at the last sync counted, so within the first ``sync_every`` measured
        steps (all of them for a run shorter than that) the stalled optimizer's frozen P went on
        weighing every step without a word (a fuzzer, tests/fuzz_beyond.py)."""
        if self.precondition is None:
            return False
        # (every step: the count must be seen before it stops moving)
        self._watch_optimizer(in_step=True)
        if self._preconditioned_since() is None:
            return False
        stalled = self._optimizer_stalled()
        # (deciding at once where the parameters' versions moved without its step was tried and
        # dropped: an embedding's max_norm or a clamp_ under no_grad moves them with no update,
        # and left a skipped step's next step out; a review)
        if stalled < (2 if self.scaler is None else 3):
            return False
        self._warn_once(
            "precondition-stale",
            f"noisescale: the optimizer given as precondition= has not stepped in the last "
            f"{stalled} steps, so its second moments may not be those of the optimizer training "
            "the model (one created anew since?); steps are left out while it stays still. If "
            "a new optimizer trains the model, create a new tracker with it "
            "(precondition=new_optimizer, and optimizer= for the recorded learning rate); if "
            "steps are being skipped on purpose (a loss-spike guard), the steps after them are "
            "measured again once it steps",
        )
        return True

    def _preconditioned_since(self) -> int | None:
        """The first preconditioned step of the estimate, ``None`` before one: the state's, or a
        measured step not yet read (``sync_every``), as the next sync will fold it."""
        if self._state.preconditioned_from is not None:
            return self._state.preconditioned_from
        return next((p.step for p in self._pending if p.preconditioned), None)

    def _saved_optimizer_seen(self) -> list[int] | None:
        """The stall bookkeeping as state_dict() saves it, the counts noted at unmeasured steps
        read first (until 2026-12-07 a tracker that had not read them yet, resumed with
        precondition= from one without, saved None for [0, 2]: the stall count restarted)."""
        stalled = self._optimizer_stalled()
        return None if self._optimizer_seen is None else [stalled, self._optimizer_seen[1]]

    def _optimizer_stalled(self) -> int:
        """Tracker steps counted since the precondition optimizer's step count last moved (or
        since this tracker first read it): an optimizer that never steps while the tracker
        does is not the one training the model, and would keep the estimate plain for good
        (until 2026-12-05 it did, and estimate() gave the plain B_simple without a word)."""
        if self.precondition is not None:
            for step, taken in self._steps_watched().flush():
                self._seen_at(step, taken)
        if self._optimizer_seen is None:
            return 0
        return self.steps - self._optimizer_seen[0]

    def _not_preconditioned_yet(self) -> str:
        """Why a tracker asked for the preconditioned noise scale has no estimate yet ("" when
        it has one, or was not asked): the steps measured before the optimizer reached
        ``precondition_from`` are plain, a different quantity, and are not its estimate."""
        if self.precondition is None or self._state.preconditioned_from is not None:
            return ""
        taken = self._watch_optimizer()
        reason = (
            f"preconditioning has not started: the optimizer has taken {taken} of "
            f"precondition_from={self.precondition_from} steps, and the plain steps measured "
            "until then are not the preconditioned estimate (the history keeps them, "
            '"preconditioned": false); it starts at the first preconditioned step'
        )
        stalled = self._optimizer_stalled()
        if stalled >= self._stall_limit():
            reason += (
                f". The optimizer has not stepped in the {stalled} steps the tracker counted: "
                "is it the optimizer that trains this model? Pass the one whose step() updates "
                "it"
            )
        return reason

    def _check_grads_untouched(self, unscaled_by: float | None, scale: float = 1.0) -> None:
        """Refuse a step whose ``.grad`` was changed in place after the last backward pass: the
        examples' norms were measured inside that backward, so a clipped or rescaled ``.grad``
        no longer matches them and the estimate would be wrong without a word
        (:meth:`~noisescale.per_example.PerExampleNorms.changed_grads`: every step by version
        counters; on audited steps — every step on the CPU — by value too, which sees
        ``.grad.data`` and an ``unscale_``
        the tracker was not told of). ``unscaled_by``: the loss scale a GradScaler's
        ``unscale_`` divided ``.grad`` by, else ``None``; ``scale``: the loss scale in the
        backward's gradients. With ``process_group=`` on a plain model its user averages
        ``.grad`` in place after the backward, so an in-place change is expected there: on the
        audits' steps ``.grad`` is checked to be the processes' mean instead
        (:meth:`~noisescale.sources.distributed.DataParallelSource.check_averaged`)."""
        if self._dist is not None and self._dist.kind == "manual":
            wrong = self._dist.check_averaged(scale, scale if unscaled_by is None else 1.0)
            if wrong is not None:
                self.engine.discard()
                raise NoiseScaleInputError(wrong)
            return
        allowed = 0 if unscaled_by is None else self._unscale_versions()
        found = self.engine.changed_grads(allowed, 1.0 if unscaled_by is None else unscaled_by)
        if found is None:
            return
        # a gradient penalty's backward (create_graph=True) through a forward after the step's
        # other forwards leaves that pass's marks before the final backward: the cause is the
        # penalty, not a clip (until 2026-12-06 textbook WGAN-GP was blamed on clipping, a hunt)
        wrote = written_tasks(self.engine.passes)
        second_order = any(takes_second_order(p, wrote) for p in self.engine.passes)
        self.engine.discard()
        if second_order:
            raise NoiseScaleInputError(SECOND_ORDER)
        changed, how = found
        if how == "assigned":
            raise NoiseScaleInputError(
                "call loss.backward() for the step's gradients: only torch.autograd.grad ran "
                f"through the model this step, and the gradient of {changed!r} was written to "
                ".grad by hand (gradient surgery, a task weight, gradients of several batches "
                "combined), so noisescale cannot tell that .grad is the gradient of the loss "
                "whose examples it measured. A gradient only read or logged goes under `with "
                "tracker.paused():`. Nothing of this step was recorded"
            )
        if how == "not unscaled":
            raise NoiseScaleInputError(
                "call tracker.step() before GradScaler.unscale_, or unscale_ every optimizer "
                f"first: the gradient of {changed!r} was still scaled at tracker.step() while "
                "others were unscaled (unscale_ was called for some of the scaler's optimizers "
                "only), so .grad mixes scaled and unscaled gradients and the estimate would be "
                "wrong. Nothing of this step was recorded"
            )
        raise GradientsChangedError(
            "call tracker.step() right after the last backward pass, before clipping or "
            f"changing the gradients: the gradient of {changed!r} was changed after the last "
            "backward pass and before tracker.step() (gradient clipping — clip_grad_norm_, "
            "clip_grad_value_, accelerate's clip_grad_norm_ —, a rescale of .grad or a term "
            "added to it, also through .grad.data; a .grad set to None or given to a parameter "
            "the backward gave none — torch.autograd.grad's result assigned to .grad: call "
            "loss.backward() instead). noisescale measured the examples' "
            "gradients inside the backward pass and .grad no longer matches them, so the "
            "estimate would be wrong. "
            + (
                # (the scaler given: a step() after scaler.update() reads .grad with the new
                # scale — until 2026-12-07 this said to pass the scaler, which was passed)
                "With the GradScaler given, call tracker.step() before scaler.step(optimizer) "
                "and scaler.update(): update() may change the scale .grad is read with "
                "(unscale_ before tracker.step() is fine)"
                if self.scaler is not None
                else "A GradScaler's unscale_ before tracker.step() is fine (pass it: "
                "GradientNoiseTracker(..., scaler=scaler))"
            )
            + ". Nothing of this step was recorded"
        )

    def _unscale_versions(self) -> int:
        """How many versions a GradScaler's ``unscale_`` adds to a gradient on the parameters'
        device (none with torch's kernels today), probed once on a one-element tensor."""
        device = self._params[0].device if self._params else torch.device("cpu")
        known = self._unscale_bump.get(device)
        if known is None:
            one = functools.partial(torch.ones, 1, device=device, dtype=torch.float32)
            t = one()
            before = t._version
            torch._amp_foreach_non_finite_check_and_unscale_([t], one() * 0, one())
            known = self._unscale_bump[device] = t._version - before
        return known

    def _remember_grads(self) -> None:
        """Which .grad tensors (and their versions) the step read, to recognise a repeat call."""
        self._last_grads = [
            (weakref.ref(p.grad), p.grad._version) if p.grad is not None else None
            for p in self._params
        ]

    def _grads_unchanged(self) -> bool:
        """Whether every .grad is the tensor the last step read, untouched since."""
        last = getattr(self, "_last_grads", None)
        if not last or all(x is None for x in last):
            return False
        for p, seen in zip(self._params, last, strict=True):
            if (seen is None) != (p.grad is None):
                return False
            if seen is not None and not _same_grad(p, seen):
                return False
        return True

    def _stale_grads(self, passes: list[Any]) -> set[int]:
        """The parameters holding a ``.grad`` that no backward of this step's passes reached
        (their gradient hooks never ran): a parameter removed from the model (a head reset or
        replaced, a block deleted, ``merge_and_unload()``) keeps its last gradient, which no
        zero_grad reaches. It is not this step's: left out of |G_big|², where until 2026-12-06
        it was summed at every later step (+8% … +111%, a hunt; a walk refusing removed
        parameters missed a ``del`` between its steps, and an identity-and-version test was
        defeated by a clip over the optimizer's list after the step; reviews)."""
        received: set[int] = set().union(*(p.received for p in passes))
        if not received:  # (nothing reached by hooks: nothing to tell)
            return set()
        stale = {id(p) for p in self._params if p.grad is not None and id(p) not in received}
        if stale and self._dist is not None:
            # under data parallelism a parameter no hook of this process reached may hold the
            # step's gradient all the same, averaged in from the processes that used it (an
            # expert, a task head unused here: 16–39% low, a review): stale only where .grad is
            # still the tensor the last step read, at its version
            last = getattr(self, "_last_grads", None) or [None] * len(self._params)
            stale &= {
                id(p)
                for p, seen in zip(self._params, last, strict=True)
                if seen is not None and _same_grad(p, seen)
            }
        return stale

    def _measured_params(self) -> list[nn.Parameter]:
        """The parameters whose ``.grad`` this step wrote (:meth:`_stale_grads`)."""
        return [p for p in self._params if p.grad is not None and id(p) not in self._stale]

    def _grad_sqnorm(self, weights: dict[int, Tensor] | None = None, pre: float = 1.0) -> Tensor:
        """|.grad|² (weighted by ``weights``), each gradient divided by ``pre`` first."""
        grads = [p.grad if pre == 1.0 else p.grad / pre for p in self._measured_params()]
        if not grads:
            raise NoiseScaleInputError(
                "no parameter has a gradient: call tracker.step() after loss.backward() and "
                "before optimizer.zero_grad()"
            )
        if weights is not None:
            return torch.stack(
                [
                    (_at_least_float32(g).pow(2) * weights[id(p)]).sum()
                    for p, g in zip(self._measured_params(), grads, strict=True)
                ]
            ).sum()
        return sqnorm_total([g.detach() for g in grads])

    def _group_grad_sqnorms(self, weights: dict[int, Tensor] | None, pre: float = 1.0) -> Tensor:
        sq, index = [], []
        for p, g in zip(self._params, self._group_index, strict=True):
            if p.grad is not None and id(p) not in self._stale:
                grad = _at_least_float32(p.grad if pre == 1.0 else p.grad / pre).pow(2)
                sq.append(grad.sum() if weights is None else (grad * weights[id(p)]).sum())
                index.append(g)
        values = torch.stack(sq)
        idx = torch.tensor(index, device=values.device)
        return values.new_zeros(len(self._group_names)).index_add_(0, idx, values)

    def _check_grad_scaler(self, passes: list[Any]) -> None:
        """Refuse a step whose loss a ``GradScaler`` scaled (marked on every step:
        :mod:`noisescale.per_example.scaler_watch`) when the tracker was not given that scaler:
        ``.grad`` then holds S·g until ``unscale_``, and |G|², tr Σ and everything computed from
        them (B_noise, the temperature, the history) would read S² too large — 2³² at the
        default scale — with B_simple unchanged."""
        for p in passes:
            seen = p.grad_scaler
            if seen is None or seen is self.scaler:
                continue
            if self.scaler is None:
                raise NoiseScaleInputError(
                    "the loss was scaled by a torch.amp.GradScaler (scaler.scale(loss)."
                    "backward(), also accelerate's fp16 and Lightning's 16-mixed) that the "
                    "tracker was not given: .grad holds the gradients times the loss scale "
                    f"({float(seen.get_scale()):g}), so |G|² and tr Σ would read its square too "
                    "large. Pass it: GradientNoiseTracker(model, scaler=scaler) "
                    "(accelerator.scaler under accelerate), which divides the scale out "
                    "whether or not unscale_ already ran. Nothing of this step was recorded"
                )
            raise NoiseScaleInputError(
                "the loss was scaled by a torch.amp.GradScaler other than the one the tracker "
                "was given (scaler=): pass the scaler that scales the loss, so that its scale "
                "is the one divided out. Nothing of this step was recorded"
            )

    def _loss_scale(self) -> tuple[float, bool]:
        """The AMP loss scale in the hooks' gradients, and whether ``.grad`` is already unscaled."""
        scaler = self.scaler
        if scaler is None or not scaler.is_enabled():
            return 1.0, False
        scale = float(scaler.get_scale())
        from torch.amp.grad_scaler import OptState

        unscaled = any(
            s.get("stage") is OptState.UNSCALED for s in scaler._per_optimizer_states.values()
        )
        return scale, unscaled

    def _preconditioner_weights(self) -> dict[int, Tensor] | None:
        """P² for the passes of the current step (the state cannot change before its end)."""
        if self._weights_step != self.steps:
            assert self.precondition is not None
            counts = self._step_counts()  # (the one device sync of the step's counts)
            self._weights = preconditioner_weights(
                self.precondition, self._params, min_steps=self.precondition_from, counts=counts
            )
            self._weights_taken = optimizer_steps(self.precondition, self._params, counts)
            self._stateless = (
                []
                if self._weights is None
                else stateless_parameters(self.precondition, self._params, counts)
            )
            self._weights_step = self.steps
            if self._weights is not None and "wide-preconditioner" not in self._warned:
                self._check_preconditioner_range(self._weights)
        return self._weights

    def _check_preconditioner_range(self, weights: dict[int, Tensor]) -> None:
        """Once, at the first preconditioned step (one host read): warn when P = 1/(√v̂ + ε)
        spans many orders of magnitude. Coordinates whose second moment is ~0 (inputs that are
        rarely non-zero) get P ≈ 1/ε, and the rare examples that touch them then carry most of
        the preconditioned noise: the estimate stays unbiased but needs many steps, and a
        per-example subset often reads it as unavailable."""
        self._warned.add("wide-preconditioner")
        with torch.no_grad():
            # (parameters without optimizer state weigh zero: not the preconditioner's spread)
            stateless = {id(p) for p in self._stateless}
            kept = [
                (pid, w) for pid, w in weights.items() if pid not in stateless and w.numel() > 0
            ]
            if not kept:
                return
            # (on one device: a model spread over several has its weights on each)
            device = kept[0][1].device
            flat = torch.cat([w.reshape(-1).float().to(device) for _, w in kept])
            if flat.numel() > 1_000_000:  # a sample is enough for the median
                gen = torch.Generator(device=flat.device).manual_seed(0)
                idx = torch.randint(flat.numel(), (1_000_000,), generator=gen, device=flat.device)
                median = flat[idx].median()
            else:
                median = flat.median()
            spread = float((flat.max() / median).sqrt())  # of P, not P²
        if spread > 1e4:
            # the ε of the group holding the widest coordinate (until 2026-12-05 the first
            # group's was quoted, 1/ε = 1e+01 where those coordinates had P ≈ 1e+08)
            with torch.no_grad():
                maxes = torch.stack([w.float().max().to(device) for _, w in kept])
                widest = kept[int(maxes.argmax())][0]
            groups = self.precondition.param_groups  # type: ignore[union-attr]
            index = next(
                i for i, g in enumerate(groups) if any(id(p) == widest for p in g["params"])
            )
            eps = groups[index]["eps"]
            where = f" in param group {index}" if len(groups) > 1 else ""
            warnings.warn(
                "keep the default sub-batches and expect to need many steps (or measure the "
                "plain noise scale, without precondition=): the preconditioner 1/(√v̂ + ε) of "
                f"some coordinates is {spread:.1e}× its median (their second moment is ~0, so "
                f"P ≈ 1/ε = {1 / eps:.0e}, ε = {eps:g}{where}), and the rare examples that "
                "touch them carry most of the preconditioned noise",
                RuntimeWarning,
                stacklevel=4,
            )

    def _warn(self, message: str) -> None:
        warnings.warn(f"noisescale: {message}", RuntimeWarning, stacklevel=3)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    # -- history ------------------------------------------------------------------------------

    def _header(self) -> dict[str, Any]:
        return {
            "kind": HISTORY_KIND,
            "version": HISTORY_VERSION,
            "run": self._run_id,
            "loss_reduction": self.loss_reduction,
            "beta": self._state.noise.beta,
            "confidence": self.confidence,
            "source": self.mode,
            **({"dataset_size": self.dataset_size} if self.dataset_size is not None else {}),
            "definition": self.definition or "example",
            "unit": UNITS[self.definition or "example"],
            **({"subbatches": self.subbatches} if self.mode == "subbatch" else {}),
            **({"paired_rows": self.paired_rows} if self.paired_rows is not None else {}),
            **({"grouped_rows": self.grouped_rows} if self.grouped_rows is not None else {}),
            **(
                {"per_example_fraction": self.per_example_fraction}
                if self.mode == "per_example"
                else {}
            ),
            # asked for the preconditioned noise scale: a reader names records that are plain
            **(
                {"precondition_from": self.precondition_from}
                if self.precondition is not None
                else {}
            ),
        }

    def _start_history_file(self) -> None:
        """Check the history file: new, or a history of ours this tracker may continue.

        An existing history is appended to only by a resumed tracker (:meth:`load_state_dict`)
        whose header is the file's: another run's records, or records in another unit or of
        another loss reduction, under the file's header would be read as its own. What can be
        told now is refused now; the rest at the first write (the first step fixes the
        definition, and a resume comes after the constructor).
        """
        assert self.history_path is not None
        path = self.history_path
        if path.is_dir():
            raise NoiseScaleInputError(f"history_path {str(path)!r} is a directory; give a file")
        # (a parent that is a file: the first write raised FileExistsError, steps later)
        parent = next((q for q in path.parents if q.exists()), None)
        if parent is not None and not parent.is_dir():
            raise NoiseScaleInputError(
                f"history_path {str(path)!r} cannot be created: {str(parent)!r} is a file, not "
                "a directory; give a path in a directory"
            )
        header = self._existing_history_header()
        if header is not None:
            # fixed at construction: load_state_dict refuses a checkpoint that differs in these
            self._check_history_header(
                header, ("loss_reduction", "source", "paired_rows", "grouped_rows")
            )
        # a new file's header is written with the first records: it names the definition (examples
        # or tokens), which the first step fixes

    def _existing_history_header(self) -> dict[str, Any] | None:
        """The header of the history already at ``history_path`` (None: no file, or empty)."""
        assert self.history_path is not None
        path = self.history_path
        if not (path.exists() and path.stat().st_size > 0):
            return None
        with path.open() as f:
            first = f.readline()
        if not first.endswith("\n") and _HEADER_START.startswith(first[: len(_HEADER_START)]):
            return None  # a header cut by a kill while writing it: nothing was written
        try:
            header = json.loads(first)
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or header.get("kind") != HISTORY_KIND:
            raise NoiseScaleInputError(
                f"history_path {str(path)!r} exists and is not a noisescale history (its "
                "first line is not a history header); give a new path — nothing was "
                "written to it"
            )
        return header

    def _check_history_header(
        self, header: dict[str, Any], keys: Iterable[str], path: Path | None = None
    ) -> None:
        """Refuse to append under ``header`` where it differs from ours in ``keys`` (to the
        file at ``path``: write_history's; by default ``history_path``)."""
        ours = self._header()
        differ = [k for k in keys if header.get(k) != ours.get(k)]
        theirs = header.get("run")
        resumed = self._resumed_at is not None
        if not differ and resumed and isinstance(theirs, str) and theirs != self._run_id:
            shown = str(self.history_path) if path is None else str(path)
            raise NoiseScaleInputError(
                f"{shown!r} holds the history of another run (run {theirs}; the run this "
                f"tracker resumes is {self._run_id}): continued, its records from the "
                "checkpoint's step on would be replaced by this run's. Give this run another "
                "path, or move or delete the file (it was not changed)"
            )
        if not differ:
            return
        written = ", ".join(
            f"{k} {header.get(k)!r} (this tracker: {ours.get(k)!r})" for k in differ
        )
        where, other = (
            (f"history_path {str(self.history_path)!r}", "history_path")
            if path is None
            else (f"{str(path)!r}", "path for write_history")
        )
        if self._resumed_at is not None and "confidence" in differ:
            # (a resumed run's own history, the constructor's confidence another: not "another
            # run's"; load_state_dict refuses the rest of what a resume may not change)
            fix = f"confidence={header.get('confidence')!r}"
            raise NoiseScaleInputError(
                f"{where} was written with {written}, and this resumed tracker's records under "
                f"that header would be read in its terms. Construct the tracker with {fix}, as "
                f"the run it resumes, or give it another {other} (the file was not changed)"
            )
        raise NoiseScaleInputError(
            f"{where} holds another run's history, written with {written}; this tracker's "
            f"records under that header would be read in its terms. Give this run another "
            f"{other}, or move or delete the file (it was not changed)"
        )

    def _continue_history_file(self) -> bool:
        """At the first write: whether the file at ``history_path`` is ours to append to.

        Its unfinished last line (no line feed: a write that a kill cut) is dropped, with a
        warning — appended to, it would have held the first new record too, and every reader
        refused the file as corrupt."""
        header = self._existing_history_header()
        if header is None:
            self._drop_unfinished_line()
            return False
        # what gives the records their meaning (a resume may change how precisely they are
        # measured — the source's fraction or sub-batches — as load_state_dict allows)
        self._check_history_header(header, _HISTORY_MEANING)
        if self._resumed_at is None:
            assert self.history_path is not None
            raise NoiseScaleInputError(
                f"history_path {str(self.history_path)!r} already holds a history and this "
                "tracker was not resumed (load_state_dict), so its steps, counted from 1 again, "
                "would replace that run's records in every reader. Give this run another "
                "history_path, or move or delete the file (it was not changed); a resumed "
                "tracker appends to its own history"
            )
        self._drop_unfinished_line()
        return True

    def _drop_unfinished_line(self) -> None:
        """Truncate the history file to its last complete line, saying so if it was not."""
        assert self.history_path is not None
        path = self.history_path
        if not path.exists():
            return
        with path.open("rb+") as f:
            data = f.read()
            if not data or data.endswith(b"\n"):
                return
            kept = data.rfind(b"\n") + 1
            f.truncate(kept)
        line = data[kept:].decode("utf-8", "replace")
        self._warn(
            f"history_path {str(path)!r} ended in an unfinished line (a run killed while writing "
            f"it: {line[:60]!r}...); it was dropped — its step is measured again by this resumed "
            "run, whose records replace those from the checkpoint's step on"
            if kept
            else f"history_path {str(path)!r} held only an unfinished header (a run killed while "
            "writing it); it was written again"
        )

    def _write_lines(self, records: Iterable[dict[str, Any]]) -> None:
        """Append ``records`` (and the header, at the first write). A write that fails (a full
        disk) leaves the file as it was and its records for the next one: set the header as
        written then, later records went under none and every reader refused the file."""
        assert self.history_path is not None
        self._unwritten = lines = [*self._unwritten, *records]
        if not self._header_written and not self._continue_history_file():
            lines = [self._header(), *lines]
        data = "".join(json.dumps(_json_safe(r), allow_nan=False) + "\n" for r in lines).encode()
        self.history_path.parent.mkdir(parents=True, exist_ok=True)
        with self.history_path.open("ab", buffering=0) as f:
            start = f.tell()
            try:
                view = memoryview(data)
                while view:
                    view = view[f.write(view) :]
            except OSError:
                f.truncate(start)
                raise
        self._header_written = True
        self._unwritten = []

    def write_history(self, path: str | Path) -> Path:
        """Write the whole history (a header line, then one JSON object per step); returns the
        path written.

        Onto a noisescale history already there, a resumed tracker (:meth:`load_state_dict`)
        continues it as ``history_path`` does: the file's records up to the checkpoint's step
        are kept (the run it resumes measured them; this tracker's history starts after), and
        its own follow. Any other file there — another run's history (a tracker not resumed,
        but on the files it wrote itself, or a header of another meaning), a file that is not a
        noisescale history or is corrupt — is left as it was, and this run's history is written
        beside it (``history-2.jsonl``, the first free name) with a warning naming both:
        nothing is lost (a refusal at the end of a script would lose this run's records). The
        file is replaced whole at once (a kill while writing leaves the old one)."""
        self.sync()
        out = Path(path)
        kept: list[str] = []
        existing = _history_lines(out)
        if existing is not None:
            header, records, problem = existing
            own = out.resolve() in self._histories_written or (
                self.history_path is not None and out.resolve() == self.history_path.resolve()
            )
            reason = None
            if problem is not None:
                reason = None if own else problem
            elif self._resumed_at is not None:
                try:
                    self._check_history_header(header, _HISTORY_MEANING, out)
                except NoiseScaleInputError as err:
                    reason = str(err)
                else:
                    kept = [line for step, line in records if step <= self._resumed_at]
            elif not own:
                reason = (
                    "another run's history: this tracker was not resumed (load_state_dict), so "
                    "its history would replace that run's records"
                )
            if reason is not None:
                beside = _free_name_beside(out)
                warnings.warn(
                    f"noisescale: {str(out)!r} exists and was left as it was ({reason}); this "
                    f"run's history is written to {str(beside)!r} instead",
                    RuntimeWarning,
                    stacklevel=2,
                )
                out = beside
        out.parent.mkdir(parents=True, exist_ok=True)
        part = out.with_name(out.name + ".part")
        with part.open("w") as f:
            f.writelines(kept)
            for r in [*([] if kept else [self._header()]), *self._history]:
                f.write(json.dumps(_json_safe(r), allow_nan=False) + "\n")
        part.replace(out)
        self._histories_written.add(out.resolve())
        return out

    # -- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed for a resumed tracker to give the same subsequent estimates."""
        self.sync()
        s = self._state
        return {
            "version": STATE_VERSION,
            "run": self._run_id,
            "state": _json_safe(s.noise._asdict()),
            "combiner": {k: _json_safe(v._asdict()) for k, v in s.combiner.items()},
            "group_states": {n: _json_safe(v._asdict()) for n, v in s.groups.items()},
            # what each group measures (_group_signature): a resume whose groups of the same
            # names hold other parameters is refused
            "group_parameters": self._group_signature(),
            "steps": self.steps,
            "folded_steps": s.steps,
            "skipped_steps": s.skipped_steps,
            "examples": s.examples,
            "tokens": s.tokens,
            "counted_examples": s.counted_examples,
            "definition": self.definition,
            "paired_rows": self.paired_rows,
            "grouped_rows": self.grouped_rows,
            "preconditioned_from": s.preconditioned_from,
            "precondition": self.precondition is not None,
            "preconditioner": self._preconditioner_kind(),
            # the last step's micro-batch count: a shorter window next is left out (its divisor).
            # Under data parallelism it is only this process's: not saved (0, unknown), since the
            # checkpoint may resume on one process or another number, whose window is its own
            "passes_before": (
                0 if self._dist is not None and self._dist.world_size > 1 else self._passes_before
            ),
            # the passes' weights have varied with the data: later steps are measured within
            # their passes (StepNorms.within_passes)
            "weights_varied": self._varied_before
            or (self._weights_varied is not None and bool(self._weights_varied))
            or (self._dist is not None and self._dist.weights_varied),
            "loss_reduction": self.loss_reduction,
            "confidence": self.confidence,
            "source": self.mode,
            "subset_rng": self.engine.rng_state(),
            "subset_step_examples": self.engine.last_step_examples,
            "subset_position": self.engine.subset_position,
            "subset_step_passes": self.engine.last_step_passes,
            "engine_steps": self.engine.steps_collected,
            "subbatches_pay": self.engine.subbatches_pay,
            # the loss forms the audits passed (Settle._new_loss_shape), those met unaudited and
            # the audits left for them: until 2026-12-08 a resume forgot them, and a form the
            # audits knew before the checkpoint but had not met since withheld its next step
            # (a spike guard's loss * inf at the first resumed step: the next ordinary step
            # withheld, B_simple 94.96 for 23.75 at step 10; hunt/spike.py)
            "loss_forms": sorted(self.engine._audited_losses),
            "loss_forms_pending": sorted(self.engine._pending_losses.items()),
            "loss_audits_left": self.engine._loss_audits_left,
            "measure_every": self.measure_every,
            # the averages are corrected for batches drawn without replacement from this many
            "dataset_size": self.dataset_size,
            # what the estimate was measured on: a checkpoint of another model is refused
            "model": self._model_signature(),
            # the unmeasured steps since the last measured one (count, examples, tokens)
            "unmeasured": [
                self._unmeasured[0],
                self._unmeasured[1],
                None if self._unmeasured[2] is None else float(self._unmeasured[2]),
            ],
            # the precondition optimizer's stall: tracker steps since its count last moved, and
            # that count (_optimizer_stalled; until 2026-12-07 a resume restarted it at 0, and
            # the steps the run would have left out were weighed by the stalled optimizer's
            # frozen P without a word: g2 16.09 for 18.69, a hunt)
            "optimizer_seen": self._saved_optimizer_seen(),
        }

    def _preconditioner_kind(self) -> str | None:
        """Which P the precondition optimizer's state gives: Adam's and AdamW's 1/(√v̂ + ε),
        RMSprop's 1/(√v + ε); ``None`` without precondition=."""
        if self.precondition is None:
            return None
        return "RMSprop" if isinstance(self.precondition, torch.optim.RMSprop) else "Adam/AdamW"

    def _group_signature(self) -> dict[str, list[int]]:
        """Each parameter group's trainable parameter tensors and their elements, by name."""
        signature = {name: [0, 0] for name in self._group_names}
        for p, g in zip(self._params, self._group_index, strict=bool(self._group_names)):
            signature[self._group_names[g]][0] += 1
            signature[self._group_names[g]][1] += p.numel()
        return signature

    def _model_signature(self) -> dict[str, int]:
        """The trainable parameters the tracker measures, in a form wrappers do not change
        (DDP's ``module.``, ``torch.compile``'s ``_orig_mod.`` rename them): their number and
        their total of elements."""
        return {
            "parameters": len(self._params),
            "elements": sum(p.numel() for p in self._params),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (this version's or an earlier one's).

        The checkpoint's averages belong to its model and its ``beta``: a checkpoint of another
        model (other trainable parameters) or of another ``beta`` is refused. The interval's
        ``confidence`` is this tracker's, as constructed (it only sets the level of the
        interval, computed afresh from the state). A different ``measure_every`` is taken, with
        a warning: the averages then span other numbers of trained steps before and after. A
        checkpoint of a later version (a newer noisescale) is refused: its fields may mean what
        this version cannot read."""
        saved_version = state.get("version", 0)
        if not isinstance(saved_version, int) or saved_version > STATE_VERSION:
            # (until 2026-12-07 a newer checkpoint failed with a raw TypeError from its new
            # fields, or loaded the ones this version knows without a word; a review)
            raise NoiseScaleInputError(
                f"the checkpoint's state is of version {saved_version!r}, written by a newer "
                f"noisescale than this one (which reads versions up to {STATE_VERSION}); "
                "upgrade noisescale to resume from it, or start a new estimate"
            )
        if state.get("loss_reduction", self.loss_reduction) != self.loss_reduction:
            raise NoiseScaleInputError(
                f"the checkpoint was measured with loss_reduction={state['loss_reduction']!r} "
                f"but this tracker uses {self.loss_reduction!r}"
            )
        saved_source = state.get("source", "per_example")
        if saved_source != self.mode:
            raise NoiseScaleInputError(
                f"the checkpoint was measured with the {saved_source!r} source but this tracker "
                f"uses {self.mode!r}; construct it with the same per_example/"
                "per_example_fraction/subbatches settings"
            )
        if state.get("paired_rows") != self.paired_rows:
            raise NoiseScaleInputError(
                f"the checkpoint was measured with paired_rows={state.get('paired_rows')!r} but "
                f"this tracker uses {self.paired_rows!r}; construct it with the same paired_rows"
            )
        if state.get("grouped_rows") != self.grouped_rows:
            raise NoiseScaleInputError(
                f"the checkpoint was measured with grouped_rows={state.get('grouped_rows')!r} "
                f"but this tracker uses {self.grouped_rows!r}; construct it with the same "
                "grouped_rows"
            )
        if state.get("preconditioned_from") is not None and self.precondition is None:
            raise NoiseScaleInputError(
                "the checkpoint's estimate is of the preconditioned gradient (precondition= since "
                f"step {state['preconditioned_from']}) but this tracker measures the plain one; "
                "construct it with precondition=<the optimizer> (and restore the optimizer's "
                "state), or start a new plain estimate"
            )
        saved_kind, kind = state.get("preconditioner"), self._preconditioner_kind()
        if state.get("preconditioned_from") is not None and saved_kind not in (None, kind):
            # (until 2026-12-07 an Adam checkpoint resumed with precondition=RMSprop averaged
            # RMSprop's 1/(√v + ε) into Adam's 1/(√v̂ + ε) without a word; a hunt)
            raise NoiseScaleInputError(
                f"the checkpoint's estimate is of the gradient preconditioned by {saved_kind}'s "
                f"second moments (since step {state['preconditioned_from']}) but this tracker's "
                f"precondition= is {kind}'s, another preconditioner: construct it with "
                f"precondition=<the {saved_kind} optimizer> (and restore its state), or start "
                "a new estimate (no load_state_dict)"
            )
        saved_model, model = state.get("model"), self._model_signature()
        if saved_model is not None and saved_model != model:
            raise NoiseScaleInputError(
                f"the checkpoint was measured on a model with {saved_model['parameters']} "
                f"trainable parameter tensors of {saved_model['elements']} elements in all, but "
                f"this tracker's model has {model['parameters']} of {model['elements']}: its "
                "averages are another model's (or of other parameters frozen), and mixed with "
                "this one's they would be neither's. Load the tracker checkpoint saved with "
                "this model, or start a new estimate (no load_state_dict)"
            )
        saved_beta, beta = float(state["state"]["beta"]), self._state.noise.beta
        if saved_beta != beta:
            raise NoiseScaleInputError(
                f"the checkpoint's averages were taken with beta={saved_beta} but this tracker "
                f"was built with beta={beta}: the averages' weights belong to their beta. "
                f"Construct the tracker with beta={saved_beta} to resume them, or start a new "
                "estimate (no load_state_dict)"
            )
        est.check_resumed_dataset_size(state.get("dataset_size"), self.dataset_size)
        saved_every = int(state.get("measure_every", self.measure_every))
        if saved_every != self.measure_every:
            self._warn(
                f"the checkpoint was measured with measure_every={saved_every} and this tracker "
                f"measures with measure_every={self.measure_every}: the resumed averages "
                "weigh measured steps, which span "
                f"{saved_every} trained steps each before the resume and {self.measure_every} "
                "after; construct the tracker with the checkpoint's measure_every to keep them "
                "alike"
            )
        saved_groups = state.get("group_states", {})
        if set(saved_groups) != set(self._state.groups):
            raise NoiseScaleInputError(
                f"the checkpoint has parameter groups {sorted(saved_groups)} but this tracker "
                f"has {sorted(self._state.groups)}; construct it with the same groups="
            )
        saved_members, members = state.get("group_parameters"), self._group_signature()
        if saved_members is not None and saved_members != members:
            # (until 2026-12-07 only the names were compared: groups {"a": model[0], "b":
            # model[2]} resumed as {"a": model[2], "b": model[0]} averaged one layer's steps
            # into the other's without a word, a's g2 -10.88 for -3.64; a hunt)
            differ = sorted(n for n in members if saved_members.get(n) != members[n])
            raise NoiseScaleInputError(
                "the checkpoint's parameter groups of the same names hold other parameters: "
                + "; ".join(
                    f"{n!r} had {saved_members.get(n, [0, 0])[0]} tensors of "
                    f"{saved_members.get(n, [0, 0])[1]} elements, here {members[n][0]} of "
                    f"{members[n][1]}"
                    for n in differ
                )
                + ". Construct the tracker with the groups= (and, for 'param_groups', the "
                "optimizer's param groups) the checkpoint was measured with, or start a new "
                "estimate (no load_state_dict)"
            )
        self._pending.clear()
        self._resumed_at = int(state["steps"])
        if isinstance(state.get("run"), str):  # (a checkpoint from before 2026-12-07 has none)
            self._run_id = state["run"]
        # (an earlier version's combiner statistics are of the raw estimates (version 3) or of
        # the changes over the step before's level (4), which update_combiner no longer folds:
        # they restart — equal weights for the first steps, learnt anew — which keeps the
        # combination unbiased, any fixed weights do)
        combiner = {
            k: est.CombinerState(
                **{
                    f: np.asarray(x, dtype=float) if isinstance(x, list) else x
                    for f, x in v.items()
                }
            )
            for k, v in state["combiner"].items()
            if int(state.get("version", 0)) >= 5
        }
        self._state = state_mod.TrackerState(
            est.load_state(state["state"]),
            combiner,
            {n: est.load_state(v) for n, v in saved_groups.items()},
            int(state.get("folded_steps", state["steps"])),
            int(state["skipped_steps"]),
            int(state["examples"]),
            state.get("preconditioned_from"),
            float(state.get("tokens", 0.0)),
            int(state.get("counted_examples", 0)),
        )
        self.definition = state.get("definition")
        self.steps = int(state["steps"])
        # (self.confidence stays the constructor's: until 2026-12-05 the checkpoint's replaced
        # it without a word)
        self.engine.set_rng_state(state.get("subset_rng", {}))
        self.engine.last_step_examples = state.get("subset_step_examples")
        self.engine.subset_position = int(state.get("subset_position", 0))
        self.engine.last_step_passes = int(state.get("subset_step_passes", 0))
        self.engine.steps_collected = int(state.get("engine_steps", self.steps))
        self.engine.subbatches_pay = state.get("subbatches_pay")
        # (a checkpoint before version 5 has no loss forms: learnt again, each one's first step
        # after the resume withheld with a warning unless it is audited)
        self.engine._audited_losses = {int(k) for k in state.get("loss_forms", [])}
        self.engine._pending_losses = {
            int(k): int(n) for k, n in state.get("loss_forms_pending", [])
        }
        self.engine._loss_audits_left = int(state.get("loss_audits_left", 0))
        # under data parallelism the checkpoint is usually one process's (rank 0's), whose
        # accumulation window need not be this process's: unknown, the first step after the
        # resume not judged short (until 2026-12-06 rank 0's was carried to every process, and a
        # process accumulating fewer micro-batches had a measurable step left out everywhere
        # with a false warning; a review). A checkpoint saved under data parallelism holds none
        # (state_dict: until 2026-12-07 rank 0's, loaded by one plain process, left its first
        # step of fewer micro-batches out alike; a hunt)
        many = self._dist is not None and self._dist.world_size > 1
        self._passes_before = 0 if many else int(state.get("passes_before", 0))
        self._weights_varied, self._varied_before = None, bool(state.get("weights_varied"))
        if self._dist is not None:
            self._dist.weights_varied = bool(state.get("weights_varied"))
        count, examples, tokens = state.get("unmeasured", [0, 0, 0.0])
        self._unmeasured = (int(count), int(examples), None if tokens is None else float(tokens))
        seen = state.get("optimizer_seen")
        # (the stall goes on only while the restored optimizer's count is the saved one: the
        # next step's _watch_optimizer restarts it where the count differs)
        self._optimizer_seen = (
            None
            if seen is None or self.precondition is None
            else (self.steps - int(seen[0]), int(seen[1]))
        )
        self._step_watch = None  # (counts noted before the restore are not the run's)
        self._schedule_next()


def _loss_scale_message(scale: float, where: str = "") -> str:
    """Why steps are left out once the GradScaler's scale overflows float32's squared norms
    (``where``: on which processes, at which step, under data parallelism)."""
    return (
        f"noisescale: {where}the GradScaler's loss scale has grown to {scale:g} (it doubles "
        "every growth_interval steps while no gradient overflows: with bfloat16 or float32 "
        "gradients, for ever), where squared norms of the scaled gradients overflow float32; "
        "steps are left out from here. bfloat16 needs no GradScaler (torch.autocast alone); "
        "otherwise keep the scale bounded (a growth_interval long enough, or a scaler of your "
        "own)"
    )


def _short_window_message(had: str) -> str:
    """Why a step with fewer micro-batches than the one before and no measured multiplier is
    left out (``had``: which step had fewer, and where): whether its losses were divided by its
    own count or by the full one cannot be told (either reads |G|² and tr Σ (k'/k)² apart).
    Under data parallelism every process leaves it out alike, when it reads the step."""
    return (
        f"{had} than the step before (an epoch's short last window?), and noisescale cannot "
        "tell whether their losses were divided by their own count or by the full count, as "
        "most loops, Lightning and accelerate's backward do; the step is left out. To have the "
        "division measured, pass each micro-batch's loss to tracker.watch_loss(loss) before "
        "dividing it (the Trainer's and Lightning's callbacks measure it themselves)"
    )


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def _remove_hooks(hooked: list[Any]) -> None:
    """Remove the hooks of what a tracker put on the model (``remove()``, or the tracker
    collected); refers to the tracker's parts, never to the tracker."""
    for owner in hooked:
        if owner is not None:
            owner.remove()


def _release(hooked: list[Any], engine: PerExampleNorms) -> None:
    """A tracker collected: its hooks removed, and the passes its engine held open dropped (a
    pass and its autograd graph hold each other through autograd's C++ nodes, a cycle Python's
    collector cannot see)."""
    _remove_hooks(hooked)
    engine.discard()


def _weakly(method: Any) -> Any:
    """``method`` of an object, called through a weak reference to it (``None`` once the
    object is gone)."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any, **kwargs: Any) -> Any:
        bound = ref()
        return None if bound is None else bound(*args, **kwargs)

    return call


def _json_safe(x: Any) -> Any:
    if isinstance(x, np.generic):  # before float: np.float64 is a float subclass
        return _json_safe(x.item())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return _json_safe(x.tolist())
    return x


def _checked_step_args(loss: Any, lr: Any) -> tuple[Any, float | None]:
    """``step``'s arguments, checked before anything of the step is touched (a hunt of
    2026-12-06: a per-example loss vector crashed the next sync with torch's error, the
    pending steps lost; a scheduler's ``get_last_lr()`` list crashed in the history)."""
    if isinstance(loss, Tensor) and loss.numel() != 1:
        raise NoiseScaleInputError(
            "pass tracker.step(loss=...) the step's loss as one number — the scalar you "
            f"backpropagated —, not a tensor of shape {list(loss.shape)} (a per-example loss "
            "vector: pass its mean or sum). Nothing of this step was recorded; call "
            "tracker.step() again"
        )
    if loss is not None and not isinstance(loss, Tensor):
        try:
            loss = float(loss)
        except (TypeError, ValueError):
            raise NoiseScaleInputError(
                f"pass tracker.step(loss=...) a number or a one-element tensor, not a "
                f"{type(loss).__name__}. Nothing of this step was recorded; call "
                "tracker.step() again"
            ) from None
    if isinstance(lr, list | tuple):
        rates = {float(r) for r in lr}
        if not rates:
            raise NoiseScaleInputError(
                "pass tracker.step(lr=...) one learning rate, not an empty list. Nothing of "
                "this step was recorded; call tracker.step() again"
            )
        if len(rates) != 1:
            raise NoiseScaleInputError(
                f"pass tracker.step(lr=...) one learning rate: got {list(lr)}, one per parameter "
                "group (a scheduler's get_last_lr()), and they differ — pass the one your "
                "decisions use, e.g. lr=scheduler.get_last_lr()[0]. Nothing of this step was "
                "recorded; call tracker.step() again"
            )
        lr = rates.pop()
    elif isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise NoiseScaleInputError(
                f"pass tracker.step(lr=...) one learning rate, not a tensor of shape "
                f"{list(lr.shape)}. Nothing of this step was recorded; call tracker.step() again"
            )
        lr = float(lr)
    elif lr is not None:
        try:
            lr = float(lr)
        except (TypeError, ValueError):
            raise NoiseScaleInputError(
                f"pass tracker.step(lr=...) a number, not a {type(lr).__name__}. Nothing of this "
                "step was recorded; call tracker.step() again"
            ) from None
    return loss, lr


#: Loss scales above this are not measured: S² is inf in float32 from 2⁶⁴ (= 2¹²⁸ > 3.4e38),
#: where |S·g|² overflows for any |g| ≥ 1 (2⁶³ and below were measured exactly; a first
#: threshold of 2⁴⁸ left such steps out, a review).
_LARGEST_LOSS_SCALE = 2.0**63

#: From this loss scale on (2³², far above an fp16 run's), a step whose per-example or
#: micro-batch squared norms came out non-finite is left out naming the scale (S·|g_i| past 2⁶⁴
#: overflows their float32 squares): read back, on these steps only.
_SCALE_CHECKED = 2.0**32


def _norms_finite(passes: list[Any]) -> bool:
    """Whether the passes' per-example and micro-batch squared norms are all finite."""
    for p in passes:
        for t in (p.raw_sqnorms, p.grad_sqnorm, p.group_sqnorms):
            if isinstance(t, Tensor) and not bool(torch.isfinite(t).all()):
                return False
    return True


def _same_grad(p: nn.Parameter, seen: tuple[Any, int]) -> bool:
    """Whether ``p.grad`` is the tensor :meth:`GradientNoiseTracker._remember_grads` noted in
    ``seen`` (a weak reference and a version), untouched since."""
    g = p.grad
    return g is not None and seen[0]() is g and g._version == seen[1]


def _at_least_float32(grad: Tensor) -> Tensor:
    """A gradient detached, in float32 if it is 16-bit, else in its own dtype: the per-group and
    preconditioned norms of a float64 model were taken in float32 until 2026-12-06 (1.6e-5
    relative off, where |G|² ≪ tr Σ/N, a hunt)."""
    grad = grad.detach()
    return grad if grad.dtype in (torch.float32, torch.float64) else grad.float()
