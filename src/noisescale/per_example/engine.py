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

Layout: this module holds :class:`PerExampleNorms`' construction, its forward and backward hooks
and collection; its mixins hold what it decides after a backward (:mod:`~.settle`), its hooks
under ``torch.compile`` (:mod:`~.traced`), the audit's re-runs on permuted examples
(:mod:`~.example_check`) and its watch on ``.grad`` (:mod:`~.grad_watch`).
"""

from __future__ import annotations

import inspect
import re
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
from noisescale.module_hooks import foreign_thread
from noisescale.per_example import audit as audit_mod
from noisescale.per_example import compiled, norms, scaler_watch
from noisescale.per_example import subbatch as subbatch_mod
from noisescale.per_example.backward import Backward
from noisescale.per_example.embedding import sparse_message
from noisescale.per_example.example_check import ExampleCheck
from noisescale.per_example.factors import (
    Factor,
    NormFactor,
    _acc,
    _flat_rows,
    group_factor,
    sqnorm,
    sqnorm_of_sum,
    weighted_sqnorm,
)
from noisescale.per_example.grad_watch import GradWatch
from noisescale.per_example.graph import (
    _accumulator,
    _checkpoint_recompute,
    _MirroredCheckpoint,
)
from noisescale.per_example.layer_hooks import LayerHooks, _ours
from noisescale.per_example.loss_watch import LossWatch
from noisescale.per_example.messages import (
    _REENTRANT_LEAD,
    SECOND_ORDER,
    _reentrant_checkpointing,
    forward_transform_message,
    new_parameters_message,
    sparse_grad_message,
)
from noisescale.per_example.opening import PassOpening, _inside_functorch
from noisescale.per_example.pass_checks import (
    _audit_scheduled,
    _merge_shared_backward,
    _refuse_fed_by_its_own_output,
    _refuse_same_input_twice,
    takes_second_order,
    written_tasks,
)
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
from noisescale.per_example.values import (
    _owned,
    _time_major,
)

__all__ = ["PassNorms", "PerExampleNorms"]

# an audit's finding that rows do not belong to their examples (settle.py's messages)
_AUDIT_FAILED = re.compile(r"audit of this step failed.*do not belong to the examples")

LOSS_REDUCTIONS = ("mean", "sum")


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


def _first_held(flags: list[tuple[str, Tensor]]) -> str | None:
    """The first name whose device flag is set (one host read for them all), or None."""
    if not flags:
        return None
    held = torch.stack([flag.to(flags[0][1].device) for _, flag in flags])
    return next((name for (name, _), h in zip(flags, held.tolist(), strict=True) if h), None)


def _replaced_message(label: str, name: str, held: Any) -> str:
    """A layer that ran without the parameter the engine found on it when it was created."""
    if held is None:
        return (
            f"module '{label}' no longer holds its parameter '{name}', which it held when the "
            "tracker was created: it was re-parametrized or removed since (torch.nn.utils.prune, "
            "spectral_norm, weight_norm or parametrize applied after the tracker was created, "
            f"which move '{name}' elsewhere; module.{name} = None). Apply them before creating "
            "the tracker, or create a new tracker after changing the model"
        )
    return (
        f"module '{label}' ran with its parameter '{name}' replaced by another tensor for this "
        f"call (a forward pre-hook or a patched forward that sets module.{name}: a weight "
        "swapped for an EMA copy, or tied by a hook; torch.func.functional_call with weights "
        "of your own, a hypernetwork's); noisescale attributes a layer's "
        "per-example gradients to the parameters it held when the tracker was created. Tie "
        f"weights by sharing the Parameter itself (b.{name} = a.{name}) before creating the "
        "tracker; a module that only ever runs on weights given to functional_call needs its "
        f"own frozen (requires_grad_(False) before creating the tracker: '{name}' gets no "
        "gradient, and the weights given are followed to where they were computed); or use "
        "per_example=False"
    )


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
    PassOpening, LayerHooks, RowChecks, Backward, ExampleCheck, GradWatch, Traced, Settle
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

    def _make_param_hook(self, pid: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor | None) -> None:
            if self._paused or self._replaying:
                return
            if grad is None:
                # a compiled backward calls the hooks of parameters it gave no gradient (a
                # submodule run under no_grad or on a detached input, its parameters still
                # trainable): nothing reached them — eager autograd calls no hook (until
                # 2026-12-05 this crashed the backward, or withheld a step blaming a graph
                # break, a hunt)
                return
            if grad.layout is not torch.strided:
                # a sparse gradient (F.embedding(ids, table, sparse=True), which no module's
                # sparse=True shows at construction): until 2026-12-06 the backward crashed in
                # the .grad watch's norm with torch's NotImplementedError, in every mode (a hunt)
                raise UnsupportedModuleError(sparse_grad_message(self._param_name.get(pid, "?")))
            task = torch._C._current_graph_task_id()
            current = self._task_pass.get(task) or (self.passes[-1] if self.passes else None)
            if current is None:
                return
            if self._marking[0] is None and task not in self._between_checked:
                # (before this parameter's gradient is accumulated: a layer the loss code
                # calls — model.head(model(x)) — has its parameters reached before the model's
                # outputs, and its accumulation was taken for a zero_grad between micro-batches
                # until 2026-12-06, a review; not in a backward nested in a marked one — a
                # reentrant checkpoint's, whose outer backward accumulated already)
                self._check_between(task)
            current.tasks.add(task)
            current.param_tasks.add(task)
            self._task_pass.setdefault(task, current)
            if current.grad_scaler is None and (scaler := scaler_watch.task_scaler()) is not None:
                # a GradScaler scaled the loss this backward started from: noted here, where
                # every backward that writes a gradient passes — also a compiled model's steps
                # after its eager audited ones and per_example=False, where no hook on the
                # outputs runs (until 2026-12-05 those recorded the scale² without a word)
                current.grad_scaler = scaler
            repeated = pid in current.received
            if repeated:
                current.repeated_backward = True
            current.received.add(pid)
            if not current.wrote and self._accumulates(task, pid):
                current.wrote = True
                if self._writer is None:
                    self._writer = current
            elif task in self._grad_only_tasks:
                current.grad_only = True
            if self._step_marks and not repeated and self._accumulates(task, pid):
                self._check_zeroed(pid)
            if current.idle:
                return
            if current.audit is not None:
                current.audit.record_grad(pid, grad)
                # (the step's first pass that writes .grad: one before it whose gradients
                # only torch.autograd.grad took — a .grad assigned by hand from them — is no
                # excuse, a hunt of 2026-12-06)
                if current is self._writer and not repeated:
                    self._check_stale(current, task, pid)
            if self._first_pass is None and self.lazy_first_pass:
                self._first_pass = current
            first = self._first_pass
            if current is first and self._accumulates(task, pid):
                current.lazy.add(pid)
                return
            if first is not None and pid in first.lazy:
                # runs before AccumulateGrad: .grad still holds the first pass's gradient only
                self._resolve_lazy(first, pid, 1.0)
            self._add_grad_norm(current, pid, grad)

        return hook

    def _check_zeroed(self, pid: int) -> None:
        """Every step, before a parameter's first gradient of the step is accumulated: its
        ``.grad`` must not still be the tensor the last step's last backward left, at the same
        version — then nothing zeroed it (``zero_grad`` sets ``None`` or zeroes in place, which
        bumps the version) and ``.grad`` will sum two steps. Version counters only: no host
        read. Until 2026-12-04 only the audited steps (1, 2, 4, …) checked this, by value
        (:meth:`_check_stale`): a ``zero_grad`` skipped once on another step (``if bad: continue``
        after the backward) was measured without a word. A ``DTensor`` gradient (FSDP2), whose
        in-place changes bump no version of its own, is left to the audited steps."""
        if pid in self._zero_checked:
            return
        self._zero_checked.add(pid)
        mark = self._step_marks.pop(pid, None)
        g = self._param[pid].grad
        if g is not None and (mark is None or g is not mark[0]()) and type(g).__name__ != "DTensor":
            # a .grad neither the last step's nor emptied since: assigned by hand before this
            # backward accumulates into it (torch.autograd.grad's result written to .grad for
            # one micro-batch, backward() for the next: .grad held both, the examples measured
            # the backward's alone — 4× off without a word until 2026-12-06, a hunt). Zeros
            # are fine (p.grad = torch.zeros_like(p)); read once in collect, as _unzeroed
            with torch.no_grad():
                self._handset.append((self._param_name[pid], g.detach().ne(0).any()))
            return
        if mark is None:
            return
        if (
            g is not None
            and g is mark[0]()
            and g._version == mark[1]
            and type(g).__name__ != "DTensor"
        ):
            # zeroed through .data (``p.grad.data.zero_()``) bumps no version of .grad: whether
            # it holds anything is noted on the device, read once in collect — a host read only
            # in loops that leave .grad's version alone
            with torch.no_grad():
                self._unzeroed.append((self._param_name[pid], g.detach().ne(0).any()))

    def _check_stale(self, pass_: PassNorms, task: int, pid: int) -> None:
        """On audited steps: before the step's first backward writes ``.grad``, it must be empty
        (``None``, or zeros after ``zero_grad(set_to_none=False)``); read in :meth:`collect`."""
        old = self._param[pid].grad
        if old is None or type(old).__name__ == "DTensor" or not self._accumulates(task, pid):
            return
        with torch.no_grad():
            sq = sqnorm(old.detach())
        pass_.stale_sqnorm = sq if pass_.stale_sqnorm is None else pass_.stale_sqnorm + sq

    def _add_grad_norm(self, pass_: PassNorms, pid: int, grad: Tensor, factor: float = 1.0) -> None:
        """Add |P ⊙ grad|² of one parameter to the pass's gradient norm (and its group's)."""
        with torch.no_grad():
            w2 = None if pass_.weights is None else pass_.weights.get(pid)
            g = grad.detach()
            sq = sqnorm(g) if w2 is None else (_acc(g).pow(2) * w2).sum()
            if factor != 1.0:
                sq = sq * factor
            pass_.grad_sqnorm = sq if pass_.grad_sqnorm is None else pass_.grad_sqnorm + sq
            if self._group_of is not None:
                if pass_.group_grad_sqnorm is None:
                    pass_.group_grad_sqnorm = sq.new_zeros(self.num_groups)
                pass_.group_grad_sqnorm[self._group_of[pid]] += sq

    def _accumulator(self, pid: int) -> Any:
        """The AccumulateGrad node autograd runs for the parameter now (``None``: not known).

        Autograd makes a new one when the parameter's data changes dtype or device
        (``model.to(device)``, ``model.double()`` after the tracker was built; Hugging Face's
        Switch Transformers casts its router to float32 in every forward): the node held
        from before would never run, and a backward through the layer would be taken for one
        that does not reach its weight."""
        held = self._acc_node.get(pid)
        if held is None:
            return None
        node, dtype, device = held
        p = self._param[pid]
        if p.dtype != dtype or p.device != device:
            node = _accumulator(p)
            self._acc_node[pid] = (node, p.dtype, p.device)
        return node

    def _accumulates(self, task: int, pid: int) -> bool:
        """Whether the running backward writes .grad (backward(), not torch.autograd.grad)."""
        known = self._task_accumulates.get(task)
        if known is None:
            node = self._accumulator(pid)
            try:
                known = node is not None and bool(torch._C._will_engine_execute_node(node))
            except RuntimeError:  # autograd.grad(): .grad is not written, so no lazy reading
                known = False
                self._grad_only_tasks.add(task)
            self._task_accumulates[task] = known
        return known

    def _resolve_lazy(self, pass_: PassNorms, pid: int, factor: float) -> None:
        pass_.lazy.discard(pid)
        grad = self._param[pid].grad
        if grad is not None:
            self._add_grad_norm(pass_, pid, grad, factor)

    def _add(self, pass_: PassNorms, p: nn.Parameter, factor: Factor) -> None:
        pid = id(p)
        pass_.covered.add(pid)
        if pass_.audit is not None:
            pass_.audit.add_sum(pid, factor, p.shape)
        if pass_.subbatches is not None:
            factor = group_factor(factor, pass_.subbatches)
        if pass_.uses.get(pid, 1) == 1:
            w2 = None if pass_.weights is None else pass_.weights.get(pid)
            # a NormFactor's norms were weighted where they were computed
            plain = w2 is None or isinstance(factor, NormFactor)
            self._accumulate(pass_, pid, factor.sqnorm() if plain else weighted_sqnorm(factor, w2))
            return
        waiting = pass_.pending.setdefault(pid, [])
        waiting.append(factor)
        if _without_cross_terms(waiting):
            # a weight measured by sub-batch products turned out to be used again: its cross
            # terms are not available; the next passes measure it from factors instead
            self._multi_use.add(pid)
            pass_.broken = f"parameter '{self._param_name.get(pid, '?')}' is used more than once"
            return
        if len(waiting) == pass_.uses[pid]:
            self._accumulate(pass_, pid, self._sqnorm_of_uses(pass_, p, waiting))
            del pass_.pending[pid]
        elif pass_.compiled and pass_.subbatches is None:  # (sub-batch factors are copies)
            waiting[-1] = _owned(waiting[-1], p.shape)

    @staticmethod
    def _sqnorm_of_uses(pass_: PassNorms, p: nn.Parameter, factors: list[Factor]) -> Tensor:
        w2 = None if pass_.weights is None else pass_.weights.get(id(p))
        if w2 is None:
            return sqnorm_of_sum(factors, p.shape)
        # weighted cross terms have no compact form: sum the materialised uses
        total = sum(f.dense(p.shape) for f in factors)
        return _flat_rows(total.pow(2) * w2).sum(1)

    def _accumulate(self, pass_: PassNorms, pid: int, sq: Tensor) -> None:
        if sq.dtype not in (torch.float32, torch.float64):
            sq = sq.float()
        pass_.raw_sqnorms = sq if pass_.raw_sqnorms is None else pass_.raw_sqnorms + sq
        if self._group_of is not None:
            if pass_.group_sqnorms is None:
                pass_.group_sqnorms = sq.new_zeros(sq.shape[0], self.num_groups)
            pass_.group_sqnorms[:, self._group_of[pid]] += sq

    # -- results ------------------------------------------------------------------------------

    def discard(self) -> None:
        """Drop the step's passes unmeasured and reset the step's state: what :meth:`collect`
        does first, and all a step the tracker refused before collecting it needs (the next
        step starts clean)."""
        passes = self.passes
        self._reset_step()
        for pass_ in passes:
            pass_.release()

    def _reset_step(self) -> None:
        self.passes = []
        self._loss_watch.finish()
        self._loss_watch.reset()
        self._scratch.release()  # (rows kept for layers that read one input: an activation)
        self._context.clear()
        self._records.clear()
        self._shadows.clear()
        self._first_pass = None
        self._positions = 0
        self._task_measured.clear()
        self._forwards = 0
        self._measured_found = False
        self._task_accumulates.clear()
        self._grad_only_tasks.clear()
        self._task_pass.clear()
        self._fallback_versions.clear()
        self._fallback_unread = []
        self._hook_changed, self._between = [], None
        self._between_checked.clear()
        self._unzeroed = []
        self._handset = []
        self._zero_checked.clear()
        self._writer = None
        self._hook_in.clear()
        self._unopened = None
        self._unopened_params = []
        self._unopened_transform = False

    def _learned_state(self) -> tuple[int, ...]:
        """How much the engine has learned about the model (layers for the fallback, direct
        uses followed, shared calls and lookups): a pass that changed it taught the engine."""
        return (
            len(self._fallback),
            sum(len(uses) for uses in self._scopes.values()),
            len(self._learned_shared),
            len(self.learned_shared_lookups),
        )

    def collect(self, grad_rescale: float = 1.0, *, learn: bool = True) -> list[PassNorms]:
        """Finish the open passes and return them, resetting the engine for the next step.

        Passes that no backward reached are dropped; passes one backward ran through together
        (two forwards, one loss) are merged into one.

        Args:
            grad_rescale: What ``.grad`` must be multiplied by to be in the hooks' units again
                (the loss scale, when ``GradScaler.unscale_`` ran after the backward passes).
            learn: When an audit finds a use the engine can handle from the next step on (a
                parameter used outside its module, a layer whose input proved shared, an
                operation that needs the fallback), withhold this pass's per-example norms
                (:attr:`PassNorms.withheld`) and adapt; ``False`` refuses instead (one-shot
                measurements).

        Raises:
            UnsupportedModuleError: if a parameter received a gradient but no per-example
                contribution, or an audit failed in a way the engine cannot adapt to.
            NoiseScaleInputError: if the trainable parameters changed since construction, a
                backward with ``create_graph=True`` fed the parameters' gradients, or two
                backward passes ran through one forward.
        """
        opened = self.passes
        done: list[PassNorms] = []
        unopened, outside = self._unopened, self._unopened_params
        try:
            done = self._collect(grad_rescale, learn)
            return done
        except UnsupportedModuleError as err:
            text = str(err)
            if unopened is None or not any(f"'{name}'" in text for name in outside):
                raise
            # the refused parameters' layer ran before the model's forward (inputs_embeds
            # built by the caller): that use was never seen, whatever the finding says
            raise UnsupportedModuleError(
                f"layer '{unopened}' ran with gradients enabled outside a forward of the "
                f"measured model ({type(self.model).__name__}) — e.g. inputs_embeds computed by "
                "the caller, model.get_input_embeddings()(ids), then model(inputs_embeds=...) "
                "— so its parameters' use there was never attributed to examples. Let the "
                "model run the layer (pass input_ids), wrap the layer's call and the model's "
                "in one module and measure that, or use per_example=False. What noisescale "
                f"found: {text}"
            ) from err
        finally:
            # The step is over: what ties a pass to its autograd graph goes. The graph's
            # hooks hold the pass and the pass held the graph's nodes (the outputs', the
            # audit's roots): a cycle through autograd's C++ nodes that Python's collector
            # cannot see, which kept every step's pass, graph and input batch alive (a
            # ResNet's 64 images a step: +1.5 MB of memory a step, for good).
            for pass_ in (*opened, *done):
                pass_.release()

    def _collect(self, grad_rescale: float, learn: bool) -> list[PassNorms]:
        done, first = self.passes, self._first_pass
        changed, between = self._hook_changed, self._between
        #: a parameter whose .grad the step found not zeroed since the last one
        #: (:meth:`_check_zeroed`); the tracker refuses the step, a one-shot measurement — whose
        #: norms do not read .grad — does not care
        self.unread_picks = []  # (set below, from the passes of the step's training backwards)
        self.unopened = self._unopened
        self.unopened_transform = self._unopened_transform
        # the parameters of that layer: not learned as direct uses of the forward (a use
        # outside it, inputs_embeds built by the caller, would never be seen)
        self._outside_params = set(self._unopened_params)
        self.unzeroed = _first_held(self._unzeroed)
        self.handset = _first_held(self._handset)
        self._reset_step()  # the step's state reset, whatever is refused below
        if any(p.wrote for p in done):
            # A pass whose gradients only torch.autograd.grad took (the ascent of
            # sharpness-aware minimization, a gradient logged for a held-out batch, the inner
            # step of first-order MAML) is not part of .grad: not a micro-batch of the step (a
            # review found each counted as one, b_big 2x and tr Σ 2.7x off). (Where no pass
            # wrote .grad, they stay: a .grad assigned by hand from them is checked to be that
            # one pass's gradient, GradWatch._assigned_by_hand, or refused by the tracker.)
            for p in done:
                if p.received and p.grad_only and not p.wrote:
                    p.received = set()
        marked = next((p for p in reversed(done) if p.grad_marks and p.received), None)
        self._step_marks = (
            {}
            if marked is None
            else {
                id(p): m
                for p, m in zip(self._params, marked.grad_marks, strict=True)
                if m is not None
            }
        )
        split = [p for p in done if p.subbatches is not None and p.received and not p.skipped]
        if split:
            self._subbatches_pay = any(p.products for p in split)
        reached = sum(1 for p in done if p.received)  # passes of the step, before merging
        if first is not None and first.lazy and reached > 1:
            # parameters no later pass touched: .grad is still the first pass's gradient
            # (``grad_rescale`` undoes an AMP unscale_ of .grad that ran since the backward)
            for pid in list(first.lazy):
                self._resolve_lazy(first, pid, grad_rescale**2)
        if first is not None:
            first.lazy.clear()
        if between is not None:
            raise NoiseScaleInputError(
                "call optimizer.zero_grad() once per optimizer step, after optimizer.step(), "
                f"not between the micro-batches of one step: the gradient of {between!r} was "
                "zeroed (or changed) between two backward passes of this step, so .grad holds "
                "only part of the step's gradient and the estimate would be wrong. Nothing of "
                "this step was recorded. A pass that is not part of the step's gradient (the "
                "ascent pass of sharpness-aware minimization, a probe at other weights) goes "
                "under `with tracker.paused():`, its gradients zeroed before the measured pass — "
                "so does another model's step whose loss reaches this model (a GAN's generator "
                "step through a tracked discriminator, a discriminator step on a fake not "
                "detached), or freeze this model for it (requires_grad_(False)); "
                "with torch.optim.LBFGS, whose closure runs several passes per step, call "
                "tracker.step() inside the closure, after its backward. A step abandoned after "
                "its backward (a loss that is not finite, then zero_grad() and continue; an "
                "exception caught in the loop) needs tracker.discard() before zero_grad(); "
                "to measure only some steps, call tracker.step() every step with "
                "measure_every= instead of skipping it"
            )
        post = [pid for pid, after in changed if after]
        if post:
            names = ", ".join(repr(self._param_name[pid]) for pid in dict.fromkeys(post))
            raise UnsupportedModuleError(
                f"a hook run after the accumulation of the gradient of {names} changed .grad "
                "(a function given to register_post_accumulate_grad_hook: a rescale, a clamp, "
                "an optimizer step inside the backward); noisescale takes every norm before "
                "such a hook and .grad holds the gradient after it, so they would not match. "
                "Apply the change after tracker.step()"
            )
        if changed and self.per_example:
            pids = dict.fromkeys(pid for pid, _ in changed)
            names = ", ".join(repr(self._param_name[pid]) for pid in pids)
            raise UnsupportedModuleError(
                f"a hook on the gradient of {names} changed it (a function given to "
                "register_hook that returns another gradient or changes it in place: a mask, a "
                "clamp, a scale); noisescale measures each example's gradient before such a "
                "hook and .grad holds it after, so the norms would not match .grad. Apply the "
                "change to .grad after tracker.step(), or use per_example=False (micro-batch "
                "norms, taken after the hooks: right for a linear change such as a mask)"
            )
        if any(p.requires_grad != (id(p) in self._param) for p in self._all_params):
            raise NoiseScaleInputError(
                "the model's trainable parameters changed since the tracker was created "
                "(a layer was frozen or unfrozen); create a new tracker after changing "
                "requires_grad"
            )
        if any(p.audit is not None for p in done):
            # on audited steps (1, 2, 4, …): a parameter the engine was not built on — a layer
            # re-created or added, resize_token_embeddings(), peft adapters, assign=True loads —
            # would be left out of every norm without a word
            known = {id(p) for p in self._all_params}  # (unfreezing: the message above)
            new = [
                name
                for name, p in self.model.named_parameters()
                if p.requires_grad and id(p) not in known
            ]
            if new:
                raise NoiseScaleInputError(new_parameters_message(new))
        for pass_ in done:
            for label, name, held in pass_.replaced if pass_.received else ():
                raise UnsupportedModuleError(_replaced_message(label, name, held))
        for pass_ in done:
            if pass_.deferred and pass_.audit is not None:
                pass_.audit.skip_sums.update(self._param)
            for task, items in pass_.deferred.items():
                if task in pass_.param_tasks:
                    for p, factor in items:
                        self._add(pass_, p, factor)
            pass_.deferred.clear()
            for slot in list(pass_.slots.values()):
                # meetings whose output never reached the loss contribute nothing
                if slot.arrived:
                    self._finish_slot(pass_, slot, True)
            pass_.slots.clear()
            for pid, waiting in list(pass_.pending.items()):
                if _without_cross_terms(waiting):
                    continue  # the pass is broken (withheld below)
                # a use whose output never reached the loss contributes a zero gradient
                self._accumulate(pass_, pid, self._sqnorm_of_uses(pass_, self._param[pid], waiting))
            pass_.pending.clear()
            if pass_.audited and pass_.rows is not None:
                rows = pass_.rows
                if pass_.raw_sqnorms is not None:
                    pass_.raw_sqnorms = pass_.raw_sqnorms.index_select(
                        0, rows.to(pass_.raw_sqnorms.device)
                    )
                if pass_.group_sqnorms is not None:
                    pass_.group_sqnorms = pass_.group_sqnorms.index_select(
                        0, rows.to(pass_.group_sqnorms.device)
                    )
            if pass_.row_weights is not None:  # importance weights of the drawn rows
                w = pass_.row_weights
                if pass_.raw_sqnorms is not None:
                    pass_.raw_sqnorms = pass_.raw_sqnorms * w.to(pass_.raw_sqnorms.dtype)
                if pass_.group_sqnorms is not None:
                    wg = w.to(pass_.group_sqnorms.dtype)[:, None]
                    pass_.group_sqnorms = pass_.group_sqnorms * wg
            pass_.uses.clear()
        # (the passes of backwards that reached the parameters: not a saliency probe's; of
        # them, those that wrote .grad: not torch.autograd.grad's, which are no part of .grad)
        trained = set().union(*(p.param_tasks for p in done))
        wrote = written_tasks(done)
        for pass_ in done:
            sb = pass_.subbatches
            if sb is not None and pass_.received and sum(sb.sizes) != pass_.batch_size:
                # never an estimate from sub-batches that leave examples out (or count rows
                # that are not examples): the sub-batch norms assume a partition of the pass
                raise UnsupportedModuleError(
                    f"the pass's {pass_.batch_size} examples were split into sub-batches of "
                    f"{sum(sb.sizes)} (the example count changed after the split); this is a "
                    "noisescale bug — please report it with the model. Meanwhile measure every "
                    "example: GradientNoiseTracker(model, per_example_fraction=1.0)"
                )
            if takes_second_order(pass_, wrote):
                raise NoiseScaleInputError(SECOND_ORDER)
            if pass_.repeated_backward and pass_.grad_only and not pass_.wrote and wrote:
                # (torch.autograd.grad alone ran through it, twice — two loss terms' gradients
                # taken apart to weigh them, PINNs' learning-rate annealing —, beside a backward
                # that wrote .grad: no part of the step, as above; refused as two backwards
                # until 2026-12-06, a hunt)
                continue
            if pass_.repeated_backward and pass_.grad_only and pass_.wrote:
                # (a hunt, 2026-12-06: a gradient only read — the cosine between two tasks'
                # gradients — was refused as a sum of two backwards, paused() unmentioned)
                raise NoiseScaleInputError(
                    "put a gradient that is only read or logged under `with tracker.paused():` "
                    "(torch.autograd.grad(..., retain_graph=True) ran through the step's forward "
                    "beside its backward — a gradient norm, the cosine between two tasks' "
                    "gradients —, and noisescale cannot tell its part of the examples' norms "
                    "from the backward's); where it is part of the update, add the losses and "
                    "call backward once per forward. A custom autograd.Function whose backward "
                    "calls torch.autograd.grad through the model's layers (a neural ODE's "
                    "adjoint method, torchdiffeq's odeint_adjoint) cannot be measured, "
                    "per_example=False included: backpropagate through the solver's steps "
                    "(torchdiffeq's odeint) instead"
                )
            if pass_.repeated_backward:
                raise NoiseScaleInputError(
                    "two backward passes ran through one forward (retain_graph=True), so the "
                    "gradient norms of their sum are unknown; add the losses and call backward "
                    "once per forward (passes that are not the step's — a measurement such as "
                    "noisescale.hessian.measure_b_noise, whose Hessian-vector products run "
                    "several backward passes through one forward — go under "
                    "`with tracker.paused():`)"
                    + (
                        ". (This step also ran checkpoint(use_reentrant=True), whose forward "
                        "recomputed in a backward noisescale takes for the step's last forward's: "
                        "with several forwards before their backwards, that reads as this — use "
                        "use_reentrant=False, or one backward after each forward)"
                        if any(p.reentrant for p in done)
                        else ""
                    )
                )
        compiled_step = any(p.compiled or p.compiled_call for p in done)
        self._seen_compiled = self._seen_compiled or compiled_step
        # (by value on the audits' steps, in every mode — they read values back anyway —, the
        # passes a backward that wrote .grad ran through; the same tensor, those of the step's
        # training backwards: where one wrote .grad, not a forward whose gradients only
        # torch.autograd.grad took — SAM's ascent on the batch itself, refused as the same
        # examples twice until 2026-12-06, a hunt)
        audited = self._audit_due or any(p.audit is not None for p in done)
        _refuse_same_input_twice(
            [p for p in done if p.tasks & (wrote or trained) and not p.idle],
            by_value=[p for p in done if p.tasks & wrote and not p.idle] if audited else (),
        )
        _refuse_fed_by_its_own_output([p for p in done if p.tasks & trained])
        self._take_unread_picks([p for p in done if p.tasks & trained and not p.idle])
        opened = len(done)
        for p in done:
            if p.batch_size == 1:
                # (the loss watch follows a one-example pass for the groups it joins — their
                # coupling and their plain sum —; how its own loss weighs its one example, a
                # mean over its tokens or its class weight, is its own and weighs nothing
                # against another's: as before 2026-12-06, when such passes went unwatched)
                p.counted_mean = p.counted_inside = p.class_weighted = None
                p.loss_kind_counted = None
        done = _merge_shared_backward(done)
        # several forwards in one backward: their positions (counted in forwards) and the
        # step's backwards (counted in passes that received gradients) are not the same count
        merged_any = len(done) < opened
        done = [p for p in done if p.received]
        if done and all(p.idle for p in done):
            return done  # an unmeasured step: the measured steps' schedules stay as they were
        self.steps_collected += 1
        self._audit_due = _audit_scheduled(self.steps_collected + 1)  # the next step's number
        if done:
            self.last_step_examples = sum(p.batch_size for p in done)
            separate = len(done) == reached and not compiled_step and not merged_any
            self.last_step_passes = reached if self.subbatches and separate else 0
            # which pass of the next step is measured: a subset's, or (sub-batch mode) the one
            # micro-batch that is split
            self.subset_position = 0
            if reached > 1 and (self.per_example_fraction < 1.0 or self.last_step_passes > 1):
                self.subset_position = self._draw_subset_position(reached)
        if self.per_example:
            taught: str | None = None  # what an earlier pass of this step taught the engine
            for pass_ in done:
                known = self._learned_state()
                try:
                    self._settle(pass_, learn)
                except UnsupportedModuleError as err:
                    # whether deferred or refused (and caught by a caller who goes on): every
                    # micro-batch of the next step is measured and audited, the deferred one's
                    # position included (in sub-batch mode one a step is), until a step passes
                    self._audit_due = True
                    self.last_step_passes, self.subset_position = 0, 0
                    if taught is not None:
                        # The step's earlier micro-batch taught the engine (a direct use, a
                        # layer for the fallback), from the next step on: this one ran before
                        # that and may meet the same thing. Left out with it, and the next
                        # step is audited (whatever its schedule), so that a cause the lesson
                        # does not explain is refused there, before any step is measured.
                        self._withhold(
                            pass_,
                            f"an earlier micro-batch of this step taught the engine ({taught}); "
                            "this one ran before that and is left out with it (the next step "
                            f"is audited; what this one met: {err})",
                        )
                        continue
                    if pass_.sticky is not None:  # (refused: the structure stays refused)
                        self._refused_structures[pass_.sticky[0]] = pass_.sticky[1]
                    # (an audit that compared rows found them mixed: it replays through
                    # reentrant checkpoints since 2026-12-05, and its cause stands — LoRA
                    # models with examples mixed inside a checkpointed block were told the
                    # checkpoint was the cause, a hunt)
                    if _reentrant_checkpointing(self.model) and not _AUDIT_FAILED.search(str(err)):
                        raise UnsupportedModuleError(
                            f"{_REENTRANT_LEAD}. (What the engine's check met there, for "
                            "reference — a consequence of the reentrant recomputation; the "
                            f"other causes its words list do not apply: {err})"
                        ) from err
                    if not pass_.reentrant:
                        raise
                    # A forward ran inside the backward, with no checkpointing configured:
                    # a custom Function re-running its forward in its backward (Reformer's
                    # reversible layers) as likely as checkpoint(use_reentrant=True).
                    raise UnsupportedModuleError(
                        f"{err}. (This step also ran a forward inside a backward — a custom "
                        "torch.autograd.Function that re-runs its forward in its backward, as "
                        "reversible layers do, or activation checkpointing with "
                        "use_reentrant=True — which the engine may not see whole: if what is "
                        "named above does not explain it, that does; checkpoint with "
                        "use_reentrant=False, or use per_example=False)"
                    ) from err
                if (
                    learn
                    and taught is None
                    and pass_.withheld is not None
                    and self._learned_state() != known
                ):
                    taught = pass_.withheld
        # an audited step runs eagerly, in compiled models too
        self._eager_steps.want(
            self._compiled_eagerly
            or (self.per_example and self.auditing_enabled and self._audit_due)
        )
        self._prepare_compile()
        return done


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


def _without_cross_terms(uses: list[Factor]) -> bool:
    """Whether one of a parameter's uses in a pass came from sub-batch products that kept no
    sub-batch gradients: the norm of the uses' sum cannot be formed (its cross terms)."""
    return any(isinstance(f, NormFactor) and f.grads is None for f in uses)


# -- helpers ----------------------------------------------------------------------------------


def _has_fsdp2(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())
