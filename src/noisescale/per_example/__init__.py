"""Exact per-example squared gradient norms |∇θ ℓ_i|² from module hooks.

A forward hook keeps each supported layer's input; a hook on the layer's output receives the
output gradient during backward, and the layer's per-example gradient norm is computed there in
closed form (Gram or materialised, whichever is cheaper), then the activations are let go.
Parameters used more than once (tied embeddings, a layer called twice) are combined with their
cross terms. A hook on every trainable parameter checks that each parameter that received a
gradient also received a per-example contribution, so a parameter used outside its module is
reported instead of silently left out.

Usage::

    with noisescale.per_example_sqnorms(model, loss_reduction="mean") as pe:
        loss = criterion(model(x), y)
        loss.backward()
    pe.sqnorms  # tensor [batch]: |∇θ ℓ_i|² of each example's own loss ℓ_i

The hooks are installed when the object is created, so the forward pass must run after that —
inside the ``with`` block, or after ``pe = per_example_sqnorms(model)`` and before
``with pe: loss.backward()``.

Conventions (BackPACK warns about the same): with ``loss_reduction="mean"`` the loss that was
backpropagated is (1/N)·Σ_i ℓ_i, with ``"sum"`` it is Σ_i ℓ_i, where N is the size of dim 0 of the
model's input; dim 0 of every layer's input is the example dimension. For sequence models an
example is a sequence, and ℓ_i is whatever the loss assigns to it (e.g. the mean over its tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from noisescale.errors import NoiseScaleInputError, UnsupportedModuleError
from noisescale.per_example import conv, embedding, fallback, linear, norms
from noisescale.per_example.factors import (
    DenseFactor,
    EmbeddingFactor,
    Factor,
    LinearFactor,
    sqnorm,
    sqnorm_of_sum,
)

__all__ = ["PassNorms", "PerExampleNorms", "per_example_sqnorms", "supported_layers"]

LOSS_REDUCTIONS = ("mean", "sum")


@dataclass
class _Handler:
    kind: str
    save: Callable[..., Any]
    factors: Callable[..., dict[str, Factor]]


_CLOSED_FORM: dict[type[nn.Module], _Handler] = {
    nn.Linear: _Handler("linear", linear.save, linear.factors),
    nn.Conv1d: _Handler("conv", conv.save, conv.factors),
    nn.Conv2d: _Handler("conv", conv.save, conv.factors),
    nn.Conv3d: _Handler("conv", conv.save, conv.factors),
    nn.Embedding: _Handler("embedding", embedding.save, embedding.factors),
    nn.LayerNorm: _Handler("norm", norms.save, norms.factors),
    nn.RMSNorm: _Handler("norm", norms.save, norms.factors),
    nn.GroupNorm: _Handler("norm", norms.save, norms.factors),
    nn.BatchNorm1d: _Handler("norm", norms.save, norms.factors),
    nn.BatchNorm2d: _Handler("norm", norms.save, norms.factors),
    nn.BatchNorm3d: _Handler("norm", norms.save, norms.factors),
}
_FALLBACK = _Handler("fallback", fallback.save, fallback.factors)


def supported_layers() -> list[str]:
    """Names of the layer types with closed-form per-example norms."""
    return [t.__name__ for t in _CLOSED_FORM]


def _handler_for(module: nn.Module) -> _Handler:
    for base, handler in _CLOSED_FORM.items():
        # a subclass that overrides forward may compute something else: use the fallback
        if isinstance(module, base) and type(module).forward is base.forward:
            return handler
    return _FALLBACK


@dataclass
class PassNorms:
    """Per-example norms of one forward/backward pass (one micro-batch).

    Attributes:
        batch_size: Examples in the pass (dim 0 of the model's input).
        raw_sqnorms: Σ over parameters of |∂(backpropagated loss)/∂θ restricted to example i|²,
            before undoing the loss reduction, for the examples ``rows``; shape [batch_size], or
            [len(rows)] for a subset, each times its ``row_weights``. ``None`` when per-example
            norms were not computed.
        grad_sqnorm: |∂(backpropagated loss)/∂θ|² of the whole pass (the micro-batch gradient),
            a 0-d tensor; ``None`` if no parameter received a gradient.
        group_sqnorms: ``raw_sqnorms`` split by parameter group, shape [batch_size, groups]
            (summing over groups gives ``raw_sqnorms``); ``None`` without groups.
        group_grad_sqnorm: ``grad_sqnorm`` split by parameter group, shape [groups].
        weights: P² per parameter id when the norms are preconditioned, |P ⊙ g|² = Σ P²g²
            (the same weights for every norm of the pass); ``None`` for plain norms.
        rows: The examples (indices into the pass's batch) whose norms were computed, drawn
            with replacement with probabilities that favour large gradients; ``None`` for all
            of them.
        row_weights: The importance weights 1/(n·q_i) of ``rows``, already applied to
            ``raw_sqnorms`` and ``group_sqnorms`` when the pass is collected, so that their
            mean is an unbiased estimate of the pass's mean (see ``PerExampleNorms._rows``).
        skipped: With a subset fraction, one pass of a step computes per-example norms; the
            others (further accumulation micro-batches) have ``raw_sqnorms`` ``None`` and this
            set.
    """

    batch_size: int
    raw_sqnorms: Tensor | None = None
    grad_sqnorm: Tensor | None = None
    group_sqnorms: Tensor | None = None
    group_grad_sqnorm: Tensor | None = None
    weights: dict[int, Tensor] | None = None
    rows: Tensor | None = None
    row_weights: Tensor | None = None
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
    # with a subset: the step's pass whose per-example norms are computed, in every backward
    # through it (a reentrant checkpoint's inner backward, a second loss on other parameters) ...
    measured: bool = False
    # ... and the step's other passes (accumulation micro-batches), which compute none
    skipped: bool = False
    repeated_backward: bool = False  # a parameter received two gradients in the pass


class PerExampleNorms:
    """The hook engine: per-example squared norms and micro-batch gradient norms per pass.

    Args:
        model: The model; every trainable parameter must belong to a supported layer or to a
            module the torch.func fallback can handle.
        per_example: Compute per-example norms (``False`` keeps only the micro-batch gradient
            norms, which need no layer support).
        fallback: Allow the torch.func fallback for modules without a closed form; if ``False``
            such a module raises :class:`UnsupportedModuleError` at construction.
        groups: A partition of the trainable parameters; each pass then also keeps its norms per
            group (``group_sqnorms``, ``group_grad_sqnorm``).
        precondition: Called when a pass opens; returns P² per parameter id (every norm of the
            pass becomes |P ⊙ g|²) or ``None`` for plain norms.
        per_example_fraction: Compute the per-example norms of a random subset of each pass's
            examples, ⌈fraction·N⌉ of them, drawn afresh every pass (from a generator of the
            engine's own seeded with ``torch.initial_seed()``, so training's random stream is
            left alone), with replacement and favouring large output gradients, each norm
            weighted back (:attr:`PassNorms.row_weights`). The layers' work on per-example norms
            shrinks in proportion, and the mean of the subset's weighted norms is still an
            unbiased estimate of E|g_i|². When a step
            accumulates several backward passes, the subset (⌈fraction·N⌉ of the step's N
            examples, as many as without accumulation, up to the whole micro-batch) is drawn
            from one of them, at a position drawn uniformly among the last step's passes (so a
            sampler that orders a step's micro-batches, e.g. by length, does not bias it); the
            others keep their micro-batch gradient norms only. The hooks' per-example work is
            then paid once per step, not once per micro-batch. A step with fewer passes than
            the last may end before the drawn position: it has no per-example norms.
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
    ):
        if not 0.0 < per_example_fraction <= 1.0:
            raise NoiseScaleInputError(
                f"per_example_fraction must be in (0, 1], got {per_example_fraction}"
            )
        self.model = model
        self.per_example = per_example
        self.per_example_fraction = per_example_fraction
        self._seed = torch.initial_seed()
        self._generators: dict[torch.device, torch.Generator] = {}
        self.precondition = precondition
        self.passes: list[PassNorms] = []
        self._handles: list[RemovableHandle] = []
        self._recomputing = False
        self._paused = False
        self._param_name: dict[int, str] = {}
        self._param: dict[int, nn.Parameter] = {}
        self._plan: dict[nn.Module, tuple[_Handler, str, dict[str, nn.Parameter]]] = {}
        # the pass each running backward (autograd graph task) belongs to
        self._task_pass: dict[int, PassNorms] = {}
        # The first pass of a step skips its per-parameter gradient norms: with one pass they are
        # not needed (the big batch is .grad), and with more they are read from .grad when a
        # later pass first touches the parameter (.grad then holds the first pass alone).
        self.lazy_first_pass = True
        self._first_pass: PassNorms | None = None
        # with a subset and accumulation: the position (among the step's passes, in the order
        # their backward reaches them) of the pass the subset is drawn from, drawn at collect()
        # for the next step; the positions given so far; whether this step's pass was found
        self.subset_position = 0
        self._positions = 0
        self._measured_found = False
        # examples in the last collected step: a subset drawn from one of several micro-batches
        # is sized by the whole step (as if it had not been split)
        self.last_step_examples: int | None = None
        self._task_accumulates: dict[int, bool] = {}
        self._acc_node: dict[int, Any] = {}
        for mname, module in model.named_modules():
            if getattr(module, "sparse", False) and isinstance(
                module, nn.Embedding | nn.EmbeddingBag
            ):
                raise UnsupportedModuleError(
                    f"module '{mname}' ({type(module).__name__}) has sparse=True; its sparse "
                    "gradients are not supported: construct it with sparse=False"
                )
            if parametrize.is_parametrized(module):
                raise UnsupportedModuleError(
                    f"module '{mname}' ({type(module).__name__}) has parametrized weights "
                    "(torch.nn.utils.parametrize: weight_norm, spectral_norm, ...), whose "
                    "per-example gradients noisescale does not compute; remove the "
                    "parametrization or use per_example=False"
                )
        if isinstance(model, nn.DataParallel):
            raise UnsupportedModuleError(
                "nn.DataParallel replicates the model into threads that the hooks cannot follow; "
                "use DistributedDataParallel (supported) or track the inner module on one device"
            )

        for mname, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    self._param_name.setdefault(id(p), f"{mname}.{pname}" if mname else pname)
                    self._param[id(p)] = p
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
                self._acc_node[pid] = p.view_as(p).grad_fn.next_functions[0][0]
        self._install()

    # -- construction -------------------------------------------------------------------------

    def _build_plan(self, allow_fallback: bool) -> None:
        owned_by_fallback: set[nn.Module] = set()
        for module in self.model.modules():
            if isinstance(module, nn.MultiheadAttention):
                owned_by_fallback.update(m for m in module.modules() if m is not module)
        for mname, module in self.model.named_modules():
            if module in owned_by_fallback:
                continue
            handler = _handler_for(module)
            params = (
                fallback.fallback_params(module)
                if handler is _FALLBACK
                else {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
            )
            if not params:
                continue
            label = mname or "<top-level model>"
            if handler is not _FALLBACK and not set(params) <= {"weight", "bias"}:
                raise UnsupportedModuleError(
                    f"module '{label}' ({type(module).__name__}) has parameters {sorted(params)} "
                    "instead of weight/bias (e.g. the old nn.utils.weight_norm), so its forward "
                    "does not compute what its type says; use torch.nn.utils.parametrizations or "
                    "per_example=False"
                )
            if handler.kind == "norm":
                norms.check(module, label)
            elif handler.kind == "embedding":
                embedding.check(module, label)
            elif handler is _FALLBACK:
                if not allow_fallback:
                    raise UnsupportedModuleError(
                        f"module '{label}' ({type(module).__name__}) owns parameters "
                        f"{sorted(params)} and has no closed-form per-example norm; supported: "
                        f"{', '.join(supported_layers())}. Allow the torch.func fallback or use "
                        "per_example=False"
                    )
                if module is self.model:
                    raise UnsupportedModuleError(
                        f"the top-level model ({type(module).__name__}) owns parameters "
                        f"{sorted(params)} directly; per-example norms are computed per layer, so "
                        "put these parameters inside a layer (e.g. nn.Embedding for a positional "
                        "table) or use per_example=False"
                    )
                fallback.check(module, label)
            self._plan[module] = (handler, label, params)

    def _install(self) -> None:
        self._handles.append(
            self.model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True)
        )
        self._handles.append(self.model.register_forward_hook(self._on_model_output))
        for module in self._plan:
            self._handles.append(module.register_forward_hook(self._on_forward, with_kwargs=True))
        for pid, p in self._param.items():
            self._handles.append(p.register_hook(self._make_param_hook(pid)))

    def remove(self) -> None:
        """Remove every hook; the object keeps what it has measured."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

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

    # -- hooks --------------------------------------------------------------------------------

    def _on_model_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._recomputing or self._paused or not torch.is_grad_enabled():
            return
        if torch._C._current_graph_task_id() != -1:
            # a forward re-run during backward (activation checkpointing) belongs to its pass
            return
        # Every forward opens a pass; passes that no backward reaches (a validation forward
        # with grad enabled) are dropped, and passes that one backward ran through together
        # (two forwards, one loss) are merged, when the step collects them.
        n = _leading_dim(args, kwargs)
        weights = self.precondition() if self.precondition is not None else None
        # a forward after the step's measured backward (the next accumulation micro-batch)
        # cannot be measured: no layer hooks for it
        skipped = self._measured_found and self.per_example_fraction < 1.0
        self.passes.append(PassNorms(batch_size=n, weights=weights, skipped=skipped))

    def _on_model_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._recomputing or self._paused or not torch.is_grad_enabled() or not self.passes:
            return
        if torch._C._current_graph_task_id() != -1:
            return
        hook = self._make_root_hook(self.passes[-1])
        for out in _tensors(output):
            if out.requires_grad:
                out.register_hook(hook)

    def _make_root_hook(self, pass_: PassNorms) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            self._enter(pass_)

        return hook

    def _enter(self, pass_: PassNorms) -> None:
        """Record that the running backward goes through ``pass_``."""
        task = torch._C._current_graph_task_id()
        pass_.tasks.add(task)
        self._task_pass.setdefault(task, pass_)

    def _reaches_parameters(self, params: dict[str, nn.Parameter]) -> bool:
        """Whether the running backward computes gradients of these parameters.

        False for a backward towards the inputs only (adversarial examples, saliency maps).
        """
        for p in params.values():
            node = self._acc_node.get(id(p))
            if node is None or torch._C._will_engine_execute_node(node):
                return True
        return False

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._recomputing or self._paused or not torch.is_grad_enabled() or not self.passes:
            return
        out = output[0] if isinstance(output, tuple) else output
        if not isinstance(out, Tensor) or not out.requires_grad:
            return
        handler, label, params = self._plan[module]
        current = self.passes[-1]
        if handler.kind == "norm":
            norms.check(module, label)  # a BatchNorm may have been switched to train() since
        if current.skipped:
            return
        if handler is _FALLBACK:
            saved = fallback.save(module, args, kwargs)
            lead = _leading_dim(args, kwargs)
            if lead != current.batch_size:
                raise NoiseScaleInputError(
                    f"module '{label}' received an input with leading dimension {lead} but the "
                    f"model's input has {current.batch_size} examples: noisescale takes dim 0 "
                    "of every layer's input as the example dimension (batch-first). Keep "
                    "activations batch-first, or use per_example=False"
                )
        else:
            saved = handler.save(module, args, out)
            if saved.shape[0] != current.batch_size:
                hint = (
                    " A table shared by all examples, like nanoGPT's wpe(pos) with pos of shape "
                    "[T], needs the positions per example: pos.expand(batch, T)."
                    if handler.kind == "embedding"
                    else ""
                )
                raise NoiseScaleInputError(
                    f"layer '{label}' received an input with leading dimension {saved.shape[0]} "
                    f"but the model's input has {current.batch_size} examples: noisescale takes "
                    "dim 0 of every layer's input as the example dimension (batch-first). Keep "
                    f"activations batch-first, or use per_example=False.{hint}"
                )
        for p in params.values():
            current.uses[id(p)] = current.uses.get(id(p), 0) + 1
        # the hook lives as long as the autograd graph (often until the user's next step, via
        # `loss`): it holds the saved input in a box it empties when it runs, so the input is
        # freed when autograd frees its own copy, not when the graph dies
        out.register_hook(self._make_output_hook(module, [saved], current))
        if isinstance(output, tuple):
            for k, extra in enumerate(output[1:], start=1):
                if isinstance(extra, Tensor) and extra.requires_grad:
                    extra.register_hook(_refuse_extra_output(label, k))

    def _make_output_hook(
        self, module: nn.Module, box: list[Any], pass_: PassNorms
    ) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            handler, label, params = self._plan[module]
            if torch.is_grad_enabled():
                # create_graph=True (gradient penalties, double backward): the loss that is
                # later backpropagated has second-order terms the factors do not see
                pass_.second_order = True
                return
            try:
                reaches: bool | None = self._reaches_parameters(params)
            except RuntimeError:  # inside torch.autograd.grad(): decided when collected
                reaches = None
            if reaches is False:
                return
            if not box:
                # a second backward through this output (retain_graph=True): the parameter
                # hooks see the repeated gradient and collect() refuses the step
                return
            saved = box.pop()
            self._enter(pass_)
            if not self._measures(pass_, reaches):
                return
            with torch.no_grad():
                rows = self._rows(pass_, grad)
                kept = saved
                if rows is not None:
                    kept = _take_rows(saved, rows, pass_.batch_size)
                    grad = grad.index_select(0, rows)
                if handler is _FALLBACK:
                    self._recomputing = True
                    try:
                        facs = fallback.factors(module, kept, grad, label)
                    finally:
                        self._recomputing = False
                else:
                    facs = handler.factors(module, kept, grad)
                task = torch._C._current_graph_task_id()
                for pname, factor in facs.items():
                    if pname not in params:  # a parameter unfrozen later: collect() reports it
                        continue
                    if reaches is None:
                        pass_.deferred.setdefault(task, []).append((params[pname], factor))
                    else:
                        self._add(pass_, params[pname], factor)

        return hook

    def _measures(self, pass_: PassNorms, reaches: bool | None) -> bool:
        """Whether this pass's per-example norms are computed (decided once per pass).

        Every pass's are for the exact mode. With a subset, the pass at ``subset_position``
        among those the step's backwards reach is measured, in whatever backward later runs
        through it, and the others are skipped. Inside torch.autograd.grad() (``reaches``
        ``None``) whether the parameters are reached is known only at collect(): such a pass is
        computed without taking a position.
        """
        if self.per_example_fraction >= 1.0 or pass_.measured:
            return True
        if pass_.skipped:
            return False
        if reaches is None:
            return True
        position, self._positions = self._positions, self._positions + 1
        if position == self.subset_position:
            pass_.measured = self._measured_found = True
            return True
        pass_.skipped = True
        return False

    def _rows(self, pass_: PassNorms, grad: Tensor) -> Tensor | None:
        """The pass's random subset of examples (the same for every layer), or ``None`` for all.

        ⌈fraction·N⌉ rows for a step of N examples (N from the last step while this one is
        running: its first micro-batch does not know how many follow), at most the pass's own.
        They are drawn with replacement, example i with probability q_i = ½/n + ½·π_i/Σπ,
        where π_i = |δ_i|² is the squared norm of example i's rows of the output gradient of
        the layer whose hook runs first (the one nearest the loss: for a classifier or a
        language model, the logits' gradient), which tracks |g_i|². Each drawn norm is later
        weighted by 1/(n·q_i) ≤ 2 (:attr:`PassNorms.row_weights`), so their mean is still
        unbiased for the mean of |g_i|² over the pass (Hansen–Hurwitz), whatever π is; the
        uniform half bounds the weights. When a few examples carry most of the gradient noise
        (late in training) they are drawn nearly every step instead of rarely.
        """
        device = grad.device
        n_pass = pass_.batch_size
        n = max(n_pass, self.last_step_examples or 0)
        k = math.ceil(self.per_example_fraction * n)
        if k >= n_pass:
            return None
        if pass_.rows is None:
            gen = self._generator(device)
            q = torch.full((n_pass,), 1.0 / n_pass, device=device)
            if grad.dim() > 0 and grad.shape[0] == n_pass:
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
        return pass_.rows if pass_.rows.device == device else pass_.rows.to(device)

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
            gen.manual_seed(self._seed)
        return gen

    def rng_state(self) -> dict[str, list[int]]:
        """The states of the subset generators by device (for checkpoints: an exact resume)."""
        return {str(d): g.get_state().tolist() for d, g in self._generators.items()}

    def set_rng_state(self, state: dict[str, list[int]]) -> None:
        """Restore :meth:`rng_state`."""
        for device, values in state.items():
            self._generator(torch.device(device)).set_state(torch.tensor(values, dtype=torch.uint8))

    def _make_param_hook(self, pid: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            if self._paused:
                return
            task = torch._C._current_graph_task_id()
            current = self._task_pass.get(task) or (self.passes[-1] if self.passes else None)
            if current is None:
                return
            current.tasks.add(task)
            current.param_tasks.add(task)
            self._task_pass.setdefault(task, current)
            if pid in current.received:
                current.repeated_backward = True
            current.received.add(pid)
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

    def _accumulates(self, task: int, pid: int) -> bool:
        """Whether the running backward writes .grad (backward(), not torch.autograd.grad)."""
        known = self._task_accumulates.get(task)
        if known is None:
            node = self._acc_node.get(pid)
            try:
                known = node is not None and bool(torch._C._will_engine_execute_node(node))
            except RuntimeError:  # autograd.grad(): .grad is not written, so no lazy reading
                known = False
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
        if pass_.uses.get(pid, 1) == 1:
            w2 = None if pass_.weights is None else pass_.weights.get(pid)
            self._accumulate(
                pass_, pid, factor.sqnorm() if w2 is None else weighted_sqnorm(factor, w2)
            )
            return
        waiting = pass_.pending.setdefault(pid, [])
        waiting.append(factor)
        if len(waiting) == pass_.uses[pid]:
            self._accumulate(pass_, pid, self._sqnorm_of_uses(pass_, p, waiting))
            del pass_.pending[pid]

    @staticmethod
    def _sqnorm_of_uses(pass_: PassNorms, p: nn.Parameter, factors: list[Factor]) -> Tensor:
        w2 = None if pass_.weights is None else pass_.weights.get(id(p))
        if w2 is None:
            return sqnorm_of_sum(factors, p.shape)
        # weighted cross terms have no compact form: sum the materialised uses
        total = sum(f.dense(p.shape) for f in factors)
        return (total.pow(2) * w2).flatten(1).sum(1)

    def _accumulate(self, pass_: PassNorms, pid: int, sq: Tensor) -> None:
        pass_.raw_sqnorms = sq if pass_.raw_sqnorms is None else pass_.raw_sqnorms + sq
        if self._group_of is not None:
            if pass_.group_sqnorms is None:
                pass_.group_sqnorms = sq.new_zeros(sq.shape[0], self.num_groups)
            pass_.group_sqnorms[:, self._group_of[pid]] += sq

    # -- results ------------------------------------------------------------------------------

    def collect(self, grad_rescale: float = 1.0) -> list[PassNorms]:
        """Finish the open passes and return them, resetting the engine for the next step.

        Passes that no backward reached are dropped; passes one backward ran through together
        (two forwards, one loss) are merged into one.

        Args:
            grad_rescale: What ``.grad`` must be multiplied by to be in the hooks' units again
                (the loss scale, when ``GradScaler.unscale_`` ran after the backward passes).

        Raises:
            UnsupportedModuleError: if a parameter received a gradient but no per-example
                contribution (it was used outside the module that owns it).
            NoiseScaleInputError: if the trainable parameters changed since construction, a
                backward with ``create_graph=True`` fed the parameters' gradients, or two
                backward passes ran through one forward.
        """
        done, self.passes = self.passes, []
        first, self._first_pass = self._first_pass, None
        self._positions = 0
        self._measured_found = False
        reached = sum(1 for p in done if p.received)  # passes of the step, before merging
        if first is not None and first.lazy and reached > 1:
            # parameters no later pass touched: .grad is still the first pass's gradient
            # (``grad_rescale`` undoes an AMP unscale_ of .grad that ran since the backward)
            for pid in list(first.lazy):
                self._resolve_lazy(first, pid, grad_rescale**2)
        if first is not None:
            first.lazy.clear()
        self._task_accumulates.clear()
        self._task_pass.clear()
        trainable = {id(p) for p in self.model.parameters() if p.requires_grad}
        if trainable != set(self._param):
            raise NoiseScaleInputError(
                "the model's trainable parameters changed since the tracker was created "
                "(a layer was frozen or unfrozen); create a new tracker after changing "
                "requires_grad"
            )
        for pass_ in done:
            for task, items in pass_.deferred.items():
                if task in pass_.param_tasks:
                    for p, factor in items:
                        self._add(pass_, p, factor)
            pass_.deferred.clear()
            for pid, waiting in list(pass_.pending.items()):
                # a use whose output never reached the loss contributes a zero gradient
                self._accumulate(pass_, pid, self._sqnorm_of_uses(pass_, self._param[pid], waiting))
            pass_.pending.clear()
            if pass_.row_weights is not None:  # importance weights of the drawn rows
                w = pass_.row_weights
                if pass_.raw_sqnorms is not None:
                    pass_.raw_sqnorms = pass_.raw_sqnorms * w.to(pass_.raw_sqnorms.dtype)
                if pass_.group_sqnorms is not None:
                    wg = w.to(pass_.group_sqnorms.dtype)[:, None]
                    pass_.group_sqnorms = pass_.group_sqnorms * wg
            pass_.uses.clear()
        for pass_ in done:
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
        # a pass whose parameters received no gradient was a forward without a training backward
        # (validation with grad enabled, gradients towards the inputs only): it is not a
        # micro-batch of this step
        done = [p for p in _merge_shared_backward(done) if p.received]
        if done:
            self.last_step_examples = sum(p.batch_size for p in done)
            self.subset_position = 0
            if reached > 1 and self.per_example_fraction < 1.0:
                gen = self._generator(torch.device("cpu"))
                self.subset_position = int(torch.randint(reached, (1,), generator=gen))
        if self.per_example:
            for pass_ in done:
                if pass_.skipped:  # another micro-batch: the measured one checked the layers
                    continue
                missing = pass_.received - pass_.covered
                if missing:
                    names = sorted(self._param_name[pid] for pid in missing)
                    raise UnsupportedModuleError(
                        f"parameters {names} received gradients but noisescale saw no forward "
                        "call of the layer that owns them (they are used outside their module, "
                        "e.g. `F.linear(x, other.weight)`), so their per-example norms would be "
                        "missing. Call the owning module instead, or use per_example=False"
                    )
        return done


def _merge_shared_backward(passes: list[PassNorms]) -> list[PassNorms]:
    """Merge passes that one backward ran through: one micro-batch of all their examples."""
    groups: list[list[PassNorms]] = []
    for pass_ in passes:
        joined = [g for g in groups if any(pass_.tasks & q.tasks for q in g)]
        merged = [pass_]
        for g in joined:
            groups.remove(g)
            merged = g + merged
        groups.append(merged)
    out = []
    for group in groups:
        if len(group) == 1:
            out.append(group[0])
            continue
        first = group[0]
        merged = PassNorms(batch_size=sum(p.batch_size for p in group), weights=first.weights)
        for name in ("raw_sqnorms", "group_sqnorms"):
            parts = [getattr(p, name) for p in group if getattr(p, name) is not None]
            setattr(merged, name, torch.cat(parts) if parts else None)
        for name in ("grad_sqnorm", "group_grad_sqnorm"):
            parts = [getattr(p, name) for p in group if getattr(p, name) is not None]
            setattr(merged, name, sum(parts[1:], parts[0]) if parts else None)
        merged.skipped = all(p.skipped for p in group)
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


def _tensors(value: Any) -> list[Tensor]:
    """The tensors in a model's output (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


# Materialised per-example weight gradients are built this many elements at a time (1 GiB in fp32).
_MATERIALISE_ELEMENTS = 1 << 28


def _acc(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def weighted_sqnorm(factor: Factor, w2: Tensor) -> Tensor:
    """Per-example Σ w2 ⊙ g_i² of one parameter: the preconditioned norm |P ⊙ g_i|² for w2 = P².

    An elementwise P (Adam's 1/(√v̂ + ε), a full matrix for a weight) breaks the Gram trick
    |Σ_t δ_t a_tᵀ|² = Σ_{t,s}(a_t·a_s)(δ_t·δ_s), so a Linear/conv weight's per-example gradient
    δᵀa is materialised, N·O·I elements (in chunks of examples to bound memory) — the cost of a
    dense per-example gradient of that layer. Embeddings stay sparse: only the rows an example
    touches are weighted.
    """
    if isinstance(factor, LinearFactor):
        a, d = _acc(factor.a), _acc(factor.d)
        groups, o, i = factor.groups, d.shape[2], a.shape[2]
        w = w2.reshape(groups, o, i)
        n = a.shape[0] // groups
        chunk = max(1, _MATERIALISE_ELEMENTS // (groups * o * i))
        out = []
        for start in range(0, n, chunk):
            rows = slice(start * groups, (start + chunk) * groups)
            g = torch.bmm(d[rows].transpose(1, 2), a[rows])  # [chunk·G, O/G, I']
            out.append((g.pow(2).view(-1, groups, o, i) * w).sum((1, 2, 3)))
        return torch.cat(out)
    if isinstance(factor, EmbeddingFactor):
        rows, summed = factor.row_sums()
        return (summed.pow(2) * w2[rows]).sum((1, 2))
    assert isinstance(factor, DenseFactor)
    return (_acc(factor.grads).pow(2) * w2).flatten(1).sum(1)


def _leading_dim(args: tuple, kwargs: dict) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
        if isinstance(value, dict | list | tuple):
            inner = value.values() if isinstance(value, dict) else value
            for v in inner:
                if isinstance(v, Tensor) and v.dim() > 0:
                    return int(v.shape[0])
    raise NoiseScaleInputError(
        "the model was called without a tensor argument, so the number of examples is unknown; "
        "pass the batch as a tensor (dim 0 = examples)"
    )


def _take_rows(saved: Any, rows: Tensor, n: int) -> Any:
    """What a forward hook saved, restricted to the examples ``rows`` of a batch of ``n``."""
    if isinstance(saved, Tensor):
        return saved.index_select(0, rows)

    def take(a: Any) -> Any:
        return a.index_select(0, rows) if fallback._is_batched(a, n) else a

    return fallback.Saved(
        tuple(take(a) for a in saved.args), {k: take(v) for k, v in saved.kwargs.items()}
    )


def _refuse_extra_output(label: str, k: int) -> Callable[[Tensor], None]:
    def hook(grad: Tensor) -> None:
        if torch.count_nonzero(grad):
            raise UnsupportedModuleError(
                f"output {k} of module '{label}' received a gradient; the torch.func fallback "
                "uses only the first output of a module. Do not backpropagate through its other "
                "outputs, or use per_example=False"
            )

    return hook


class per_example_sqnorms:
    """Context manager giving |∇θ ℓ_i|² for each example i of a forward/backward pass.

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
        self.sqnorms: Tensor | None = None

    def __enter__(self) -> per_example_sqnorms:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                passes = [p for p in self.engine.collect() if p.raw_sqnorms is not None]
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
            self.engine.remove()
