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
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math
import operator
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence
from torch.utils.hooks import RemovableHandle

from noisescale.errors import NoiseScaleInputError, UnsupportedModuleError
from noisescale.module_hooks import InertWhenCopied
from noisescale.per_example import audit as audit_mod
from noisescale.per_example import compiled, fallback, norms
from noisescale.per_example import subbatch as subbatch_mod
from noisescale.per_example.factors import (
    DenseFactor,
    EmbeddingFactor,
    Factor,
    LinearFactor,
    MergedSubbatches,
    NormFactor,
    SliceFactor,
    Subbatches,
    _acc,
    _flat_rows,
    group_factor,
    sqnorm,
    sqnorm_of_sum,
    weighted_sqnorm,
)
from noisescale.per_example.loss_watch import LossWatch
from noisescale.per_example.registry import LayerRule, rule_for, save_first_input
from noisescale.per_example.shared import (
    Meeting,
    Origin,
    SharedTensor,
    Source,
    per_example_reduce,
    view_relation,
    wrap,
)

__all__ = ["PassNorms", "PerExampleNorms"]

LOSS_REDUCTIONS = ("mean", "sum")

# Built-in containers whose descendants see time-major activations when batch_first=False.
_TIME_MAJOR = (
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.Transformer,
)


def _time_major(module: nn.Module) -> bool:
    if isinstance(module, nn.MultiheadAttention | nn.RNNBase):
        return not module.batch_first
    if isinstance(module, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer):
        return not module.self_attn.batch_first
    if isinstance(module, nn.TransformerEncoder | nn.TransformerDecoder):
        return bool(module.layers) and not module.layers[0].self_attn.batch_first
    if isinstance(module, nn.Transformer):
        return not module.batch_first
    return False


_UNKNOWN = object()  # (PerExampleNorms._begin: not asked yet)


@dataclass(eq=False)
class _Call:
    """A layer call (or a shared call) whose rule runs in the backward pass."""

    module: nn.Module
    rule: LayerRule
    label: str
    params: dict[str, nn.Parameter]
    dim: int  # where the examples are in its input and outputs (layout of the rule's caller)
    box: list[Any] = field(default_factory=list)  # the saved input, emptied by the backward
    out_dims: Sequence[int] = (0,)
    size: int = 0  # examples in the call (a shared call: the leading size of its input)
    why: str = ""  # why a shared call was treated as shared
    picked: str = ""  # why, when its input's rows (or an upstream shared call's) were picked
    flat: int = 0  # rows per example of an input with the examples flattened in (0: not)


def new_parameters_message(names: Sequence[str]) -> str:
    """The refusal of trainable parameters the tracker was not built on."""
    return (
        f"parameters {list(names[:6])}{'…' if len(names) > 6 else ''} were added to the model or "
        "replaced by new Parameter objects after the tracker was created (a layer re-created or "
        "added, resize_token_embeddings(), peft adapters, load_state_dict(..., assign=True), "
        "model.to() with torch.__future__.set_overwrite_module_params_on_conversion(True), "
        "FSDP2's fully_shard()): the tracker would leave them out of every norm. Create the "
        "tracker after the model is built, moved, loaded and wrapped"
    )


def submodule_called_message(lead: str, model: nn.Module, label: str) -> str:
    """The refusal of a step in which a layer ran with gradients enabled outside a forward of
    the measured ``model`` (:attr:`PerExampleNorms.unopened`); ``lead`` names the fix."""
    return (
        f"{lead} ({type(model).__name__}), or give it the module you call: layer '{label}' "
        "ran with gradients enabled outside a forward of that model — a submodule called by "
        "itself, model.model(...) with a loss of your own on its output, as fused "
        "linear-cross-entropy losses and custom heads do, or model.forward(...) called "
        "directly, which skips the model's hooks — and noisescale opens each pass at the "
        "model's forward. Wrap the submodule and the loss in one module and measure that, or "
        "measure the submodule (its parameters only)"
    )


def _accumulator(p: Tensor) -> Any:
    """The AccumulateGrad node of a leaf tensor that requires grad."""
    with torch.enable_grad():
        return p.view_as(p).grad_fn.next_functions[0][0]


@dataclass(eq=False)
class _WeightJob:
    """A weight whose gradient the engine computes as sub-batch products (one layer call)."""

    pass_: Any
    module: nn.Module
    weight: nn.Parameter
    kind: str  # "linear", "conv1d" (Hugging Face Conv1D, weight [in, out]) or "conv"
    box: list[Any]
    engine: Any = None
    bias: nn.Parameter | None = None  # the layer's bias, when its gradient is taken over too
    # the product layers that read this call's input tensor itself in the forward (eager only)
    readers: subbatch_mod.Readers | None = None

    def weight_grad(self, x: Tensor, d: Tensor) -> tuple[Tensor | None, Tensor | None]:
        return self.engine._weight_backward(self, x, d)


@dataclass(eq=False)
class _Slot:
    """Per-example gradients of one shared source, summed over the meetings that reached it."""

    source: Source
    expected: int = 0
    arrived: int = 0
    total: Tensor | None = None
    pass_: Any = None


@dataclass(eq=False)
class _Record:
    """What one event of a compiled graph recorded (``PerExampleNorms.on_forward_event``)."""

    kind: str  # "call", "shared", "param", "meet" or "root"
    pass_: Any
    call: _Call | None = None
    job: _WeightJob | None = None
    meeting: Meeting | None = None
    source: Source | None = None  # a shared call's, for its meetings


@dataclass
class PassNorms:
    """Per-example norms of one forward/backward pass (one micro-batch).

    Attributes:
        batch_size: Examples in the pass (dim 0 of the model's input).
        raw_sqnorms: Σ over parameters of |∂(backpropagated loss)/∂θ restricted to example i|²,
            before undoing the loss reduction, for the examples ``rows``; shape [batch_size], or
            [len(rows)] for a subset, each times its ``row_weights``. ``None`` when per-example
            norms were not computed (or withheld: see ``withheld``).
        grad_sqnorm: |∂(backpropagated loss)/∂θ|² of the whole pass (the micro-batch gradient),
            a 0-d tensor; ``None`` if no parameter received a gradient.
        group_sqnorms: ``raw_sqnorms`` split by parameter group, shape [batch_size, groups].
        group_grad_sqnorm: ``grad_sqnorm`` split by parameter group, shape [groups].
        weights: P² per parameter id when the norms are preconditioned, |P ⊙ g|² = Σ P²g²
            (the same weights for every norm of the pass); ``None`` for plain norms.
        rows: The examples (indices into the pass's batch) whose norms were computed, drawn
            with replacement with probabilities that favour large gradients; ``None`` for all.
        row_weights: The importance weights 1/(n·q_i) of ``rows``, already applied to
            ``raw_sqnorms`` and ``group_sqnorms`` when the pass is collected.
        skipped: With a subset fraction, one pass of a step computes per-example norms; the
            others (further accumulation micro-batches) have ``raw_sqnorms`` ``None`` and this set.
        audited: Every example was measured and checked against autograd (see the module doc).
        withheld: Why this pass's per-example norms were withheld (an audit that taught the
            engine something; the step's other sources still count), or ``None``.
        subbatches: In sub-batch mode, how the pass's examples were split; ``raw_sqnorms`` then
            holds one squared norm per sub-batch (of sizes ``subbatches.sizes``).
    """

    batch_size: int
    raw_sqnorms: Tensor | None = None
    grad_sqnorm: Tensor | None = None
    group_sqnorms: Tensor | None = None
    group_grad_sqnorm: Tensor | None = None
    weights: dict[int, Tensor] | None = None
    rows: Tensor | None = None
    row_weights: Tensor | None = None
    skipped: bool = False
    # counted, not measured: the tracker's unmeasured steps (measure_every), which run plain
    idle: bool = False
    audited: bool = False
    withheld: str | None = None
    # bookkeeping while the pass is open
    uses: dict[int, int] = field(default_factory=dict)
    pending: dict[int, list[Factor]] = field(default_factory=dict)
    covered: set[int] = field(default_factory=set)
    received: set[int] = field(default_factory=set)
    tasks: set[int] = field(default_factory=set)  # autograd graph tasks that ran through the pass
    param_tasks: set[int] = field(default_factory=set)  # tasks that computed parameter gradients
    # factors from torch.autograd.grad() calls, kept until it is known whether they reached the
    # parameters (autograd cannot tell a hook that during autograd.grad)
    deferred: dict[int, list[tuple[nn.Parameter, Factor]]] = field(default_factory=dict)
    second_order: bool = False  # a backward with create_graph=True ran through the pass
    lazy: set[int] = field(default_factory=set)  # gradient norms still to read from .grad
    measured: bool = False  # with a subset: this pass's per-example norms are computed
    products: bool = False  # sub-batch mode: some weight's gradient came from sub-batch products
    # product layers' inputs in the forward, by id: (a weak reference to the tensor — not to
    # keep alive what a saved-tensor hook offloads —, its version, its readers)
    read_by: dict[int, tuple[Any, int, subbatch_mod.Readers]] = field(
        default_factory=dict, repr=False
    )
    unsplit: bool = False  # sub-batch mode: measured per example, as no weight used products
    repeated_backward: bool = False  # a parameter received two gradients in the pass
    # a backward through the pass wrote .grad (backward()); torch.autograd.grad took gradients
    # of parameters through it (wrote nothing). (FSDP2 writes .grad outside: neither is set.)
    wrote: bool = False
    grad_only: bool = False
    # the model's outputs' autograd nodes as (id, sequence number) — not the nodes, which
    # would keep a graph no backward reaches alive; a dead node's id reused by a new node
    # comes with a later sequence number —, for a later forward of the step fed by them; the
    # earlier pass whose outputs fed this one's input
    fed_marks: set[tuple[int, int]] | None = None
    fed_by: PassNorms | None = None
    # Σ|.grad|² found before the step's first backward wrote it (audited passes: stale gradients)
    stale_sqnorm: Tensor | None = None
    slots: dict[int, _Slot] = field(default_factory=dict)  # shared sources
    signature: list[tuple] = field(default_factory=list)  # structure, for the audit
    nodes_at: int | None = None  # the thread's autograd sequence number at the forward
    nodes: int | None = None  # autograd nodes its (eager) forward made
    audit: audit_mod.PassAudit | None = None
    unsupported: list[tuple[Any, str]] = field(default_factory=list)  # (scope, op)
    # meetings that nothing can prove to be by example (shared.py's _rows_unproven, and any in
    # the loss only through tensors not computed from the model's outputs): (origin, op, shared
    # shape, other shape, kind "rows" | "loss")
    ambiguous: list[tuple[Any, str, tuple, tuple, str]] = field(default_factory=list)
    returned: bool = False  # the model's forward has returned (what follows is the loss)
    # how the loss combined the examples, when it did (loss_watch.py): refused in _settle
    coupled: str | None = None
    loss_unfollowed: str | None = None  # why its loss could not be followed (withheld)
    # a device bool: the loss averaged over what it counts, not over the examples — a negative
    # log-likelihood with ignore_index targets or class weights, or a sum divided by a tensor
    # other than their number (loss_watch.py); per_example_sqnorms refuses it under "mean"
    counted_mean: Any = None
    # each parameter's (.grad, version) when the pass's backward had finished (changed_grads)
    grad_marks: list[tuple[Any, int] | None] | None = None
    # on the steps audits fall on: each parameter's |.grad|² then too (changed_grads: what no
    # version counter sees)
    grad_prints: list[Tensor | None] | None = None
    output_nodes: dict[int, Any] = field(default_factory=dict)  # the outputs' autograd nodes
    meetings_added: int = 0
    buffer_storages: set[int] | None = None  # the model's buffers' storages (_is_buffer)
    # layer inputs picked by several index tensors on an accelerator, where the indices are
    # not read when the layer runs: (layer, how, a device flag "none of them is the examples in
    # order"), read by the tracker with the step's statistics (_selected_rows)
    unread_picks: list[tuple[str, str, Tensor]] = field(default_factory=list)
    shared_calls: list[_Call] = field(default_factory=list)
    # layers called on the examples flattened together with positions (LayerRule.flattened)
    flat_calls: set[nn.Module] = field(default_factory=set)
    amp: bool = False  # the forward ran under autocast (looser audit tolerance)
    # the model's first tensor argument (a layer reading it may set the example count:
    # EmbeddingBag's offsets)
    n_source: Tensor | None = None
    # the input the example count was read from, and its version counter at the forward (None:
    # an inference tensor, which has none), for the same input seen twice in a step
    examples: Tensor | None = None
    examples_version: int | None = None
    forward_skipped: bool = False  # skipped when its forward ran (the backward may skip it later)
    aliased: set[int] = field(default_factory=set)  # parameters handed out as shared aliases
    inputs: tuple | None = None  # the model's (args, kwargs), for the audit's permutation check
    subbatches: Subbatches | MergedSubbatches | None = None
    broken: str | None = None  # a weight measured by sub-batch products was used twice
    reentrant: bool = False  # checkpoint(use_reentrant=True) recomputed layers in its backward
    # how the pass's loss weighs its examples (tokens), attached by noisescale.tokens
    units: Any = None
    units_error: str | None = None
    # the gradient that reached the loss a Hugging Face model computed itself and returned, in
    # the backward (noisescale.tokens): the multiplier the step put on that loss (an
    # accumulation divisor or none, a loss scale, the Trainer's own scaling); and its hook
    loss_grad: Tensor | None = None
    loss_grad_hook: Any = None
    # the loss was passed to watch_loss (it is the whole micro-batch loss), not only seen
    # returned by a model (it may be one term of a larger loss)
    loss_grad_explicit: bool = False
    # tokens per example counted from the labels= of a model that computed its loss itself (the
    # case of ``units_error``), [N] float64
    label_counts: Tensor | None = None
    # (gradient edge, shape) of the logits a Hugging Face loss_function was computed from
    # (noisescale.tokens): a root of the audit's replay when the model's outputs are not on the
    # loss's path (a wrapper that returns only the loss)
    loss_inputs: list = field(default_factory=list)
    # the hooks the pass put on its graph (removed with release())
    handles: list = field(default_factory=list)
    compiled: bool = False  # its forward ran inside a compiled graph (torch.compile)
    unaudited: bool = False  # compiled, and due for an audit it could not have there
    compiled_unsupported: str | None = None  # an operation the traced hooks do not follow
    compiled_blocked: bool = False  # compiled, in a model the traced hooks cannot follow
    compiled_call: bool = False  # the model was called through torch.compile

    def release(self) -> None:
        """Drop what ties the pass to its step's autograd graph and inputs (the step is over):
        the graph's hooks hold the pass, so a pass holding the graph's nodes — or tensors
        computed in it — would keep both alive for good. What the step measured stays."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.output_nodes = {}
        self.loss_inputs = []
        self.audit = None
        self.inputs = self.examples = self.n_source = None
        self.fed_by, self.fed_marks = None, None
        self.grad_marks = self.grad_prints = None
        self.shared_calls = []
        self.slots = {}
        self.pending = {}
        self.deferred = {}
        self.read_by = {}
        self.unread_picks = []
        self.unsupported = []
        self.ambiguous = []
        self.flat_calls = set()


class _ModuleHook(InertWhenCopied):
    """The engine's hook on one module (:meth:`PerExampleNorms._hook`): ``eager``, or while
    Dynamo traces it ``traced``. Deep-copied (``copy.deepcopy``: ``AveragedModel``, an EMA, a
    twin) or pickled (``torch.save(model)``) it is inert: the copy is not the model measured
    (:mod:`noisescale.module_hooks`). ``owner``, the layer it was put on: a shallow
    ``copy.copy`` of that layer shares the hook but is a module the engine has no rule for, and
    there the hook does nothing (the model's own hooks have none: a shallow copy of the whole
    model shares its parameters and is the measured model). Before 2026-12-04 the hook was a
    closure: a copy's forward with gradients on failed with a ``KeyError`` inside the engine,
    and ``torch.save(model)`` could not pickle it."""

    def __init__(
        self,
        engine: PerExampleNorms,
        eager: Callable,
        traced: Callable | None,
        owner: nn.Module | None,
    ) -> None:
        self.engine = engine
        self.eager = eager
        self.traced = traced
        self.owner = owner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        engine = self.engine
        if torch.compiler.is_compiling():
            if self.traced is not None and engine.compile_blocker is None:
                return self.traced(*args, **kwargs)
            compiled.emit_forward(engine._key, "blocked", 0, [], [])
            return None
        if self.owner is not None and args[0] is not self.owner:
            return None  # a copy of the model
        engine._inside_compiled_call = compiled.in_compiled_call()
        return self.eager(*args, **kwargs)


class PerExampleNorms:
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
    ):
        if not 0.0 < per_example_fraction <= 1.0:
            raise NoiseScaleInputError(
                f"per_example_fraction must be in (0, 1], got {per_example_fraction}"
            )
        self.model = model
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
        self._handles: list[RemovableHandle] = []
        # hooks of others on the parameters' gradients (_guard_param_hooks): our hook's handle,
        # the sentinels around theirs, what the first sentinel saw, the parameters it changed
        self._param_hook: dict[int, RemovableHandle] = {}
        self._sentinels: dict[int, tuple[RemovableHandle, RemovableHandle]] = {}
        self._post_sentinels: dict[int, tuple[RemovableHandle, RemovableHandle]] = {}
        self._hook_in: dict[tuple[int, bool], tuple[Tensor | None, int]] = {}
        self._hook_changed: list[tuple[int, bool]] = []  # (parameter, after accumulation)
        self._between: str | None = None  # _check_between
        # each parameter's .grad (weakref, version) when the last step's last backward ended:
        # a step's first gradient of a parameter finding .grad still that tensor at that
        # version means nobody zeroed it since (the parameter hook; names it in _unzeroed)
        self._step_marks: dict[int, tuple[Any, int]] = {}
        self._unzeroed: list[tuple[str, Tensor]] = []  # (name, .grad not all zeros)
        self.unzeroed: str | None = None  # the last collected step's (collect)
        # the last collected step's PassNorms.unread_picks, every pass's (collect)
        self.unread_picks: list[tuple[str, str, Tensor]] = []
        # a layer that ran with gradients enabled while no pass of the model was open (a
        # submodule called by itself, model.model(...)): the step's first, and the last
        # collected step's (collect), for the tracker to name when it finds no pass
        self._unopened: str | None = None
        self.unopened: str | None = None
        self._unopened_params: list[str] = []  # (the names of its parameters)
        self._outside_params: set[str] = set()  # the collected step's _unopened_params
        self._recomputing = False
        self._paused = False
        # follows the loss of audited passes from the model's outputs to the backward
        self._loss_watch = LossWatch()
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
        self._mirrored: list[nn.Module] = []  # layers whose checkpoint function is wrapped
        # each scope's modules that may checkpoint their forward (_mirror_in_recompute)
        self._checkpointing_layers: dict[nn.Module, list[nn.Module]] = {}
        self._fallback: set[nn.Module] = set()  # owner modules measured by torch.func
        self._learned_shared: set[nn.Module] = set()  # layers whose input proved to be shared
        #: lookups into parameters used directly that the audit found to be by positions
        #: (keys from :func:`~noisescale.per_example.shared._lookup_key`)
        self.learned_shared_lookups: set[tuple] = set()
        self._context: list[int] = []  # example dim inside time-major containers
        self._swapped: dict[tuple[int, str], list[Tensor]] = {}
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
        self._task_accumulates: dict[int, bool] = {}
        self._grad_only_tasks: set[int] = set()  # tasks of torch.autograd.grad() calls
        self._acc_node: dict[int, Any] = {}
        self._shapes: dict[int, torch.Size] = {}  # (each held node's parameter's)
        # layers without a trainable parameter whose rule checks their form at each pass
        self._mode_checks: list[tuple[nn.Module, Callable[[nn.Module, str], None], str]] = []
        self._fallback_rng: dict[nn.Module, dict[str, Tensor]] = {}
        self.steps_collected = 0
        self._audit_due = True
        self._marking: tuple[int | None, list[PassNorms]] = (None, [])  # _mark_backward
        self._audited_signatures: set[tuple] = set()
        self._audited_nodes: set[tuple] = set()  # (signature, autograd nodes) audited
        self.audit_log: list[str] = []  # what audits found and taught (for messages and tests)
        # torch.compile (noisescale.per_example.compiled): the key that names this engine in a
        # compiled graph, the modules by position (a graph names a layer by its index), what the
        # graph's events recorded (by token), and the tensor whose leading size is the batch
        self._key = compiled.register(self)
        self._modules = list(model.modules())
        self._site = {m: i for i, m in enumerate(self._modules)}
        self._params: list[nn.Parameter] = []  # trainable parameters by position, and back
        self._param_index: dict[int, int] = {}
        self._records: dict[int, _Record] = {}
        self._next_token = 1
        self._trace_batch: Tensor | None = None
        self._returned_loss = False  # whether the last forward of the model returned .loss
        self._eager_hooks: list[Callable] = []  # what each module hook runs without compile
        self._compile_prepared = False  # _prepare_compile() has run (Dynamo is imported)
        self._inside_compiled_call = False  # the running eager hook runs inside a compiled call
        self._eager_steps = compiled.EagerSteps(self._key)
        # why the traced hooks cannot follow the model (then compiled code runs eagerly while
        # the engine measures: _compiled_eagerly); _compile_learned: what a compiled pass revealed
        self.compile_blocker: str | None = None
        self._compile_learned: str | None = None
        self._compiled_eagerly = False
        # A step of the model ran compiled: from then on the eager hooks take the traced hooks'
        # decisions where they differ (a tied weight's products), so that an audited eager step
        # sees the structure the compiled steps have (else every compiled step would wait for
        # another audit)
        self._seen_compiled = False
        self._refuse_modules(model)
        self._model_dim = 1 if _time_major(model) else 0
        # FSDP2 reshards parameters in hooks of the backward: a replayed backward would run them
        self._replay_allowed = not _has_fsdp2(model)
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
    def _refuse_modules(model: nn.Module) -> None:
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
        for mname, module in model.named_modules():
            if getattr(module, "sparse", False) and isinstance(
                module, nn.Embedding | nn.EmbeddingBag
            ):
                raise UnsupportedModuleError(
                    f"module '{mname}' ({type(module).__name__}) has sparse=True; its sparse "
                    "gradients are not supported: construct it with sparse=False"
                )
        if isinstance(model, nn.DataParallel):
            raise UnsupportedModuleError(
                "nn.DataParallel replicates the model into threads that the hooks cannot follow; "
                "use DistributedDataParallel (supported) or track the inner module on one device"
            )

    def _build_plan(self, allow_fallback: bool) -> None:
        for module in self.model.modules():
            label = self._labels[module]
            # a parametrized weight (weight_norm, spectral_norm, orthogonal, …) is computed by
            # its parametrization from the original tensors each time it is read: the layer's
            # rule (which takes .weight for a parameter) does not apply; its parameters — the
            # originals, on module.parametrizations.<name> — are followed through the
            # parametrization's forward to where they meet the batch (wav2vec2's positional
            # convolution under weight_norm)
            rule = None if parametrize.is_parametrized(module) else rule_for(module)
            own = {
                n: p
                for n, p in module._parameters.items()
                if p is not None and p.requires_grad and id(p) in self._param
            }
            if rule is None:
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    # a BatchNorm subclass with its own forward (timm's BatchNormAct2d): batch
                    # statistics in training mode, whatever else the forward adds
                    if own:
                        norms.check(module, label)
                    else:
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
                    f"layer rule does not cover (e.g. the old nn.utils.weight_norm's weight_g and "
                    "weight_v, computed into .weight before each call); use "
                    "torch.nn.utils.parametrizations, register a rule for the module "
                    "(noisescale.register_layer), or per_example=False"
                )
            if rule.check is not None:
                rule.check(module, label)
                if not covered:
                    # a frozen layer whose form can still couple the examples (a BatchNorm
                    # frozen by eval(), which model.train() puts back in training mode): no
                    # hook of its own runs its check, each pass does (_open_pass)
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

    def _hook(
        self, eager: Callable, traced: Callable | None = None, owner: nn.Module | None = None
    ) -> Callable:
        """A module hook: ``eager``, or while Dynamo traces it ``traced`` — the form whose work
        runs inside the compiled graph (:mod:`~noisescale.per_example.compiled`). A hook
        without a traced form, or any hook of a model the traced hooks cannot follow
        (:attr:`compile_blocker`), only reports that the pass ran compiled: the pass is
        withheld and compiled code then runs eagerly while the engine measures.

        ``owner``: the module the hook is put on; in a copy of the model the hook does nothing
        (:class:`_ModuleHook`)."""

        self._eager_hooks.append(eager)
        if self._compile_prepared:
            compiled.skip_frames(eager, recursive=True)

        return _ModuleHook(self, eager, traced, owner)

    def _install(self) -> None:
        self._handles.append(
            self.model.register_forward_pre_hook(
                self._hook(self._on_model_forward, self._traced_model_forward),
                with_kwargs=True,
            )
        )
        self._handles.append(
            self.model.register_forward_hook(
                self._hook(self._on_model_output, self._traced_model_output)
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
                        self._hook(lambda m, a, o: self._pop_context(), owner=module),
                        always_call=True,
                    )
                )
        for module in self._calls:
            if self.subbatches and _by_products(module, self._calls[module][0]):
                self._handles.append(
                    module.register_forward_pre_hook(
                        self._hook(self._on_weight_enter, self._traced_weight_enter, owner=module)
                    )
                )
                self._handles.append(
                    module.register_forward_hook(
                        self._hook(self._on_weight_exit, self._traced_weight_exit, owner=module),
                        prepend=True,
                        always_call=True,
                    )
                )
            self._handles.append(
                module.register_forward_hook(
                    self._hook(self._on_forward, self._traced_forward, owner=module),
                    with_kwargs=True,
                )
            )
        for module in self._scopes:
            self._install_scope(module)
        self._prepare_compile()
        for pid, p in self._param.items():
            self._param_hook[pid] = p.register_hook(self._make_param_hook(pid))
            self._handles.append(self._param_hook[pid])

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
            )
        )
        self._handles.append(
            module.register_forward_hook(
                self._hook(self._on_scope_exit, self._traced_scope_exit, owner=module),
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
            holder.register_forward_hook(self._hook(leave, owner=holder), always_call=True)
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
        for (_, _), stack in list(self._swapped.items()):
            stack.clear()
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
        return not (self._paused or replaying or self._recomputing)

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
                pass_.reentrant = True
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

    # -- forward hooks ------------------------------------------------------------------------

    def _active(self) -> bool:
        # a forward that checkpoint recomputes inside the audit's replay must do what the
        # original forward did to the tensors, like any recomputation (_hook_pass)
        replaying = self._replaying and not _checkpoint_recompute()
        return (
            not self._recomputing
            and not self._paused
            and not replaying
            and not _inside_functorch()
            and torch.is_grad_enabled()
            and bool(self.passes)
            and not self.passes[-1].idle
        )

    def _on_model_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._loss_watch.pause()  # (the model's own operations are the layer hooks' to follow)
        if (
            self._recomputing
            or self._paused
            or self._replaying
            or not torch.is_grad_enabled()
            or _inside_functorch()
        ):
            return
        # what a compiled forward's traced hooks read the batch's size from (its shape only)
        self._trace_batch = _batch_tensor(args, kwargs, self._model_dim)
        self._open_pass(args, kwargs)
        if self.passes and self._inside_compiled_call:
            self.passes[-1].compiled_call = True

    def _check_tied_rows(self, n: int) -> None:
        """Under ``paired_rows`` or ``grouped_rows`` every forward — each accumulation
        micro-batch, measured or not, one row or more — must hold whole pairs or groups: one
        split across micro-batches ties them together, and the micro-batch norms would take
        them for independent draws (a review found GRPO with one completion a micro-batch read
        B_simple 0.40x its truth, its interval excluding it)."""
        if self.pairs is None or not self.per_example or not n:
            return
        if isinstance(self.pairs, int) and n % self.pairs:
            g = self.pairs
            raise NoiseScaleInputError(
                f"grouped_rows={g} keeps blocks of {g} consecutive rows together, but this "
                f"forward had N = {n} rows, not a multiple of {g}; feed whole groups in every "
                "forward, each accumulation micro-batch too (every prompt with all its "
                "completions; drop_last=True in the loader), or drop grouped_rows if the rows "
                "are not grouped"
            )
        if not isinstance(self.pairs, int) and n % 2:
            raise NoiseScaleInputError(
                f"paired_rows={self.pairs!r} pairs the rows of a batch in two (row i "
                f"with row {'N − 1 − i' if self.pairs == 'flip' else 'i + N/2'}), but this "
                f"forward had N = {n} rows, an odd number; feed even batches in every forward, "
                "each accumulation micro-batch too (timm's Mixup requires them, drop_last=True "
                "in the loader), or drop paired_rows if the rows are not paired"
            )

    def _check_shapes(self) -> None:
        """Refuse a parameter whose data was given another shape since the tracker was built
        (``resize_token_embeddings()`` assigns the new table to the old Parameter's ``.data``):
        the AccumulateGrad node the engine holds for it expects the old shape, and autograd
        would fail in the backward with an error that does not say why."""
        changed = [pid for pid, shape in self._shapes.items() if self._param[pid].shape != shape]
        if changed:
            names = [self._param_name[pid] for pid in changed]
            raise NoiseScaleInputError(
                f"parameters {names[:6]}{'…' if len(names) > 6 else ''} changed shape after the "
                "tracker was created (resize_token_embeddings() assigns the resized table to "
                "the same Parameter): the tracker was built on the old shapes. Create the "
                "tracker after the model is resized (tracker.remove() first; what it measured "
                "stays in its history)"
            )

    def _open_pass(self, args: tuple, kwargs: dict) -> None:
        if torch._C._current_graph_task_id() != -1:
            # a forward re-run during backward (activation checkpointing) belongs to its pass
            return
        # Every forward opens a pass; passes that no backward reaches (a validation forward
        # with grad enabled) are dropped, and passes that one backward ran through together
        # (two forwards, one loss) are merged, when the step collects them.
        self._check_shapes()
        n = self._batch_size_of_model(args, kwargs)
        self._check_tied_rows(n)
        fed_by = _fed_by(self.passes, args, kwargs)
        if self.idle:
            self._context.clear()
            self.passes.append(PassNorms(batch_size=n, skipped=True, idle=True, fed_by=fed_by))
            return
        self._guard_param_hooks()
        for module, check, label in self._mode_checks:
            check(module, label)
        weights = self.precondition() if self.precondition is not None else None
        # a forward after the step's measured backward (the next accumulation micro-batch)
        # cannot be measured: no layer hooks for it
        skipped = self._measured_found and self.per_example_fraction < 1.0
        if self.subbatches and self.last_step_passes > 1:
            # Sub-batch mode with accumulation: one micro-batch per step, at a random position
            # among the last step's, is split and measured; the others keep their micro-batch
            # norms only (each micro-batch is already a group whose norm the micro-batch source
            # pairs with the step's gradient). The position is drawn before the step, whatever
            # its data, so every sub-batch norm stays unbiased; measuring every micro-batch
            # would cost the sub-batch overhead m times for k·m groups where m + k do nearly as
            # well. Decided here, at the forward, so that skipped micro-batches run plain.
            position, self._forwards = self._forwards, self._forwards + 1
            skipped = skipped or position != self.subset_position
        pass_ = PassNorms(batch_size=n, weights=weights, skipped=skipped or n == 0)
        pass_.fed_by = fed_by
        pass_.forward_skipped = pass_.skipped
        pass_.n_source = _first_tensor(args, kwargs)
        examples = _batch_tensor(args, kwargs, self._model_dim)
        if examples is not None and examples.numel() and examples.stride(self._model_dim):
            # (not one row broadcast to every example: a prompt expanded over the batch)
            pass_.examples = examples
            pass_.examples_version = None if examples.is_inference() else examples._version
        pass_.inputs = (args, kwargs)
        if self.subbatches and self.per_example and n >= 2 and not pass_.skipped:
            unit = self.pairs if isinstance(self.pairs, int) else 2
            if self.pairs is not None and n < 2 * unit:
                pass  # one pair (group): no two sub-batches to compare; no small-batch norm
            elif self.pairs is not None or self._split():
                source = pass_.n_source
                device = source.device if source is not None else torch.device("cpu")
                pass_.subbatches = Subbatches.split(
                    n, self.subbatches, self._generator(device), device, self.pairs
                )
            else:
                pass_.unsplit = True
        pass_.amp = _autocast_enabled()
        self._context.clear()
        self.passes.append(pass_)
        pass_.nodes_at = _sequence_nr()

    #: Sub-batch mode re-checks a model measured per example this often (shapes may change).
    RECHECK_SUBBATCHES = 256

    @property
    def subbatches_pay(self) -> list | None:
        """What :meth:`_split` has learnt, for a state_dict: ``[pays, passes since the last
        split]``, or ``None`` while nothing is known."""
        if self._subbatches_pay is None:
            return None
        return [self._subbatches_pay, self._unsplit_passes]

    @subbatches_pay.setter
    def subbatches_pay(self, value: list | None) -> None:
        if value is None:
            self._subbatches_pay, self._unsplit_passes = None, 0
        else:
            self._subbatches_pay, self._unsplit_passes = bool(value[0]), int(value[1])

    def _split(self) -> bool:
        """Sub-batch mode: split this pass into sub-batches, or measure every example?

        Sub-batches pay where a weight's gradient comes from their products
        (:mod:`~noisescale.per_example.subbatch`). In a pass where none does, every layer's
        sub-batch norms would be merged from its per-example factors, so measuring every
        example instead costs less (no merging) and is more precise (all pairs of examples
        cancel their own norms, not only pairs in different sub-batches): after a split pass
        without products, passes are measured per example, and split again every
        :attr:`RECHECK_SUBBATCHES` passes to see whether that still holds. Both are unbiased.
        """
        if self._subbatches_pay is not False:
            return True
        self._unsplit_passes += 1
        if self._unsplit_passes >= self.RECHECK_SUBBATCHES:
            self._unsplit_passes = 0
            return True
        return False

    def _batch_size_of_model(self, args: tuple, kwargs: dict) -> int:
        call = self._calls.get(self.model)
        if call is not None and call[0].batch_size is not None:
            return call[0].batch_size(self.model, args, kwargs)
        for value in (*args, *kwargs.values()):
            size = _size_along(value, self._model_dim)
            if size is not None:
                return size
        raise NoiseScaleInputError(
            "the model was called without a tensor argument, so the number of examples is "
            "unknown; pass the batch as a tensor (dim 0 = examples)"
        )

    def _on_model_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        try:
            self._model_output(output)
        finally:
            self._loss_watch.resume()  # (a watched pass's loss may go on after any forward)

    def _model_output(self, output: Any) -> None:
        self._trace_batch = None
        # (a loss the model computed itself, to which its forward may add terms of its own)
        self._returned_loss = isinstance(getattr(output, "loss", None), Tensor)
        if (
            self.passes
            and not (self._recomputing or self._paused or self._replaying)
            and torch.is_grad_enabled()
            and torch._C._current_graph_task_id() == -1
        ):
            self.passes[-1].fed_marks = {
                _node_key(t.grad_fn) for t in _tensors(output) if t.grad_fn is not None
            }
        if not self._active() or torch._C._current_graph_task_id() != -1:
            return
        pass_ = self.passes[-1]
        if (
            pass_.nodes_at is not None
            and not pass_.returned
            and not (pass_.compiled or pass_.compiled_call)
        ):
            # What the forward did between the layers is part of its structure: a weight used
            # again outside its layer, examples mixed (a batch mean, a roll), a step of the
            # loop that changes only there records other autograd operations — counted by
            # autograd's own sequence number (thread-local, one per node made) — and the
            # pass is audited as a structure never seen (eager forwards: a compiled one
            # makes its graph's nodes, which Dynamo's guards tie to its structure)
            pass_.nodes = _sequence_nr() - pass_.nodes_at
        pass_.returned = True
        # The replay's roots, by gradient edge: the model's outputs; the tensor an output was
        # cast from (accelerate's convert_outputs_to_fp32 for the Trainer's bf16=True casts the
        # logits after the loss was computed from them: the loss's gradient never reaches the
        # output); and the logits a Hugging Face loss was computed from (a wrapper that returns
        # only the loss, noisescale.tokens)
        candidates = []
        for out in _tensors(output):
            if out.requires_grad:
                candidates.append((torch.autograd.graph.get_gradient_edge(out), out.shape))
                source = _cast_source(out)
                if source is not None:
                    candidates.append((source, out.shape))
        candidates += pass_.loss_inputs
        pass_.loss_inputs = []
        # (what the loss computes from: shared.py asks whether a tensor there derives from them)
        pass_.output_nodes = {id(edge.node): edge.node for edge, _ in candidates}
        dim, seen, roots = self._model_dim, set(), []
        for edge, shape in candidates:
            if (id(edge.node), edge.output_nr) in seen:
                continue
            seen.add((id(edge.node), edge.output_nr))
            batched = len(shape) > dim and shape[dim] == pass_.batch_size
            hook = self._make_root_hook(pass_, edge, batched)
            pass_.handles.append(
                edge.node.register_prehook(
                    lambda grads, h=hook, nr=edge.output_nr: (
                        None if grads[nr] is None else h(grads[nr])
                    )
                )
            )
            if batched:
                roots.append(edge)
        if pass_.skipped or not self.per_example:
            return
        signature = tuple(pass_.signature)
        if self._audit_wanted(pass_):
            pass_.audit = audit_mod.PassAudit(
                signature,
                self._audit_generator(_device_of(output, pass_)),
                pass_.batch_size,
                amp=pass_.amp,
                replay=self._replay_allowed,
            )
            pass_.audit.nodes = pass_.nodes
            pass_.audited = True
            for edge in roots:
                pass_.audit.add_root(edge, dim)
            for edge, dim, owner, label, rebased in getattr(pass_, "_pending_targets", []):
                if rebased is not None and rebased[0]._version != rebased[1]:
                    # the view was changed in place since: its node is out of the graph
                    edge, dim = rebased[2], audit_mod.FLAT
                pass_.audit.add_target(edge, dim, owner, label)
            self._check_permutation(pass_, output)
            if pass_.batch_size > 1 and not (pass_.compiled or pass_.compiled_call):
                batched = [t for t in _tensors(output) if not isinstance(t, SharedTensor)]
                packed = _tensors(output, packed=True)
                self._loss_watch.watch(pass_, batched, self._model_dim, packed, self.pairs)
        if hasattr(pass_, "_pending_targets"):
            del pass_._pending_targets  # type: ignore[attr-defined]

    def _audit_wanted(self, pass_: PassNorms) -> bool:
        """Whether to audit the pass: the step is due, or its structure was never audited. A pass
        that ran inside a compiled graph cannot be (no eager graph to replay): it is marked, its
        per-example norms are withheld and the next step runs eagerly (:meth:`collect`)."""
        signature = tuple(pass_.signature)
        due = self.auditing_enabled and (
            self._audit_due
            or signature not in self._audited_signatures
            or (pass_.nodes is not None and (signature, pass_.nodes) not in self._audited_nodes)
        )
        if due and pass_.compiled:
            pass_.unaudited = True
            return False
        return due

    def _example_cycle(self, n: int) -> Tensor:
        """One random n-cycle, from the audit's generator: a permutation that moves every
        example (fixing up the fixed points of a random permutation afterwards could map two
        examples to one)."""
        order = torch.randperm(n, generator=self._audit_generator(torch.device("cpu")))
        perm = torch.empty_like(order)
        perm[order] = order.roll(-1)
        return perm

    def _run_twice(
        self, inputs: tuple, permuted: tuple, between: Callable[[], None] | None = None
    ) -> tuple[Any, Any]:
        """The model's outputs on ``inputs`` and on ``permuted`` (each ``(args, kwargs)``):
        run without gradients, its hooks paused, both from one random state (dropout draws
        the same masks), its buffers left as they were; a DistributedDataParallel's module
        itself (no collectives in a re-run). ``between`` is called between the two runs."""
        model = self.model
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        with (
            torch.no_grad(),
            self.paused(),
            torch.random.fork_rng(devices=[]),
            _buffers_kept(model),
        ):
            state = torch.get_rng_state()
            first = model(*inputs[0], **inputs[1])
            if between is not None:
                between()
            torch.set_rng_state(state)
            return first, model(*permuted[0], **permuted[1])

    def _inputs_follow_examples(
        self, pass_: PassNorms, layers: list[nn.Module]
    ) -> list[nn.Module] | None:
        """The layers among ``layers`` whose input changes when the examples of the model's
        input are permuted; ``None`` when that cannot be told (no re-run possible).

        Before the audit takes a layer whose rows it found misattributed for one called on a
        table shared by every example (positions arange(T) with T = N), it checks that the
        layer's input does not carry the examples: the model is run twice more without
        gradients, in the modes it trained in, from the same random state (dropout draws the
        same masks in both runs), on its inputs and on them with the examples permuted; a
        shared input comes out the same, an input computed from the examples does not (a
        review found a batch-mean context, ``h.mean(0).expand_as(h)``, learned as a shared
        first layer and measured on every later step). The buffers are restored after the
        re-runs."""
        n, dim, source = pass_.batch_size, self._model_dim, pass_.n_source
        if (
            n < 2
            or not self._replay_allowed
            or pass_.inputs is None
            or source is None
            or (pass_.examples is not None and pass_.examples._version != pass_.examples_version)
        ):
            return None
        try:
            # (an input with the batch's size along two dimensions, labels [N, T] with T = N
            # beside input_ids, is permuted along the example dimension all inputs share)
            perm = self._example_cycle(n)
            p_inputs = _permute_examples(pass_.inputs, perm, n, dim, source, strict=False)
        except _SkipCheck:
            return None
        seen: dict[nn.Module, list[list[Tensor]]] = {m: [[], []] for m in layers}
        run = [0]

        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            first = _first_tensor(args, kwargs)
            if first is not None:
                seen[module][run[0]].append(first.detach().clone())

        def second() -> None:
            run[0] = 1

        handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in layers]
        try:
            self._run_twice(pass_.inputs, p_inputs, between=second)
        except Exception:  # a forward that cannot be re-run: say so, do not guess
            return None
        finally:
            for h in handles:
                h.remove()

        def same(a: list[Tensor], b: list[Tensor]) -> bool:
            return len(a) == len(b) and all(
                x.shape == y.shape
                and (
                    torch.allclose(x.double(), y.double(), rtol=1e-6, atol=0.0)
                    if x.is_floating_point()
                    else torch.equal(x, y)
                )
                for x, y in zip(a, b, strict=True)
            )

        return [m for m in layers if not seen[m][0] or not same(*seen[m])]

    def _check_permutation(self, pass_: PassNorms, output: Any) -> None:
        """Do the model's outputs follow its inputs' examples? Run the model twice more,
        without gradients and in evaluation mode, on the inputs and on the inputs with their
        examples permuted. Each batched output whose example dimension is ambiguous must come
        out permuted the same way: a time-major output whose length equals the batch size, or
        an operation that mixes examples, fails; the signed replay of the backward could not
        tell (it signs the output's dim 0). And each output taken as shared by every example
        (computed from parameters and tensors without the batch's size in dim 0) must come out
        unchanged: time-major rows of the input data, [T·N, D], have no autograd history to
        show where they came from, and a view of such an output in the loss whose dim 0 happens
        to have the batch's size (T = N) would be split there as if it held the examples — the
        loss is outside the model, where no replay reaches."""
        n, dim = pass_.batch_size, self._model_dim
        # only an output with the batch's size along another dimension too can hide its
        # examples there (T = N); with one such dimension it is the example dimension. (Every
        # output with the batch's size was checked for a while on 2026-12-03 — it caught class
        # prototypes computed from a buffer of C = N rows — but the re-runs between the forward
        # and the backward broke RWKV, whose evaluation mode rescales its weights in place:
        # re-running a user's model is not free of side effects, so it stays where needed.)
        outputs = _tensors(output)
        ambiguous = (
            [
                t
                for t in outputs
                if t.is_floating_point()
                and t.dim() > dim
                and t.shape[dim] == n
                and sum(s == n for s in t.shape) > 1
            ]
            if self._model_dim == 0  # a built-in time-major model: its outputs' layouts are known
            else []
        )
        shared_outputs = [i for i, t in enumerate(outputs) if isinstance(t, SharedTensor)]
        source = pass_.n_source
        if (
            n < 2
            or not (ambiguous or shared_outputs)
            or not self._replay_allowed  # FSDP2: a re-run would all-gather inside the forward
            or pass_.inputs is None
            or source is None
            or source.dim() <= dim
            or source.shape[dim] != n
        ):
            return
        args, kwargs = pass_.inputs
        perm = self._example_cycle(n)
        modes = {m: m.training for m in self.model.modules()}
        try:
            p_inputs = _permute_examples((args, kwargs), perm, n, dim, source)
            self.model.train(False)
            plain, permuted = map(_tensors, self._run_twice((args, kwargs), p_inputs))
        except _SkipCheck:
            assert pass_.audit is not None
            pass_.audit.unverified = (
                "the output permutation check was skipped: an input's example dimension is "
                "ambiguous (another dimension has the batch's size)"
            )
            return
        except Exception as err:  # a forward that cannot be re-run: say so, do not guess
            assert pass_.audit is not None
            pass_.audit.unverified = (
                f"the output permutation check could not re-run the model ({err})"
            )
            return
        finally:
            for m, training in modes.items():
                m.training = training
        tol = 5e-2 if pass_.amp else 1e-3
        assert pass_.audit is not None

        def differs(got: Tensor, want: Tensor) -> float | None:
            # (the relative change, or None within the tolerance)
            got, want = got.detach(), want.detach()  # (a parameter returned as it is)
            if got.shape != want.shape:
                return 1.0
            if not got.is_floating_point() or not got.numel():
                return None if torch.equal(got, want) else 1.0
            got, want = got.float(), want.float()
            err, scale = float((got - want).abs().max()), float(want.abs().max()) + 1e-30
            return err / scale if err > tol * scale else None

        same_structure = len(plain) == len(outputs) == len(permuted) and all(
            a.shape == b.shape for a, b in zip(plain, outputs, strict=True)
        )
        if shared_outputs and not same_structure:
            # (the evaluation-mode re-runs return other outputs than the training forward did:
            # their shared outputs cannot be matched)
            pass_.audit.unverified = (
                "the permutation check could not compare the model's shared outputs: in "
                "evaluation mode the model returns other outputs than in training"
            )
            shared_outputs = []
        for i in shared_outputs:
            rel = differs(permuted[i], plain[i])
            sized = [j for j, size in enumerate(plain[i].shape) if size == n]
            if rel is not None and len(sized) == 1:
                # the examples along the one dimension of the batch's size (a time-major
                # [T, N, D], T ≠ N): a meeting can find them only by bringing that dimension
                # to the front, where they are
                moved = plain[i].detach().index_select(sized[0], perm.to(plain[i].device))
                rel = differs(permuted[i], moved) and rel
            if rel is not None:
                origin: Origin | None = getattr(outputs[i], "_ns_origin", None)
                names = sorted({f"'{s.label}'" for s in origin.sources}) if origin else []
                pass_.audit.findings.unpermuted = (
                    f"a model output computed from {', '.join(names) or 'parameters'} and "
                    f"tensors without the batch's examples in dim {dim} (so taken as shared by "
                    "all examples) changes when the "
                    f"examples of the model's input are permuted (by {rel:.2g} of its largest "
                    "value): it holds the examples in a layout noisescale cannot follow "
                    "(time-major, or flattened together with another dimension) and their "
                    f"gradients would be split wrongly. Keep dim {dim} of the model's outputs "
                    "the examples, or use per_example=False"
                )
                return
        for a, b in zip(plain, permuted, strict=False):
            if not any(a is t or a.shape == t.shape for t in ambiguous):
                continue
            want = a.index_select(dim, perm.to(a.device)).float()
            got = b.float()
            if got.shape != want.shape:
                continue
            rel = differs(got, want)
            if rel is not None:
                pass_.audit.findings.unpermuted = (
                    "the model's output does not follow its input's examples: with the input's "
                    f"examples (dim {dim}) permuted, the output's dim {dim} did not come out "
                    "permuted the same way (max. difference "
                    f"{rel:.2g} of its largest value). Its example dimension is another "
                    "one (a time-major output: keep dim 0 the examples), or an operation in the "
                    "model mixes examples — a loss over pairs of examples, such as CLIP's or "
                    "SigLIP's contrastive loss (return_loss=True), has no per-example gradient; "
                    "measure such a model with per_example=False and gradient-accumulation "
                    "micro-batches"
                )
                return

    def _add_target(
        self,
        pass_: PassNorms,
        tensor: Tensor,
        dim: int,
        owner: nn.Module | None,
        label: str,
        base: Tensor | None = None,
    ) -> None:
        """Remember a hooked tensor: the audit decided at the end of the forward needs it.
        ``base``: the whole base of ``tensor``, a reshaped view whose rows are each example's
        in turn (:func:`_rebasable_base`), taken instead if the view is changed in place before the
        forward ends (an in-place operation leaves the view's own node out of the graph)."""
        if not self.auditing_enabled:
            return
        edge = torch.autograd.graph.get_gradient_edge(tensor)
        if pass_.audit is not None:  # a recomputed forward of an audited pass
            pass_.audit.add_target(edge, dim, owner, label)
            return
        pending = getattr(pass_, "_pending_targets", None)
        if pending is None:
            pending = pass_._pending_targets = []  # type: ignore[attr-defined]
        rebased = (
            None
            if base is None
            else (tensor, tensor._version, torch.autograd.graph.get_gradient_edge(base))
        )
        pending.append((edge, dim, owner, label, rebased))

    def _make_root_hook(self, pass_: PassNorms, edge: Any, batched: bool) -> Callable:
        def hook(grad: Tensor) -> None:
            if self._replaying or self._paused:
                return
            self._mark_backward(pass_)
            self._enter(pass_)
            if batched and pass_.audit is not None and not torch.is_grad_enabled():
                try:
                    pass_.audit.on_root(edge, grad)
                except RuntimeError as err:
                    if "use_reentrant" not in str(err):
                        raise
                    raise UnsupportedModuleError(
                        f"{_REENTRANT_LEAD} (noisescale's audit could not replay it)"
                    ) from err

        return hook

    def _mark_backward(self, pass_: PassNorms) -> None:
        """Once per backward: when it has finished, note each parameter's ``.grad`` and its
        version on the passes it ran through, for :meth:`changed_grads`. The callback queues
        itself once more, so that it runs after the final callbacks queued meanwhile (DDP's
        reducer writes the reduced gradients into ``.grad`` in one)."""
        task = torch._C._current_graph_task_id()
        if task == self._marking[0]:
            self._marking[1].append(pass_)
            return
        self._check_between()
        marked: list[PassNorms] = [pass_]
        self._marking = (task, marked)
        queue = torch.autograd.Variable._execution_engine.queue_callback
        queue(lambda: queue(lambda: self._mark_grads(marked)))

    def _check_between(self) -> None:
        """At the start of a backward, whether ``.grad`` is still what the step's previous
        backward left (:meth:`_mark_grads`): gradients zeroed between the micro-batches of one
        step leave ``.grad`` holding only the last ones' gradient, which the step's norms
        would be paired with as if it were the whole step's (:meth:`collect` refuses)."""
        if self._between is None:
            found = self._compare_marks(0, 1.0, emptied=True)
            self._between = None if found is None else found[0]

    def _mark_grads(self, marked: list[PassNorms]) -> None:
        marks = [
            None if (g := p.grad) is None else (weakref.ref(g), g._version) for p in self._params
        ]
        # on the steps audits fall on (1, 2, 4, …: they read values back anyway), in every mode
        checked = any(p.audit is not None for p in marked) or (
            self._audit_due and not any(p.idle for p in marked)
        )
        prints = self._grad_prints() if checked else None
        for pass_ in marked:
            pass_.grad_marks = marks
            pass_.grad_prints = prints
        if self._marking[1] is marked:
            self._marking = (None, [])

    @property
    def check_scheduled(self) -> bool:
        """Whether the step under way is one the audits' schedule falls on (1, 2, 4, …, 1,024,
        then one in 1,024), counted in measured steps: the same on every process of a run,
        whatever its batches (an audit a new structure asks for is not counted)."""
        return _audit_scheduled(self.steps_collected + 1)

    def changed_grads(self, allowed: int = 0, unscaled_by: float = 1.0) -> tuple[str, str] | None:
        """A parameter whose ``.grad`` was changed after the step's last backward pass and
        before this call — clipped, rescaled, weight decay added, replaced by another tensor,
        given to a parameter that had none, or set to ``None`` while others kept theirs — as
        ``(name, "changed")``; ``(name, "not unscaled")`` when ``.grad`` was unscaled for some
        parameters but not this one (a GradScaler's ``unscale_`` called for one optimizer of
        several); else ``None`` (also when every gradient was set to ``None``: the tracker says
        so itself). ``allowed``: in-place operations expected meanwhile (a GradScaler's
        ``unscale_``, where it counts as one); ``unscaled_by``: the loss scale ``.grad`` was
        divided by meanwhile (``unscale_``), else 1. The marks are those of the last pass whose
        backward has finished (a forward whose output was not backpropagated changes nothing).

        Every step, by version counters (no host read). A change through ``.grad.data`` (a
        version counter of its own), an ``unscale_`` the tracker was not told of, or an
        in-place change of a sharded ``DTensor`` gradient (FSDP2) bumps none: on audited steps
        (1, 2, 4, …, which read values back anyway) each ``|.grad|²`` noted when the backward
        had finished is compared too, so a loop that does one of these on every step is refused
        at its first."""
        return self._compare_marks(allowed, unscaled_by, emptied=False)

    def _compare_marks(
        self, allowed: int, unscaled_by: float, emptied: bool
    ) -> tuple[str, str] | None:
        """:meth:`changed_grads` and :meth:`_check_between`: ``.grad`` against the marks of
        the step's last pass whose backward has finished — by version (:meth:`_changed_since`),
        then, where the pass noted them, by value (:meth:`_changed_values`)."""
        # (a pass whose backward reached no parameter — a frozen discriminator in a GAN's
        # generator step — or only torch.autograd.grad's — a gradient logged after the last
        # step — changed no .grad, and its marks say nothing of this step's)
        last = next(
            (
                p
                for p in reversed(self.passes)
                if p.grad_marks is not None and p.received and not (p.grad_only and not p.wrote)
            ),
            None,
        )
        if last is None or last.grad_marks is None:
            return None
        changed = self._changed_since(last.grad_marks, allowed, emptied)
        if changed is not None:
            return changed, "changed"
        if last.grad_prints is not None:
            return self._changed_values(last.grad_prints, unscaled_by)
        return None

    def _grad_prints(self) -> list[Tensor | None]:
        """Each parameter's |.grad|² (its local shard's, for a ``DTensor``), in float64 (MPS:
        float32): the same computation on the same values gives the same number, so a later
        difference is a change (:meth:`_changed_values`)."""
        out: list[Tensor | None] = []
        with torch.no_grad():
            for p in self._params:
                g = p.grad
                if g is None:
                    out.append(None)
                    continue
                g = (g.to_local() if hasattr(g, "to_local") else g).detach()
                dtype = torch.float32 if g.device.type == "mps" else torch.float64  # (no fp64)
                out.append(torch.linalg.vector_norm(g, dtype=dtype).square())
        return out

    def _changed_values(
        self, prints: list[Tensor | None], unscaled_by: float
    ) -> tuple[str, str] | None:
        """The first parameter whose |.grad|² is no longer the one :meth:`_grad_prints` noted
        (divided by ``unscaled_by``²), as ``(name, "changed")`` — or ``(name, "not unscaled")``
        where it is still the one noted, undivided, while ``.grad`` was to be unscaled. Relative
        differences under 1e-5 are taken as rounding (an ``unscale_`` by a scale that is not a
        power of two) and change no estimate. Reads values back: called on audited passes
        only."""
        now = self._grad_prints()
        pairs = [
            (i, a, b)
            for i, (a, b) in enumerate(zip(prints, now, strict=True))
            if a is not None and b is not None
        ]
        if not pairs:
            return None
        noted = torch.stack([a.to(pairs[0][1].device) for _, a, _ in pairs])
        after = torch.stack([b.to(noted.device) for _, _, b in pairs])

        def differs(before: Tensor) -> list[bool]:
            # (nan and inf — a step a GradScaler will skip — compare as unchanged)
            return ((after - before).abs() > 1e-5 * torch.maximum(after, before)).tolist()

        changed = differs(noted / unscaled_by**2)
        kept = differs(noted) if unscaled_by != 1.0 and any(changed) else None
        for n, (i, _, _) in enumerate(pairs):
            if changed[n]:
                how = "not unscaled" if kept is not None and not kept[n] else "changed"
                return self._param_name[id(self._params[i])], how
        return None

    def _changed_since(self, marks: list, allowed: int, emptied: bool) -> str | None:
        """The first parameter whose ``.grad`` is not the tensor its mark noted (replaced, or
        given where there was none), was changed in place more than ``allowed`` times since, or
        was set to ``None`` — when ``emptied`` counts, or while other parameters kept theirs
        (every gradient set to ``None`` is left to the caller's own message)."""
        noted = emptied_now = 0
        first_emptied = None
        for p, mark in zip(self._params, marks, strict=True):
            g = p.grad
            if mark is None:
                if g is not None:  # a gradient given to a parameter the backward gave none
                    return self._param_name[id(p)]
                continue
            noted += 1
            if g is None:
                if emptied:
                    return self._param_name[id(p)]
                emptied_now += 1
                first_emptied = first_emptied or self._param_name[id(p)]
            elif mark[0]() is not g or g._version - mark[1] > allowed:
                return self._param_name[id(p)]
        return first_emptied if 0 < emptied_now < noted else None

    def _on_scope_enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Hand the forward shared aliases of the parameters it uses directly."""
        if not self._active() or module in self._fallback:
            return
        pass_ = self._hook_pass()
        if self._inside_compiled_call:
            # a model's own hooks run eagerly inside its compiled call: the aliases would enter
            # the compiled graph, which cannot hold them (compile_blocker)
            pass_.compiled = pass_.compiled_blocked = True
            return
        if pass_.skipped:
            return
        self._mirror_in_recompute(module)
        for holder, name, pid in self._scopes[module]:
            real = holder._parameters.get(name)
            if real is None or isinstance(real, SharedTensor):
                continue
            pass_.aliased.add(pid)
            source = Source(tensor=real, pid=pid, label=self._param_name.get(pid, name))
            origin = Origin(self, pass_, (source,), scope=module)
            alias = wrap(real, origin)
            source.tensor = alias
            self._swapped.setdefault((id(holder), name), []).append(real)
            holder._parameters[name] = alias  # type: ignore[assignment]

    def _mirror_in_recompute(self, module: nn.Module) -> None:
        """The transformers layers whose ``forward`` activation checkpointing recomputes
        (``GradientCheckpointingLayer``: it checkpoints ``forward``, inside the module call, so
        the recomputation runs without the module's hooks) — ``module`` itself and those
        inside it: their checkpoint function is wrapped so that the recomputed forward gets the
        aliases of the parameters ``module`` uses directly, as the forward did — else the
        tensors it saves differ and checkpoint raises (BEiT's layer scale, a parameter
        multiplied in its layer; peft's IA3 and VeRA vectors, learned as direct uses of the
        whole model, read inside each checkpointed decoder layer: ``CheckpointError`` until
        2026-12-04)."""
        layers = self._checkpointing_layers.get(module)
        if layers is None:
            layers = self._checkpointing_layers[module] = [
                m for m in module.modules() if hasattr(m, "gradient_checkpointing")
            ]
        for layer in layers:
            func = getattr(layer, "_gradient_checkpointing_func", None)
            if func is None or not getattr(layer, "gradient_checkpointing", False):
                continue
            if isinstance(func, _MirroredCheckpoint):
                if func.engine is self and module not in func.scopes:
                    func.scopes.append(module)
                continue
            layer._gradient_checkpointing_func = _MirroredCheckpoint(func, self, [module])
            self._mirrored.append(layer)

    def _on_scope_exit(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        for holder, name, _ in reversed(self._scopes.get(module, [])):
            stack = self._swapped.get((id(holder), name))
            if stack:
                holder._parameters[name] = stack.pop()  # type: ignore[assignment]

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        stack = self._weight_calls.get(module)
        taken = stack.pop() if stack else None
        product_weight, product_bias = (None, None) if taken is None else taken
        if product_weight is None and not self._active():
            if (
                not self.passes
                and self._unopened is None
                and torch.is_grad_enabled()
                and not (self._paused or self._recomputing or self._replaying)
            ):
                _, self._unopened, params = self._calls[module]
                self._unopened_params = [self._param_name[id(p)] for p in params.values()]
            return None
        rule, label, params = self._calls[module]
        pass_ = self._hook_pass()
        if not pass_.amp:
            # autocast entered inside the model's forward (accelerate wraps ``model.forward``,
            # so the model's own hooks run outside it) still loosens the audit
            pass_.amp = _autocast_enabled()
        outs = list(rule.outputs(module, output)) if rule.outputs is not None else [_first(output)]
        replaced = None  # the output, when this hook replaces it
        if product_weight is not None:
            # The layer ran on a detached weight (_on_weight_enter): its gradient comes from
            # WeightBySubbatch whatever happens next, also when nothing else in the output needs
            # a gradient (a first layer without bias on input data) — or the weight gets none.
            # The bias, when it ran detached too, is computed with it; the rule computes the
            # other parameters.
            job, params = self._product_job(
                pass_, module, rule, params, product_weight, product_bias
            )
            job.readers = self._readers(pass_, args[0])
            x = args[0].detach()
            base = _reshaped_base(module, output)
            if base is None:
                subbatch_mod.weight_by_subbatch(outs[0], x, product_weight, product_bias, job)
            else:
                # The output is a reshaped view of the product's result (nn.Linear on [N, T, I],
                # Conv1D): marking the view dirty makes autograd copy every gradient through
                # the whole base and back (CopySlices, ≈ 3 copies of the output per layer).
                # The base is marked instead, and the layer's output becomes a new view of it,
                # made after — the view the layer made is seen by no one else.
                subbatch_mod.weight_by_subbatch(base, x, product_weight, product_bias, job)
                output = outs[0] = replaced = base.view(output.shape)
        if rule.check is not None:
            rule.check(module, label)  # e.g. a BatchNorm switched to train() since
        if pass_.skipped:
            return replaced
        if product_weight is not None and not params and not kwargs and len(args) == 1:
            # the products took the whole layer (checked in _on_weight_enter: one per-example
            # input, dim 0 the batch's examples, not shared)
            n = pass_.batch_size
            pass_.signature.append(("products", id(module), (_shape_pattern(args[0], n),)))
            base = _rebasable_base(outs[0], 0, n)
            self._add_target(pass_, outs[0], 0, module, label, base)
            return replaced
        if not any(isinstance(o, Tensor) and o.requires_grad for o in outs):
            return replaced
        ctx_dim = self.batch_dim()
        in_dim, out_dims = (
            rule.batch_dims(module)
            if rule.batch_dims is not None
            else (ctx_dim, [ctx_dim] * len(outs))
        )
        single = not kwargs and len(args) == 1 and type(args[0]) is Tensor  # (the common case)
        shared_input = not single and any(
            isinstance(v, SharedTensor) for v in _flat_values(args, kwargs)
        )
        if rule.batch_size is not None:
            size = rule.batch_size(module, args, kwargs)
        elif single:
            size = args[0].shape[in_dim] if args[0].dim() > in_dim else None
        else:
            size = _first_size(args, kwargs, in_dim)
        n = pass_.batch_size
        if (
            size != n
            and not shared_input
            and pass_.n_source is not None
            and _first_tensor(args, kwargs) is pass_.n_source
        ):
            # the model's example count came from this layer's input (e.g. EmbeddingBag offsets)
            pass_.batch_size = n = size
            if pass_.subbatches is not None:
                # drawn for the input's leading size (the bags' flat indices): draw again for
                # the examples, before any layer has used them (this is the model's input)
                device = pass_.subbatches.index.device
                pass_.subbatches = (
                    Subbatches.split(n, self.subbatches, self._generator(device), device)
                    if n >= 2 and self.pairs is None
                    else None
                )
        flat = (
            self._flat_rows(rule, module, args, size, n, in_dim)
            if single
            and size != n
            and isinstance(output, Tensor)
            and module not in self._learned_shared
            else 0
        )
        if flat:
            # the examples flattened together with positions, [N·k, …] (LayerRule.flattened):
            # measured as [N, k, …]; the audit checks that the rows are each example's in turn
            args = (args[0].unflatten(0, (n, flat)),)
            pass_.flat_calls.add(module)
        elif (
            shared_input
            or size != n
            or module in self._learned_shared
            or (single and self._rows_not_examples(pass_, args[0], n, label))
        ):
            shared = self._shared_call(pass_, module, rule, label, params, args, kwargs, output)
            return replaced if shared is None else shared
        if product_weight is not None and not params:
            pass_.signature.append(("products", id(module), _pattern(args, kwargs, n)))
            base = _rebasable_base(outs[0], out_dims[0], n)
            self._add_target(pass_, outs[0], out_dims[0], module, label, base)
            return replaced
        saved = rule.save(module, args, kwargs, output.unflatten(0, (n, flat)) if flat else output)
        call = _Call(module, rule, label, params, in_dim, [saved], out_dims, n, flat=flat)
        for p in params.values():
            pass_.uses[id(p)] = pass_.uses.get(id(p), 0) + 1
        # ("products": a bias left to the rule)
        tag = "flat-call" if flat else "call" if product_weight is None else "products"
        pattern = (_shape_pattern(args[0], n),) if single else _pattern(args, kwargs, n)
        pass_.signature.append((tag, id(module), pattern))
        hooked = [o for o in outs if isinstance(o, Tensor) and o.requires_grad]
        base = _rebasable_base(outs[0], out_dims[0], n) if len(outs) == 1 and not flat else None
        if base is not None:
            # (the whole base of a reshaped view: its hook still fires after an in-place
            # operation on the view, whose own node that operation leaves out of the graph)
            shape = outs[0].shape
            pass_.handles.append(
                base.register_hook(
                    lambda g, c=call, p=pass_, s=shape: self._on_call_grad(p, c, (g.view(s),))
                )
            )
        elif len(outs) == 1:
            pass_.handles.append(
                outs[0].register_hook(lambda g, c=call, p=pass_: self._on_call_grad(p, c, (g,)))
            )
        else:
            handle = torch.autograd.graph.register_multi_grad_hook(
                hooked,
                lambda grads, c=call, p=pass_, o=outs, h=hooked: self._on_call_grad(
                    p, c, _align(o, h, grads)
                ),
                mode="all",
            )
            pass_.handles.append(handle)
        for o, d in zip(outs, out_dims, strict=False):
            if isinstance(o, Tensor) and o.requires_grad:
                rebased = base if o is outs[0] else None
                self._add_target(pass_, o, audit_mod.FLAT if flat else d, module, label, rebased)
        return replaced

    def _flat_rows(
        self, rule: LayerRule, module: nn.Module, args: tuple, size: Any, n: int, in_dim: int
    ) -> int:
        """k, when a layer's single input holds each example's k rows in turn: the examples
        flattened together with positions (``x.reshape(-1, D)`` of a batch-first [N, T, D]),
        its leading size k·N, the layer's rule treating positions alike
        (``LayerRule.flattened``), and the input's history showing the flattening
        (:func:`_example_major`: never rows selected, sorted or routed by the data, whose
        order could change from one step to the next). 0 otherwise: the call is shared. The
        audit checks the rows' attribution on the first pass of each structure; a layer whose
        rows are not each example's in turn is learned as shared."""
        if in_dim != 0 or self.batch_dim() != 0 or not _flat_size(rule, module, size, n):
            return 0
        return size // n if _example_major(args[0], n, size) else 0

    def _on_weight_enter(self, module: nn.Module, args: tuple) -> None:
        """Sub-batch mode: run the layer on a detached weight; its gradient is computed by
        :class:`~noisescale.per_example.subbatch.WeightBySubbatch` (see :meth:`_on_forward`)."""
        stack = self._weight_calls.setdefault(module, [])
        if not self._active():
            stack.append(None)
            return
        weight = module._parameters.get("weight")
        pass_ = self._hook_pass()
        use = (
            pass_.subbatches is not None
            and weight is not None
            and weight.requires_grad
            and not isinstance(weight, SharedTensor)
            and (
                id(weight) not in self._multi_use
                or (
                    not self._seen_compiled
                    and subbatch_mod.keeps_pay(module, args[0], pass_.subbatches.k)
                )
            )
            and id(weight) in self._param
            and module not in self._learned_shared  # its call is shared: no WeightBySubbatch
            and bool(args)
            and isinstance(args[0], Tensor)
            and not isinstance(args[0], SharedTensor)
            and self.batch_dim() == 0
            and args[0].dim() > 0
            and args[0].shape[0] == pass_.batch_size
            and self._replay_allowed
            and not self._rows_not_examples(
                pass_, args[0], pass_.batch_size, self._calls[module][1]
            )
            and self._uses_products(module, weight, args[0], pass_.batch_size, pass_.subbatches.n)
        )
        if not use:
            stack.append(None)
            return
        module._parameters["weight"] = weight.detach()
        bias = self._bias_with_products(module, weight)
        if bias is not None:
            module._parameters["bias"] = bias.detach()
        stack.append((weight, bias))

    def _take_unread_picks(self, passes: list[PassNorms]) -> None:
        """The step's :attr:`PassNorms.unread_picks` (passes of backwards that reached the
        parameters: not a metric's forward or a saliency probe's), for the tracker to read with
        the step's statistics. An audited pass's are read now — the audit reads back anyway —
        and a flagged one is refused before the audit's findings are settled: the audit would
        blame the layer the picked rows came from and take it for shared from then on."""
        picks = [pick for p in passes for pick in p.unread_picks]
        audited = [pick for p in passes if p.audited for pick in p.unread_picks]
        if audited:
            flags = torch.stack([flag.to(audited[0][2].device) for _, _, flag in audited])
            bad = [pick for pick, flag in zip(audited, flags.tolist(), strict=True) if flag]
            if bad:
                label, how, _ = bad[0]
                raise UnsupportedModuleError(
                    f"the input rows of layer '{label}' were picked by {how} (h[b, t] with b, t "
                    "from mask.nonzero()): their count equals the batch's by coincidence and "
                    "which example each belongs to changes with the data. Nothing of this "
                    "step was recorded. Pick one row per example with an index along the "
                    "examples, h[torch.arange(N), t], or measure with per_example=False"
                )
        self.unread_picks = picks

    def _rows_not_examples(self, pass_: PassNorms, x: Tensor, n: int, label: str) -> bool:
        """Whether ``x``, the input of layer ``label`` with the batch's leading size, holds rows
        that are not the examples by that coincidence: one of the model's buffers, or rows
        picked by a mask or an index (:func:`_selected_rows`). Such a call is shared. (Index
        tensors on an accelerator are checked on the device: ``pass_.unread_picks``.)"""
        if self._is_buffer(pass_, x):
            return True
        unread: list[tuple[str, Tensor]] = []
        if _selected_rows(x, n, unread) is not None:
            return True
        pass_.unread_picks += [(label, how, flag) for how, flag in unread]
        return False

    def _is_buffer(self, pass_: PassNorms, x: Tensor) -> bool:
        """Is ``x`` (a layer's input) one of the model's buffers, or a view of one? Its leading
        size may equal the batch's by coincidence — class embeddings [C, D] with C = N, turned
        into prototypes by a Linear and returned: measured as a per-example call, their rows
        were split as the examples' (35-124% off, found by a review) — but a buffer holds no
        example: the call is shared. (Computed from a buffer by operations, the input is not
        recognised: a known gap.)"""
        if (
            x.grad_fn is not None
            or x.requires_grad
            or not x.is_floating_point()  # (indices: BERT's token types, a buffer expanded)
            or (x.dim() > 0 and x.stride(0) == 0)  # (one row for every example: theirs)
            or torch.compiler.is_compiling()
        ):
            return False
        try:
            if pass_.buffer_storages is None:
                pass_.buffer_storages = {
                    b.untyped_storage().data_ptr() for b in self.model.buffers()
                } - {0}
            return x.untyped_storage().data_ptr() in pass_.buffer_storages
        except (RuntimeError, NotImplementedError, TypeError):  # (tensors without storage)
            return False

    def _uses_products(
        self, module: nn.Module, weight: Tensor, x: Tensor, n: int, per_subbatch: int
    ) -> bool:
        """:func:`~noisescale.per_example.subbatch.uses_products`, remembered for each layer and
        input shape (every product layer asks it at every call)."""
        key = (module, weight.shape, x.shape, x.is_cpu, n, per_subbatch)
        try:
            choice = self._product_choices.get(key)
        except TypeError:  # symbolic sizes
            return subbatch_mod.uses_products(module, x, n, per_subbatch)
        if choice is None:
            choice = subbatch_mod.uses_products(module, x, n, per_subbatch)
            if len(self._product_choices) > 4096:
                self._product_choices.clear()
            self._product_choices[key] = choice
        return choice

    def _product_job(
        self,
        pass_: PassNorms,
        module: nn.Module,
        rule: LayerRule,
        params: dict[str, nn.Parameter],
        weight: nn.Parameter,
        bias: nn.Parameter | None,
    ) -> tuple[_WeightJob, dict[str, nn.Parameter]]:
        """A layer call whose weight (and bias) take sub-batch products, eager or compiled: the
        job that computes their gradients, one use each counted, and the parameters left to the
        layer's rule."""
        job = _WeightJob(pass_, module, weight, _product_kind(module, rule), [True], self, bias)
        pass_.products = True
        for p in (weight, bias):
            if p is not None:
                pass_.uses[id(p)] = pass_.uses.get(id(p), 0) + 1
        if (
            len(params) == (1 if bias is None else 2)
            and params.get("weight") is weight
            and (bias is None or params.get("bias") is bias)
        ):
            return job, {}  # (the common case: the products took every parameter)
        return job, {k: v for k, v in params.items() if v is not weight and v is not bias}

    @staticmethod
    def _readers(pass_: PassNorms, x: Tensor) -> subbatch_mod.Readers | None:
        """The product layers reading the tensor ``x`` itself (this very object, unchanged: the
        same version) in this pass's forward — a query, key and value projection, a gate and up
        projection, a residual block's first convolution and its projection shortcut — whose
        backward may then share one gather of its rows (``Scratch.held``). Paired here, in the
        forward, not by the memory the backward's saved tensors occupy: a saved-tensor unpack
        hook may reload different activations into one buffer. Plain tensors only."""
        if type(x) is not torch.Tensor:
            return None
        entry = pass_.read_by.get(id(x))
        if entry is not None and entry[0]() is x and entry[1] == x._version:
            entry[2].count += 1
            return entry[2]
        readers = subbatch_mod.Readers()
        pass_.read_by[id(x)] = (weakref.ref(x), x._version, readers)
        return readers

    def _bias_with_products(self, module: nn.Module, weight: Tensor) -> nn.Parameter | None:
        """The bias of a layer whose weight takes sub-batch products, when its gradient is
        computed with the weight's (it then runs detached too): unless either has another use."""
        bias = module._parameters.get("bias")
        if (
            bias is None
            or not bias.requires_grad
            or isinstance(bias, (SharedTensor, compiled.CompiledShared))  # (a tuple: Dynamo)
            or id(bias) not in self._param
            or id(bias) in self._multi_use
            or id(weight) in self._multi_use
        ):
            return None
        return bias  # type: ignore[return-value]

    def _on_weight_exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        stack = self._weight_calls.get(module)
        if not stack:
            return
        taken = stack[-1]
        if taken is not None:
            weight, bias = taken
            module._parameters["weight"] = weight  # type: ignore[assignment]
            if bias is not None:
                module._parameters["bias"] = bias  # type: ignore[assignment]

    def _weight_backward(
        self, job: _WeightJob, x: Tensor, d: Tensor
    ) -> tuple[Tensor | None, Tensor | None]:
        """The gradients of the weight (and the bias, when taken over) from the sub-batch
        products, and their squared norms."""
        pass_, weight, bias = job.pass_, job.weight, job.bias
        pids = [id(weight)] if bias is None else [id(weight), id(bias)]
        try:
            needed: bool | None = self._reaches_parameters(pids)
        except RuntimeError:  # torch.autograd.grad(): decided when collected
            needed = None
        if needed is False:
            return None, None
        reaches = self._begin(pass_, pids, job.box, needed)
        sb = pass_.subbatches
        if reaches is None or sb is None:
            if job.kind != "conv" and d.shape[:-1] != x.shape[:-1]:
                d = d.reshape(*x.shape[:-1], d.shape[-1])  # the gradient of the output's base
            grad, bias_grad = _plain_weight_grad(job, x, d)
            return grad.to(weight.dtype), None if bias is None else bias_grad.to(bias.dtype)
        # (from here gradient mode is off: _begin leaves a double backward to the plain product)
        job.box.clear()
        weights = pass_.weights
        w2 = None if weights is None else weights.get(id(weight))
        bias_w2 = None if weights is None or bias is None else weights.get(id(bias))
        # a weight with another use (a tied head) keeps its sub-batch gradients for cross terms
        keep = id(weight) in self._multi_use
        if job.kind == "conv":
            out = subbatch_mod.conv_subbatch_grads(
                job.module, x, d, sb, w2, keep, bias is not None, bias_w2, self._scratch,
                job.readers,
            )  # fmt: skip
        else:
            # (the output gradient may be that of the output's base: [N·T, O] for [N, T, O])
            a = x.reshape(x.shape[0], -1, x.shape[-1])
            g = d.reshape(x.shape[0], -1, d.shape[-1])
            out = subbatch_mod.linear_subbatch_grads(
                a, g, sb, w2, job.kind == "conv1d", keep, self._scratch, bias is not None,
                bias_w2, job.readers,
            )  # fmt: skip
        audited = pass_.audit is not None
        grad = out.grad if out.grad.dtype == weight.dtype else out.grad.to(weight.dtype)
        if bias is None:
            factor = NormFactor(out.sq, grad if audited else None, out.kept)
            self._deliver(pass_, {"weight": weight}, {"weight": factor}, reaches)
            return grad, None
        assert out.bias_grad is not None and out.bias_sq is not None
        bias_grad = out.bias_grad
        if bias_grad.dtype != bias.dtype:
            bias_grad = bias_grad.to(bias.dtype)
        if (
            reaches is True
            and not audited
            and out.kept is None
            and self._group_of is None
            and pass_.uses.get(id(weight), 1) == 1
            and pass_.uses.get(id(bias), 1) == 1
        ):
            # the common case, in one addition: both used once, norms weighted where computed
            pass_.covered.add(id(weight))
            pass_.covered.add(id(bias))
            self._accumulate(pass_, id(weight), out.sq + out.bias_sq)
            return grad, bias_grad
        params: dict[str, nn.Parameter] = {"weight": weight, "bias": bias}
        facs: dict[str, Factor] = {
            "weight": NormFactor(out.sq, grad if audited else None, out.kept),
            "bias": NormFactor(out.bias_sq, bias_grad if audited else None),
        }
        self._deliver(pass_, params, facs, reaches)
        return grad, bias_grad

    def _shared_call(
        self,
        pass_: PassNorms,
        module: nn.Module,
        rule: LayerRule,
        label: str,
        params: dict[str, nn.Parameter],
        args: tuple,
        kwargs: dict,
        output: Any,
    ) -> Any:
        """A layer called on input shared by every example: follow its output to the batch."""
        if rule.native_layout or not isinstance(output, Tensor):
            raise UnsupportedModuleError(
                f"layer '{label}' ({type(module).__name__}) was called on input that is not "
                f"per-example (its example dimension does not have the batch's size "
                f"{pass_.batch_size}); noisescale follows such shared calls only for layers with "
                "one output and the standard layout. Keep its input per-example (dim 0 = "
                "examples), or use per_example=False"
            )
        saved = rule.save(module, _unshare(args), _unshare(kwargs), output)
        size = _first_size(args, kwargs, 0) or 0
        shared = [v for v in _flat_values(args, kwargs) if isinstance(v, SharedTensor)]
        upstream: list[Source] = [
            source
            for v in shared
            for source in v._ns_origin.sources  # type: ignore[attr-defined]
        ]
        picked = next((s.call.picked for s in upstream if s.call is not None and s.call.picked), "")
        if picked:
            why = picked  # (the cause, named at the first call on the picked rows)
        elif shared:
            why = (
                "its input came from parameters used directly, combined only with tensors "
                "whose dim 0 does not have the batch's size (constants, time-major "
                "activations, or the examples flattened together with another dimension)"
            )
        elif module in self._learned_shared and size != pass_.batch_size:
            why = (
                f"its input's leading dimension {size} is a multiple of the batch's "
                f"{pass_.batch_size} examples, but the audit found its rows are not each "
                "example's rows in turn (x.reshape(-1, D) of a batch-first [N, T, D] is; a "
                "time-major [T, N, D] flattened, or rows routed or sorted across examples, is "
                "not)"
            )
        elif module in self._learned_shared:
            why = (
                f"its input's leading dimension has the batch's size {pass_.batch_size}, but the "
                "audit found its rows are not the examples"
            )
        elif size == pass_.batch_size and (
            selected := _selected_rows(_first_tensor(args, kwargs), size)
        ):
            why = picked = (
                f"the {size} input rows of layer '{label}', on which it is computed, were "
                f"picked by a mask or an index ({selected}), so "
                "their count equals the batch's by coincidence, and which example each row "
                "belongs to changes with the data (a loss on the masked tokens alone, "
                "h.view(-1, D)[labels.view(-1) != -100], as ModernBERT's "
                "sparse_prediction=True does: turn it off, or use per_example=False)"
            )
        elif size == pass_.batch_size:
            why = (
                f"its input is one of the model's buffers, whose leading size {size} equals the "
                "batch's by coincidence"
            )
        else:
            why = (
                f"its input's leading dimension {size} is not the batch's {pass_.batch_size} "
                "examples" + _flattened_hint(size, pass_.batch_size)
            )
        call = _Call(module, rule, label, params, 0, [saved], size=size, why=why, picked=picked)
        if output.requires_grad and output._base is not None:
            # a view (nn.Linear on [1, T, D] returns one): an in-place operation on it would
            # rebase the view's own history and bypass its edge; a copy of its own (a shared
            # call's output is computed once, not per example: small) keeps the edge below
            output = output.clone()
        source = Source(tensor=output, call=call, label=label)
        if output.requires_grad:
            # the edge of the tensor the output's memory belongs to: on input that is itself
            # shared the output is an alias (a shared tensor) of its copy, and an in-place
            # operation on a view of it (DeBERTa's `pos_query_layer /= scale`) rebases that
            # copy's history, past any alias's own node
            with torch._C.DisableTorchFunctionSubclass():
                root = output._base if output._base is not None else output
            source.edge = torch.autograd.graph.get_gradient_edge(root)
            source.version = output._version
        shared = wrap(output, Origin(self, pass_, (source, *upstream), scope=None))
        source.tensor = shared
        pass_.shared_calls.append(call)
        pass_.signature.append(
            ("shared-call", id(module), _pattern(args, kwargs, pass_.batch_size))
        )
        return shared

    # -- torch.compile: the traced hooks and the events of compiled graphs ----------------------
    #
    # While Dynamo traces a compiled model's forward, the hooks take these forms (the design is in
    # noisescale.per_example.compiled). They read only what the model's structure and shapes
    # decide — never a pass, which changes every step and would make Dynamo recompile — and leave
    # the per-pass work to on_forward_event / on_backward_event / on_weight_grad, which the
    # compiled graph calls when it runs and which do what the eager hooks do.

    def _why_not_traced(self) -> str | None:
        """What in the model the traced hooks do not follow (``None``: they follow it all)."""
        if not self.per_example:
            return None
        if not compiled.SUPPORTED:
            return (
                "this version of torch cannot keep noisescale's hook operators in a compiled "
                "graph (torch.library custom operators with ordered effects are missing)"
            )
        if not self._replay_allowed:
            return "the model is sharded with FSDP2"
        time_major = sorted(
            self._labels[m]
            for m in self._modules
            if _time_major(m) or isinstance(m, nn.MultiheadAttention)
        )
        if self._model_dim != 0 or time_major:
            return f"layers {time_major} see time-major activations"
        # parameters used directly in their own module's forward are followed (traced scope
        # hooks), except in the top-level model, whose own hooks Dynamo runs outside the trace,
        # and in layers with a rule, which are then also used elsewhere (learned direct uses)
        direct = sorted(
            {
                self._param_name[pid]
                for scope, uses in self._scopes.items()
                for holder, _, pid in uses
                if scope is self.model or holder is self.model or holder in self._calls
            }
        )
        if direct:
            more = f" and {len(direct) - 3} more" if len(direct) > 3 else ""
            return (
                f"parameters {direct[:3]}{more} are used directly in the top-level model's "
                "forward or outside the layer that owns them, which the traced hooks do not "
                "follow"
            )
        for module, (rule, label, _) in self._calls.items():
            if (
                rule.save is not save_first_input
                or rule.outputs is not None
                or rule.batch_dims is not None
                or rule.batch_size is not None
                or rule.native_layout
            ):
                return (
                    f"layer '{label}' ({type(module).__name__}) has a rule with its own inputs, "
                    "outputs or layout (recurrent layers, EmbeddingBag, the torch.func "
                    "fallback), which the traced hooks do not follow"
                )
        return None

    def _update_compile_blocker(self) -> None:
        self.compile_blocker = self._why_not_traced() or self._compile_learned

    def _prepare_compile(self) -> None:
        """Once Dynamo is imported (a compile may follow): the model's own hooks, which Dynamo
        would compile as frames of their own, run eagerly; a model compiled with
        ``model.compile()`` that the traced hooks cannot follow runs eagerly from now on."""
        if "torch._dynamo" not in sys.modules:
            return
        if not self._compile_prepared:
            # Dynamo does not guard on module hooks by default: a graph compiled for another
            # instance of the model's class without hooks (an untracked copy) would run for this
            # one, without the hooks' operators. Graphs compiled from now on check the hooks.
            torch._dynamo.config.skip_nnmodule_hook_guards = False
            self._compile_prepared = True
            # (every module hook's code: _ModuleHook.__call__)
            compiled.skip_frames(_ModuleHook.__call__, recursive=False)
            for eager in self._eager_hooks:
                compiled.skip_frames(eager, recursive=True)
        model = self.model
        if self.compile_blocker is not None and (
            getattr(model, "_compiled_call_impl", None) is not None
            or type(model).__name__ == "OptimizedModule"
        ):
            self._run_compiled_code_eagerly()

    def _run_compiled_code_eagerly(self) -> None:
        if self._compiled_eagerly:
            return
        self._compiled_eagerly = True
        self._eager_steps.want(True)
        warnings.warn(
            f"noisescale: under torch.compile, {self.compile_blocker}. While the tracker measures "
            "this model, compiled code runs eagerly (torch.compiler.set_stance('force_eager'), "
            "in the whole process, until tracker.remove()): exact, but without the speed of "
            "compilation. Measured inside the compiled graph: layers with a rule (Linear, "
            "convolutions, Embedding, norm layers, Conv1D), and parameters or position tables "
            "added to, multiplied with or expanded over the batch inside a layer; for any model, "
            "per_example=False with gradient accumulation (micro-batch norms)",
            RuntimeWarning,
            stacklevel=3,
        )

    def traced_batch_size(self) -> Any:
        """The batch's size while Dynamo traces the model's forward (``None`` outside one)."""
        t = self._trace_batch
        return None if t is None else t.shape[self._model_dim]

    def _traces(self) -> bool:
        """Whether the traced hooks record the pass being traced: not an unmeasured one
        (``idle``, measure_every), which the model's hook only opens and counts."""
        return self._traces_pass() and not self.idle

    def _traces_pass(self) -> bool:
        return (
            not (self._recomputing or self._paused or self._replaying) and torch.is_grad_enabled()
        )

    def _traced_model_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._traces_pass():
            return
        tensors = _flat_tensors(args, []) + _flat_tensors(kwargs, [])
        if self.idle:
            # measure_every: an unmeasured step's graph opens its pass (to count its examples)
            # and has no other hook in it. Dynamo guards the graph on ``idle``, which the hooks
            # read while tracing, so measured and unmeasured steps run two graphs; the event
            # says which one this is, checked when it runs (on_forward_event)
            self._trace_batch = None
            compiled.emit_forward(self._key, "open", 1, tensors, [])
            return
        self._trace_batch = _batch_tensor(args, kwargs, self._model_dim)
        compiled.emit_forward(self._key, "open", 0, tensors, [])

    def _traced_model_output(self, module: nn.Module, args: tuple, output: Any) -> Any:
        self._trace_batch = None
        if not self._traces():
            return None
        token = compiled.emit_forward(self._key, "output", 0, [], [])

        def root(t: Any) -> Any:
            if isinstance(t, Tensor) and t.requires_grad:
                return compiled.tap_output(self._key, token, t, ())
            return t

        if isinstance(output, Tensor):
            return root(output)
        if isinstance(output, tuple | list):
            return type(output)(root(v) for v in output)
        if isinstance(output, dict):
            for k, v in list(output.items()):
                output[k] = root(v)
        return None

    def _traced_products(self, module: nn.Module, args: tuple) -> bool:
        """:meth:`_on_weight_enter`'s decision, from what does not change between passes."""
        if not (self.subbatches and self.per_example and self._replay_allowed):
            return False
        rule, _, params = self._calls[module]
        weight = params.get("weight")
        if not _by_products(module, rule) or weight is None:
            return False
        if id(weight) in self._multi_use or module in self._learned_shared:
            return False
        n = self.traced_batch_size()
        x = args[0] if args else None
        if n is None or n < 2 or not isinstance(x, Tensor):
            return False
        if isinstance(x, compiled.CompiledShared) or x.dim() == 0 or x.shape[0] != n:
            return False
        k = min(self.subbatches, n)
        return subbatch_mod.uses_products(module, x, n, -(-n // k))

    def _traced_weight_enter(self, module: nn.Module, args: tuple) -> None:
        if self._traces() and self._traced_products(module, args):
            weight = self._calls[module][2]["weight"]
            bias = self._bias_with_products(module, weight)
            module._parameters["weight"] = weight.detach()  # type: ignore[assignment]
            if bias is not None:
                module._parameters["bias"] = bias.detach()  # type: ignore[assignment]

    def _traced_weight_exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._traces() and self._traced_products(module, args):
            params = self._calls[module][2]
            module._parameters["weight"] = params["weight"]
            if "bias" in params:
                module._parameters["bias"] = params["bias"]

    def _traced_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self._traces():
            return None
        params = self._calls[module][2]
        n = self.traced_batch_size()
        if n is None:
            return None
        products = self._traced_products(module, args)
        flat = [v for v in _flat_values(args, kwargs) if isinstance(v, Tensor)]
        x = save_first_input(module, args, kwargs, output)
        shared_input = any(isinstance(v, compiled.CompiledShared) for v in flat)
        sized = _batch_tensor(args, kwargs, 0)
        size = None if sized is None else sized.shape[0]
        if not isinstance(x, Tensor):
            compiled.emit_forward(self._key, "unsupported:a call on a non-tensor", 0, [], [])
            return None
        if (
            not shared_input
            and module not in self._learned_shared
            and _flat_size(self._calls[module][0], module, size, n)
        ):
            # perhaps the examples flattened together with positions, which only the eager
            # hooks can prove (from the input's autograd history) and measure: the pass is
            # withheld and the model runs eagerly while it is measured
            compiled.emit_forward(
                self._key,
                "unsupported:a layer on rows that may be examples flattened together "
                "with positions",
                0,
                [],
                [],
            )
            return None
        if shared_input or size != n or module in self._learned_shared:
            return self._traced_shared_call(module, args, kwargs, output, flat, x)
        out = _first(output)
        if not products and not (isinstance(out, Tensor) and out.requires_grad):
            return None
        site = self._site[module]
        bias = self._bias_with_products(module, params["weight"]) if products else None
        taken = {"weight", "bias"} if bias is not None else {"weight"} if products else set()
        token = compiled.emit_forward(
            self._key, "call", site, flat, [int(products), int(bias is not None)]
        )
        y = out
        if products:
            y = compiled.tap_weight(self._key, site, token, y, x.detach(), params["weight"], bias)
        if any(name not in taken for name in params) and y.requires_grad:
            y = compiled.tap_output(self._key, token, y, (x,))
        return _replace_first(output, y)

    def _traced_shared_call(
        self, module: nn.Module, args: tuple, kwargs: dict, output: Any, flat: list, x: Any
    ) -> Any:
        if not isinstance(output, Tensor) or any(
            isinstance(v, compiled.CompiledShared) for v in flat
        ):
            # a layer on a shared tensor, or one with several outputs: not followed here
            compiled.emit_forward(self._key, "unsupported:a shared call", 0, [], [])
            return None
        site = self._site[module]
        token = compiled.emit_forward(self._key, "shared", site, flat, list(output.shape))
        return compiled.share(output, (self, self._key, token, (x,)))

    def _traced_scope_enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """:meth:`_on_scope_enter` while tracing: the module's parameters, followed as
        :class:`~noisescale.per_example.compiled.CompiledShared` to where they meet the batch."""
        if not self._traces() or self.traced_batch_size() is None:
            return
        for holder, name, pid in self._scopes[module]:
            real = holder._parameters.get(name)
            if real is None or isinstance(real, compiled.CompiledShared):
                continue
            token = compiled.emit_forward(self._key, "param", self._param_index[pid], [], [])
            alias = compiled.share(real, (self, self._key, token, ()))
            holder._parameters[name] = alias  # type: ignore[assignment]

    def _traced_scope_exit(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        for holder, name, pid in self._scopes[module]:
            if isinstance(holder._parameters.get(name), compiled.CompiledShared):
                holder._parameters[name] = self._param[pid]

    def _new_record(self, record: _Record) -> int:
        token = self._next_token
        self._next_token += 1
        self._records[token] = record
        return token

    def on_forward_event(
        self, kind: str, site: int, tensors: Sequence[Tensor], sizes: Sequence[int]
    ) -> int:
        """A traced hook's per-pass work, run by the compiled graph (``noisescale::
        forward_event``); returns the token its backward reports with (0: nothing recorded)."""
        if kind == "open":
            if bool(site) != self.idle:
                self._refuse_graph(traced_idle=bool(site))
            self._open_pass(tuple(tensors), {})
            return 0
        # (not _active(): a compiled forward runs with gradients off; the trace checked them)
        if self._recomputing or self._paused or self._replaying or not self.passes:
            return 0
        pass_ = self.passes[-1]
        pass_.compiled = True
        if not pass_.amp:  # (as _on_forward: autocast entered inside the model's forward)
            pass_.amp = _autocast_enabled()
        if kind == "blocked":  # (also in an unmeasured step's graph: such hooks do not read idle)
            pass_.compiled_blocked = True
            return 0
        if pass_.idle:  # (a block compiled by itself: the model's own hook opened the pass)
            self._refuse_graph(traced_idle=False)
        if kind == "output":
            if self.per_example and not pass_.skipped:
                self._audit_wanted(pass_)
            return self._new_record(_Record("root", pass_))
        if kind.startswith("unsupported:"):
            if pass_.compiled_unsupported is None:
                pass_.compiled_unsupported = kind.partition(":")[2]
            return 0
        if kind == "meet":
            return self._compiled_meeting(pass_, int(tensors[0]), sizes)
        if kind == "param":
            if pass_.skipped:
                return 0
            p = self._params[site]
            pid = id(p)
            pass_.aliased.add(pid)
            meta = torch.empty(p.shape, device="meta")
            source = Source(tensor=meta, pid=pid, label=self._param_name[pid])
            return self._new_record(_Record("param", pass_, source=source))
        module = self._modules[site]
        rule, label, params = self._calls[module]
        if rule.check is not None:
            rule.check(module, label)
        n = pass_.batch_size
        pattern = tuple(_shape_pattern(t, n) for t in tensors)
        if kind == "shared":
            if pass_.skipped:
                return 0
            size = int(tensors[0].shape[0]) if tensors and tensors[0].dim() > 0 else 0
            why = (
                f"its input's leading dimension has the batch's size {n}, but the audit found "
                "its rows are not the examples"
                if module in self._learned_shared
                else f"its input's leading dimension {size} is not the batch's {n} examples"
            )
            call = _Call(module, rule, label, params, 0, [], size=size, why=why)
            operand = torch.empty(tuple(sizes), device="meta")
            source = Source(tensor=operand, call=call, label=label)
            pass_.shared_calls.append(call)
            pass_.signature.append(("shared-call", id(module), pattern))
            return self._new_record(_Record("shared", pass_, call=call, source=source))
        record = _Record("call", pass_)
        if sizes[0]:  # the weight's gradient comes from its sub-batch products
            weight = params["weight"]
            bias = params["bias"] if len(sizes) > 1 and sizes[1] else None  # (and the bias's)
            record.job, params = self._product_job(pass_, module, rule, params, weight, bias)
        token = self._new_record(record)
        if pass_.skipped:
            return token
        if record.job is not None and not params:
            pass_.signature.append(("products", id(module), pattern))
            return token
        record.call = _Call(module, rule, label, params, 0, [None], [0], n)
        for p in params.values():
            pass_.uses[id(p)] = pass_.uses.get(id(p), 0) + 1
        pass_.signature.append(("call" if record.job is None else "products", id(module), pattern))
        return token

    def _refuse_graph(self, traced_idle: bool) -> None:
        """A compiled graph traced for one kind of step (measure_every: measured or not) ran on
        the other — were Dynamo ever to stop guarding its graphs on :attr:`idle`."""
        raise UnsupportedModuleError(
            f"a compiled graph traced for {'an unmeasured' if traced_idle else 'a measured'} "
            f"step ran on {'a measured' if traced_idle else 'an unmeasured'} one "
            "(measure_every): torch.compile did not recompile for the tracker's state, so this "
            "step cannot be measured as asked. Please report it with your torch version; "
            "meanwhile use measure_every=1"
        )

    def _compiled_meeting(self, pass_: PassNorms, call_token: int, shape: Sequence[int]) -> int:
        """:meth:`add_meeting` for a shared call's output broadcast to the batch's ``shape``."""
        shared = self._records.get(call_token)
        if pass_.skipped or shared is None or shared.source is None:
            return 0
        source = shared.source
        origin = Origin(self, pass_, (source,))
        meeting = Meeting("expand", None, origin)
        meeting.box.insert(0, True)  # alive until the backward takes it
        slot = pass_.slots.get(id(source))
        if slot is None:
            slot = pass_.slots[id(source)] = _Slot(source, pass_=pass_)
            for pid in self._source_pids(source):
                pass_.uses[pid] = pass_.uses.get(pid, 0) + 1
        slot.expected += 1
        meeting.extra["routes"] = [("vjp", None, (origin, source.tensor))]
        meeting.extra["dim"] = 0
        n = pass_.batch_size
        hooked = (len(shape), tuple(i for i, s in enumerate(shape) if s == n))
        pass_.signature.append(("meet", "expand", (source.label,), hooked))
        return self._new_record(_Record("meet", pass_, call=shared.call, meeting=meeting))

    def on_backward_event(self, token: int, tensors: Sequence[Tensor]) -> None:
        """A traced hook's backward, run by the compiled backward (``noisescale::
        backward_event``): ``tensors`` are what the hook saved, then the output gradient."""
        record = self._records.get(token)
        if record is None:
            return
        pass_, grad = record.pass_, tensors[-1]
        if record.kind == "root":
            if not (self._replaying or self._paused):
                self._enter(pass_)
        elif record.kind == "call" and record.call is not None:
            call = record.call
            if call.box:  # empty after a first backward through it (retain_graph=True)
                call.box[0] = tensors[0]
            self._on_call_grad(pass_, call, (grad,))
        elif record.kind == "meet" and record.meeting is not None:
            if record.call is not None:  # (a parameter's meeting saves nothing)
                record.call.box[:] = [tensors[0]]  # the shared call's input, for its rule
            self._on_meeting_grad(pass_, record.meeting, grad)

    def on_weight_grad(
        self, site: int, token: int, x: Tensor, d: Tensor, weight: Tensor, bias: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """A weight's (and with ``bias`` the bias's) gradient from its sub-batch products, run
        by the compiled backward (``noisescale::weight_grad``, ``weight_bias_grad``); their
        sub-batch norms are recorded on the way."""
        record = self._records.get(token)
        job = record.job if record is not None else None
        if job is None:  # no pass recorded the call: the plain product
            module = self._modules[site]
            kind = _product_kind(module, self._calls[module][0])
            plain = _WeightJob(None, module, weight, kind, [], bias=bias)  # type: ignore[arg-type]
            return _plain_weight_grad(plain, x, d)
        grad, bias_grad = self._weight_backward(job, x, d)
        if bias is not None and bias_grad is None:
            bias_grad = torch.zeros_like(bias)
        return (grad if grad is not None else torch.zeros_like(weight)), bias_grad

    # -- meetings (called by SharedTensor) ------------------------------------------------------

    def add_meeting(self, pass_: PassNorms, meeting: Meeting) -> None:
        """Register where a shared tensor meets the batch; its hook runs in the backward."""
        pass_.meetings_added += 1
        if pass_.skipped:
            return
        meeting.box.insert(0, True)  # alive until the backward takes it
        if meeting.kind == "expand":
            plan = [(meeting.shared, None)]
        else:
            plan = [
                (meeting.extra.get("weight"), "weight"),
                (meeting.extra.get("bias"), "bias"),
            ]
        routes: list[tuple[str, Any, Any]] = []
        for operand, role in plan:
            if not isinstance(operand, SharedTensor):
                continue
            origin: Origin = operand._ns_origin  # type: ignore[attr-defined]
            direct = self._direct_route(operand, origin, role, meeting.kind)
            if direct is not None:
                source, relation = direct
                pass_.uses[source.pid] = pass_.uses.get(source.pid, 0) + 1
                routes.append(("direct", role, (source, relation, operand)))
                continue
            for source in origin.sources:
                slot = pass_.slots.get(id(source))
                if slot is None:
                    slot = pass_.slots[id(source)] = _Slot(source, pass_=pass_)
                    for pid in self._source_pids(source):
                        pass_.uses[pid] = pass_.uses.get(pid, 0) + 1
                slot.expected += 1
            routes.append(("vjp", role, (origin, operand)))
        meeting.extra["routes"] = routes
        labels = tuple(sorted(s.label for _, _, r in routes for s in _route_sources(r)))
        pass_.signature.append(
            ("meet", meeting.kind, labels, _shape_pattern(meeting.hooked, pass_.batch_size))
        )
        dim = meeting.extra.get("dim", self.batch_dim())
        meeting.extra["dim"] = dim
        hooked = meeting.hooked
        assert hooked is not None
        pass_.handles.append(
            hooked.register_hook(lambda g, m=meeting, p=pass_: self._on_meeting_grad(p, m, g))
        )
        # (a lookup's target carries its key: an audit may learn that it is shared)
        owner = meeting.extra.get("learn")
        self._add_target(pass_, hooked, dim, owner, f"{meeting.kind} of {', '.join(labels)}")

    def _direct_route(
        self, operand: SharedTensor, origin: Origin, role: str | None, kind: str
    ) -> tuple[Source, tuple[str, int, int]] | None:
        """A meeting whose factor needs no materialised per-example gradient: the shared
        operand is a parameter's alias itself, its transpose or a block of its rows."""
        if kind not in ("linear", "embedding", "conv") or len(origin.sources) != 1:
            return None
        source = origin.sources[0]
        if source.pid is None:
            return None
        relation = view_relation(operand, source.tensor)
        if relation is None:
            return None
        if kind != "linear" and relation[0] != "same":
            return None
        if role == "bias" and relation[0] == "t":
            return None
        return source, relation

    def _source_pids(self, source: Source) -> list[int]:
        if source.pid is not None:
            return [source.pid]
        return [id(p) for p in source.call.params.values()]

    def record_unsupported(self, pass_: PassNorms, origin: Origin, op: str) -> None:
        pass_.unsupported.append((origin, op))

    def record_ambiguous(
        self, pass_: PassNorms, origin: Origin, op: str, shapes: tuple[tuple, tuple], kind: str
    ) -> None:
        pass_.ambiguous.append((origin, op, *shapes, kind))

    # -- backward hooks -----------------------------------------------------------------------

    def _begin(
        self, pass_: PassNorms, pids: Sequence[int], box: list[Any], known: Any = _UNKNOWN
    ) -> bool | None:
        """The checks every per-example hook makes; ``None``: skip, else ``reaches``. ``known``:
        :meth:`_reaches_parameters`'s answer when the caller has it already (``None`` inside
        torch.autograd.grad())."""
        if self._replaying or self._paused:
            return None
        if torch.is_grad_enabled():
            # create_graph=True (gradient penalties, double backward): the loss that is
            # later backpropagated has second-order terms the factors do not see
            pass_.second_order = True
            return None
        reaches: bool | None
        if known is not _UNKNOWN:
            reaches = known
        else:
            try:
                reaches = self._reaches_parameters(pids)
            except RuntimeError:  # inside torch.autograd.grad(): decided when collected
                reaches = None
        if reaches is False:
            return None
        if not box:
            # a second backward through this output (retain_graph=True): the parameter
            # hooks see the repeated gradient and collect() refuses the step
            return None
        self._enter(pass_)
        if not self._measures(pass_, reaches):
            box.clear()
            return None
        return True if reaches is None else reaches

    def _on_call_grad(self, pass_: PassNorms, call: _Call, grads: tuple) -> None:
        reaches = self._begin(pass_, [id(p) for p in call.params.values()], call.box)
        if reaches is None:
            return
        saved = call.box.pop()
        # (no torch.no_grad(): _begin goes on only where gradient mode is off, as in any
        # backward without create_graph)
        first = next((g for g in grads if g is not None), None)
        if first is None:
            return
        rule = call.rule
        if rule.native_layout:
            rows = self._rows(pass_, None, first.device)
            if rows is not None:
                saved = rule.select(call.module, saved, rows)  # type: ignore[misc]
            facs = rule.factors(call.module, saved, grads)
        else:
            g = grads[0]
            if call.flat:
                g = g.unflatten(0, (call.size, call.flat))
            if call.dim != 0:
                g = g.movedim(call.dim, 0)
                saved = _move(saved, call.dim, call.size)
            rows = self._rows(pass_, g, g.device)
            if rows is not None:
                saved = _take_rows(saved, rows, call.size)
                g = g.index_select(0, rows)
            facs = rule.factors(call.module, saved, g)
            if pass_.audit is not None and rule.name == "norm" and _sums_in_16_bits(g):
                # the CPU's LayerNorm/GroupNorm backward adds its weight's and bias's
                # gradients up in 16 bits (Swin's final LayerNorm bias in bf16: 3
                # significant bits left at 32 images); autograd's sum is then no reference
                # for the coverage check — the attribution check still runs
                pass_.audit.skip_sums.update(id(p) for p in call.params.values())
                pass_.audit.unverified = pass_.audit.unverified or (
                    "the coverage of normalisation layers' weights and biases is not "
                    "checked under autocast on the CPU (autograd adds their gradients up "
                    "in 16 bits there)"
                )
        self._deliver(pass_, call.params, facs, reaches)

    def _deliver(
        self,
        pass_: PassNorms,
        params: dict[str, nn.Parameter],
        facs: dict[str, Factor],
        reaches: bool | None,
    ) -> None:
        task = torch._C._current_graph_task_id()
        for pname, factor in facs.items():
            p = params.get(pname)
            if p is None:  # a parameter unfrozen later: collect() reports it
                continue
            if reaches is None:
                if pass_.compiled:
                    factor = _owned(factor, p.shape)
                pass_.deferred.setdefault(task, []).append((p, factor))
            else:
                self._add(pass_, p, factor)

    def _on_meeting_grad(self, pass_: PassNorms, meeting: Meeting, grad: Tensor) -> None:
        pids = [pid for _, _, r in meeting.extra["routes"] for pid in self._route_pids(r)]
        reaches = self._begin(pass_, pids, meeting.box)
        if reaches is None:
            return
        inputs = meeting.box[1:]
        meeting.box.clear()
        dim = meeting.extra["dim"]
        n = pass_.batch_size
        with torch.no_grad():
            kind = meeting.kind
            if kind == "expand":
                # s.repeat(N, 1, …): example i's gradient of s is its own block of k rows
                repeat = meeting.extra.get("repeat", False)
                g = grad.unflatten(0, (n, -1)) if repeat else grad.movedim(dim, 0)
                rows = self._rows(pass_, g, g.device)
                for _, _, (origin, operand) in meeting.extra["routes"]:
                    per = (
                        g.reshape(n, *operand.shape)
                        if repeat
                        else per_example_reduce(grad, tuple(operand.shape), dim, n)
                    )
                    if rows is not None:
                        per = per.index_select(0, rows)
                    self._to_sources(pass_, origin, operand, per, reaches)
            else:
                x = inputs[0] if inputs else None
                self._meeting_factors(pass_, meeting, x, grad, dim, n, reaches)

    def _meeting_factors(
        self,
        pass_: PassNorms,
        meeting: Meeting,
        x: Tensor,
        grad: Tensor,
        dim: int,
        n: int,
        reaches: bool | None,
    ) -> None:
        kind = meeting.kind
        if kind == "linear":
            a, d = _positions(x, grad, dim, n)
            rows = self._rows(pass_, d, d.device)
            if rows is not None:
                a, d = a.index_select(0, rows), d.index_select(0, rows)
            transposed = meeting.extra["transposed"]
            for route, role, data in meeting.extra["routes"]:
                if role == "weight":
                    factor: Factor = LinearFactor(a, d, transposed=transposed)
                    dense = lambda: torch.einsum(  # noqa: E731
                        "npo,npi->nio" if transposed else "npo,npi->noi", _acc(d), _acc(a)
                    )
                else:
                    factor = DenseFactor(d.sum(1))
                    dense = lambda: _acc(d).sum(1)  # noqa: E731
                self._route(pass_, route, data, factor, dense, reaches)
        elif kind == "embedding":
            idx = x.movedim(dim, 0) if dim else x
            g = grad.movedim(dim, 0) if dim else grad
            rows = self._rows(pass_, g, g.device)
            if rows is not None:
                idx, g = idx.index_select(0, rows), g.index_select(0, rows)
            k = idx.shape[0]
            idx2 = idx.reshape(k, -1)
            d3 = g.reshape(k, idx2.shape[1], -1)
            pad = meeting.extra.get("padding_idx")
            if pad is not None:
                d3 = d3 * (idx2 != pad).unsqueeze(-1).to(d3.dtype)
            for route, _, data in meeting.extra["routes"]:
                table = data[2] if route == "direct" else data[1]
                factor = EmbeddingFactor(idx2, d3, table.shape[0])
                flat = torch.Size((table.shape[0], math.prod(table.shape[1:])))
                self._route(
                    pass_, route, data, factor, lambda f=factor, s=flat: f.dense(s), reaches
                )
        elif kind == "conv":
            from noisescale.per_example import conv

            rows = self._rows(pass_, grad, grad.device)
            xx, g = x, grad
            if rows is not None:
                xx, g = x.index_select(0, rows), grad.index_select(0, rows)
            spec = meeting.extra["spec"]
            facs = conv.factors(spec, xx, g)
            for route, role, data in meeting.extra["routes"]:
                factor = facs[role]
                self._route(
                    pass_, route, data, factor,
                    lambda f=factor, op=data[-1]: f.dense(op.shape), reaches,
                )  # fmt: skip

    def _route(
        self,
        pass_: PassNorms,
        route: str,
        data: Any,
        factor: Factor,
        dense: Callable[[], Tensor],
        reaches: bool | None,
    ) -> None:
        if route == "direct":
            source, relation, _ = data
            if relation[0] == "t":
                assert isinstance(factor, LinearFactor)
                factor = LinearFactor(factor.a, factor.d, factor.groups, not factor.transposed)
            elif relation[0] == "rows":
                factor = SliceFactor(factor, relation[1], relation[2])
            self._deliver(pass_, {"p": self._param[source.pid]}, {"p": factor}, reaches)
            return
        origin, operand = data
        per = dense().reshape(-1, *operand.shape)
        self._to_sources(pass_, origin, operand, per, reaches)

    def _to_sources(
        self, pass_: PassNorms, origin: Origin, operand: Tensor, per: Tensor, reaches: bool | None
    ) -> None:
        """Carry per-example gradients of a shared operand back to its sources."""
        sources = origin.sources
        if (
            len(sources) == 1
            and sources[0].tensor is operand
            and (sources[0].edge is None or operand._version == sources[0].version)
        ):
            grads: Sequence[Tensor | None] = [per]
        else:
            # Plain tensors and gradient edges, so that autograd.grad does not dispatch through
            # the shared tensors' __torch_function__: that runs it with subclass dispatch
            # disabled, and a forward activation checkpointing recomputes inside it would then
            # skip the shared tensors' handling and save other tensors than the original
            # forward did (checkpoint's CheckpointError: Mixtral's router, checkpointed)
            with torch._C.DisableTorchFunctionSubclass(), torch.enable_grad():
                output = operand.as_subclass(Tensor)  # an alias, upstream of operand's graph
                edge = torch.autograd.graph.get_gradient_edge
                edges = [s.edge if s.edge is not None else edge(s.tensor) for s in sources]
            with audit_mod.replaying(), torch.enable_grad():
                grads = _batched_grad(output, edges, per.to(operand.dtype))
        for source, g in zip(sources, grads, strict=True):
            slot = pass_.slots.get(id(source))
            if slot is None:
                continue
            if g is not None:
                g = _acc(g)
                slot.total = g if slot.total is None else slot.total + g
            slot.arrived += 1
            if slot.arrived >= slot.expected:
                self._finish_slot(pass_, slot, reaches)
            elif pass_.compiled and slot.total is g:
                slot.total = g.clone()  # it may be a view of the compiled graph's memory

    def _finish_slot(self, pass_: PassNorms, slot: _Slot, reaches: bool | None) -> None:
        del pass_.slots[id(slot.source)]
        source = slot.source
        if source.pid is not None:
            if slot.total is None:
                return
            p = self._param[source.pid]
            self._deliver(
                pass_, {"p": p}, {"p": DenseFactor(slot.total.reshape(-1, *p.shape))}, reaches
            )
            return
        call: _Call = source.call
        saved = call.box[0]
        if slot.total is None:
            return
        per = slot.total  # [k, *output shape]: each example's gradient of the call's output
        k = per.shape[0]
        rows = call.rule.shared_rows
        if rows is not None and isinstance(saved, Tensor) and rows(call.module, saved):
            # each example made the call on all m rows: the factors of the k·m (example, row)
            # pairs, summed over each example's m rows (contiguous groups of m)
            m = saved.shape[0]
            x = saved.unsqueeze(0).expand(k, *saved.shape).reshape(k * m, *saved.shape[1:])
            facs = call.rule.factors(call.module, x, per.reshape(k * m, *per.shape[2:]))
            index = torch.arange(k * m, device=per.device)
            groups = Subbatches(index, index[:0], k, m, (m,) * k)
            facs = {name: group_factor(f, groups) for name, f in facs.items()}
        else:
            facs = call.rule.factors(call.module, _expand_saved(saved, k), per)
        self._deliver(pass_, call.params, facs, reaches)

    def _route_pids(self, route: Any) -> list[int]:
        if isinstance(route, tuple) and len(route) == 3 and isinstance(route[0], Source):
            return [route[0].pid]
        origin = route[0]
        return [pid for s in origin.sources for pid in self._source_pids(s)]

    def _enter(self, pass_: PassNorms) -> None:
        """Record that the running backward goes through ``pass_``."""
        task = torch._C._current_graph_task_id()
        pass_.tasks.add(task)
        self._task_pass.setdefault(task, pass_)

    def _reaches_parameters(self, pids: Sequence[int]) -> bool:
        """Whether the running backward computes gradients of these parameters.

        False for a backward towards the inputs only (adversarial examples, saliency maps).
        """
        for pid in pids:
            node = self._accumulator(pid)
            if node is None or torch._C._will_engine_execute_node(node):
                return True
        return False

    def _measures(self, pass_: PassNorms, reaches: bool | None) -> bool:
        """Whether this pass's per-example norms are computed (decided once per pass).

        Every pass's are for the exact mode (and audited passes). With a subset, the pass at
        ``subset_position`` among those the step's backwards reach is measured, in whatever
        backward later runs through it, and the others are skipped. Inside
        torch.autograd.grad() (``reaches`` ``None``) whether the parameters are reached is known
        only at collect(): such a pass is computed without taking a position.
        """
        if pass_.measured:
            return True
        if pass_.skipped:
            return False
        if self.per_example_fraction >= 1.0:
            return True
        if reaches is None:
            return True
        # one position per backward: the forwards that one backward runs through together
        # (two forwards, one loss) are one pass of the step (merged at collect), measured or
        # skipped together (before 2026-12-04 each forward took a position of its own, so only
        # part of such a pass was measured, the later ones never, and the audit refused)
        task = torch._C._current_graph_task_id()
        measured = self._task_measured.get(task)
        if measured is None:
            position, self._positions = self._positions, self._positions + 1
            measured = self._task_measured[task] = position == self.subset_position
        if measured:
            pass_.measured = self._measured_found = True
            return True
        pass_.skipped = True
        return False

    def _rows(self, pass_: PassNorms, grad: Tensor | None, device: torch.device) -> Tensor | None:
        """The pass's random subset of examples (the same for every layer), or ``None`` for all.

        ⌈fraction·N⌉ rows for a step of N examples (N from the last step while this one is
        running: its first micro-batch does not know how many follow), at most the pass's own.
        They are drawn with replacement, example i with probability q_i = ½/n + ½·π_i/Σπ,
        where π_i = |δ_i|² is the squared norm of example i's rows of the output gradient of
        the layer whose hook runs first (the one nearest the loss: for a classifier or a
        language model, the logits' gradient), which tracks |g_i|². Each drawn norm is later
        weighted by 1/(n·q_i) ≤ 2 (:attr:`PassNorms.row_weights`), so their mean is still
        unbiased for the mean of |g_i|² over the pass (Hansen–Hurwitz), whatever π is; the
        uniform half bounds the weights. An audited pass measures every example.
        """
        if pass_.subbatches is not None:
            return None
        n_pass = pass_.batch_size
        n = max(n_pass, self.last_step_examples or 0)
        k = math.ceil(self.per_example_fraction * n)
        if k >= n_pass:
            return None
        if pass_.rows is None:
            gen = self._generator(device)
            q = torch.full((n_pass,), 1.0 / n_pass, device=device)
            if grad is not None and grad.dim() > 0 and grad.shape[0] == n_pass:
                flat = _acc(grad.detach().reshape(n_pass, -1))
                proxy = torch.linalg.vector_norm(flat, dim=1).square().to(q.dtype)
                total = proxy.sum()
                usable = torch.isfinite(total) & (total > 0)  # no host sync
                q = torch.where(usable, 0.5 * q + 0.5 * proxy / total.clamp_min(1e-30), q)
            # inverse-CDF draws: torch.multinomial validates its input on the host when it draws
            # one sample (a device sync on GPUs, in the torch versions we read)
            cdf = torch.cumsum(q, 0)
            u = torch.rand(k, generator=gen, device=device, dtype=cdf.dtype) * cdf[-1]
            rows = torch.searchsorted(cdf, u, right=True).clamp_max(n_pass - 1)
            pass_.rows = rows
            pass_.row_weights = 1.0 / (n_pass * q[rows])
        if pass_.audited:
            # the audit needs every example; the drawn rows are picked when the pass is
            # collected, so an audited step reports exactly what it would have without the audit
            return None
        return pass_.rows if pass_.rows.device == device else pass_.rows.to(device)

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
            gen.manual_seed(self._seed)
        return gen

    def _draw_subset_position(self, reached: int) -> int:
        """Which pass of the next step is measured: drawn on the host (a CPU generator), so
        reading it never waits for a device."""
        gen = self._generator(torch.device("cpu"))
        return int(torch.randint(reached, (1,), generator=gen))

    def _audit_generator(self, device: torch.device) -> torch.Generator:
        """The audit's own random stream: auditing a step never shifts the subset's draws."""
        gen = self._audit_generators.get(device)
        if gen is None:
            gen = self._audit_generators[device] = torch.Generator(device=device)
            gen.manual_seed(self._seed ^ 0x5EED)
        return gen

    def rng_state(self) -> dict[str, list[int]]:
        """The states of the subset generators by device (for checkpoints: an exact resume)."""
        return {str(d): g.get_state().tolist() for d, g in self._generators.items()}

    def set_rng_state(self, state: dict[str, list[int]]) -> None:
        """Restore :meth:`rng_state`."""
        for device, values in state.items():
            self._generator(torch.device(device)).set_state(torch.tensor(values, dtype=torch.uint8))

    def _guard_param_hooks(self) -> None:
        """Hooks of others on a parameter's gradient (``p.register_hook``: a mask, a clamp, a
        logger) run between two sentinels, and this engine's own hook after them: the first
        sentinel notes the gradient that arrives, the last one whether it is still that tensor,
        unchanged (its version), so a hook that changes it is found on every step, whether it
        was registered before the tracker or after. The per-example norms are computed before
        such a hook and ``.grad`` after it (:meth:`collect` refuses); micro-batch norms, taken
        by our hook, see what ``.grad`` gets. Checked at each measured forward: ~0.3 µs a
        parameter, and nothing more where no other hook is registered."""
        for pid, p in self._param.items():
            self._guard_post_hooks(pid, p)
            hooks = p._backward_hooks
            guarded = self._sentinels.get(pid)
            if hooks is None or len(hooks) == (1 if guarded is None else 3):
                continue
            if guarded is None:
                entry = p.register_hook(lambda g, pid=pid: self._hook_entry(pid, g))
                leave = p.register_hook(lambda g, pid=pid: self._hook_exit(pid, g))
                guarded = self._sentinels[pid] = (entry, leave)
                self._handles += [entry, leave]
            _order(hooks, guarded[0].id, [self._param_hook[pid].id, guarded[1].id])

    def _guard_post_hooks(self, pid: int, p: nn.Parameter) -> None:
        """Hooks run after the gradient's accumulation (``register_post_accumulate_grad_hook``:
        the Trainer callback's, an optimizer run inside the backward) between two sentinels
        too: one that changes ``.grad`` does so before the backward's end, where
        :meth:`changed_grads` takes its marks, and after every norm was taken."""
        hooks = p._post_accumulate_grad_hooks
        guarded = self._post_sentinels.get(pid)
        if not hooks or len(hooks) == (0 if guarded is None else 2):
            return
        if guarded is None:
            entry = p.register_post_accumulate_grad_hook(
                lambda q, pid=pid: self._hook_entry(pid, q.grad, post=True)
            )
            leave = p.register_post_accumulate_grad_hook(
                lambda q, pid=pid: self._hook_exit(pid, q.grad, post=True)
            )
            guarded = self._post_sentinels[pid] = (entry, leave)
            self._handles += [entry, leave]
        _order(hooks, guarded[0].id, [guarded[1].id])

    def _hook_entry(self, pid: int, grad: Tensor | None, post: bool = False) -> None:
        if not (self._paused or self._replaying):
            self._hook_in[pid, post] = (grad, -1 if grad is None else grad._version)

    def _hook_exit(self, pid: int, grad: Tensor | None, post: bool = False) -> None:
        seen = self._hook_in.pop((pid, post), None)
        if seen is not None and (
            seen[0] is not grad or seen[1] != (-1 if grad is None else grad._version)
        ):
            self._hook_changed.append((pid, post))

    def _make_param_hook(self, pid: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            if self._paused or self._replaying:
                return
            task = torch._C._current_graph_task_id()
            current = self._task_pass.get(task) or (self.passes[-1] if self.passes else None)
            if current is None:
                return
            current.tasks.add(task)
            current.param_tasks.add(task)
            self._task_pass.setdefault(task, current)
            repeated = pid in current.received
            if repeated:
                current.repeated_backward = True
            current.received.add(pid)
            if not current.wrote and self._accumulates(task, pid):
                current.wrote = True
            elif task in self._grad_only_tasks:
                current.grad_only = True
            if self._step_marks and not repeated and self._accumulates(task, pid):
                self._check_zeroed(pid)
            if current.idle:
                return
            if current.audit is not None:
                current.audit.record_grad(pid, grad)
                if current is self.passes[0] and not repeated:
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
        mark = self._step_marks.pop(pid, None)
        if mark is None:
            return
        g = self._param[pid].grad
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
        self._hook_changed, self._between = [], None
        self._unzeroed = []
        self._hook_in.clear()
        self._unopened = None
        self._unopened_params = []

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
        self.unzeroed = None
        self.unread_picks = []  # (set below, from the passes of the step's training backwards)
        self.unopened = self._unopened
        # the parameters of that layer: not learned as direct uses of the forward (a use
        # outside it, inputs_embeds built by the caller, would never be seen)
        self._outside_params = set(self._unopened_params)
        if self._unzeroed:
            held = torch.stack([flag.to(self._unzeroed[0][1].device) for _, flag in self._unzeroed])
            self.unzeroed = next(
                (name for (name, _), h in zip(self._unzeroed, held.tolist(), strict=True) if h),
                None,
            )
        self._reset_step()  # the step's state reset, whatever is refused below
        if any(p.wrote for p in done):
            # A pass whose gradients only torch.autograd.grad took (the ascent of
            # sharpness-aware minimization, a gradient logged for a held-out batch, the inner
            # step of first-order MAML) is not part of .grad: not a micro-batch of the step (a
            # review found each counted as one, b_big 2x and tr Σ 2.7x off). (Where no pass
            # wrote .grad, they stay: a .grad assigned by hand is refused by the tracker.)
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
                "under `with tracker.paused():`, its gradients zeroed before the measured pass; "
                "with torch.optim.LBFGS, whose closure runs several passes per step, call "
                "tracker.step() inside the closure, after its backward"
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
            if pass_.second_order and pass_.received:
                raise NoiseScaleInputError(
                    "a backward with create_graph=True (a gradient penalty or double backward) "
                    "ran through the model before the parameters' gradients were computed; "
                    "per-example norms do not include its second-order terms. Use "
                    "per_example=False (micro-batch norms are exact there)"
                )
            if pass_.repeated_backward:
                raise NoiseScaleInputError(
                    "two backward passes ran through one forward (retain_graph=True), so the "
                    "gradient norms of their sum are unknown; add the losses and call backward "
                    "once per forward"
                )
        compiled_step = any(p.compiled or p.compiled_call for p in done)
        self._seen_compiled = self._seen_compiled or compiled_step
        # (the passes of backwards that reached the parameters: not a saliency probe's)
        trained = set().union(*(p.param_tasks for p in done))
        _refuse_same_input_twice([p for p in done if p.tasks & trained and not p.idle])
        _refuse_fed_by_its_own_output([p for p in done if p.tasks & trained])
        self._take_unread_picks([p for p in done if p.tasks & trained and not p.idle])
        opened = len(done)
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
            for pass_ in done:
                try:
                    self._settle(pass_, learn)
                except UnsupportedModuleError as err:
                    if not (pass_.reentrant or _reentrant_checkpointing(self.model)):
                        raise
                    raise UnsupportedModuleError(
                        f"{_REENTRANT_LEAD} (what the engine met there: {err})"
                    ) from err
        # an audited step runs eagerly, in compiled models too
        self._eager_steps.want(
            self._compiled_eagerly
            or (self.per_example and self.auditing_enabled and self._audit_due)
        )
        self._prepare_compile()
        return done

    def _settle(self, pass_: PassNorms, learn: bool) -> None:
        """Check the pass's coverage and audit; adapt or refuse."""
        if pass_.skipped:
            return
        if pass_.broken is not None:
            self._withhold(
                pass_,
                f"{pass_.broken}; from the next step on its sub-batch norms come from its "
                "factors (with the cross terms between its uses)",
            )
            return
        if pass_.unsupported:
            self._on_unsupported(pass_, learn)
            if pass_.withheld is not None:
                return
        if pass_.compiled_call and not (pass_.compiled or pass_.covered) and pass_.received:
            # none of the layer hooks ran in a compiled forward: Dynamo ran a graph it had
            # compiled before they existed (it does not guard on hooks by default, so it does
            # not notice hooks added later). Dropped; later compilations guard on hooks
            # (_prepare_compile).
            self._withhold(
                pass_,
                "its forward ran a graph that torch.compile made before the tracker's hooks "
                "existed; the compiled code is reset (torch._dynamo.reset()) and recompiled "
                "with them from the next step on",
            )
            torch._dynamo.reset()
            return
        if pass_.compiled and self._settle_compiled(pass_):
            return
        if pass_.coupled is not None:
            raise UnsupportedModuleError(_coupled_message(pass_))
        if pass_.loss_unfollowed is not None:
            if not learn:
                raise UnsupportedModuleError(pass_.loss_unfollowed)
            self._withhold(pass_, f"{pass_.loss_unfollowed}; the next audited step checks again")
            return
        findings = (
            pass_.audit.finish(pass_.received, self._param_name)
            if pass_.audit is not None
            else audit_mod.Findings()
        )
        missing = pass_.received - pass_.covered
        if findings.unpermuted:
            # (a shared call that never met the batch says more about the cause: first)
            self._refuse_unmet_shared(pass_, missing)
            raise UnsupportedModuleError(self._audit_message(findings))
        if pass_.ambiguous:
            # (after the permutation check, which names the cause when it is time-major data)
            # (a tensor of parameters alone: a penalty's, never a router's auxiliary loss)
            raise UnsupportedModuleError(self._with_cause(_ambiguous_message(pass_), False))
        if findings.ok and not missing:
            if pass_.audit is not None:
                self._audited_signatures.add(pass_.audit.signature)
                if pass_.audit.nodes is not None:
                    self._audited_nodes.add((pass_.audit.signature, pass_.audit.nodes))
                if pass_.audit.unverified:
                    self.audit_log.append(pass_.audit.unverified)
            return
        if findings.unverified_flat:
            self._on_unverified_flat(pass_, findings, learn)
            return
        flat_wrong = [t.module for t in findings.misattributed if t.module in pass_.flat_calls]
        if flat_wrong:
            if not learn:
                names = ", ".join(f"'{self._labels[m]}'" for m in flat_wrong)
                others = len(flat_wrong) < len(findings.misattributed) or bool(
                    findings.unexplained or missing
                )
                raise UnsupportedModuleError(
                    "noisescale's audit of this step failed, so it refuses to report "
                    f"per-example norms that could be wrong: the rows of {names}, whose input's "
                    "leading dimension is a multiple of the batch's size, were measured as each "
                    "example's rows in turn (the examples flattened together with positions, "
                    "x.reshape(-1, D) of a batch-first [N, T, D]), and they are not each "
                    "example's rows in turn (a time-major [T, N, D] flattened, or rows routed "
                    "or sorted across examples). GradientNoiseTracker learns this on its first "
                    "step and treats such layers as shared from the next; a one-shot "
                    "measurement cannot. Flatten with the examples first, or use "
                    "per_example=False"
                    + (". Besides: " + self._audit_message(findings) if others else "")
                )
            self._learned_shared.update(flat_wrong)
            names = ", ".join(sorted({f"'{self._labels[m]}'" for m in flat_wrong}))
            self._withhold(
                pass_,
                f"the audit found that the rows of layer(s) {names}, whose input's leading "
                "dimension is a multiple of the batch's size, are not each example's rows in "
                "turn (examples flattened together with positions, x.reshape(-1, D) of a "
                "batch-first activation, would be); they are treated as shared from the next "
                "step on",
            )
            return
        self._refuse_unmet_shared(pass_, missing)
        unexplained = set(findings.unexplained) | missing
        if (
            learn
            and unexplained
            and not findings.misattributed
            and self._learn_direct_uses(pass_, sorted(unexplained))
        ):
            return
        if findings.misattributed and not missing:
            self._on_audit_failure(pass_, findings, learn)
            return
        if missing:
            names = sorted(self._param_name[pid] for pid in missing)
            raise UnsupportedModuleError(
                f"parameters {names} received gradients but noisescale saw no use of them that "
                "it can attribute to examples (used outside their module, e.g. "
                "`F.linear(x, other.weight)`, or read through a method of their module other "
                "than forward, e.g. timm's `self.rel_pos.get_bias()` for a relative-position "
                "table; inside a torch.autograd.Function, whose operations autograd does not "
                "record — a fused linear-cross-entropy loss on the output head's weight "
                "(Liger's, Cut Cross-Entropy): compute the logits with the head and a plain "
                "cross-entropy; or in the loss outside the model's forward, e.g. "
                "a weight penalty: use the optimizer's weight_decay instead). Call the owning "
                "module, register a rule for the module that uses them "
                "(noisescale.register_layer), or use per_example=False"
                + (
                    ""
                    if learn
                    else ". (If they are used directly in a module's forward — torchvision "
                    "Swin's attention passes self.qkv.weight to F.linear — GradientNoiseTracker "
                    "learns those uses on its first step and measures them exactly from the "
                    "next; a one-shot measurement cannot.)"
                )
            )
        text = self._audit_message(findings)
        if not learn and unexplained and not findings.misattributed:
            text = text.rstrip(".") + (
                ". If it is a weight used directly in a module's forward beside its layer (a "
                "read-out h @ emb.weight.T next to emb(ids)), GradientNoiseTracker learns such "
                "uses on its first step and measures them exactly from the next; a one-shot "
                "measurement cannot"
            )
        raise UnsupportedModuleError(text)

    def _audit_message(self, findings: audit_mod.Findings) -> str:
        """The failed audit's findings, led by the likely cause where the model names one."""
        return self._with_cause(findings.message(self._labels, None, self._param_name))

    def _with_cause(self, text: str, auxiliary: bool = True) -> str:
        """A refusal led by the likely cause where the model names one (a term its forward adds
        to its loss: a mixture of experts' auxiliary loss unless ``auxiliary`` is false,
        AdaLoRA's orthogonality penalty when the model returned a loss)."""
        cause = (_auxiliary_loss_cause(self.model) if auxiliary else None) or (
            _penalty_cause(self.model) if self._returned_loss else None
        )
        return text if cause is None else f"{cause} What noisescale found: {text}"

    def _refuse_unmet_shared(self, pass_: PassNorms, missing: set[int]) -> None:
        """Refuse a pass in which parameters of a shared call, or parameters used directly,
        got gradients that no meeting with the batch gave."""
        for call in pass_.shared_calls:
            if any(id(p) in missing for p in call.params.values()):
                raise UnsupportedModuleError(
                    f"layer '{call.label}' was treated as shared by all examples ({call.why}), "
                    "but its output never met the batch (it was never combined with per-example "
                    "activations). noisescale takes dim 0 of a layer's input as the example "
                    "dimension: keep activations batch-first, the examples not flattened "
                    "together with attention heads (flattened with positions, each example's "
                    "rows in turn, they are measured for Linear, Conv1D, LayerNorm and "
                    "RMSNorm; time-major built-in layers such as nn.LSTM(batch_first=False) are "
                    "handled), or use per_example=False"
                )
        aliased = sorted(self._param_name[pid] for pid in missing & pass_.aliased)
        if aliased:
            raise UnsupportedModuleError(
                f"parameters {aliased} received gradients that no use noisescale followed "
                "gave: read outside the model's forward (in the loss: model.temperature — "
                "return it from the forward instead, where it is followed), or used directly in "
                "their module's forward but never combined with a tensor whose dim 0 has the "
                f"batch's {pass_.batch_size} examples (time-major activations; examples "
                "flattened together with positions or routed to experts: x.reshape(-1, D), a "
                "mixture of experts' eager loop — keep dim 0 the examples; transformers' "
                "experts_implementation='batched_mm' is followed; or a custom "
                "torch.autograd.Function, whose outputs noisescale cannot follow a parameter "
                "through), or use per_example=False"
            )

    def _settle_compiled(self, pass_: PassNorms) -> bool:
        """What only a pass that ran inside a compiled graph can reveal; ``True``: withheld.

        A structure never audited (a new input shape) is audited eagerly on the next step. An
        operation the traced hooks do not follow, or a parameter whose gradient the graph did
        not report (a graph break inside its layer's forward makes Dynamo drop the hook's
        backward), makes the eager hooks run outside the graph from the next step on.
        """
        if pass_.compiled_blocked:
            self._withhold(
                pass_,
                f"its forward ran inside a compiled graph, which the hooks cannot measure in "
                f"this model ({self.compile_blocker}); from the next step on compiled code runs "
                "eagerly",
            )
            self._run_compiled_code_eagerly()
            return True
        if pass_.compiled_unsupported is not None:
            learned = (
                "a tensor shared by every example (a layer's output on input without the "
                f"batch's examples) meets the batch in '{pass_.compiled_unsupported}', which "
                "the traced hooks do not follow"
            )
        elif pass_.received - pass_.covered:
            names = sorted(self._param_name[pid] for pid in pass_.received - pass_.covered)
            learned = (
                f"the compiled graph did not report the per-example gradients of parameters "
                f"{names} (a graph break inside their layer's forward?)"
            )
        elif pass_.unaudited:
            self._audit_due = True
            self._withhold(
                pass_,
                "its forward ran inside a compiled graph with a structure (shapes, layers) not "
                "audited yet, which an audit must see eagerly: the next step runs eagerly",
            )
            return True
        else:
            return False
        self._compile_learned = learned
        self._update_compile_blocker()
        self._withhold(
            pass_,
            f"under torch.compile, {learned}; from the next step on compiled code runs eagerly",
        )
        self._run_compiled_code_eagerly()
        return True

    def _learn_direct_uses(self, pass_: PassNorms, pids: list[int]) -> bool:
        """Follow parameters through the whole forward from the next step on: rule-owned ones
        used outside their layer too, and those of a module without a rule whose forward never
        ran (timm's relative-position tables, read by the attention's forward through
        ``self.rel_pos.get_bias()``)."""
        if any(self._param_name.get(pid) in self._outside_params for pid in pids):
            return False
        new_scopes = []
        for pid in pids:
            holders = self._holders(pid)
            if not holders:
                return False
            for holder, name in holders:
                known = any(
                    h is holder and n == name for h, n, _ in self._scopes.get(self.model, [])
                )
                if known:
                    return False  # already followed: the use is outside the forward
                new_scopes.append((holder, name, pid))
        first_time = self.model not in self._scopes
        self._scopes.setdefault(self.model, []).extend(new_scopes)
        # used in their layer and outside it: sub-batch products keep what cross terms need
        # (or leave them to the factors) from the next step on, not a step later
        self._multi_use.update(pids)
        self._update_compile_blocker()
        if first_time:
            self._install_scope(self.model)
        for holder, _, _ in new_scopes:
            if holder in self._calls:  # (a rule-less holder's own forward hands out aliases)
                self._guard_holder(holder)
        names = sorted(self._param_name[pid] for pid in pids)
        self._withhold(
            pass_,
            f"parameters {names} are used outside the layers that own them; their direct uses "
            "in the model's forward are followed from the next step on",
        )
        return True

    def _withhold(self, pass_: PassNorms, reason: str) -> None:
        pass_.withheld = reason
        pass_.raw_sqnorms = None
        pass_.group_sqnorms = None
        self.audit_log.append(reason)

    def _on_unsupported(self, pass_: PassNorms, learn: bool) -> None:
        owners: dict[nn.Module, str] = {}
        for origin, op in pass_.unsupported:
            scope = origin.scope
            calls = [s.call for s in origin.sources if s.call is not None]
            if calls:
                call = calls[0]
                raise UnsupportedModuleError(
                    f"layer '{call.label}' was called on input that is not per-example "
                    f"({call.why}), and its output then met the batch in the operation '{op}', "
                    "which noisescale cannot attribute to examples (e.g. the cells of a "
                    "hand-written recurrent layer run on the active rows of a packed sequence, "
                    "a subset of the batch). Call layers on whole, batch-first activations "
                    "(nn.LSTM/GRU/RNN handle packed sequences exactly), or use per_example=False"
                )
            labels = sorted({s.label for s in origin.sources})
            if scope is not None:
                for name, sub in scope.named_modules():  # (switched to train() since)
                    if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                        norms.check(sub, self._labels.get(sub, name))
            if scope is None or scope is self.model or not self.allow_fallback or not learn:
                raise UnsupportedModuleError(self._unsupported_message(origin, op, labels, scope))
            owners[scope] = op
        for scope in owners:
            fallback.check(scope, self._labels[scope])
            self._fallback.add(scope)
            self._calls_fallback(scope)
        names = ", ".join(f"'{self._labels[m]}' ({op})" for m, op in owners.items())
        self._withhold(
            pass_,
            f"modules {names} use their parameters in operations without a per-example rule; "
            "they are measured with the torch.func fallback from the next step on",
        )

    def _unsupported_message(
        self, origin: Any, op: str, labels: list[str], scope: nn.Module | None
    ) -> str:
        if scope is not self.model:
            where = f"inside module '{self._labels.get(scope, '?')}' " if scope is not None else ""
            return (
                f"parameters {labels} meet the batch {where}in the operation '{op}', which has "
                "no per-example rule. Register a rule for the module that owns them "
                "(noisescale.register_layer), move them into a layer with a rule, or use "
                "per_example=False"
            )
        # Followed through the model's whole forward (read from a parameter container, not
        # as a layer's own weights: peft's GraLoRA and BOFT): name the modules that hold them,
        # whose forward is where a rule would go, not the top-level model.
        owners: dict[str, str] = {}
        for source in origin.sources:
            if source.pid is None:
                continue
            for holder, _ in self._holders(source.pid):
                name, owner = self._owning_layer(holder)
                owners.setdefault(name, _qualified(type(owner)))
        held = (
            " (held by " + ", ".join(f"'{n}' ({t})" for n, t in sorted(owners.items())) + ")"
            if owners
            else ""
        )
        kinds = sorted(set(owners.values()))
        rule_for = " or ".join(kinds) if kinds else "the module that owns them"
        return (
            f"parameters {labels}{held} meet the batch in the operation '{op}', which has no "
            "per-example rule. They are read outside any layer noisescale measures (from a "
            "parameter container, or by another module's forward), so it followed them "
            "through the whole model's forward, and the top-level model cannot be re-run per "
            f"example. Register a rule for {rule_for} (noisescale.register_layer), move them "
            "into a layer with a rule, or use per_example=False"
        )

    def _owning_layer(self, holder: nn.Module) -> tuple[str, nn.Module]:
        """The module whose forward reads ``holder``'s parameters, with its name: ``holder``
        itself, or, for a container (ParameterDict, ParameterList, ModuleDict, ModuleList),
        the innermost module that holds it (by the dotted names every module is labelled
        with when the engine is built)."""
        containers = (nn.ParameterDict, nn.ParameterList, nn.ModuleDict, nn.ModuleList)
        name, module = self._labels[holder], holder
        while isinstance(module, containers) and module is not self.model:
            name = name.rpartition(".")[0]
            module = self.model.get_submodule(name)  # ("": the model itself)
        return self._labels[module], module

    def _calls_fallback(self, module: nn.Module) -> None:
        params = fallback.fallback_params(module)
        rule = fallback.rule(self)
        self._calls[module] = (rule, self._labels[module], params)
        self._update_compile_blocker()
        self._handles.append(
            module.register_forward_pre_hook(self._hook(fallback.pre_hook(self), owner=module))
        )
        self._handles.append(
            module.register_forward_hook(
                self._hook(self._on_forward, owner=module), with_kwargs=True
            )
        )

    def _on_unverified_flat(
        self, pass_: PassNorms, findings: audit_mod.Findings, learn: bool
    ) -> None:
        """Tensors taken for each example's rows in turn that the audit's replay was never
        compared with: learned as shared calls (the tracker), else refused."""
        targets = findings.unverified_flat
        why = (
            pass_.audit.unverified
            if pass_.audit is not None and pass_.audit.unverified
            else "no replay of the backward reached them: a model output without the batch's "
            "examples in dim 0 (e.g. logits returned flattened, [T·N, V]) is not replayed from"
        )
        names = ", ".join(sorted({f"'{t.label}'" for t in targets}))
        calls = {t.module for t in targets if t.module in pass_.flat_calls}
        learnable = all(t.module in pass_.flat_calls for t in targets)  # (no repeated table)
        if learn and learnable:
            self._learned_shared.update(calls)  # type: ignore[arg-type]
            self._withhold(
                pass_,
                f"the rows of {names}, whose input's leading dimension is a multiple of the "
                "batch's size, could not be checked to be each example's rows in turn "
                f"({why}); they are treated as shared from the next step on",
            )
            return
        raise UnsupportedModuleError(
            "noisescale's audit of this step could not check that the rows of "
            f"{names} (a leading dimension that is a multiple of the batch's size, taken as "
            f"each example's rows in turn) belong to the examples they are attributed to ({why}), "
            "so it refuses to report per-example norms that could be wrong. Return the model's "
            "outputs with the examples in dim 0 ([N, T, V], not flattened), or use "
            "per_example=False"
            + (
                ""
                if learn or not learnable
                else " (GradientNoiseTracker treats such layers as shared calls from its second "
                "step; a one-shot measurement cannot)"
            )
        )

    def _on_audit_failure(
        self, pass_: PassNorms, findings: audit_mod.Findings, learn: bool
    ) -> None:
        owners = findings.misattributed_modules()
        learnable_calls = [m for m in owners if isinstance(m, nn.Module)]
        lookups = [m for m in owners if isinstance(m, tuple)]
        if (
            learn
            and findings.only_attribution
            and owners
            and len(learnable_calls) + len(lookups) == len(owners)
            and not any(m in self._learned_shared for m in learnable_calls)
            and not any(key in self.learned_shared_lookups for key in lookups)
        ):
            following = self._inputs_follow_examples(pass_, learnable_calls)
            if following is None or following:
                names = ", ".join(f"'{self._labels[m]}'" for m in following or learnable_calls)
                raise UnsupportedModuleError(
                    "noisescale's audit of this step failed, so it refuses to report per-example "
                    f"norms that could be wrong: the rows of {names} do not belong to the "
                    "examples they are attributed to, and "
                    + (
                        "its input changes when the examples of the model's input are permuted, "
                        "so it is not a table shared by every example"
                        if following
                        else "the model could not be re-run to tell whether its input is a "
                        "table shared by every example"
                    )
                    + ": its dim 0 is not the examples' (a time-major activation, [T, N, …] "
                    "with T = N — keep dim 0 the examples), or an operation in the forward "
                    "mixes examples — a statistic of the batch (a batch mean added back as "
                    "context, minibatch features, BatchNorm in training mode) or one example's "
                    "activations mixed into another's (Manifold Mixup) —, and such a model has "
                    "no per-example gradient: measure it with per_example=False and two or more "
                    "gradient-accumulation micro-batches a step"
                )
            self._learned_shared.update(learnable_calls)
            self.learned_shared_lookups.update(lookups)
            names = ", ".join(
                [f"'{self._labels[m]}'" for m in learnable_calls]
                + [f"'{t.label}'" for t in findings.misattributed if isinstance(t.module, tuple)]
            )
            self._withhold(
                pass_,
                f"the audit found that the input of layer(s) or lookup(s) {names} is the same "
                "for every example although its leading dimension has the batch's size (e.g. "
                "positions arange(T), or a relative-position index of T² entries, with that "
                "count equal to the batch size); they are treated as shared from the next step "
                "on",
            )
            return
        raise UnsupportedModuleError(self._audit_message(findings))

    def _holders(self, pid: int) -> list[tuple[nn.Module, str]]:
        out = []
        for module in self.model.modules():
            for name, p in module._parameters.items():
                if p is not None and id(p) == pid:
                    out.append((module, name))
        return out


# the cause first: what the engine met in a reentrant recomputation follows from it
_REENTRANT_LEAD = (
    "this step ran activation checkpointing with use_reentrant=True, which recomputes the "
    "forward and backpropagates it in a backward of its own, out of the per-example engine's "
    "reach. Use torch.utils.checkpoint(..., use_reentrant=False) (in transformers: "
    "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': "
    "False}), its default), or per_example=False"
)


def _reentrant_checkpointing(model: nn.Module) -> bool:
    """Whether a transformers layer of ``model`` checkpoints its forward with
    ``use_reentrant=True`` (``gradient_checkpointing_enable(gradient_checkpointing_kwargs=
    {"use_reentrant": True})``): its recomputation may run none of the engine's hooks (peft's
    IA3, VeRA and LoKr, whose parameters are followed from the model's own forward), so the
    pass is not marked (:meth:`PerExampleNorms._hook_pass`) and a refusal would not name it."""
    for module in model.modules():
        if not getattr(module, "gradient_checkpointing", False):
            continue
        func = getattr(module, "_gradient_checkpointing_func", None)
        func = func.original if isinstance(func, _MirroredCheckpoint) else func
        if isinstance(func, functools.partial) and func.keywords.get("use_reentrant") is True:
            return True
    return False


def _order(hooks: dict, first: int, last: list[int]) -> None:
    """Put hook ``first`` before the others in a tensor's hook dict and the hooks ``last``
    after them, in that order. Reinserted, not moved: autograd calls the hooks in the order of
    the underlying dict, which an ``OrderedDict``'s ``move_to_end`` does not change."""
    keys = list(hooks)
    if keys[:1] == [first] and keys[len(keys) - len(last) :] == last:
        return
    ours = {key: hooks[key] for key in (first, *last)}
    theirs = [(key, hook) for key, hook in hooks.items() if key not in ours]
    hooks.clear()
    hooks[first] = ours[first]
    hooks.update(theirs)
    for key in last:
        hooks[key] = ours[key]


def _cast_source(out: Tensor) -> Any:
    """The gradient edge of the tensor ``out`` is a dtype cast of (``out.float()``), or
    ``None``."""
    fn = out.grad_fn
    if fn is None or type(fn).__name__ != "ToCopyBackward0":
        return None
    nexts = [e for e in fn.next_functions if e[0] is not None]
    if len(nexts) != 1:
        return None
    return torch.autograd.graph.GradientEdge(*nexts[0])


def _identity(x: Any) -> Any:
    return x


class _MirroredCheckpoint:
    """A transformers layer's ``_gradient_checkpointing_func`` (``checkpoint`` with its
    options), wrapped so that the forward it recomputes in the backward holds the same aliases
    of the parameters used directly in its ``scopes`` (the layer, or a module around it) as the
    forward held (:meth:`_on_scope_enter`, on the step's shadow pass: nothing of it counts). A
    copy or a pickle of the model gets the original function back."""

    __slots__ = ("engine", "original", "scopes")

    def __init__(self, original: Callable[..., Any], engine: Any, scopes: list[nn.Module]) -> None:
        self.original, self.engine, self.scopes = original, engine, scopes

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        engine, scopes = self.engine, self.scopes

        def run(*a: Any, **k: Any) -> Any:
            if not _checkpoint_recompute():
                return fn(*a, **k)
            entered = []
            try:
                for scope in list(scopes):
                    engine._on_scope_enter(scope, (), {})
                    entered.append(scope)
                return fn(*a, **k)
            finally:
                for scope in reversed(entered):
                    engine._on_scope_exit(scope, (), {}, None)

        return self.original(run, *args, **kwargs)

    def __deepcopy__(self, memo: dict) -> Any:
        return copy.deepcopy(self.original, memo)

    def __reduce__(self) -> tuple:
        return (_identity, (self.original,))


def _batched_grad(output: Tensor, edges: list, rows: Tensor) -> Sequence[Tensor | None]:
    """The vector-Jacobian products of ``output`` for each of ``rows`` (dim 0) at ``edges``:
    one batched backward (``torch.func.vmap`` over autograd), or — where that backward
    recomputes a checkpointed forward that draws random numbers, which vmap cannot run
    (peft's LoKr under activation checkpointing in training mode draws its module dropout: a
    crash until 2026-12-04) — one backward per row, each recomputation replaying the forward's
    random state (checkpoint's ``preserve_rng_state``)."""
    try:
        return torch.autograd.grad(
            output, edges, rows, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    except RuntimeError as error:
        if "random operations inside of vmap" not in str(error):
            raise
    per_row = [
        torch.autograd.grad(output, edges, row, retain_graph=True, allow_unused=True)
        for row in rows
    ]
    # (an edge the graph does not reach is None for every row alike)
    return [
        None if per_row[0][j] is None else torch.stack([g[j] for g in per_row])
        for j in range(len(edges))
    ]


def _checkpoint_recompute() -> bool:
    """Whether this forward is torch.utils.checkpoint's non-reentrant recomputation: inside a
    backward, under the saved-tensor hooks checkpoint installs to collect what it recomputes —
    or, checkpoints nested in the recomputed code (Swin checkpoints stages and their blocks),
    under the hooks of an inner checkpoint's forward, run again as part of the outer one's
    recomputation."""
    if torch._C._current_graph_task_id() == -1:
        return False
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    name = "" if top is None else getattr(top[0], "__qualname__", "")
    return "_recomputation_hook" in name or "_checkpoint_hook" in name


def _sums_in_16_bits(grad: Tensor) -> bool:
    """Whether autograd sums a normalisation layer's affine gradients from this output gradient
    in 16 bits: a bfloat16/float16 gradient on the CPU (measured in torch 2.13: the bias
    gradient of 8,192 rows 9% off a float32 sum)."""
    return grad.device.type == "cpu" and grad.dtype in (torch.bfloat16, torch.float16)


# autograd nodes whose output row r depends on row r of their inputs only (elementwise
# operations, activations, dropout, a LayerNorm over the last dimensions, a copy)
_ROWWISE_NODES = frozenset(
    {
        "AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1", "MulBackward0",
        "MulBackward1", "DivBackward0", "DivBackward1", "NegBackward0", "ReluBackward0",
        "GeluBackward0", "SiluBackward0", "TanhBackward0", "SigmoidBackward0", "EluBackward0",
        "LeakyReluBackward0", "HardswishBackward0", "HardsigmoidBackward0", "SoftplusBackward0",
        "ThresholdBackward0", "NativeDropoutBackward0", "CloneBackward0", "ToCopyBackward0",
        "NativeLayerNormBackward0",
    }
)  # fmt: skip
_VIEW_NODES = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"})
_PRODUCT_NODES = {"AddmmBackward0": 1, "MmBackward0": 0}  # the input's position (x @ Wᵀ)


def _flat_size(rule: LayerRule, module: nn.Module, size: Any, n: int) -> bool:
    """Whether a call's leading size could be the examples flattened together with positions:
    a multiple k·N (k > 1) of the batch's, on a layer whose rule treats positions alike."""
    return (
        rule.flattened is not None
        and isinstance(size, int)
        and size > n > 0
        and size % n == 0
        and rule.flattened(module)
    )


def _example_major(x: Tensor, n: int, size: int) -> bool:
    """Whether ``x`` ([size, …], size = k·N) provably holds each example's k rows in turn.

    With a history: every path back through it passes only through operations that keep rows
    apart (:data:`_ROWWISE_NODES`, views that keep the leading size, a product with a
    parameter) to a view that flattened a tensor whose dim 0 has the N examples, [N, a, …] →
    [N·a·…, …]. An input without a history (input data, a frozen model's activation) is not
    taken, nor is a row selection (``x[idx]``, ``index_select``, a gather: a mixture of
    experts' routing), a transpose or anything else not listed — such rows could be ordered by
    the data, differently at every step. This is necessary, not sufficient: whether each
    output row's gradient comes from its example alone depends on what consumes it, which the
    audit's replay compares (a flattened call no replay compared is not measured)."""
    fn = x.grad_fn
    if fn is None:
        return False  # no history to read (input data, a frozen activation): shared
    stack, seen, budget = [fn], set(), 64
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        budget -= 1
        if budget < 0:
            return False
        name = type(node).__name__
        if name == "AccumulateGrad":
            continue  # a parameter, broadcast over the rows (a bias)
        if name in _VIEW_NODES:
            sizes = [int(s) for s in getattr(node, "_saved_self_sym_sizes", ())]
            if sizes and sizes[0] == size:
                stack.extend(f for f, _ in node.next_functions)  # the rows kept
                continue
            if (
                len(sizes) >= 2
                and sizes[0] == n
                and size in itertools.accumulate(sizes[:-1], operator.mul)
            ):
                continue  # the flattening of [N, a, …]: each example's rows in turn
            return False
        if name in _PRODUCT_NODES:
            edges = node.next_functions
            at = _PRODUCT_NODES[name]
            weight = edges[at + 1][0] if len(edges) > at + 1 else None
            while weight is not None and type(weight).__name__ in ("TBackward0", "ToCopyBackward0"):
                weight = weight.next_functions[0][0]  # transposed, cast (autocast)
            if weight is not None and type(weight).__name__ != "AccumulateGrad":
                return False  # a product with an activation: rows mixed
            stack.extend(f for i, (f, _) in enumerate(edges) if i != at + 1)
            continue
        if name not in _ROWWISE_NODES:
            return False
        stack.extend(f for f, _ in node.next_functions)
    return True


def _flattened_hint(size: int, n: int) -> str:
    """What a leading size that is a multiple of the batch's most likely means."""
    if n < 1 or size <= n or size % n:
        return ""
    return (
        f" — {size} = {n} × {size // n}: if the examples were flattened together with another "
        "dimension, noisescale can tell which example a row belongs to only for a layer that "
        "treats positions alike (Linear, Conv1D, LayerNorm, RMSNorm) on rows that are each "
        "example's in turn (x.reshape(-1, D) of a batch-first [N, T, D], as OPT's feed-forward "
        "block does); elsewhere it needs the examples along dim 0 of the input"
    )


def _by_products(module: nn.Module, rule: LayerRule) -> bool:
    """Layers whose weight gradient the sub-batch mode computes itself (built-in rules only)."""
    from noisescale.per_example import conv, linear

    return rule in (linear.LINEAR_RULE, linear.CONV1D_RULE, *conv.CONV_RULES)


def _without_cross_terms(uses: list[Factor]) -> bool:
    """Whether one of a parameter's uses in a pass came from sub-batch products that kept no
    sub-batch gradients: the norm of the uses' sum cannot be formed (its cross terms)."""
    return any(isinstance(f, NormFactor) and f.grads is None for f in uses)


def _rebasable_base(output: Tensor, dim: int, n: int) -> Tensor | None:
    """The tensor to hook for a layer's output gradient instead of the output, if any.

    nn.Linear on [N, T, I] and Hugging Face's Conv1D return a view of a product's result,
    ``addmm(...).view(N, T, O)``. An in-place operation on that view — ``nn.ReLU(inplace=True)``,
    ``h[~mask] = 0`` (Wav2Vec2's padded frames), ``h.mul_(m)`` — rebases it: its gradient then
    flows through the base's new node into the product, and the view's own node, where a hook
    on the view sits, is left out of the graph (until 2026-12-04 such a layer was refused as
    "no use of its parameters"). The whole base, its rows each example's in turn ([N·T, O]:
    the audit's FLAT), keeps its node whatever is done to the view. ``None`` for any other
    output."""
    base = _whole_base(output)
    if (
        base is None
        or dim != 0
        or base.dim() == 0
        or base.shape[0] < n
        or base.shape[0] % max(n, 1)
        or output.dim() == 0
        or output.shape[0] != n
    ):
        return None
    return base


def _whole_base(output: Tensor) -> Tensor | None:
    """The tensor ``output`` is a reshaped view of, when it is the whole base, in the same
    layout (a product's result, ``addmm(...).view(...)``)."""
    base = output._base
    if (
        base is None
        or base._base is not None
        or not base.requires_grad
        or base.numel() != output.numel()
        or not (base.is_contiguous() and output.is_contiguous())
        or base.data_ptr() != output.data_ptr()
    ):
        return None
    return base


def _reshaped_base(module: nn.Module, output: Any) -> Tensor | None:
    """The tensor a product layer's output is a reshaped view of — nn.Linear on [N, T, I] and
    Hugging Face's Conv1D return ``addmm(...).view(...)`` — when the view may be replaced by a
    new one: no forward hook but the engine's saw it (a hook of the user's registered before
    the tracker's would hold the old view), and it is the whole base, in the same layout."""
    if (
        not isinstance(output, Tensor)
        or len(module._forward_hooks) != 2  # _on_weight_exit and _on_forward
        or _global_forward_hooks
    ):
        return None
    return _whole_base(output)


def _product_kind(module: nn.Module, rule: LayerRule) -> str:
    """How a layer's weight gradient is one product: ``"conv"``, ``"conv1d"`` (Hugging Face's
    ``Conv1D``, weight [in, out]) or ``"linear"``."""
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return "conv"
    return "conv1d" if rule.name == "Conv1D" else "linear"


def _plain_weight_grad(job: _WeightJob, x: Tensor, d: Tensor) -> tuple[Tensor, Tensor | None]:
    """The weight gradient as one product, and the bias's when taken over (a backward the
    engine does not measure)."""
    if job.kind == "conv":
        from noisescale.per_example.conv import ConvWeightFactor

        grad = ConvWeightFactor(job.module, x, d).summed(job.weight.shape)
        bias = None if job.bias is None else d.transpose(0, 1).flatten(1).sum(1)
        return grad, bias
    a = x.reshape(-1, x.shape[-1])
    g = d.reshape(-1, d.shape[-1]).to(a.dtype)
    grad = g.t() @ a
    bias = None if job.bias is None else d.reshape(-1, d.shape[-1]).sum(0)
    return (grad.t() if job.kind == "conv1d" else grad), bias


@contextmanager
def _buffers_kept(model: nn.Module) -> Iterator[None]:
    """Re-runs of the user's model that leave no trace in its buffers (running statistics,
    counters a forward updates): each one they changed restored to its value before, in place
    (only those: a copy into a buffer the backward saved — prototypes a loss reads — would
    change its version and fail the backward)."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                if not torch.equal(b, saved):
                    b.copy_(saved)


def _inside_functorch() -> bool:
    """Inside a torch.func transform (``vmap(grad(f))`` over the model, the user's per-sample
    gradients): its forwards are no pass of the step — their gradients never reach .grad — and
    drawing sub-batches inside vmap is an error (a review found the tracker broke such a call)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _permute_examples(
    v: Any, perm: Tensor, n: int, dim: int, source: Tensor | None, strict: bool = True
) -> Any:
    """The model's inputs with their examples (dim ``dim`` of size ``n``) permuted by
    ``perm``; raises _SkipCheck for an input that cannot be (a packed sequence, or — when
    ``strict`` — an input other than ``source`` with the batch's size along two dimensions;
    not strict, such an input is taken at its word, the examples in dim ``dim``)."""
    if isinstance(v, Tensor):
        if v.dim() <= dim or v.shape[dim] != n:
            return v
        if strict and v is not source and sum(s == n for s in v.shape) > 1:
            raise _SkipCheck  # an input whose example dimension is ambiguous
        return v.index_select(dim, perm.to(v.device))
    if isinstance(v, PackedSequence):
        raise _SkipCheck
    if isinstance(v, dict):
        return {k: _permute_examples(x, perm, n, dim, source, strict) for k, x in v.items()}
    if type(v) in (list, tuple):
        return type(v)(_permute_examples(x, perm, n, dim, source, strict) for x in v)
    return v


def _auxiliary_loss_cause(model: nn.Module) -> str | None:
    """A Hugging Face mixture of experts trained with its routers' auxiliary loss: the
    load-balancing loss multiplies the batch's mean routing fractions by its mean router
    probabilities, over every token of the batch together (and Switch Transformers' z-loss is
    a mean over them too), so it combines examples — the audit fails on it, and its findings
    alone would name a generic cause."""
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if not getattr(config, "output_router_logits", False):
            continue
        coefs = {
            key: value
            for key in ("router_aux_loss_coef", "router_z_loss_coef")
            if isinstance(value := getattr(config, key, None), (int, float)) and value
        }
        if not coefs:
            continue
        where = f"'{name}.config'" if name else "the model's config"
        set_ = ", ".join(f"{k}={v:g}" for k, v in coefs.items())
        return (
            f"This model returns its routers' logits and, given labels, adds their auxiliary "
            f"loss to its loss ({where}: output_router_logits=True, {set_}), computed from the "
            "routing of every token of the batch together (a load-balancing loss: the batch's "
            "mean routing fractions times its mean router probabilities): that loss combines "
            "examples, so no example has a gradient of its own. Measure this model with "
            "per_example=False and two or more gradient-accumulation micro-batches a step "
            "(each micro-batch's loss, its auxiliary loss included, is then a group of its "
            "own), or, if it is not trained with the auxiliary loss, with "
            "output_router_logits=False."
        )
    return None


def _qualified(cls: type) -> str:
    """``peft.tuners.gralora.layer.Linear``: a class by its module, as a user imports it."""
    module, name = cls.__module__, cls.__qualname__
    return name if module in ("builtins", "__main__") else f"{module}.{name}"


def _penalty_cause(model: nn.Module) -> str | None:
    """peft's AdaLoRA: whenever the model returns a loss (called with ``labels=``), its forward
    adds ``orth_reg_weight`` × the orthogonality penalty |P Pᵀ − I| of every ``lora_A`` and
    ``lora_B`` to it — a term computed from those parameters alone, of no example, which the
    audit finds as a use outside any layer (or, when a rank equals the batch's size, as a table
    of that size meeting a constant). It is named whatever its weight: at 0 the penalty still
    runs, with a zero gradient."""
    for name, module in model.named_modules():
        if type(module).__name__ != "AdaLoraModel":
            continue
        configs = getattr(module, "peft_config", None)
        adapter = getattr(module, "trainable_adapter_name", None)
        config = configs.get(adapter) if isinstance(configs, dict) else None
        weight = getattr(config, "orth_reg_weight", None)
        if not isinstance(weight, (int, float)):
            continue
        where = f"'{name}'" if name else "the model"
        return (
            f"This is peft's AdaLoRA ({where}, adapter '{adapter}', orth_reg_weight={weight:g}): "
            "when the model returns a loss (called with labels=), its forward adds the "
            "orthogonality penalty |P Pᵀ − I| of every lora_A and lora_B to it"
            + (" (at weight 0 it still runs, with a zero gradient)" if weight == 0 else "")
            + ", a term "
            "computed from those parameters alone that belongs to no example, so the step has "
            "no per-example gradients. Call the model without labels= and compute the loss "
            "from its logits (peft then adds no penalty: train without it), or, to keep it, "
            "measure with per_example=False and two or more gradient-accumulation "
            "micro-batches a step (each micro-batch's gradient then carries the penalty's, "
            "and B_simple is that of the penalised objective)."
        )
    return None


def _ambiguous_message(pass_: PassNorms) -> str:
    origin, op, shared, other, kind = pass_.ambiguous[0]
    labels = sorted({s.label for s in origin.sources})
    n = pass_.batch_size
    if kind == "loss":
        return (
            f"a tensor computed from {labels} alone, of shape {list(shared)}, met the batch "
            f"after the model's forward returned (in the loss), in the operation '{op}', only "
            "through tensors not computed from the model's outputs with the batch's size "
            f"({n}) in dim 0, such as {list(other)}: targets, labels, or constants. noisescale "
            "cannot tell whether their dim 0 is the examples (targets, labels) or a size that "
            "happens to equal the batch's (a fixed table with as many rows as examples, "
            "positions arange(T) with T = N), and no audit reaches the loss. Compute this "
            "inside the model's forward (pass the targets to it, as Hugging Face models take "
            "labels=), combine it with the model's per-example outputs first, keep "
            "parameters out of the loss (the optimizer's weight decay for penalties), or use "
            "per_example=False"
        )
    return (
        f"a tensor computed from {labels} alone, of shape {list(shared)}, has the "
        f"batch's size ({n}) in dim 0 and meets, row by row in the operation '{op}', "
        f"only a tensor without autograd history of shape {list(other)} (input data or a "
        "mask). noisescale cannot tell whether its rows are the examples' or a table whose "
        "size happens to equal the batch's (a single example's forward would broadcast the "
        f"whole table over it). Use a batch size other than {n}, keep the table's rows "
        "apart from the examples' dimension, or use per_example=False"
    )


def _coupled_message(pass_: PassNorms) -> str:
    return (
        "the loss combines the examples, so they have no per-example gradients for noisescale "
        f"to measure: after the model's forward returned, {pass_.coupled}, and the backward "
        "started from the result. Per-example norms are defined for a loss that is a sum (or "
        "mean) of per-example terms, Σ_i ℓ_i(output_i); a contrastive loss with in-batch "
        "negatives, a pairwise term between two forwards' outputs, or a normalization by the "
        "batch's statistics is not one (the gradient reaching example i's output depends on "
        "the others'). Use per_example=False (the noise scale from micro-batch or replica "
        "gradients), or detach the batch-level quantity if it is meant as a constant weight"
    )


def _audit_scheduled(step: int) -> bool:
    """Audit step 1 (steps count from 1), steps 2, 4, 8, …, 1024, and every 1024th after."""
    return step <= 1 or (step <= 1024 and step & (step - 1) == 0) or step % 1024 == 0


def _merge_shared_backward(passes: list[PassNorms]) -> list[PassNorms]:
    """Merge passes that one backward ran through: one micro-batch of all their examples."""
    groups: list[list[PassNorms]] = []
    for pass_ in passes:
        joined = [g for g in groups if any(pass_.tasks & q.tasks for q in g)]
        merged = [pass_]
        for g in joined:
            groups = [h for h in groups if h is not g]  # (by identity: passes hold tensors)
            merged = g + merged
        groups.append(merged)
    out = []
    for group in groups:
        if len(group) == 1:
            out.append(group[0])
            continue
        if any(p.skipped and not p.idle for p in group) and not all(p.skipped for p in group):
            # part of the pass measured: in sub-batch mode with accumulation the micro-batch
            # measured is chosen at the forward, by the last step's passes, and this step ran
            # several forwards in one backward where the last ran one (from the next step on,
            # every forward of such a step is measured). Its per-example gradients would miss
            # the skipped forwards' share of the backward (the audit's coverage check would
            # fail): the pass keeps its micro-batch norm only, as a skipped one does
            group = [_without_norms(p) for p in group]
        first = group[0]
        merged = PassNorms(batch_size=sum(p.batch_size for p in group), weights=first.weights)
        for name in ("raw_sqnorms", "group_sqnorms"):
            parts = [getattr(p, name) for p in group if getattr(p, name) is not None]
            setattr(merged, name, torch.cat(parts) if parts else None)
        for name in ("grad_sqnorm", "group_grad_sqnorm"):
            parts = [getattr(p, name) for p in group if getattr(p, name) is not None]
            setattr(merged, name, sum(parts[1:], parts[0]) if parts else None)
        merged.skipped = all(p.skipped for p in group)
        merged.audited = any(p.audited for p in group)
        merged.compiled = any(p.compiled for p in group)
        merged.unaudited = any(p.unaudited for p in group)
        merged.compiled_blocked = any(p.compiled_blocked for p in group)
        merged.compiled_call = any(p.compiled_call for p in group)
        merged.compiled_unsupported = next(
            (p.compiled_unsupported for p in group if p.compiled_unsupported), None
        )
        merged.audit = next((p.audit for p in group if p.audit is not None), None)
        merged.unsupported = [u for p in group for u in p.unsupported]
        merged.ambiguous = [u for p in group for u in p.ambiguous]
        merged.coupled = next((p.coupled for p in group if p.coupled), None)
        flags = [p.counted_mean for p in group if p.counted_mean is not None]
        merged.counted_mean = functools.reduce(operator.or_, flags) if flags else None
        merged.loss_unfollowed = next((p.loss_unfollowed for p in group if p.loss_unfollowed), None)
        # how the losses weigh the examples: one loss's weights per backward are measured (or
        # counted); several forwards' in one backward cannot be combined into one pass's
        if any(p.units is not None for p in group):
            merged.units_error = (
                f"{len(group)} forward passes of the model were backpropagated by one backward "
                "(e.g. (loss1 + loss2).backward()) and their losses weigh tokens (a Hugging "
                "Face model's labels=, count_tokens): noisescale reads one loss's token weights "
                "per backward pass and cannot combine several. Call backward() on each "
                "forward's loss in turn (gradient accumulation), or run the examples in one "
                "forward"
            )
        else:
            merged.units_error = next((p.units_error for p in group if p.units_error), None)
        # in sub-batch mode each pass was split (or measured per example): their groups
        # together partition the merged pass (before 2026-12-04 the merged pass had no
        # sub-batches, and the default measured nothing where the exact mode measured it)
        if any(p.subbatches is not None or p.unsplit for p in group) and all(
            p.raw_sqnorms is not None and not p.skipped and (p.subbatches is not None or p.unsplit)
            for p in group
        ):
            if all(p.unsplit for p in group):
                merged.unsplit = True
            else:
                merged.subbatches = MergedSubbatches(
                    [p.batch_size if p.subbatches is None else p.subbatches for p in group]
                )
        if any(p.rows is not None or p.skipped for p in group) and not merged.skipped:
            offset, taken = 0, []
            for p in group:
                if not p.skipped:
                    r = p.rows if p.rows is not None else torch.arange(p.batch_size)
                    taken.append(r.cpu() + offset)
                offset += p.batch_size
            merged.rows = torch.cat(taken)
        for p in group:
            merged.received |= p.received
            merged.covered |= p.covered
            merged.tasks |= p.tasks
            merged.param_tasks |= p.param_tasks
        out.append(merged)
    return out


def _same_input(a: PassNorms, b: PassNorms) -> bool:
    """Whether two passes read the same examples: in one backward, the same tensor or one with
    the same storage, shape and stride (a view); across backwards (two micro-batches), the
    same tensor object at the same version — a buffer refilled in place between them,
    ``buf.copy_(batch)``, holds other examples, and a new tensor on a reused buffer
    (``torch.from_numpy(buf)`` each time, which numpy refills without a version) is taken
    for other examples too."""
    x, y = a.examples, b.examples
    if x is None or y is None:
        return False
    if a.tasks & b.tasks:  # one backward: nothing can have changed the input in between
        return x is y or (
            x.device == y.device
            and x.dtype == y.dtype
            and x.shape == y.shape
            and x.stride() == y.stride()
            and x.data_ptr() == y.data_ptr()
        )
    return x is y and a.examples_version is not None and a.examples_version == b.examples_version


def _refuse_same_input_twice(passes: list[PassNorms]) -> None:
    """Refuse a step whose backward passes ran through two forwards of the model on the same
    input tensor.

    Their rows are the same examples twice (multi-sample dropout, R-Drop's two passes, two
    task heads called in turn on one batch, in one backward or two): each example's gradient
    is the sum of its two rows', but the step takes its 2N rows for 2N independent examples
    (one merged pass, or two micro-batches), so per-example norms, sub-batch and micro-batch
    norms and the noise scale from them are wrong. (Two augmented views are two input tensors,
    which no check can tell from two batches: documented, not detected.)
    """
    for i, a in enumerate(passes):
        for b in passes[i + 1 :]:
            if a.batch_size == b.batch_size and _same_input(a, b):
                one = bool(a.tasks & b.tasks)
                raise NoiseScaleInputError(
                    f"{'one backward' if one else 'the backward passes of one step'} ran "
                    "through two forward passes of the model on the same input tensor (shape "
                    f"{tuple(a.examples.shape)}; e.g. multi-sample dropout, R-Drop, two heads "
                    "called in turn on one batch): its rows are the same examples twice, whose "
                    "gradient is the sum of both rows', so no norm per row is an example's and "
                    f"the step's {a.batch_size + b.batch_size} rows are not independent draws"
                    f"{'' if one else ' (nor are its micro-batches)'}. Run the batch through "
                    "one forward and one loss; with accumulation, give each micro-batch other "
                    "examples (per_example=False then measures any loss within a micro-batch "
                    "exactly). A forward that is not trained (a teacher, a probe) goes under "
                    "torch.no_grad() or tracker.paused()"
                )


def _node_key(node: Any) -> tuple[int, int]:
    return id(node), node._sequence_nr()


def _fed_by(passes: list[PassNorms], args: tuple, kwargs: dict) -> PassNorms | None:
    """The earlier pass of the step whose model outputs a tensor argument of this forward was
    computed from through autograd (``m(m(x))``, ``m(x + m(x))``: a walk of its graph, bounded
    at 512 nodes), or None. (A detached output, the pushforward trick's ``m(m(x).detach())``,
    has no such link: its memory is the output's, but an address an output freed may hold a
    new batch, so memory cannot tell; not detected, documented.)"""
    earlier = [p for p in passes if p.fed_marks]
    if not earlier:
        return None
    for t in _flat_values(args, kwargs):
        if not isinstance(t, Tensor):
            continue
        node, seen, todo = t.grad_fn, set(), []
        while node is not None and len(seen) < 512:
            if id(node) not in seen:
                seen.add(id(node))
                key = _node_key(node)
                for p in earlier:
                    if key in p.fed_marks:  # type: ignore[operator]
                        return p
                todo.extend(n for n, _ in node.next_functions if n is not None)
            node = todo.pop() if todo else None
    return None


def _refuse_fed_by_its_own_output(passes: list[PassNorms]) -> None:
    """Refuse a step in which a trained forward of the model ran on what an earlier trained
    forward of the step returned: a rollout, an unrolled recurrence, self-conditioning with
    gradient. Row i of every call is example i, whose
    gradient is the sum over the calls, but the step took each call's rows for N independent
    examples of their own (a review found b_big 3x and tr Σ up to +164%, silently)."""
    trained = {id(p) for p in passes}
    for p in passes:
        if p.fed_by is not None and id(p.fed_by) in trained:
            raise NoiseScaleInputError(
                "a forward of the model ran on what an earlier forward of this step returned "
                "(a rollout m(m(x)), an unrolled recurrence, self-conditioning with gradient, "
                "m(x + m(x))), and both were trained: row i of "
                "each call is example i, whose gradient is the sum over the calls, so no row's "
                "norm is an example's and the calls' rows are not independent draws. Wrap the "
                "rollout in one module whose forward calls the model each time and give that "
                "module to the tracker (the repeated calls of its layers are then measured as "
                "one example's), or run a forward that is not trained under torch.no_grad() or "
                "tracker.paused(). Nothing of this step was recorded"
            )


def _without_norms(pass_: PassNorms) -> PassNorms:
    """A copy of the pass without its per-example norms, rows and audit (its micro-batch norm
    and bookkeeping kept)."""
    bare = copy.copy(pass_)
    bare.raw_sqnorms = bare.group_sqnorms = bare.rows = bare.audit = bare.subbatches = None
    bare.unsplit = False
    bare.skipped = True
    return bare


# -- helpers ----------------------------------------------------------------------------------


class _SkipCheck(Exception):
    """An input the permutation check cannot permute (a packed sequence)."""


def _has_fsdp2(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _autocast_known(device: str) -> bool:
    try:
        torch.is_autocast_enabled(device)
    except (RuntimeError, TypeError):
        return False
    return True


_AUTOCAST_DEVICES = tuple(d for d in ("cpu", "cuda") if _autocast_known(d))


_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", None)


def _sequence_nr() -> int | None:
    """The calling thread's autograd sequence number: one more for each autograd node made
    (private to torch; ``None`` where a torch lacks it)."""
    return _GET_SEQUENCE_NR() if _GET_SEQUENCE_NR is not None else None


_GET_SEQUENCE_NR: Callable[[], int] | None = getattr(torch._C._autograd, "_get_sequence_nr", None)


def _autocast_enabled() -> bool:
    """Whether autocast is on for the CPU or CUDA (checked in every measured layer's hook: one
    call into torch where it has one for every device)."""
    if _ANY_AUTOCAST is not None:
        return bool(_ANY_AUTOCAST())
    return any(torch.is_autocast_enabled(d) for d in _AUTOCAST_DEVICES)


def _tensors(value: Any, packed: bool = False) -> list[Tensor]:
    """The tensors in a model's output (a tensor, or tuples, lists and dicts of them); with
    ``packed``, only the data of its packed sequences."""
    if isinstance(value, Tensor):
        return [] if packed else [value]
    if isinstance(value, PackedSequence):
        return [value.data]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v, packed)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v, packed)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        return [t for f in fields for t in _tensors(getattr(value, f.name), packed)]
    return []


def _first(output: Any) -> Any:
    return output[0] if isinstance(output, tuple | list) else output


def _flat_values(args: tuple, kwargs: dict) -> list[Any]:
    out: list[Any] = []
    for v in (*args, *kwargs.values()):
        if isinstance(v, list | tuple):
            out.extend(v)
        else:
            out.append(v)
    return out


def _size_along(value: Any, dim: int) -> int | None:
    if isinstance(value, PackedSequence):
        return int(value.batch_sizes[0])
    if isinstance(value, Tensor):
        return int(value.shape[dim]) if value.dim() > dim else None
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        for v in value:
            size = _size_along(v, dim)
            if size is not None:
                return size
    return None


def _first_size(args: tuple, kwargs: dict, dim: int) -> int | None:
    for value in (*args, *kwargs.values()):
        size = _size_along(value, dim)
        if size is not None:
            return size
    return None


def _batch_tensor(args: tuple, kwargs: dict, dim: int) -> Tensor | None:
    """The tensor :meth:`PerExampleNorms._batch_size_of_model` reads the batch's size from."""
    for value in (*args, *kwargs.values()):
        found = _sized(value, dim)
        if found is not None:
            return found
    return None


def _sized(value: Any, dim: int) -> Tensor | None:
    if isinstance(value, Tensor):
        return value if value.dim() > dim else None
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple) and not isinstance(value, PackedSequence):
        for v in value:
            found = _sized(v, dim)
            if found is not None:
                return found
    return None


def _flat_tensors(value: Any, out: list[Tensor]) -> list[Tensor]:
    """Every tensor in nested tuples, lists and dicts, in order."""
    if isinstance(value, Tensor):
        out.append(value)
    elif isinstance(value, dict):
        for v in value.values():
            _flat_tensors(v, out)
    elif isinstance(value, list | tuple):
        for v in value:
            _flat_tensors(v, out)
    return out


def _replace_first(output: Any, y: Tensor) -> Any:
    """``output`` with its first tensor (:func:`_first`) replaced by ``y``."""
    if isinstance(output, tuple):
        return (y, *output[1:])
    if isinstance(output, list):
        return [y, *output[1:]]
    return y


def _owned(factor: Factor, shape: torch.Size) -> Factor:
    """``factor`` with tensors of its own. A compiled graph reuses the memory of the tensors it
    hands to an event as soon as the event returns; a factor kept for later (the first of several
    uses of a parameter) must not point into it."""
    if dataclasses.is_dataclass(factor) and not isinstance(factor, type):
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(factor):
            value = getattr(factor, f.name)
            if isinstance(value, Tensor):
                changes[f.name] = value.clone()
            elif dataclasses.is_dataclass(value) and not isinstance(value, type):
                changes[f.name] = _owned(value, shape)
        return dataclasses.replace(factor, **changes)
    return DenseFactor(factor.dense(shape).clone())


# autograd nodes that pass a tensor's rows on unchanged, in order, or change each element alone
# (looked through, along their first input, from a layer's input back to a pick)
_ROW_PRESERVING = frozenset(
    {"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "CloneBackward0",
     "ToCopyBackward0", "ContiguousBackward0", "GeluBackward0", "ReluBackward0",
     "SiluBackward0", "TanhBackward0", "SigmoidBackward0", "NativeDropoutBackward0",
     "MulBackward1", "DivBackward1", "NegBackward0", "LeakyReluBackward0", "EluBackward0",
     "HardtanhBackward0", "SoftplusBackward0", "ThresholdBackward0", "PowBackward0",
     "MulBackward0", "DivBackward0", "AddBackward0", "SubBackward0"}
)  # fmt: skip


def _host_reads_indices(index: Tensor) -> bool:
    """Whether :func:`_selected_rows` reads index tensors' values when the layer runs: on the
    CPU; on an accelerator that would wait for the device, and they are compared there instead
    (a flag the tracker reads with the step's statistics). Tests patch it to take the
    accelerator's way on the CPU."""
    return index.device.type == "cpu"


def _selected_rows(
    x: Tensor | None, n: int, unread: list[tuple[str, Tensor]] | None = None
) -> str | None:
    """How ``x``'s ``n`` rows were picked so that which example each belongs to depends on the
    data, when its autograd history shows it (through views and elementwise functions): a
    boolean mask over more than the examples' own dimension, or one over (or an index into) a
    tensor of another leading size — the examples flattened with their positions, [N·T, D],
    filtered to the tokens a loss counts — or, on the CPU, several index tensors none of
    which runs along the examples in order (``h[b, t]`` from ``mask.nonzero()``). Their count
    equals the batch's by coincidence, and an audit proves their order for one step's data
    only (before 2026-12-04 such rows were split as the examples on unaudited steps: 19–37%
    off). ``None`` when the history shows no such pick: an index along the examples' own
    dimension — ``h[arange(N), last]``, a time-major ``out[last, arange(N)]`` — is not one.
    On an accelerator several index tensors are not read (that would wait for the device):
    ``None`` then, and ``(how, flag)`` is appended to ``unread``, ``flag`` a device boolean,
    true when none of them is the examples in order — the tracker refuses the step when it
    reads the step's statistics, before they are folded into the estimate."""
    if x is None or x.grad_fn is None or torch.compiler.is_compiling():
        return None
    node = x.grad_fn
    for _ in range(8):
        if type(node).__name__ not in _ROW_PRESERVING:
            break
        nxt = node.next_functions
        if not nxt or nxt[0][0] is None:
            return None
        node = nxt[0][0]
    kind = type(node).__name__
    if kind == "IndexBackward0":
        sizes = tuple(node._saved_self_sym_sizes)
        indices = [t for t in node._saved_indices if t is not None]
        if not indices or not sizes:
            return None
        masks = [t for t in indices if t.dtype == torch.bool]
        if masks:
            one_dim0 = len(indices) == 1 and node._saved_indices[0] is not None
            if one_dim0 and masks[0].dim() == 1 and sizes[0] == n:
                return None  # the examples kept, in order (all of them, when n are)
            return f"a boolean mask over a {list(sizes)} tensor"
        if len(indices) == 1:
            index = node._saved_indices[0]
            if index is None or sizes[0] == n or index.dim() == 0 or index.shape[0] != n:
                # (along another dimension; along the examples' own; or rows that a view
                # takes from another dimension, aligned with the source's)
                return None
            return f"an index over the {sizes[0]} rows of a {list(sizes)} tensor"
        # several index tensors: one along a dimension of the batch's size that is the
        # examples in order (arange) says the rows are the examples
        how = f"index tensors over a {list(sizes)} tensor, none of them the examples in order"
        full = list(node._saved_indices) + [None] * (len(sizes) - len(node._saved_indices))
        along = [
            index
            for dim, index in enumerate(full)
            if index is not None and sizes[dim] == n and index.shape == (n,)
        ]
        if not along:
            return how
        if not _host_reads_indices(along[0]):
            if unread is not None:
                device = along[0].device
                in_order = torch.stack(
                    [
                        (index == torch.arange(n, device=index.device)).all().to(device)
                        for index in along
                    ]
                ).any()
                unread.append((how, in_order.logical_not()))
            return None
        if any(bool((index == torch.arange(n, device=index.device)).all()) for index in along):
            return None
        return how
    if kind in ("IndexSelectBackward0", "GatherBackward0"):
        # the result's dim 0 runs along the index's: picked rows when it has the batch's size
        # and the source's dim 0 another (a gather along dim 0 whose result has one row, a
        # time-major RNN's last step, keeps the examples of dim 1 in order)
        if node._saved_dim != 0:
            return None
        sizes = getattr(node, "_saved_self_sym_sizes", None)
        if sizes is None:
            sizes = node._saved_self.shape
        index = node._saved_index
        if not sizes or sizes[0] == n or index.dim() == 0 or index.shape[0] != n:
            return None
        return f"an index over the {sizes[0]} rows of a {list(sizes)} tensor"
    if kind in ("MaskedSelectBackward0", "TakeBackward0"):
        return "a masked_select or take, whose result is flat"
    return None


def _first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    for v in _flat_values(args, kwargs):
        if isinstance(v, Tensor):
            return v
    return None


def _pattern(args: tuple, kwargs: dict, n: int) -> tuple:
    """Which dimensions of each tensor input have the batch's size (the audit's structure)."""
    out = []
    for v in _flat_values(args, kwargs):
        if isinstance(v, Tensor):
            out.append(_shape_pattern(v, n))
    return tuple(out)


def _shape_pattern(t: Tensor | None, n: int) -> tuple:
    if t is None:
        return ()
    key = (t.shape, n)
    try:
        pattern = _PATTERNS.get(key)
    except TypeError:  # symbolic sizes (a traced forward) are not hashed
        return (t.dim(), tuple(i for i, s in enumerate(t.shape) if s == n))
    if pattern is None:
        pattern = (t.dim(), tuple(i for i, s in enumerate(t.shape) if s == n))
        if len(_PATTERNS) < 4096:
            _PATTERNS[key] = pattern
    return pattern


_PATTERNS: dict[tuple[torch.Size, int], tuple] = {}  # _shape_pattern's, by shape (every layer's)


def _align(outs: list[Any], hooked: list[Tensor], grads: Sequence[Tensor | None]) -> tuple:
    """Gradients in the order of ``outs`` (``None`` where an output was not hooked)."""
    by_id = {id(t): g for t, g in zip(hooked, grads, strict=True)}
    return tuple(by_id.get(id(o)) if isinstance(o, Tensor) else None for o in outs)


def _move(saved: Any, dim: int, n: int) -> Any:
    if isinstance(saved, Tensor):
        return saved.movedim(dim, 0) if saved.dim() > dim and saved.shape[dim] == n else saved
    if isinstance(saved, tuple | list):
        return type(saved)(_move(v, dim, n) for v in saved)
    if isinstance(saved, fallback.Saved):
        return saved.map(lambda v: _move(v, dim, n))
    return saved


def _take_rows(saved: Any, rows: Tensor, n: int) -> Any:
    """What a forward hook saved, restricted to the examples ``rows`` of a batch of ``n``."""
    if isinstance(saved, Tensor):
        return saved.index_select(0, rows) if saved.dim() > 0 and saved.shape[0] == n else saved
    if isinstance(saved, tuple | list):
        return type(saved)(_take_rows(v, rows, n) for v in saved)
    if isinstance(saved, fallback.Saved):
        return saved.map(lambda v: _take_rows(v, rows, n))
    return saved


def _expand_saved(saved: Any, k: int) -> Any:
    """A shared call's saved input as if each of ``k`` examples had made the call."""
    if isinstance(saved, Tensor):
        return saved.unsqueeze(0).expand(k, *saved.shape)
    if isinstance(saved, tuple | list):
        return type(saved)(_expand_saved(v, k) for v in saved)
    return saved


def _unshare(value: Any) -> Any:
    if isinstance(value, SharedTensor):
        with torch._C.DisableTorchFunctionSubclass():
            return value.as_subclass(Tensor).detach()
    if isinstance(value, tuple):
        return tuple(_unshare(v) for v in value)
    if isinstance(value, list):
        return [_unshare(v) for v in value]
    if isinstance(value, dict):
        return {k: _unshare(v) for k, v in value.items()}
    return value


def _positions(x: Tensor, d: Tensor, dim: int, n: int) -> tuple[Tensor, Tensor]:
    """Input and output gradient of a linear map as [N, positions, features]."""
    if dim == 1 and x.dim() == 2 and x.shape[0] % n == 0:
        # attention's output projection on [T·N, E], T-major (F.multi_head_attention_forward):
        # in a time-major context a 2-D input is positions and examples flattened together
        a = x.reshape(-1, n, x.shape[-1]).transpose(0, 1)
        g = d.reshape(-1, n, d.shape[-1]).transpose(0, 1)
    elif x.dim() > dim and x.shape[dim] == n:
        a, g = x.movedim(dim, 0), d.movedim(dim, 0)
    else:
        a, g = x, d
    return a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])


def _route_sources(route: Any) -> list[Source]:
    if isinstance(route, tuple) and len(route) == 3 and isinstance(route[0], Source):
        return [route[0]]
    return list(route[0].sources)


def _device_of(output: Any, pass_: PassNorms) -> torch.device:
    ts = _tensors(output)
    return ts[0].device if ts else torch.device("cpu")
