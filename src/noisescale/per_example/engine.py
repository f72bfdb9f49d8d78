"""The hook engine: exact per-example squared gradient norms, and every use of every parameter.

A forward pre-hook on the model opens a *pass* (one micro-batch: a forward and the backward that
reaches it). Three kinds of per-example contributions are collected in the backward pass:

* **layer calls** — a module with a rule (:mod:`~noisescale.per_example.registry`) called on
  per-example input: its forward hook keeps what the rule needs (its input), a hook on its output
  receives the output gradient, and the rule turns the pair into one factor per parameter;
* **shared tensors meeting the batch** — a parameter used directly in a module's forward (a class
  token, a layer scale, a norm's weight, a head tied through ``F.linear``), or the output of a layer
  called on input shared by all examples (``wpe(arange(T))``, T5's relative-position buckets):
  followed as a :class:`~noisescale.per_example.shared.SharedTensor` to the operation that meets
  the batch, where each example's gradient is taken;
* **the torch.func fallback** — modules whose parameters meet the batch in an operation with no
  rule are re-run per example.

Every call and every meeting is one *use* of its parameters; a parameter used more than once (tied
embeddings, a layer called twice, a weight used by its module and again through ``F.linear``) gets
the per-example norm of the *sum* of its uses, cross terms included.

**Never silently wrong.** A parameter hook checks, every step, that each parameter that received a
gradient also received a per-example contribution. On the first step, whenever the structure of a
pass changes (which layers run, which of their input dimensions have the batch's size) and on
steps 2, 4, 8, …, 1024 and every 1024th after, a pass is *audited* (:mod:`audit`): every example
is measured, the factors' sums must reproduce each parameter's gradient (a missed or double-counted
use shows up there), and a signed replay of the backward checks that each hooked tensor's rows
belong to the examples they are attributed to (a table indexed by positions whose count happens to
equal the batch size, a time-major activation). A failed audit either teaches the engine (a shared
call treated as per-example, a parameter used outside its module: handled from the next step on,
this step's per-example norms withheld) or refuses the step with a message that names the
parameter or layer and says what to do.

**Under torch.compile** the hooks run inside the compiled graph, as operations that hand the
engine what the eager hooks would have seen (:mod:`~noisescale.per_example.compiled`): no graph
break, the same numbers. Audited passes run eagerly.

Conventions: the backpropagated loss is (1/N)·Σ_i ℓ_i (``"mean"``) or Σ_i ℓ_i (``"sum"``) over the
N examples of dim 0 of the model's input (dim 1 for a time-major built-in model); inside
``nn.TransformerEncoder``/``Decoder``/``Transformer`` and their layers with ``batch_first=False``
the examples are along dim 1, and recurrent layers declare their own layout.

Layout: this module holds :class:`PerExampleNorms`' construction (its plan, the hooks installed,
pause and removal) and its small accessors; its mixins hold the rest, one side of a step each:
the pass opened by the model's forward and its output (:mod:`~.opening`), the hooks on each
measured layer (:mod:`~.layer_hooks`), the checks that the rows a forward meets are the examples
(:mod:`~.row_checks`), the backward's products, shared calls and meetings (:mod:`~.backward`),
the parameter hooks and :meth:`~PerExampleNorms.collect` (:mod:`~.collect`), what it decides
after a backward (:mod:`~.settle`), its hooks under ``torch.compile`` (:mod:`~.traced`), the
audit's re-runs on permuted examples (:mod:`~.example_check`) and its watch on ``.grad``
(:mod:`~.grad_watch`).
"""

from __future__ import annotations

import inspect
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from noisescale.errors import NoiseScaleInputError, UnsupportedModuleError
from noisescale.module_hooks import foreign_thread, registrations
from noisescale.per_example import audit as audit_mod
from noisescale.per_example import compiled, norms, scaler_watch
from noisescale.per_example import subbatch as subbatch_mod
from noisescale.per_example.backward import Backward
from noisescale.per_example.collect import Collect
from noisescale.per_example.embedding import sparse_message
from noisescale.per_example.example_check import ExampleCheck
from noisescale.per_example.grad_watch import GradWatch
from noisescale.per_example.graph import (
    _accumulator,
    _checkpoint_recompute,
    _MirroredCheckpoint,
)
from noisescale.per_example.layer_hooks import LayerHooks, _ours
from noisescale.per_example.loss_watch import LossWatch
from noisescale.per_example.messages import forward_transform_message
from noisescale.per_example.opening import PassOpening, _inside_functorch
from noisescale.per_example.passes import (
    PassNorms,
    _by_products,
    _Record,
)
from noisescale.per_example.registry import LayerRule, registered_forward, rule_for
from noisescale.per_example.row_checks import RowChecks, _version_of
from noisescale.per_example.settle import Settle
from noisescale.per_example.shared import SharedTensor
from noisescale.per_example.traced import Traced, _ModuleHook
from noisescale.per_example.values import _time_major

__all__ = ["PassNorms", "PerExampleNorms"]

LOSS_REDUCTIONS = ("mean", "sum")


def _backward_start(method: weakref.WeakMethod) -> Callable[[Any], None]:
    """A callback for audit.BACKWARD_STARTS that holds its engine weakly (an engine collected
    without remove() leaves a callback that does nothing, and drops it)."""

    def started(roots: Any) -> None:
        bound = method()
        if bound is not None:
            bound(roots)
        elif started in audit_mod.BACKWARD_STARTS:
            audit_mod.BACKWARD_STARTS.remove(started)

    return started


def _no_traced_check(module: nn.Module, args: tuple) -> None:
    """The traced form of :meth:`PerExampleNorms._on_call_enter`: nothing (see there)."""


def _no_traced_state(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """The traced form of :meth:`PerExampleNorms._on_recurrent_enter`: nothing (a compiled
    forward holds no shared tensors: :attr:`PerExampleNorms.compile_blocker`)."""


def _reparametrizing(hook: Any) -> bool:
    """Whether a forward pre-hook is an old reparametrization's (:func:`_old_reparametrized`)."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return isinstance(hook, BasePruningMethod | WeightNorm | SpectralNorm)


def _old_reparametrized(module: nn.Module) -> bool:
    """Whether an old reparametrization computes one of ``module``'s tensors from its
    parameters in a forward pre-hook: ``torch.nn.utils.prune`` (``weight`` from ``weight_orig``
    and the mask), the deprecated ``nn.utils.weight_norm`` (from ``weight_g`` and
    ``weight_v``) or ``nn.utils.spectral_norm`` (from ``weight_orig``)."""
    return any(_reparametrizing(hook) for hook in module._forward_pre_hooks.values())


# a Hugging Face multimodal model's items and the config attribute naming their token in
# input_ids: each item's features are written into its own tokens (masked_scatter)
_ITEMS = (
    ("pixel_values", ("image_token_id", "image_token_index"), "images"),
    ("pixel_values_videos", ("video_token_id", "video_token_index"), "videos"),
    ("input_features", ("audio_token_id", "audio_token_index"), "audio clips"),
)
# the dims of one item per row (an image [C, H, W], an audio clip's features [mel, frames]);
# more (Idefics3's [N, images, C, H, W], a video's frames) are grouped by example or unknown
_ONE_PER_ROW = {"pixel_values": 4, "input_features": 3}
# the language side of a multimodal model, whose parameters read no item's rows
_LANGUAGE = ("language_model", "text_model", "lm_head", "embed_tokens")


def _item_models(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` (itself included) with a Hugging Face config that names an item
    token (images, videos, audio clips) — the outer model and the inner one that merges the
    items: a wrapper may call either (``vlm.model(...)`` skipped a check on the outer one only,
    a review) —, whose item side (the parameters outside the language model) has something
    trainable: where a batch's items decide which example the tower's and projector's rows
    belong to (:func:`_items_not_one_each`). A model whose item side is frozen (the language
    model fine-tuned alone) gives no rows of items to any measured layer (a review of
    2026-12-06 found such models refused)."""
    found: list[nn.Module] = []
    for _, module in model.named_modules():
        config = getattr(module, "config", None)
        if config is None or not any(
            isinstance(getattr(config, a, None), int) for _, names, _ in _ITEMS for a in names
        ):
            continue
        items_side = any(
            p.requires_grad and not any(part in n for part in _LANGUAGE)
            for n, p in module.named_parameters()
        )
        if items_side:
            found.append(module)
    return found


def _items_not_one_each(model: nn.Module, n: int, kwargs: dict) -> list[tuple[str, str, Tensor]]:
    """Device flags for a multimodal model's items (images, videos, audio clips) given one row
    each, as many as the batch's examples, but not one in each example — an example without
    their tokens in ``input_ids`` beside one with two. The engine takes such rows for the
    examples (their leading size is the batch's); it is right only when each example has one,
    which the tokens show: with N items, every example holding some of their tokens. On an
    audited step the audit refuses the other case; on the others the projector's rows went to
    the wrong examples — LLaVA's per-example norms 14-19% off, tr Σ 27%, |G|² 65%, without a
    word, until 2026-12-06 (a hunt). Read with the step's statistics (``unread_picks``, label
    ``""``: ``how`` is the whole cause)."""
    config = getattr(model, "config", None)
    ids = kwargs.get("input_ids")  # (arguments bound by name: _on_items)
    if config is None or not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[0] != n:
        return []
    found = []
    for key, names, what in _ITEMS:
        items = kwargs.get(key)
        token = next(
            (t for t in (getattr(config, a, None) for a in names) if isinstance(t, int)), None
        )
        if token is None or not isinstance(items, Tensor) or items.dim() < 2:
            continue
        if items.shape[0] != n or items.dim() != _ONE_PER_ROW.get(key):
            continue  # (other counts, or grouped by example: the audit proves or refuses)
        without = ((ids == token).sum(1) == 0).any()
        found.append(
            (
                "",
                f"{key} holds {n} {what}, as many as the batch has examples, but not one in "
                f"each example (an example without their tokens in input_ids, beside one with "
                f"two): noisescale takes such rows for the examples, and would give each "
                f"{what[:-1]}'s gradient to the wrong example. Feed batches with one of them in "
                f"each example, or a count other than the batch's, or measure with "
                f"per_example=False",
                without,
            )
        )
    return found


def _items_cause(model: nn.Module, n: int, kwargs: dict) -> str | None:
    """Why a multimodal model's vision (audio) tower and projector may run on rows that are not
    the examples': their items not one per example — a count other than the batch's (a
    text-only example), or several per example flattened inside the model (Idefics3's image
    splitting). Said first where such a layer is refused (settle.py); until 2026-12-06 the
    refusal named parameters used directly (a hunt)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    for key, names, what in _ITEMS:
        items = kwargs.get(key)
        one = _ONE_PER_ROW.get(key)
        # (one item per row, or grouped by example: Qwen2-VL's patches packed in 2-D are not
        # a count of images, a review)
        if not isinstance(items, Tensor) or one is None or items.dim() not in (one, one + 1):
            continue
        if not any(isinstance(getattr(config, a, None), int) for a in names):
            continue
        if items.shape[0] != n:
            held = f"{items.shape[0]} {what} for the batch's {n} examples"
        elif items.dim() == one + 1 and items.shape[1] > 1:
            held = f"{items.shape[1]} {what} in each example, which the model flattens"
        else:
            continue
        return (
            f"{key} holds {held}: the layers that run on them (the {what[:-1]} tower, the "
            "projector) see rows that are not the examples', which noisescale cannot attribute "
            "to them. Freeze those layers (the language model is then measured exactly), feed "
            f"one {what[:-1]} in each example, or use per_example=False."
        )
    return None


def refuse_complex_parameters(model: nn.Module, one_shot: bool = False) -> None:
    """Refuse a model with trainable complex parameters (a Fourier neural operator's spectral
    weights): noisescale's per-example and batch norms are written for real gradients. The
    tracker's check, and :class:`~.sqnorms.per_example_sqnorms`' (``one_shot``): until
    2026-12-05 the tracker, until 2026-12-06 the one-shot function crashed inside the first
    backward with torch's own RuntimeError (hunts)."""
    complex_ = [n for n, p in model.named_parameters() if p.requires_grad and p.is_complex()]
    if not complex_:
        return
    # (until 2026-12-06 the fix added per_example=False, "the per-example rules do not follow
    # view_as_complex": they do, exactly per example and by sub-batches — a Fourier neural
    # operator's spectral weight, a hunt)
    what = "per-example norms" if one_shot else "noise scale"
    raise NoiseScaleInputError(
        f"parameters {complex_} are complex, and noisescale measures real parameters only (its "
        "per-example and batch norms are written for real gradients); hold each as a real "
        "tensor of its real and imaginary parts (nn.Parameter(torch.view_as_real(w))) and make "
        "it complex in the forward with torch.view_as_complex — measured exactly, per "
        f"example too —, or freeze them (requires_grad=False) to measure the {what} of the "
        "real parameters"
    )


class PerExampleNorms(
    PassOpening, LayerHooks, RowChecks, Backward, Collect, ExampleCheck, GradWatch, Traced, Settle
):
    """The hook engine: per-example squared norms and micro-batch gradient norms per pass.

    Args:
        model: The model; every trainable parameter is measured.
        per_example: Compute per-example norms (``False`` keeps only the micro-batch gradient
            norms, which need no layer support).
        fallback: Allow the torch.func fallback for modules whose parameters meet the batch in
            an operation without a rule; if ``False`` such a module is refused.
        groups: A partition of the trainable parameters; each pass then also keeps its norms per
            group (``group_sqnorms``, ``group_grad_sqnorm``).
        precondition: Called when a pass opens; returns P² per parameter id (every norm of the
            pass becomes |P ⊙ g|²) or ``None`` for plain norms.
        per_example_fraction: Compute the per-example norms of a random subset of each step's
            examples, ⌈fraction·N⌉ of them (see :meth:`_rows`); with accumulation, from one
            micro-batch at a random position among the step's micro-batches.
        subbatches: Instead of per-example norms, split each pass's examples into this many
            random sub-batches and measure the norm of each sub-batch's gradient
            (:mod:`~noisescale.per_example.subbatch`); ``0`` for per-example norms.
        audit: Audit passes (see the module docstring). ``False`` only for measurements of the
            engine's own cost.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        per_example: bool = True,
        fallback: bool = True,
        groups: Sequence[Sequence[nn.Parameter]] | None = None,
        precondition: Callable[[], dict[int, Tensor] | None] | None = None,
        per_example_fraction: float = 1.0,
        subbatches: int = 0,
        audit: bool = True,
        pairs: str | int | None = None,
        examples: Callable[[tuple, dict], Any] | None = None,
    ):
        if not 0.0 < per_example_fraction <= 1.0:
            raise NoiseScaleInputError(
                f"per_example_fraction must be in (0, 1], got {per_example_fraction}"
            )
        self.model = model
        # the thread whose forwards are measured: the one creating the engine; on any other
        # the module hooks let a forward without gradients through untouched and refuse one
        # with gradients (noisescale.module_hooks, "One thread")
        self.thread = threading.get_ident()
        self.per_example = per_example
        self.per_example_fraction = per_example_fraction
        if subbatches < 0 or subbatches == 1:
            raise NoiseScaleInputError(
                f"subbatches must be 0 (per-example norms) or at least 2, got {subbatches}"
            )
        self.subbatches = subbatches
        # "flip" (rows i and N − 1 − i share data) or "halves" (rows i and i + N/2, two
        # strata): each pair shares a sub-batch (Subbatches.split); an integer G: blocks of G
        # consecutive rows (grouped_rows)
        self.pairs = pairs
        # the number of examples of a model call, where they are not dim 0 of its first tensor
        # (GradientNoiseTracker's examples=, per_example=False)
        self.examples_of = examples
        # Sub-batch mode: whether the last split pass had a weight whose gradient came from
        # sub-batch products (None: not known yet); passes count since sub-batches last ran
        self._subbatches_pay: bool | None = None
        self._unsplit_passes = 0
        self._multi_use: set[int] = set()  # weights used more than once in a pass
        self._scratch = subbatch_mod.Scratch()  # the sub-batch products' temporaries (CPU)
        self._product_choices: dict[tuple, bool] = {}  # _uses_products's, by layer and shape
        # per product layer, a stack of (weight, bias or None) taken over by its open calls
        self._weight_calls: dict[nn.Module, list[tuple[Tensor, Tensor | None] | None]] = {}
        # activation checkpointing's recomputed forwards: a pass that mirrors theirs, whose
        # records are dropped (see _hook_pass)
        self._shadows: dict[int, PassNorms] = {}
        self.allow_fallback = fallback
        self.auditing_enabled = audit
        self._seed = torch.initial_seed()
        self._generators: dict[torch.device, torch.Generator] = {}
        self._audit_generators: dict[torch.device, torch.Generator] = {}
        self.precondition = precondition
        self.passes: list[PassNorms] = []
        # a GradScaler's scale() notes itself on the backward it starts (read by the root hooks)
        scaler_watch.listen()
        self._handles: list[RemovableHandle] = []
        # hooks of others on the parameters' gradients (_guard_param_hooks): our hook's handle,
        # the sentinels around theirs, what the first sentinel saw, the parameters it changed
        self._param_hook: dict[int, RemovableHandle] = {}
        self._sentinels: dict[int, tuple[RemovableHandle, RemovableHandle]] = {}
        self._post_sentinels: dict[int, tuple[RemovableHandle, RemovableHandle]] = {}
        self._hook_in: dict[tuple[int, bool], tuple[Tensor | None, int]] = {}
        self._hook_changed: list[tuple[int, bool]] = []  # (parameter, after accumulation)
        # the step's backwards (graph tasks) whose .grad was checked against the last one's
        # marks (GradWatch._check_between): at the first of its root hooks or parameter hooks
        self._between_checked: set[int] = set()
        self._between: str | None = None  # _check_between
        # each parameter's .grad (weakref, version) when the last step's last backward ended:
        # a step's first gradient of a parameter finding .grad still that tensor at that
        # version means nobody zeroed it since (the parameter hook; names it in _unzeroed)
        self._step_marks: dict[int, tuple[Any, int]] = {}
        self._unzeroed: list[tuple[str, Tensor]] = []  # (name, .grad not all zeros)
        self.unzeroed: str | None = None  # the last collected step's (collect)
        # a .grad that is not the tensor the last step left, found holding values at the
        # step's first accumulation into it (assigned by hand: _check_zeroed), and the result
        self._handset: list[tuple[str, Tensor]] = []
        self.handset: str | None = None
        self._zero_checked: set[int] = set()  # the parameters _check_zeroed saw this step
        self._writer: PassNorms | None = None  # the step's first pass that wrote .grad
        # the last collected step's PassNorms.unread_picks, every pass's (collect)
        self.unread_picks: list[tuple[str, str, Tensor]] = []
        # a layer that ran with gradients enabled while no pass of the model was open (a
        # submodule called by itself, model.model(...)): the step's first, and the last
        # collected step's (collect), for the tracker to name when it finds no pass
        self._unopened: str | None = None
        self._unopened_transform = False
        # (whether the last collected step's unopened layer ran under a torch.func transform)
        self.unopened_transform = False
        self.unopened: str | None = None
        self._unopened_params: list[str] = []  # (the names of its parameters)
        self._unopened_order = 0  # (when it ran: the calls' count below)
        self._unopened_calls = 0  # calls outside a forward so far
        # modules of no rule called after a pass's backward, noted at their exit if a backward
        # reaches their output (PassOpening._note_unopened)
        self._unopened_scopes: dict[nn.Module, tuple[str, list[str], bool]] = {}
        self._outside_params: set[str] = set()  # the collected step's _unopened_params
        self._recomputing = False
        self._paused = False
        # follows the loss of audited passes from the model's outputs to the backward
        self._loss_watch = LossWatch(paused=lambda: self._paused)
        self._loss_watch.rows_left_warned = self.pairs is not None
        #: The passes opened while set are counted (examples, tokens), not measured: no layer
        #: hook works on them and the step's collect() leaves the measured steps' schedules
        #: (audits, subsets) as they were. Set by the tracker for its unmeasured steps.
        self.idle = False
        self._param_name: dict[int, str] = {}
        self._param: dict[int, nn.Parameter] = {}
        self._calls: dict[nn.Module, tuple[LayerRule, str, dict[str, nn.Parameter]]] = {}
        self._labels: dict[nn.Module, str] = {}
        # (scope module, holder module, name, pid): the holder's parameter is replaced by a
        # shared alias while the scope module's forward runs
        self._scopes: dict[nn.Module, list[tuple[nn.Module, str, int]]] = {}
        # modules whose weight an old reparametrization's pre-hook computes (_build_plan)
        self._old_reparametrized: set[nn.Module] = set()
        # the model's buffers when the engine was made, by storage: (a weak reference, their
        # version then; an inference tensor's -1, it cannot be written outside inference mode)
        # — is_model_buffer
        self._buffers_made: dict[int, tuple[Any, int]] = {}
        for b in model.buffers():
            with suppress(RuntimeError, NotImplementedError, TypeError):
                self._buffers_made[b.untyped_storage().data_ptr()] = (
                    weakref.ref(b),
                    _version_of(b),
                )
        self._weights_only: list[nn.Module] = []  # (_install_weights_only)
        # each rule layer's forward hook, the hooks that keep a layer's own output where a
        # user's forward hook runs before that one, and that output (_changed_on_the_way)
        self._forward_ids: dict[nn.Module, int] = {}
        self._class_forwards: dict[type, Any] = {}  # (each rule layer class's, when made)
        self._capture_ids: dict[nn.Module, int] = {}
        self._captured: dict[nn.Module, list] = {}
        # the layers' outputs before any global forward hook, by a global hook of the engine's
        # put first when others exist (_raw_capture_first)
        self._captured_raw: dict[nn.Module, list] = {}
        self._raw_capture_id: int | None = None
        self._mirrored: list[nn.Module] = []  # layers whose checkpoint function is wrapped
        # each scope's modules that may checkpoint their forward (_mirror_in_recompute)
        self._checkpointing_layers: dict[nn.Module, list[nn.Module]] = {}
        self._fallback: set[nn.Module] = set()  # owner modules measured by torch.func
        self._learned_shared: set[nn.Module] = set()  # layers whose input proved to be shared
        # layers' calls in the loss code (by their order in the pass) on rows of another count
        # than the batch's, not computed from the model (sampled negatives):
        # _check_loss_code_rows
        self._loss_code_shared: set[tuple[nn.Module, int]] = set()
        #: lookups into parameters used directly that the audit found to be by positions
        #: (keys from :func:`~noisescale.per_example.shared._lookup_key`)
        self.learned_shared_lookups: set[tuple] = set()
        self._context: list[int] = []  # example dim inside time-major containers
        self._swapped: dict[tuple[int, str], list[Tensor]] = {}
        # per scope module, one frame per open call: the (holder, name) it swapped for aliases,
        # which its exit puts back — and only those (a scope that swapped nothing, a rule-less
        # module run by the fallback, must not pop the aliases an enclosing scope handed out)
        self._scope_frames: dict[nn.Module, list[list[tuple[nn.Module, str]]]] = {}
        # the pack hooks of the transformers checkpoints running now whose recomputation
        # enters their scopes again (_MirroredCheckpoint): aliases met there are followed
        self._mirrored_under: list[Any] = []
        self._guarded: set[nn.Module] = set()
        self._unswapped: dict[int, list[tuple[str, Tensor]]] = {}
        self._task_pass: dict[int, PassNorms] = {}
        # The first pass of a step skips its per-parameter gradient norms: with one pass they are
        # not needed (the big batch is .grad), and with more they are read from .grad when a
        # later pass first touches the parameter (.grad then holds the first pass alone).
        self.lazy_first_pass = True
        self._first_pass: PassNorms | None = None
        self.subset_position = 0
        self._positions = 0
        self._task_measured: dict[int, bool] = {}  # this step's backwards: measured or not
        self._measured_found = False
        self.last_step_examples: int | None = None
        # Sub-batch mode with accumulation: the number of micro-batches of the last step (0 while
        # unknown, or when its passes cannot be told apart at forward time: merged or compiled)
        # and the forwards opened in this step; see _open_pass
        self.last_step_passes = 0
        self._forwards = 0
        self._unreached_warned = False  # _watch_unreached
        self._task_accumulates: dict[int, bool] = {}
        self._grad_only_tasks: set[int] = set()  # tasks of torch.autograd.grad() calls
        self._acc_node: dict[int, Any] = {}
        self._shapes: dict[int, torch.Size] = {}  # (each held node's parameter's)
        # layers without a trainable parameter whose rule checks their form at each pass
        self._mode_checks: list[tuple[nn.Module, Callable[[nn.Module, str], None], str]] = []
        self._fallback_rng: dict[nn.Module, dict[str, Tensor]] = {}
        # per fallback module, the shapes of the arguments its last backward split as examples
        self._fallback_split: dict[nn.Module, list[tuple[int, ...]]] = {}
        # a product layer's hooks (weight enter, weight exit, forward): _nothing_between checks
        # their order, eagerly at each call and while Dynamo traces (it guards the hooks)
        self._product_hooks: dict[nn.Module, tuple[int, int, int]] = {}
        # per fallback module, its tensor arguments' versions when its forward began
        self._fallback_versions: dict[nn.Module, list[tuple[Tensor, int]]] = {}
        # device flags of the fallback's re-runs (fallback.rule), moved to their pass's
        # unread_picks by _on_call_grad
        self._fallback_unread: list[tuple[str, str, Tensor]] = []
        self.steps_collected = 0
        self._audit_due = True
        self._marking: tuple[int | None, list[PassNorms]] = (None, [])  # _mark_backward
        self._audited_signatures: set[tuple] = set()
        # the shapes of the losses audited steps backpropagated (Settle._new_loss_shape)
        self._audited_losses: set[int] = set()
        # shapes met unaudited -> the windows of audits started for them, and the audits left
        self._pending_losses: dict[int, int] = {}
        self._loss_audits_left = 0
        self._loss_shapes_warned = False
        # (signature, learned state) of structures whose audit found rows of the wrong
        # examples -> the refusal, repeated at every later pass of them (Settle._settle)
        self._refused_structures: dict[tuple, str] = {}
        self._unreplayed_warned: set[str] = set()  # (Settle._warn_unreplayed: once each)
        self._time_major_warned = False  # (_check_time_major_count: once)
        self._child_loss_warned = False  # (a loss computed inside a child: once per engine)
        self.recurrent = False  # a recurrent layer among the hooked ones (_install)
        # the layers' hooks as the last passed audit saw them (_hook_state): a compiled pass
        # with other hooks ran a graph traced since, which no audit has seen
        self._hooks_audited: int | None = None
        self._audited_nodes: set[tuple] = set()  # (signature, autograd nodes) audited
        # structures whose eager passes ran a layer on rows routed by the data: signature ->
        # the layer (ExampleCheck._audit_wanted: their compiled passes run eagerly)
        self._routed_signatures: dict[tuple, str] = {}
        self.audit_log: list[str] = []  # what audits found and taught (for messages and tests)
        # torch.compile (noisescale.per_example.compiled): the key that names this engine in a
        # compiled graph, the modules by position (a graph names a layer by its index), what the
        # graph's events recorded (by token), and the tensor whose leading size is the batch
        self._key = compiled.register(self)
        # (torch.compile's wrappers left out: Dynamo, tracing a hook's lookup in this table,
        # builds every key, and a wrapper's `_orig_mod` is the module it is tracing)
        self._modules = [m for m in model.modules() if not compiled.is_compile_wrapper(m)]
        self._spine = _spine(model)  # (whose own code the loss watch follows: begin_forward)
        self._site = {m: i for i, m in enumerate(self._modules)}
        self._params: list[nn.Parameter] = []  # trainable parameters by position, and back
        self._param_index: dict[int, int] = {}
        self._records: dict[int, _Record] = {}
        self._next_token = 1
        self._trace_batch: Tensor | None = None
        self._returned_loss = False  # whether the last forward of the model returned .loss
        # whether it returned its routers' logits (a transformers mixture of experts) and no loss
        self._returned_router_logits_only = False
        self._eager_hooks: list[Callable] = []  # what each module hook runs without compile
        self._compile_prepared = False  # _prepare_compile() has run (Dynamo is imported)
        # Dynamo was not imported when the engine was made: a graph compiled before the first
        # _prepare_compile() does not check module hooks (the tracker's message on a step that
        # saw no pass names it)
        self.dynamo_after_creation = "torch._dynamo" not in sys.modules
        self._inside_compiled_call = False  # the running eager hook runs inside a compiled call
        self._eager_steps = compiled.EagerSteps(self._key)
        # why the traced hooks cannot follow the model (then compiled code runs eagerly while
        # the engine measures: _compiled_eagerly); _compile_learned: what a compiled pass revealed
        self.compile_blocker: str | None = None
        self._compile_learned: str | None = None
        # a backward recomputed a forward (checkpoint(use_reentrant=True)): _settle_compiled
        self._reentrant_seen = False
        # a graph traced with its first event inside checkpoint(use_reentrant=False), whose
        # events it left out (compiled._checkpoint_first): _settle_compiled
        self.checkpoint_first = False
        self._compiled_eagerly = False
        # A step of the model ran compiled: from then on the eager hooks take the traced hooks'
        # decisions where they differ (a tied weight's products), so that an audited eager step
        # sees the structure the compiled steps have (else every compiled step would wait for
        # another audit)
        self._seen_compiled = False
        self._refuse_modules(model, per_example)
        self._model_dim = 1 if _time_major(model) else 0
        # FSDP2 reshards parameters in hooks of the backward: a replayed backward would run them
        self._replay_allowed = not _has_fsdp2(model)
        # (the audit's replays through checkpoint(use_reentrant=True): audit.py's notes)
        self._reentrant_hold = audit_mod.ReentrantHold()
        # (each backward's start: a term of the loss reading a parameter, Backward._loss_side)
        self._backward_start = _backward_start(weakref.WeakMethod(self._loss_side))
        audit_mod.BACKWARD_STARTS.append(self._backward_start)
        for mname, module in model.named_modules():
            self._labels[module] = mname or "<top-level model>"
            for pname, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    self._param_name.setdefault(id(p), f"{mname}.{pname}" if mname else pname)
                    self._param[id(p)] = p
        self._params = list(self._param.values())
        self._param_index = {id(p): i for i, p in enumerate(self._params)}
        # every parameter at construction, frozen ones too: collect() checks their flags
        self._all_params = list({id(p): p for p in model.parameters()}.values())
        # parameters registered anywhere since: collect() then looks for new ones
        self._registrations_seen = registrations()
        self._group_of: dict[int, int] | None = None
        self.num_groups = 0
        if groups is not None:
            self._group_of = {id(p): g for g, ps in enumerate(groups) for p in ps}
            self.num_groups = len(groups)
            missing = sorted(self._param_name[i] for i in self._param if i not in self._group_of)
            if missing:
                raise ValueError(f"parameters {missing} belong to no group")
        if per_example:
            self._build_plan(fallback)
        for pid, p in self._param.items():
            if type(p.data) is torch.Tensor:  # sharded (DTensor) parameters are resolved later
                # the AccumulateGrad node autograd runs for p; held so it stays the same node
                self._acc_node[pid] = (_accumulator(p), p.dtype, p.device)
                self._shapes[pid] = p.shape
        self._update_compile_blocker()
        self._install()
        # step 1 is audited: compiled code runs it eagerly
        self._eager_steps.want(self.per_example and self.auditing_enabled)

    # -- construction -------------------------------------------------------------------------

    @staticmethod
    def _refuse_modules(model: nn.Module, per_example: bool = True) -> None:
        lazy = [
            name
            for name, p in model.named_parameters()
            if isinstance(p, nn.parameter.UninitializedParameter)
        ]
        if lazy:
            shown = ", ".join(repr(n) for n in lazy[:3]) + (" …" if len(lazy) > 3 else "")
            raise NoiseScaleInputError(
                f"parameters {shown} of lazy modules (nn.LazyLinear, nn.LazyConv2d, …) are not "
                "initialised yet, so there is nothing to hook: run the model once on a batch "
                "(under torch.no_grad()) before creating the tracker, as the optimizer needs too"
            )
        outer: list[str] = []  # the outermost TorchScript modules (their children are too)
        trained: list[str] = []  # of them, those with parameters to measure
        for name, module in model.named_modules():
            if isinstance(module, torch.jit.ScriptModule) and not any(
                o == "" or name.startswith(o + ".") for o in outer
            ):
                outer.append(name)
                if any(p.requires_grad for p in module.parameters()):
                    trained.append(name)
        scripted = [name or "the model" for name in trained]
        if outer == [""]:
            raise UnsupportedModuleError(
                "the model is TorchScript (torch.jit.script or torch.jit.trace), which takes no "
                "forward hook, and noisescale counts the model's passes with one: measure the "
                "eager model (script a copy for deployment, or use torch.compile, which is "
                "measured)"
            )
        if scripted and per_example:
            shown = ", ".join(repr(n) for n in scripted[:3]) + (" …" if len(scripted) > 3 else "")
            raise UnsupportedModuleError(
                f"modules {shown} are TorchScript (torch.jit.script or torch.jit.trace): their "
                "forward runs in TorchScript, where noisescale's hooks and rules cannot follow "
                "it. Measure the eager module (script a copy for deployment, or use "
                "torch.compile, which is measured), or use per_example=False (micro-batch norms "
                "need no hooks inside the model)"
            )
        for mname, module in model.named_modules():
            if getattr(module, "sparse", False) and isinstance(
                module, nn.Embedding | nn.EmbeddingBag
            ):
                raise UnsupportedModuleError(sparse_message(mname, module))
        if isinstance(model, nn.DataParallel):
            raise UnsupportedModuleError(
                "nn.DataParallel replicates the model into threads that the hooks cannot follow; "
                "use DistributedDataParallel (supported) or track the inner module on one device"
            )

    def _build_plan(self, allow_fallback: bool) -> None:
        for module in self.model.modules():
            if isinstance(module, torch.jit.ScriptModule):
                continue  # (nothing of it trained: _refuse_modules; autograd runs through it)
            label = self._labels[module]
            # a parametrized weight (weight_norm, spectral_norm, orthogonal, …) is computed by
            # its parametrization from the original tensors each time it is read: the layer's
            # rule (which takes .weight for a parameter) does not apply; its parameters — the
            # originals, on module.parametrizations.<name> — are followed through the
            # parametrization's forward to where they meet the batch (wav2vec2's positional
            # convolution under weight_norm)
            # The old reparametrizations — torch.nn.utils.prune, and the deprecated
            # nn.utils.weight_norm and nn.utils.spectral_norm — compute .weight from their own
            # parameters (weight_orig; weight_g and weight_v) in a forward pre-hook: followed
            # the same way, the scope's aliases handed out before that hook runs (refused
            # until 2026-12-06 as parameters the layer's rule does not cover)
            old = _old_reparametrized(module)
            if old:
                self._old_reparametrized.add(module)
            rule = None if parametrize.is_parametrized(module) or old else rule_for(module)
            own = {
                n: p
                for n, p in module._parameters.items()
                if p is not None and p.requires_grad and id(p) in self._param
            }
            if rule is None:
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    # a BatchNorm subclass with its own forward (timm's BatchNormAct2d): batch
                    # statistics in training mode, whatever else the forward adds
                    norms.check_built(module, label)
                    self._mode_checks.append((module, norms.check, label))
                for name, p in own.items():
                    self._scopes.setdefault(module, []).append((module, name, id(p)))
                if isinstance(module, nn.MultiheadAttention):
                    # its forward uses out_proj's parameters itself, never out_proj.forward
                    for name, p in module.out_proj._parameters.items():
                        if p is not None and p.requires_grad:
                            self._scopes.setdefault(module, []).append(
                                (module.out_proj, name, id(p))
                            )
                continue
            covered = (
                own if rule.params is None else {n: p for n, p in own.items() if n in rule.params}
            )
            extra = sorted(set(own) - set(covered))
            if extra:
                raise UnsupportedModuleError(
                    f"module '{label}' ({type(module).__name__}) has parameters {extra} that its "
                    "layer rule does not cover (a subclass of the layer that adds parameters, "
                    "or a forward pre-hook that computes the layer's weight from them: "
                    "torch.nn.utils.parametrize, prune and the old weight_norm and spectral_norm "
                    "hooks are followed); register a rule for the module "
                    "(noisescale.register_layer), or use per_example=False"
                )
            if rule.check is not None:
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    # (its mode where it runs: _on_forward, or the pre-hook of _mode_checks)
                    norms.check_built(module, label)
                else:
                    rule.check(module, label)
                if not covered:
                    # a frozen layer whose form can still couple the examples (a BatchNorm
                    # frozen by eval(), which model.train() puts back in training mode): no
                    # hook of its own runs its check, a pre-hook does at each call (_install)
                    self._mode_checks.append((module, rule.check, label))
            if covered:
                self._calls[module] = (rule, label, covered)
        # a weight registered on two modules (a tied head) is used twice: sub-batch products,
        # which keep no per-sub-batch gradient for cross terms, are not used for it
        owners: dict[int, int] = {}
        for module in self.model.modules():
            for p in module._parameters.values():
                if p is not None and id(p) in self._param:
                    owners[id(p)] = owners.get(id(p), 0) + 1
        self._multi_use.update(pid for pid, count in owners.items() if count > 1)
        if not allow_fallback:
            return

    @staticmethod
    def _mode_check(module: nn.Module, args: tuple, check: Callable, label: str) -> None:
        """A frozen layer's check at its call (:attr:`_mode_checks`): a norm layer's through
        :func:`norms.check_call`, which passes a call no gradient goes through."""
        if check is norms.check:
            norms.check_call(module, label, args)
        else:
            check(module, label)

    def _hook(
        self,
        eager: Callable,
        traced: Callable | None = None,
        owner: nn.Module | None = None,
        opens: bool = False,
        post: bool = False,
    ) -> Callable:
        """A module hook: ``eager``, or while Dynamo traces it ``traced`` — the form whose work
        runs inside the compiled graph (:mod:`~noisescale.per_example.compiled`). A hook
        without a traced form, or any hook of a model the traced hooks cannot follow
        (:attr:`compile_blocker`), only reports that the pass ran compiled: the pass is
        withheld and compiled code then runs eagerly while the engine measures.

        ``owner``: the module the hook is put on; in a copy of the model the hook does nothing
        (:class:`_ModuleHook`). ``post``: a forward hook (after the module), not a pre-hook."""

        self._eager_hooks.append(eager)
        if self._compile_prepared:
            compiled.skip_frames(eager, recursive=True)

        return _ModuleHook(self, eager, traced, owner, opens, post)

    def _install(self) -> None:
        self._handles.append(
            self.model.register_forward_pre_hook(
                self._hook(self._on_model_forward, self._traced_model_forward, opens=True),
                with_kwargs=True,
            )
        )
        self._handles.append(
            self.model.register_forward_hook(
                self._hook(self._on_model_output, self._traced_model_output, post=True)
            )
        )
        # (a forward that raised: the watch that followed it comes off the mode stacks — left
        # there, every operation the user ran next went through Python, a review)
        self._handles.append(
            self.model.register_forward_hook(
                self._hook(self._on_model_raised, lambda m, a, o: None, post=True),
                always_call=True,
            )
        )
        for module in self.model.modules():
            if self.per_example and (
                _time_major(module) or isinstance(module, nn.MultiheadAttention)
            ):
                # F.multi_head_attention_forward works time-major whatever batch_first says
                dim = 1
                self._handles.append(
                    module.register_forward_pre_hook(
                        self._hook(lambda m, a, d=dim: self._push_context(d), owner=module)
                    )
                )
                self._handles.append(
                    module.register_forward_hook(
                        self._hook(lambda m, a, o: self._pop_context(), owner=module, post=True),
                        always_call=True,
                    )
                )
            elif (
                not self.per_example
                and self.examples_of is None
                and (_time_major(module) or isinstance(module, nn.RNNCellBase))
            ):
                self._handles.append(
                    module.register_forward_pre_hook(
                        self._hook(
                            lambda m, a: self._check_time_major_count(m, a),
                            lambda m, a: None,
                            owner=module,
                        )
                    )
                )
        if self.per_example:
            self._install_spine_hooks()
        for module, check, label in self._mode_checks:
            # (at each call of the layer, in the pass: not when the pass opens, which refused a
            # BatchNorm the forward never calls, an unused head's)
            self._handles.append(
                module.register_forward_pre_hook(
                    self._hook(
                        lambda m, a, c=check, lb=label: (
                            self._mode_check(m, a, c, lb) if self._active() else None
                        ),
                        lambda m, a, c=check, lb=label: self._mode_check(m, a, c, lb),
                        owner=module,
                    )
                )
            )
        # (the learned-state search's records are kept only for a model with a recurrent layer,
        # the one place they are read: _on_recurrent_enter)
        self.recurrent = any(isinstance(m, nn.RNNBase) for m in self._calls)
        for module in self._calls:
            # After the forward hooks the user registered before the tracker (as they were),
            # not first: such a hook may register a tensor hook on the output that changes its
            # gradient (a gradient reversal, a clip), which must run before the engine's own
            # reads it — tensor hooks run in the order they are registered (prepending this
            # one, tried on 2026-12-05, made those 85–96% off on unaudited steps). A hook there
            # that changes the output itself makes the rule read the changed output's
            # gradient, which the audit finds (refused); the sub-batch products, whose weight
            # gradient the audit cannot check, are not used then (_nothing_between).
            forward = module.register_forward_hook(
                self._hook(self._on_forward, self._traced_forward, owner=module, post=True),
                with_kwargs=True,
            )
            self._handles.append(forward)
            self._forward_ids[module] = forward.id
            self._class_forwards.setdefault(
                type(module), registered_forward(module) or type(module).forward
            )
            if self.subbatches and _by_products(module, self._calls[module][0]):
                enter = module.register_forward_pre_hook(
                    self._hook(self._on_weight_enter, self._traced_weight_enter, owner=module)
                )
                # (before _on_forward, which takes the call off the stack this one reads)
                leave = module.register_forward_hook(
                    self._hook(
                        self._on_weight_exit, self._traced_weight_exit, owner=module, post=True
                    ),
                    prepend=True,
                    always_call=True,
                )
                self._handles += [enter, leave]
                self._product_hooks[module] = (enter.id, leave.id, forward.id)
            elif isinstance(module, nn.RNNBase):
                # (a learned initial state meets the batch here: _on_recurrent_enter)
                self._handles.append(
                    module.register_forward_pre_hook(
                        self._hook(self._on_recurrent_enter, _no_traced_state, owner=module),
                        with_kwargs=True,
                    )
                )
            else:
                # (compiled: not checked, a gap the notes name)
                self._handles.append(
                    module.register_forward_pre_hook(
                        self._hook(self._on_call_enter, _no_traced_check, owner=module)
                    )
                )
        for module in self._scopes:
            self._install_scope(module)
        if self.per_example:
            for module in _item_models(self.model):
                self._handles.append(
                    module.register_forward_pre_hook(
                        self._hook(self._on_items, lambda *a: None, owner=module),
                        with_kwargs=True,
                    )
                )
        for module, forward_id in self._forward_ids.items():
            # a forward hook the user registered before the tracker runs before the engine's:
            # the layer's own output is kept for the engine's hook to compare (_changed_on_the_way)
            hooks = module._forward_hooks
            if next(k for k in hooks if k == forward_id or not _ours(hooks[k])) != forward_id:
                capture = module.register_forward_hook(
                    self._hook(self._capture_output, lambda m, a, o: None, owner=module, post=True),
                    prepend=True,
                )
                self._handles.append(capture)
                self._capture_ids[module] = capture.id
        for module in self.model.modules():
            if isinstance(module, parametrize.ParametrizationList):
                self._install_weights_only(module, module)
            elif module in self._old_reparametrized:
                self._install_weights_only(module, None)
        self._prepare_compile()
        for pid, p in self._param.items():
            self._param_hook[pid] = p.register_hook(self._make_param_hook(pid))
            self._handles.append(self._param_hook[pid])

    def _on_items(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A multimodal model's forward (:func:`_item_models`): its items against the
        examples, its arguments bound by name (positional ones too, and a module around it)."""
        if not self._active() or self._recomputing or self._replaying:
            return
        pass_ = self._hook_pass()
        n = pass_.batch_size
        if pass_.skipped or n < 2 or pass_.items_checked:
            return  # (once a pass: the outer model's call, or the inner one's)
        try:
            named = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
        except (TypeError, ValueError):
            named = dict(kwargs)
        if "kwargs" in named and isinstance(named["kwargs"], dict):
            named = {**named, **named["kwargs"]}
        flags = _items_not_one_each(module, n, named)
        cause = _items_cause(module, n, named)
        pass_.unread_picks += flags
        pass_.items_cause = pass_.items_cause or cause
        pass_.items_checked = bool(flags) or cause is not None

    def _install_weights_only(self, module: nn.Module, body: nn.Module | None) -> None:
        """Mark the computation of a weight from parameters alone — a parametrization's
        forward (``body`` the ParametrizationList), or an old reparametrization's pre-hooks
        (``body`` None: from just before them to just after them) —: no tensor there
        holds an example, whatever its leading size (:meth:`weights_only`). Spectral norm's
        vectors u and v, computed without gradient and so without history, were taken for rows
        of the batch when the weight had N output rows, and the layer refused (a discriminator
        of 64 channels on batches of 64; 2026-12-06)."""

        def enter(m: nn.Module, args: tuple) -> None:
            self._weights_only.append(m)

        def leave(m: nn.Module, *rest: Any) -> None:
            # (also after a forward or a pre-hook that raised: always_call)
            if m in self._weights_only:
                self._weights_only.remove(m)

        nothing = lambda *a: None  # noqa: E731 (compiled: not followed this way)
        opened = module.register_forward_pre_hook(
            self._hook(enter, nothing, owner=module), prepend=True
        )
        self._handles.append(opened)
        if body is None:
            # around the reparametrization's own hooks only, a window for each run of them: a
            # user's pre-hook before, after or between them (an input gain, x * model.gain)
            # meets the batch as usual (inside the window it did not, and the layer after it
            # was refused: before or after them, a review of 2026-12-06; between a pruned
            # weight's hook and a pruned bias's, a hunt the same day)
            hooks = module._forward_pre_hooks
            items: dict[int, Any] = {}
            inside = False
            for k in [k for k in hooks if k != opened.id]:
                if _reparametrizing(hooks[k]) != inside:
                    edge = (
                        opened
                        if not inside and opened.id not in items
                        else module.register_forward_pre_hook(
                            self._hook(leave if inside else enter, nothing, owner=module)
                        )
                    )
                    if edge is not opened:
                        self._handles.append(edge)
                    items[edge.id] = hooks[edge.id]
                    inside = not inside
                items[k] = hooks[k]
            if inside or opened.id not in items:
                closed = module.register_forward_pre_hook(self._hook(leave, nothing, owner=module))
                self._handles.append(closed)
                items[closed.id] = hooks[closed.id]
            if opened.id not in items:  # (none marked: around them all, as made)
                items = {opened.id: hooks[opened.id], **items}
            hooks.clear()
            hooks.update(items)
        self._handles.append(
            module.register_forward_hook(
                self._hook(leave, nothing, owner=module, post=True), always_call=True
            )
        )

    def weights_only(self) -> bool:
        """Inside a parametrization's or an old reparametrization's computation of a weight
        (:meth:`_install_weights_only`)."""
        return bool(self._weights_only)

    def _push_context(self, dim: int) -> None:
        self._context.append(dim)

    def _pop_context(self) -> None:
        if self._context:
            self._context.pop()

    def _install_scope(self, module: nn.Module) -> None:
        self._handles.append(
            module.register_forward_pre_hook(
                self._hook(self._on_scope_enter, self._traced_scope_enter, owner=module),
                with_kwargs=True,
                # (before an old reparametrization's pre-hook, which computes the weight from
                # the parameters it reads: from their aliases then)
                prepend=module in self._old_reparametrized,
            )
        )
        self._handles.append(
            module.register_forward_hook(
                self._hook(self._on_scope_exit, self._traced_scope_exit, owner=module, post=True),
                with_kwargs=True,
                prepend=True,
                always_call=True,
            )
        )

    def _guard_holder(self, holder: nn.Module) -> None:
        """Inside a rule module's own call its parameters are the real ones (its rule counts
        that use), even while an enclosing scope hands out aliases of them."""
        if holder in self._guarded:
            return
        self._guarded.add(holder)

        def enter(module: nn.Module, args: tuple) -> None:
            for (hid, name), stack in self._swapped.items():
                if (
                    hid == id(module)
                    and stack
                    and isinstance(module._parameters.get(name), SharedTensor)
                ):
                    alias = module._parameters[name]
                    module._parameters[name] = stack[-1]  # type: ignore[assignment]
                    self._unswapped.setdefault(id(module), []).append((name, alias))

        def leave(module: nn.Module, args: tuple, output: Any) -> None:
            for name, alias in self._unswapped.pop(id(module), []):
                module._parameters[name] = alias

        self._handles.append(
            holder.register_forward_pre_hook(self._hook(enter, owner=holder), prepend=True)
        )
        self._handles.append(
            holder.register_forward_hook(
                self._hook(leave, owner=holder, post=True), always_call=True
            )
        )

    def remove(self) -> None:
        """Remove every hook; the object keeps what it has measured."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        # (autograd makes a parameter's AccumulateGrad node anew when none is held: one held
        # after removal would keep its old shape, and a resized parameter's backward failing)
        self._acc_node.clear()
        self._shapes.clear()
        self._loss_watch.reset()
        self._scratch.release()
        self._eager_steps.want(False)
        self._reentrant_hold.release()
        if self._backward_start in audit_mod.BACKWARD_STARTS:
            audit_mod.BACKWARD_STARTS.remove(self._backward_start)
        # an alias still in the model (a forward that never returned to its scope's exit) is
        # replaced by the parameter itself: the model is left as it was given (only this
        # engine's: a tracker collected while another one's forward runs leaves its aliases)
        for scope_uses in self._scopes.values():
            for holder, name, pid in scope_uses:
                held = holder._parameters.get(name)
                origin = getattr(held, "_ns_origin", None)
                if isinstance(held, SharedTensor) and getattr(origin, "engine", self) is self:
                    holder._parameters[name] = self._param[pid]
        for (_, _), stack in list(self._swapped.items()):
            stack.clear()
        self._scope_frames.clear()
        for module in self._mirrored:
            func = getattr(module, "_gradient_checkpointing_func", None)
            if isinstance(func, _MirroredCheckpoint):
                module._gradient_checkpointing_func = func.original
        self._mirrored.clear()
        self._checkpointing_layers.clear()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Ignore the forward and backward passes run inside the block.

        For extra passes that are not part of the training step, e.g. the Hessian-vector
        products of :mod:`noisescale.hessian`; call it between steps (no pass open).
        """
        was, self._paused = self._paused, True
        for pid, shape in self._shapes.items():
            if self._param[pid].shape != shape:
                # (resized since: the held AccumulateGrad node expects the old shape, and a
                # backward in the block crashed inside autograd until 2026-12-06, a hunt; a
                # measured pass is refused by _check_shapes)
                self._acc_node.pop(pid, None)
        try:
            yield
        finally:
            self._paused = was

    @property
    def _replaying(self) -> bool:
        # shared by every engine: a replay started by one must not feed another's hooks
        return audit_mod.replay_active()

    @property
    def is_paused(self) -> bool:
        """Whether passes are being ignored (inside :meth:`paused`)."""
        return self._paused

    def current_pass(self) -> PassNorms | None:
        """The pass the next backward belongs to (the last one opened), or ``None`` — also
        inside :meth:`paused`, whose forwards open none (a validation loss a Hugging Face model
        computes there is not the open pass's: a review found it refused as that pass's loss
        function run twice)."""
        return self.passes[-1] if self.passes and not self._paused else None

    def open_passes(self) -> int:
        """How many passes the current step has opened so far."""
        return len(self.passes)

    def add_parameter_hook(self, tensor: Tensor, param: nn.Parameter) -> RemovableHandle:
        """Count ``tensor``'s gradients as ``param``'s (FSDP2's unsharded parameters)."""
        return tensor.register_hook(self._make_param_hook(id(param)))

    # -- what the shared tensors ask ----------------------------------------------------------

    def tracks_shared(self) -> bool:
        replaying = self._replaying and not _checkpoint_recompute()  # (see _active)
        # (another thread's forward under no_grad may read an alias the measured thread's
        # forward put in the model: there it is the parameter's value, nothing is followed)
        return not (self._paused or replaying or self._recomputing or foreign_thread(self.thread))

    def check_forward_transform(self, where: str) -> None:
        """Refuse ``where`` met under a torch.func transform entered inside the model's forward
        (``torch.vmap(scan)(h)``): the hooks see its wrapped tensors, not the batch — a bare
        "cannot register a hook" RuntimeError, or parameters said to be read in the loss,
        until 2026-12-06 (a hunt). The user's own transforms around the model
        (``vmap(grad(functional_call(model, ...)))``) open no pass: not refused here."""
        if (
            self.passes
            and not self.passes[-1].returned
            and torch.is_grad_enabled()
            and torch._C._current_graph_task_id() == -1
            and not (self._paused or self._recomputing or self._replaying)
            and _inside_functorch()
        ):
            raise UnsupportedModuleError(forward_transform_message(where))

    def open_pass(self) -> PassNorms | None:
        if not self.passes or not torch.is_grad_enabled():
            return None
        return self._hook_pass()

    def _hook_pass(self) -> PassNorms:
        """The pass a forward hook records into: the open pass, or — in a forward that
        activation checkpointing re-runs during the backward — a shadow of it.

        torch.utils.checkpoint (non-reentrant: transformers' gradient_checkpointing_enable)
        recomputes a block's forward in the backward only to refill the tensors the original
        forward's graph saved, checking that they match; the gradient still flows through the
        original graph, whose hooks measure it. The recomputation must therefore do what the
        original forward did to the tensors (detached weights of sub-batch products, shared
        aliases of parameters used directly) — or the saved tensors differ and checkpoint
        raises — but none of it may count: a layer seen twice would be a weight used twice. So
        the hooks run on a pass with the same settings that no backward reaches and that is
        dropped when the step is collected.

        Any other forward inside a backward is checkpoint(use_reentrant=True)'s, whose
        recomputed graph is backpropagated by a backward of its own: its hooks measure it like
        any forward, and simple cases audit (tests/test_engine_edge_cases.py); the pass is
        marked so that where the audit cannot replay it, its refusal says so first
        (``_REENTRANT_LEAD``).
        """
        pass_ = self.passes[-1]
        if torch._C._current_graph_task_id() == -1:
            return pass_
        if not _checkpoint_recompute():
            if torch.is_grad_enabled() and not self._recomputing and not self._replaying:
                pass_.reentrant = self._reentrant_seen = True
            return pass_
        # the pass whose forward is recomputed: the one that made the node running now (its
        # span of sequence numbers) — not the last pass, whose size may differ (two forwards of
        # unequal sizes through a checkpointed block took the last one's settings, and torch
        # raised CheckpointError, until 2026-12-07, a fuzzer)
        node = torch._C._current_autograd_node()
        if node is not None:
            seq = node._sequence_nr()
            for candidate in reversed(self.passes):
                at, end = candidate.nodes_at, candidate.nodes_end
                if at is not None and end is not None and at <= seq < end:
                    pass_ = candidate
                    break
        shadow = self._shadows.get(id(pass_))
        if shadow is None:
            shadow = self._shadows[id(pass_)] = PassNorms(
                batch_size=pass_.batch_size,
                weights=pass_.weights,
                # as the forward was: a subset's backward may have skipped the pass since, after
                # its forward handed out aliases the recomputation must hand out too
                skipped=pass_.forward_skipped,
                subbatches=pass_.subbatches,
                amp=pass_.amp,
                unsplit=pass_.unsplit,
            )
        return shadow

    def batch_dim(self) -> int:
        return self._context[-1] if self._context else self._model_dim

    def param_label(self, pid: int) -> str:
        return self._param_name.get(pid, "?")


def _spine(model: nn.Module) -> frozenset[int]:
    """The ids of ``model`` and of the modules it only delegates to: while a module has exactly
    one child with trainable or frozen parameters (torch.compile's ``_orig_mod``, peft's
    ``base_model`` and ``model``), that child too."""
    spine, module = {id(model)}, model
    while True:
        owners = [c for c in module.children() if next(c.parameters(), None) is not None]
        if len(owners) != 1:
            return frozenset(spine)
        module = owners[0]
        spine.add(id(module))


# -- helpers ----------------------------------------------------------------------------------


def _has_fsdp2(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())
