"""What the engine records for one pass (a forward and the backward that reaches it) and for
the calls in it: :class:`PassNorms`, the per-example norms it hands the tracker."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from noisescale.per_example import audit as audit_mod
from noisescale.per_example import subbatch as subbatch_mod
from noisescale.per_example.factors import Factor, MergedSubbatches, Subbatches
from noisescale.per_example.registry import LayerRule
from noisescale.per_example.shared import Meeting, Source


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
    # the gradient edges of its outputs (None where an output needs no gradient), kept for a
    # rule the user registered: the audit checks its split among the examples (check_rule)
    edges: list[Any] | None = None


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
    # tasks that went through the forward's graph (its outputs' or layers' hooks): not a
    # penalty's own backward, which reaches the parameters only
    forward_tasks: set[int] = field(default_factory=set)
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
    nodes_end: int | None = None  # the sequence number when its forward returned (any pass)
    audit: audit_mod.PassAudit | None = None
    unsupported: list[tuple[Any, str]] = field(default_factory=list)  # (scope, op)
    # modules handing out aliases whose call had no tensor argument with the batch's size in
    # dim 0 (examples flattened or routed): the torch.func fallback cannot take them
    scopes_unbatched: set[int] = field(default_factory=set)
    # meetings that nothing can prove to be by example (shared.py's _rows_unproven, and any in
    # the loss only through tensors not computed from the model's outputs): (origin, op, shared
    # shape, other shape, kind "rows" | "loss")
    ambiguous: list[tuple[Any, str, tuple, tuple, str]] = field(default_factory=list)
    returned: bool = False  # the model's forward has returned (what follows is the loss)
    # how the loss combined the examples, when it did (loss_watch.py): refused in _settle
    coupled: str | None = None
    # a cross-entropy / NLL with class weights averaged over them (a device bool; loss_watch):
    # refused by the tracker (its divisor depends on the examples drawn)
    class_weighted: Any = None
    # the loss the backward started from was computed inside a module of the model with
    # parameters, whose code the watch does not follow (its class; warned once: settle.py)
    child_loss: str | None = None
    # its forward was followed by the loss watch (an audited step's: a loss the model computes
    # itself is checked too; loss_watch.begin_forward)
    forward_watched: bool = False
    loss_unfollowed: str | None = None  # why its loss could not be followed (withheld)
    # parameters its backward reached from outside the model's forward (a penalty in the loss:
    # Backward._loss_side; refused)
    loss_side: list[str] | None = None
    # the loss outside the forwards too large to walk (graph._MAX_LOSS_WALK nodes): withheld
    loss_side_unchecked: bool = False
    # the shapes of the losses its backwards started from (graph.loss_side_params): one no
    # audited step has had is withheld and audited (Settle._new_loss_shape)
    loss_shapes: set[int] = field(default_factory=set)
    # those of the step's skipped micro-batches, whose losses no watch followed
    # (collect._carry_skipped_loss_side)
    carried_shapes: set[int] = field(default_factory=set)
    # the output nodes of its layers called in the loss code, after its forward returned
    called_after: set[tuple[int, int]] = field(default_factory=set)
    # a device bool: the loss averaged over what it counts, not over the examples — a negative
    # log-likelihood with ignore_index targets or class weights, or a sum divided by a tensor
    # other than their number (loss_watch.py); per_example_sqnorms and the tracker refuse it
    # under "mean" (messages.counted_mean_message)
    counted_mean: Any = None
    # the same, for a mean computed inside the model's forward (SimMIM's masked mean): refused
    # by the one-shot norms where no Hugging Face labels= count decides (noisescale.tokens)
    counted_inside: Any = None
    # the same, for a Hugging Face classifier's own labels= loss computed in its forward (BERT's
    # CrossEntropyLoss) with labels of -100 (noisescale.tokens): the model's loss, not a
    # definition of the user's, so refused under "sum" too (messages.own_labels_message)
    counted_labels: Any = None
    # a mean over a slice of the examples' rows (o[:k], a DQN's first half; a chunked
    # cross-entropy's chunks): its divisor k does not depend on the data — the one-shot norms
    # refuse it under "mean" (each example's own loss is not its share × N), the tracker
    # measures it as backpropagated (rows left out are warned about: LossWatch._rows_left_out)
    counted_slice: Any = None
    # a layer ran under selective activation checkpointing (one backward through its region:
    # the audit does not replay it)
    selective: bool = False
    # layers whose output reached the engine's forward hook through something that may have
    # changed it (a forward hook registered before the tracker, a patched forward, a global
    # hook): their label and what came between. Such a pass is audited (engine._changed_on_the_way)
    between: dict = field(default_factory=dict)
    # layers whose input rows, of the batch's size, were put together by a stack, a cat, an
    # index_add or a pooling product (graph._assembled_rows): label -> how. Such a pass is
    # audited, every step
    assembled: dict = field(default_factory=dict)
    # the shape of an activation of the model's forward, not among its outputs, that the loss
    # used (captured by a forward hook, kept on a module): loss_watch.py, audited steps
    inner_used: tuple | None = None
    # a multimodal model's items not one per example (engine._items_cause): said first where
    # a layer that runs on them is refused
    items_cause: str | None = None
    items_checked: bool = False  # (once a pass: engine._on_items)
    # merged passes (one backward through several forwards): every audit among them — each
    # forward's structure is recorded as audited — and whether some were audited, others not
    audits: list = field(default_factory=list)
    partly_audited: bool = False
    # "sum" or "mean": the backward started from a plain sum or mean over the examples of
    # per-example terms (loss_watch.py, audited steps), which loss_reduction must match
    loss_kind: str | None = None
    loss_kind_factored: bool = False  # (through a numeric factor: loss_watch's _Sum.factored)
    # a device bool: the root's kind "mean" is that of a mean over what it counts (x[mask].mean()
    # over uneven picks, a cross-entropy's ignored targets), not a plain mean over the examples
    # (loss_watch.counted_kind): loss_kind_message passes it
    loss_kind_counted: Any = None
    # the torch.amp.GradScaler whose scale() multiplied the loss a backward through this pass
    # started from (scaler_watch.py, every step), which the tracker must have been given
    # (scaler=)
    grad_scaler: Any = None
    # its scale when the backward ran (a tensor copied there, no sync): update() may change it
    grad_scale: Any = None
    # each parameter's (.grad, version) when the pass's backward had finished (changed_grads)
    grad_marks: list[tuple[Any, int] | None] | None = None
    # on the steps audits fall on: each parameter's |.grad|² then too (changed_grads: what no
    # version counter sees)
    grad_prints: Any = None  # (grad_watch: per parameter, or one vector on the CPU)
    # the outputs' autograd nodes as (id, sequence number), not the nodes: a pass holding them
    # would keep alive the graph of a forward no backward reaches (an evaluation loop with
    # gradients on) until the step ends
    output_nodes: set[tuple[int, int]] = field(default_factory=set)
    meetings_added: int = 0
    # expansions and repetitions of a shared tensor taken as meetings along dim 0 (a class
    # token's s.expand(N, …), s.repeat(N, 1, …), s broadcast against constants only): the
    # autograd node's (id, sequence number) and the shared tensor's sources, for a recurrent
    # layer that finds such a tensor anywhere in the history of its initial state [L·D, N, H]
    # with L·D = N (h0 [1, 1, H].expand(L, N, H).tanh()), whose examples are along dim 1
    # (PerExampleNorms._refuse_square_expansion)
    square_expansions: dict[tuple[int, int], str] = field(default_factory=dict)
    # the model's inputs a recurrent layer was given as its initial state (hx [L·D, N, H]: the
    # examples along dim 1), which the permutation checks permute along dim 1
    # (example_check.py)
    state_inputs: list[Tensor] = field(default_factory=list)
    # expansions of a shared tensor along dim 1 to the batch's size, not meetings (a
    # sequence-first [Q, N, d] of learned queries, facebookresearch/detr's): id of each of its
    # sources -> (labels, shape), for the refusal of a shared call downstream to name
    dim1_expansions: dict[int, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    # tensors with history whose dim 1 has the batch's size and dim 0 another (time-major
    # [T, N, D], heads-first [H, N, T, d]) that a shared tensor met without a meeting: id of
    # each of its sources -> the tensor's shape, for a refusal downstream to name the layout
    dim1_inputs: dict[int, tuple[int, ...]] = field(default_factory=dict)
    # the model's buffers of the batch's leading size a shared tensor was combined with (no
    # example's, by rule): id of each of its sources -> (the buffer's name, its shape)
    buffer_rows: dict[int, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    # outputs of the layers measured in this pass after such an expansion was noted: the
    # output's autograd node (id, sequence number, output number) and its examples' dimension,
    # where that search stops (the layer keeps its examples apart along it)
    call_outputs: dict[tuple[int, int, int], int] = field(default_factory=dict)
    buffer_storages: set[int] | None = None  # its buffers' and frozen parameters' (_is_buffer)
    # the storages of the model's parameters that do not train (shared._frozen_group_weight)
    frozen_storages: set[int] | None = None
    # layer inputs picked by several index tensors on an accelerator, where the indices are
    # not read when the layer runs: (layer, how, a device flag "none of them is the examples in
    # order"), read by the tracker with the step's statistics (_selected_rows)
    unread_picks: list[tuple[str, str, Tensor]] = field(default_factory=list)
    # a layer (or a parameter used directly) ran on rows taken along the examples by an index
    # (graph._routed_by_index), or put together (``assembled``): its label. A compiled pass
    # of the same structure runs eagerly from then on (ExampleCheck._audit_wanted)
    routed: str | None = None
    # a compiled pass of such a structure: the label (settle: compiled code then runs eagerly)
    routed_compiled: str | None = None
    # parameters used directly (returned from the forward) met, in the loss, a tensor holding
    # the examples along another dimension than theirs — a per-position weight applied
    # time-major, ``tok.t() * w[:, None]`` —, which gives no meeting: what, for the refusal
    # of their unfollowed gradients (settle._refuse_unmet_shared): their labels, and what
    met_elsewhere: tuple[list[str], str] | None = None
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
    # parameters read inside a custom torch.autograd.Function's forward -> its class's name
    # (autograd runs the user's backward for them, which no use of noisescale's follows)
    custom_functions: dict[int, str] = field(default_factory=dict)
    # parameters that built a sparse tensor (torch.sparse: peft's SHiRA adds a sparse_coo_tensor
    # of its values to the frozen weight) -> the operation, which no use noisescale follows
    sparse_built: dict[int, str] = field(default_factory=dict)
    # parameters used directly in a product with k·N rows not proven each example's k in turn
    # (shared._flat_product) -> (the operation, the rows' leading size), for the refusal
    flat_unproven: dict[int, tuple[str, int]] = field(default_factory=dict)
    # (key, refusal) of a structure whose audit found rows of the wrong examples, kept by the
    # engine where the pass is refused (Settle._settle)
    sticky: tuple[tuple, str] | None = None
    inputs: tuple | None = None  # the model's (args, kwargs), for the audit's permutation check
    subbatches: Subbatches | MergedSubbatches | None = None
    broken: str | None = None  # a weight measured by sub-batch products was used twice
    reentrant: bool = False  # checkpoint(use_reentrant=True) recomputed layers in its backward
    # how the pass's loss weighs its examples (tokens), attached by noisescale.tokens
    units: Any = None
    units_error: str | None = None
    # a layer that ran with another Parameter than the one it held when the engine was made
    # (label, name, the Parameter): refused at collection, unless registered in the model
    # (then the refusal of parameters added after the tracker names them all)
    replaced: list = field(default_factory=list)
    # a model's own loss from floating-point labels= not known to be a mean over examples
    float_labels: bool = False
    # the gradient that reached the loss a Hugging Face model computed itself and returned, in
    # the backward (noisescale.tokens): the multiplier the step put on that loss (an
    # accumulation divisor or none, a loss scale, the Trainer's own scaling); and its hook
    loss_grad: Tensor | None = None
    loss_grad_hook: Any = None
    # what that loss was already divided by where watch_loss was given a callable that says so
    # at the step (Lightning's manual optimisation decides it there; a number is divided out
    # in the hook)
    loss_divided_by: Any = 1.0
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
    # a layer whose input rows the data picked (h[inv]), its call taken for a shared one:
    # (label, how), named where that call is refused (messages._ambiguous_message)
    picked_input: tuple[str, str] | None = None
    # each layer's calls in the loss code on rows without a history so far (engine's
    # _check_loss_code_rows)
    loss_code_calls: dict = field(default_factory=dict)
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
        self.output_nodes = set()
        self.call_outputs = {}
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


def _by_products(module: nn.Module, rule: LayerRule) -> bool:
    """Layers whose weight gradient the sub-batch mode computes itself (built-in rules only)."""
    from noisescale.per_example import conv, linear

    return rule in (linear.LINEAR_RULE, linear.CONV1D_RULE, *conv.CONV_RULES)


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
