"""Do the model's rows follow its examples? On audited steps the model runs twice more,
without gradients, its hooks paused and its buffers kept: on its inputs and on them with the
examples moved by a random cycle. An output whose example dimension is ambiguous must come
out moved the same way (a time-major output of length N, examples mixed inside the model),
an output taken as shared must not change, and a layer the audit would take for one called
on a table shared by every example must not see its input move. It also decides
which passes are audited (:meth:`_audit_wanted`). A mixin of :class:`~.engine.PerExampleNorms`."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakTensorKeyDictionary

from noisescale.per_example.messages import UNRERUN
from noisescale.per_example.passes import PassNorms
from noisescale.per_example.shared import Origin, SharedTensor
from noisescale.per_example.values import (
    _first_tensor,
    _flat_tensors,
    _permute_examples,
    _SkipCheck,
    _tensors,
)


class ExampleCheck:
    """:class:`~noisescale.per_example.engine.PerExampleNorms`' permutation check of audited
    steps."""

    def _audit_wanted(self, pass_: PassNorms) -> bool:
        """Whether to audit the pass: the step is due, or its structure was never audited. A pass
        that ran inside a compiled graph cannot be (no eager graph to replay): it is marked, its
        per-example norms are withheld and the next step runs eagerly (:meth:`collect`)."""
        signature = tuple(pass_.signature)
        if not pass_.compiled and (pass_.routed or pass_.assembled):
            self._routed_signatures.setdefault(
                signature, pass_.routed or next(iter(pass_.assembled))
            )
        routed = self._routed_signatures.get(signature) if pass_.compiled else None
        due = self.auditing_enabled and (
            self._audit_due
            or signature not in self._audited_signatures
            or (pass_.nodes is not None and (signature, pass_.nodes) not in self._audited_nodes)
            # (a layer's output changed on its way to the engine's hook: engine._changed_on_the_way)
            or bool(pass_.between)
            # (rows put together by the data: graph._assembled_rows)
            or bool(pass_.assembled)
        )
        if pass_.compiled and (
            due
            or routed is not None
            or (
                self.auditing_enabled
                and self._hooks_audited is not None
                and self._hook_state() != self._hooks_audited
            )
        ):
            # (a graph traced since a hook changed — prepended, global, a patched forward, a
            # pre-hook reading a weight — keeps the audited signature: 28-31% off, recorded
            # before 2026-12-05, a review found)
            pass_.unaudited = True
            pass_.routed_compiled = routed
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
        # (the accelerator's generators too: a model's dropout on a GPU drew other masks in
        # the second run, and every layer after it seemed to follow the examples — a review
        # of 2026-12-06; the audit's replays keep them alike, audit._state_kept)
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with (
            torch.no_grad(),
            self.paused(),
            torch.random.fork_rng(devices=devices),
            _buffers_kept(model),
            _attributes_kept(model),
            _no_renorm(model),
        ):
            state = torch.get_rng_state()
            cuda = torch.cuda.get_rng_state_all() if devices else None
            first = model(*inputs[0], **inputs[1])
            if between is not None:
                between()
            torch.set_rng_state(state)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
            return first, model(*permuted[0], **permuted[1])

    def _inputs_follow_examples(self, pass_: PassNorms, layers: list[Any]) -> list[Any] | None:
        """The layers among ``layers`` whose input changes when the examples of the model's
        input are permuted; ``None`` when that cannot be told (no re-run possible). Lookups
        into parameters used directly (their keys, ``("lookup", id(scope), pids, name)``:
        ``self.dp[idx]``, ``F.embedding(idx, self.dp)``) among ``layers`` are checked by their
        indices (:func:`_lookup_indices`): until 2026-12-06 they were not checked at all, and
        data-parameter weights looked up by the examples' ids and centred over the batch in
        the forward, ``sigmoid(a - a.mean())`` with ``a = self.dp[idx]`` — a coupled model —
        were learned as a shared table and measured from step 2 (a hunt).

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
            # Permuted, and one example in two rows (another left out): an input that
            # depends on the examples only through their order-free content — the batch
            # sorted by length inside the forward, before pack_padded_sequence — is the same
            # for every permutation, and was taken for one shared by every example until
            # 2026-12-06 (its layer then refused with another cause, a hunt)
            cycle = self._example_cycle(n)
            index = cycle.clone()
            index[1] = index[0]
            p_inputs = _permute_examples(
                pass_.inputs, index, n, dim, source, False, pass_.state_inputs
            )
            c_inputs = _permute_examples(
                pass_.inputs, cycle, n, dim, source, False, pass_.state_inputs
            )
        except _SkipCheck:
            return None
        runs = self._layer_inputs(pass_, layers, p_inputs)
        if runs is None:
            return None
        followed, shaped = [], []
        for m in layers:
            a, b = runs[m]
            if not a:
                followed.append(m)
            elif not _same_shapes(a, b):
                # (the input's shape changed with the example left out: a table trimmed to the
                # longest example inside the forward — which a review found refused —, its
                # common part unchanged, the permutation alone tells whether it carries the
                # examples; a batch packed by length changes in its common part too)
                if _same_prefix(a, b):
                    shaped.append(m)
                else:
                    followed.append(m)
            elif not _same(a, b):
                followed.append(m)
        if shaped:
            runs = self._layer_inputs(pass_, shaped, c_inputs)
            if runs is None:
                return None
            followed += [m for m in shaped if not runs[m][0] or not _same(*runs[m])]
        return [m for m in layers if m in followed]

    def _layer_inputs(
        self, pass_: PassNorms, layers: list[Any], changed: tuple
    ) -> dict[Any, list[list[Tensor]]] | None:
        """Each layer's inputs (a lookup's indices) in a re-run on the pass's inputs and in one
        on ``changed``; None where the model cannot be re-run."""
        seen: dict[Any, list[list[Tensor]]] = {m: [[], []] for m in layers}
        run = [0]

        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            first = _first_tensor(args, kwargs)
            if first is not None:
                seen[module][run[0]].append(first.detach().clone())

        def second() -> None:
            run[0] = 1

        modules = [m for m in layers if isinstance(m, nn.Module)]
        lookups = [key for key in layers if isinstance(key, tuple)]
        handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in modules]
        try:
            with _lookup_indices(self.model, lookups, seen, run, pass_.batch_size):
                self._run_twice(pass_.inputs, changed, between=second)
        except Exception:  # a forward that cannot be re-run: say so, do not guess
            return None
        finally:
            for h in handles:
                h.remove()
        return seen

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
            p_inputs = _permute_examples(
                (args, kwargs), perm, n, dim, source, True, pass_.state_inputs
            )
            self.model.train(False)
            plain_out, permuted_out = self._run_twice((args, kwargs), p_inputs)
            plain, permuted = _tensors(plain_out), _tensors(permuted_out)
        except _SkipCheck:
            assert pass_.audit is not None
            pass_.audit.unverified = (
                "the output permutation check was skipped: an input's example dimension is "
                "ambiguous (another dimension has the batch's size)"
            )
            return
        except Exception as err:  # a forward that cannot be re-run: say so, do not guess
            assert pass_.audit is not None
            pass_.audit.unverified = f"{UNRERUN} ({type(err).__name__}: {err})"
            return
        finally:
            # a module whose train() does more than set the flag (loralib's LoRA layers merge
            # their low-rank update into the weight in evaluation mode and unmerge it in
            # training) has it called to undo that work; the flags then set as they were (set
            # alone until 2026-12-06: a LoRA layer stayed merged, its factors given no gradient
            # from the next step on; a review)
            for m, training in modes.items():
                if type(m).train is not nn.Module.train and m.training != training:
                    m.train(training)
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
                name = _output_name(plain_out, a)
                pairs = sum(size == n for size in a.shape) == 2 and a.dim() == 2
                pass_.audit.findings.unpermuted = (
                    f"the model's output{name} [{', '.join(map(str, a.shape))}] does not "
                    f"follow its input's examples: with the input's examples (dim {dim}) "
                    f"permuted, the output's dim {dim} did not come out permuted the same way "
                    f"(max. difference {rel:.2g} of its largest value). "
                    + (state := _state_left(self, pass_, args, kwargs, n))
                    + ("Otherwise its" if state else "Its")
                    + " example dimension "
                    "is another one (a time-major output: keep dim 0 the examples), or an "
                    "operation in the model mixes examples — a loss over pairs of examples, "
                    "such as CLIP's or SigLIP's contrastive loss (return_loss=True), has no "
                    "per-example gradient; measure such a model with per_example=False and "
                    "gradient-accumulation micro-batches"
                    + (
                        f". A [{n}, {n}] output compares every pair of examples (CLIP's and "
                        "SigLIP's logits_per_image): if your loss does not use it (a loss on "
                        "the embeddings alone), compute them with the towers alone — "
                        "model.get_image_features(...), model.get_text_features(...), or the "
                        "vision or text model — whose outputs follow the examples"
                        if pairs
                        else ""
                    )
                )
                return


def _state_left(check: Any, pass_: PassNorms, args: tuple, kwargs: dict, n: int) -> str:
    """The first cause to name where a model with a recurrent layer was given an input with the
    batch's size in dim 1 only (an initial state h0 [L·D, N, H]) that no recurrent layer took
    as it is: the check permuted it nowhere (only a state passed unchanged as a layer's hx is
    known to hold the examples in dim 1, :attr:`PassNorms.state_inputs`), so an output computed
    from it (h0 masked by episode starts, then the layer's hx) cannot follow. ``""`` where
    there is none."""
    if not getattr(check, "recurrent", False):
        return ""
    left = [
        t
        for t in _flat_tensors((args, kwargs), [])
        if t.dim() > 1
        and t.shape[0] != n
        and t.shape[1] == n
        and not any(t is s for s in pass_.state_inputs)
    ]
    if not left:
        return ""
    shape = ", ".join(map(str, left[0].shape))
    return (
        f"The model's input [{shape}] has the batch's size in dim 1 only, and was not "
        "permuted: noisescale knows a recurrent layer's initial state to hold the examples in "
        "dim 1 only when the model passes it to the layer as it received it (hx=h0), and this "
        "one is not (computed on before the layer: masked by episode starts?) — pass the state "
        "to the layer unchanged (compute it before calling the model), or use sequences whose "
        "length is not their number (T ≠ N: this check runs only where an output has the "
        "batch's size in two dimensions). "
    )


def _output_name(output: Any, tensor: Tensor) -> str:
    """`` 'key'`` or `` [i]`` of ``tensor`` among the top level of a model's output (a
    ``ModelOutput`` or dict, a tuple or list), or ``""``."""
    if isinstance(output, Mapping):
        for key, value in output.items():
            if value is tensor:
                return f" '{key}'"
    elif isinstance(output, tuple | list):
        for i, value in enumerate(output):
            if value is tensor:
                return f" [{i}]"
    return ""


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


# an nn.Module's own bookkeeping, which a forward does not set (its parameters and buffers are
# kept by _buffers_kept, the training flags by the callers)
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {"training"}


@contextmanager
def _no_renorm(model: nn.Module) -> Iterator[None]:
    """Re-runs in which nn.Embedding and nn.EmbeddingBag do not renormalise their tables in
    place (``max_norm``), put back after. Each re-run's renormalisation bumped the table's
    version without changing a value (the rows it reads — the batch's, permuted or with one
    example twice — are those the user's forward renormalised already), and a head tied to
    the table (``head.weight = emb.weight``), which saved it for its backward, failed that
    backward with torch's "modified by an inplace operation" until 2026-12-06 (a hunt; where
    an output has the batch's size twice, T = N). The re-runs read the same values without
    it. (A functional ``F.embedding(..., max_norm=...)`` is not reached here.)"""
    renormed = [
        (m, m.max_norm)
        for m in model.modules()
        if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.max_norm is not None
    ]
    for m, _ in renormed:
        m.max_norm = None
    try:
        yield
    finally:
        for m, max_norm in renormed:
            m.max_norm = max_norm


@contextmanager
def _attributes_kept(model: nn.Module) -> Iterator[None]:
    """Re-runs of the user's model that leave no trace in what its forward stores on its
    modules: an attribute set (``self.aux_loss = …``, a mixture of experts' load-balancing loss
    that the loop adds to the loss after the forward; a call counter) is put back to the object
    it held before, one added is removed, and the lists, dicts and plain objects held there —
    down to :data:`_DEPTH` levels: a dict of lists of routing statistics, a namespace's fields —
    get their items back where they changed (by identity). Until 2026-12-06 the check's
    re-runs, between the user's forward and loss, left an auxiliary loss kept on the module
    detached and computed from the permuted batch: the step trained without it, and its norms
    were 3–61% off, without a word (a hunt; a review found the first restore one level deep,
    emptying a ModelOutput it refilled and failing on fx's immutable containers). A container
    that refuses to be restored is said so, once. Where the re-runs changed a parameter in place
    (RWKV rescales its weights in evaluation mode and notes it in a flag), nothing is put back:
    the flag must keep describing the weights (a review). What a forward writes elsewhere (a
    global, an object outside the model) is not seen."""
    saved: list[tuple[Any, Any]] = []
    seen: set[int] = set()
    for m in model.modules():
        state = {k: v for k, v in m.__dict__.items() if k not in _MODULE_INTERNALS}
        saved.append((m.__dict__, state))
        for v in state.values():
            _save_items(v, saved, seen, _DEPTH)
    versions = [(p, p._version, _fingerprint(p)) for p in model.parameters()]
    try:
        yield
    finally:
        # (by value where the version moved: a forward's in-place constraint — an embedding's
        # max_norm renormalising rows the training forward renormalised already — moves the
        # version at every run without changing a value, and kept the re-run's attributes
        # until a review of 2026-12-06)
        if all(p._version == v or torch.equal(_fingerprint(p), f) for p, v, f in versions):
            failed = []
            for holder, before in saved:
                try:
                    _put_back(holder, before)
                except Exception:  # (a container that forbids it: an immutable dict)
                    failed.append(type(holder).__name__)
            if failed:
                warnings.warn(
                    "noisescale: the audit re-ran the model (its permutation check, between the "
                    "forward and the loss) and could not put back what the re-runs changed in "
                    f"{', '.join(sorted(set(failed)))} the model's forward stores its results "
                    "in: read them before the next forward of an audited step, or keep them "
                    "in a plain list, dict or attribute",
                    RuntimeWarning,
                    stacklevel=3,
                )


def _fingerprint(p: Tensor) -> Tensor:
    """A parameter's sum and norm, in its own precision and without a copy (float64 copies of
    every parameter took 16 bytes an element, a review): told apart by a re-run that rescales
    it (RWKV), unchanged by one that writes the values it had."""
    with torch.no_grad():
        x = p.detach()
        x = torch.view_as_real(x) if x.is_complex() else x
        return torch.stack((x.sum(), torch.linalg.vector_norm(x)))


#: How deep :func:`_attributes_kept` follows containers held on a module.
_DEPTH = 3


def _save_items(v: Any, saved: list, seen: set[int], depth: int) -> None:
    """Record a list's, a dict's or a plain object's items (and theirs, ``depth`` deep)."""
    if depth <= 0 or id(v) in seen or isinstance(v, Tensor | nn.Module | type):
        return
    if isinstance(v, list):
        seen.add(id(v))
        saved.append((v, list(v)))
        items = list(v)
    elif isinstance(v, dict):
        seen.add(id(v))
        saved.append((v, dict(v)))
        items = list(v.values())
    elif type(v).__module__ in ("types", "__main__") or _is_dataclass_instance(v):
        # (a namespace or a dataclass of the user's: SimpleNamespace, @dataclass state)
        fields = getattr(v, "__dict__", None)
        if fields is None:
            return
        seen.add(id(v))
        saved.append((fields, dict(fields)))
        items = list(fields.values())
    else:
        return
    for item in items:
        _save_items(item, saved, seen, depth - 1)


def _is_dataclass_instance(v: Any) -> bool:
    return hasattr(type(v), "__dataclass_fields__")


def _put_back(now: Any, before: Any) -> None:
    """A list's, dict's or ``__dict__``'s items as :func:`_save_items` saved them, where they
    changed (by identity); a module's ``__dict__`` keeps its own bookkeeping."""
    if isinstance(now, list):
        if len(now) != len(before) or any(a is not b for a, b in zip(now, before, strict=True)):
            now[:] = before
        return
    module_dict = "_parameters" in now and "_modules" in now
    extra = [k for k in now if k not in before and not (module_dict and k in _MODULE_INTERNALS)]
    changed = extra or any(now.get(k, _MISSING) is not v for k, v in before.items())
    if not changed:
        return
    for k in extra:
        del now[k]
    for k, v in before.items():
        if now.get(k, _MISSING) is not v:
            now[k] = v


_MISSING = object()


@contextmanager
def _lookup_indices(
    model: nn.Module,
    lookups: list[tuple],
    seen: dict[Any, list[list[Tensor]]],
    run: list[int],
    n: int,
) -> Iterator[None]:
    """While the model re-runs (its hooks paused: plain parameters), record in
    ``seen[key][run[0]]`` the indices of each lookup in ``lookups`` — ``table[idx]`` or
    ``F.embedding(idx, table)`` run inside the key's scope module, on a table computed from
    the key's parameters alone (the parameter, a view of it — ``self.dp[:, None]`` —, or
    values computed from it and tensors without the batch's ``n`` rows, ``self.pos.to(dtype)``:
    followed op by op, as the engine's shared tensors are)."""
    if not lookups:
        yield
        return
    params = {id(p): p for p in model.parameters()}
    scopes = {id(m): m for m in model.modules()}
    # the tensors computed from the keys' parameters alone: the keys whose tables they are
    tables = WeakTensorKeyDictionary()
    where: dict[tuple, nn.Module] = {}
    for key in lookups:
        _, scope_id, pids, _ = key
        scope = scopes.get(scope_id)
        if scope is None:
            # (nothing to watch it by: never recorded, so taken as following the examples)
            continue
        where[key] = scope
        for pid in pids:
            if pid in params:
                tables[params[pid]] = tables.get(params[pid], frozenset()) | {key}
    depth: dict[int, int] = {}

    def enter(module: nn.Module, args: tuple) -> None:
        depth[id(module)] = depth.get(id(module), 0) + 1

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        depth[id(module)] = depth.get(id(module), 1) - 1

    class Recorder(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            kwargs = kwargs or {}
            operands = _flat_tensors((args, kwargs), [])
            keys = frozenset().union(*(tables.get(a, frozenset()) for a in operands))
            if keys:
                table, index = None, None
                if func is torch.nn.functional.embedding:
                    index = args[0] if args else kwargs.get("input")
                    table = args[1] if len(args) > 1 else kwargs.get("weight")
                elif getattr(func, "__name__", "") == "__getitem__" and len(args) == 2:
                    table, index = args
                if isinstance(table, Tensor) and index is not None:
                    for key in tables.get(table, frozenset()):
                        if depth.get(id(where[key]), 0) > 0:
                            flat = index if isinstance(index, tuple) else (index,)
                            seen[key][run[0]].extend(
                                i.detach().clone() for i in flat if isinstance(i, Tensor)
                            )
            out = func(*args, **kwargs)
            if keys and all(a in tables or a.dim() == 0 or a.shape[0] != n for a in operands):
                for t in _flat_tensors(out, []):
                    tables[t] = tables.get(t, frozenset()) | keys
            return out

    handles = []
    for scope in set(where.values()):
        handles.append(scope.register_forward_pre_hook(enter))
        handles.append(scope.register_forward_hook(leave, always_call=True))
    try:
        with Recorder():
            yield
    finally:
        for h in handles:
            h.remove()


def _same_shapes(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b, strict=True))


def _same(a: list[Tensor], b: list[Tensor]) -> bool:
    """Two runs' inputs of a layer, equal (floating values to 1e-6)."""
    return _same_shapes(a, b) and all(
        torch.allclose(x.double(), y.double(), rtol=1e-6, atol=0.0)
        if x.is_floating_point()
        else torch.equal(x, y)
        for x, y in zip(a, b, strict=True)
    )


def _same_prefix(a: list[Tensor], b: list[Tensor]) -> bool:
    """Two runs' inputs of a layer of different shapes, equal where they overlap."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x.dim() != y.dim():
            return False
        common = tuple(slice(0, min(i, j)) for i, j in zip(x.shape, y.shape, strict=True))
        if not _same([x[common]], [y[common]]):
            return False
    return True
