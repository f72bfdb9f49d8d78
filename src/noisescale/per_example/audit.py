"""The engine's audit: proof, on a pass, that every per-example contribution is complete and
attributed to the right example.

Two checks run on an audited pass (every example measured), and a third on rules registered
outside noisescale:

**Coverage.** For every parameter, the per-example gradients the factors describe must add up to
the gradient autograd computed for that pass: Σ_i g_i(θ) = ∂L/∂θ. A use the engine missed (a
weight also used through ``F.linear`` elsewhere, a penalty added to the loss) leaves a remainder;
a use counted twice (one parameter registered on two modules) doubles it. Both sides are compared
through K = 8 random projections, ⟨·, r_k⟩ with Gaussian r_k, so nothing parameter-sized is
kept: Σ_k ⟨D, r_k⟩² estimates K·|D|² (D the difference), and the pass fails when it exceeds
K·tol²·|∂L/∂θ|² (tol = 10⁻³; 10⁻⁵ for a pass all in float64; 3·10⁻² when the forward ran under
autocast in bfloat16/float16, whose rounding the factors do not reproduce bit for bit), plus a
floor of rounding noise relative
to the whole pass's gradient. A use whose share of a parameter's gradient is below tol is
therefore not caught; its effect on a norm is below tol as well.

**Attribution.** The rows of every hooked tensor (a layer's output, a shared tensor expanded over
the batch) must belong to the examples the engine attributes them to. When the first batched model
output receives its gradient δ, the backward is replayed from it with a coefficient s_i = ±2^e on
each example (``torch.autograd.grad`` on the still intact graph, gradients of the hooked tensors
only, no parameter gradients): if example i's rows of every hooked tensor depend on example i
alone, the replayed gradient of each is exactly s_i times its row i (±1 signs, used before, missed
rows mixed between two examples that drew the same sign, half the time; e in -2..2 gives ten
values, drawn without replacement: distinct up to ten examples — drawn independently, one pair in
ten drew the same value and passed rows mixed between them, 2026-12-05 — and powers of two scale
exactly; where float16 takes part, e in -2..0, six values, distinct up to six examples — signs
alone until 2026-12-05, which passed rows mixed between two examples of one sign). A table
indexed by positions whose count happens to equal the batch size, a time-major activation, or an
operation that mixes examples (BatchNorm statistics in training mode) breaks that, and the tensor
is named. Each hooked
tensor is compared through a random projection of each row (one number per example kept). Model
outputs that receive gradient later (hidden states that are also outputs) are replayed with the
part of their gradient the earlier replays did not account for. A model that returns only a scalar
loss is replayed from the first hooked tensors its backward reaches instead; a loss term computed
inside such a model directly from an inner activation (bypassing them) then shows up as a mismatch.
A tensor taken for each example's rows in turn (the examples flattened together with positions, a
shared table repeated over them) that no replay was compared with — the frontier of such a replay,
or a pass whose backward could not be replayed — is reported as unverified: its rows' order has no
other proof. A replay runs through ``torch.utils.checkpoint(use_reentrant=True)``, whose backward
torch refuses to run under ``torch.autograd.grad`` (:func:`install_reentrant_support`), and
compares what each such checkpoint's input receives (:meth:`PassAudit._checkpoint_inputs`).

**A user's rule** (:meth:`PassAudit.check_rule`). Coverage sees only the sum of a rule's factors
over the examples; a rule of the user's is also checked for its split among them: the layer's own
backward is run again from its outputs with each example's rows weighted by s_i, and the factors
must give Σ_i s_i g_i as well.

Cost, on an audited pass only: every example's per-example norms, one extra backward pass without
parameter gradients, and K random vectors the size of each parameter (and two backwards of each
layer that has a user's rule).
"""

from __future__ import annotations

import functools
import itertools
import math
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from noisescale.per_example.factors import (
    EmbeddingFactor,
    Factor,
    LinearFactor,
    SliceFactor,
    _acc,
)

__all__ = ["Findings", "PassAudit"]

K_PROJECTIONS = 8
TOL = 1e-3
# a float64 pass: 10⁻³ let a missed use of up to 0.1% of a parameter's gradient through (BART's
# tied table looked up by the caller, 1.5–2.3·10⁻⁴ of every norm, passed until 2026-12-07);
# not 10⁻⁷: a float64 model may compute parts in float32 (Cohere's and Llama's norms cast their
# input to float32), whose rounding left a remainder of 1.2·10⁻⁷ on Cohere's norm weight
TOL_64 = 1e-5
TOL_AMP = 3e-2
# a parameter whose own gradient is 16-bit (a model cast with .bfloat16()), outside autocast:
# autograd's .grad and the factors' sums round apart by ≈ 0.2% (bf16), so 10⁻³ refused every
# such model; autocast's 3·10⁻² let a weight's second use of 2–3% through (a review, 2026-12-05)
TOL_16 = 1e-2
_SIXTEEN = (torch.bfloat16, torch.float16)
# rows of a replayed tensor must match s_i times the real rows to this relative precision
ATTRIBUTION_TOL = 1e-4
ATTRIBUTION_TOL_AMP = 2e-2
# a target's ``dim`` for a tensor whose dim 0 holds each example's rows in turn, [N·k, ...]
# (examples flattened together with positions: LayerRule.flattened)
FLAT = -1


@dataclass(frozen=True, eq=False)
class Packed:
    """A target's layout when it is a recurrent layer's packed output (``PackedSequence``
    data, [Σ lengths, H]): the packing's metadata, by which each row is one example's — the
    example at its batch position in the sorted order, the packed tensor's rows in their
    own order. Until 2026-12-06 such targets had no example dimension and were left
    unchecked: a batch reordered inside the forward before it was packed (the sort-by-length
    idiom) had the layer's rows given to the wrong examples, 15–44% off, a hunt."""

    batch_sizes: Tensor
    sorted_indices: Tensor | None
    unsorted_indices: Tensor | None

    def examples(self, device: torch.device) -> Tensor:
        """The example of each packed row (the packed tensor's row it came from)."""
        sizes = self.batch_sizes.tolist()
        at = torch.cat([torch.arange(b) for b in sizes]).to(device)
        return at if self.sorted_indices is None else self.sorted_indices.to(device)[at]


@dataclass
class _Target:
    # the gradient edge's node by key (_node_key), not the node: an audit holding its graph's
    # nodes kept a forward no backward reaches (an evaluation loop with gradients on) alive
    # for good; the backward finds them again (_find_nodes)
    node: int
    output_nr: int
    dim: int
    module: Any  # the layer whose call it hooked, a lookup's key, or None
    label: str
    root: bool = False
    got: Tensor | None = None  # Σ over replays of each row's projection (roots: the full tensor)
    reached: bool = False
    compared: bool = False
    seed: int = 0
    seen: bool = False  # its gradient arrived in the real backward
    verified: bool = False  # a replay's rows were compared with it


@dataclass
class Findings:
    """What an audit found."""

    unexplained: dict[int, float] = field(default_factory=dict)  # pid -> relative remainder
    # of them, 16-bit embedding tables on the CPU: the message names that cause too
    sixteen_bit_sums: set[int] = field(default_factory=set)
    misattributed: list[_Target] = field(default_factory=list)
    unpermuted: str | None = None  # the outputs do not follow the inputs' examples
    # targets in the FLAT layout (each example's rows in turn) that no replay was compared with
    unverified_flat: list[_Target] = field(default_factory=list)
    batch_size: int | None = None  # the audited pass's examples (for the messages)
    # a registered rule of the user's whose factors do not split the gradient among the
    # examples as autograd does (PassAudit.check_rule): one message each
    wrong_rules: list[str] = field(default_factory=list)
    # parameters with per-example gradients whose own gradient the audit never received: their
    # sums were checked against nothing (PassAudit.finish)
    unrecorded: list[int] = field(default_factory=list)
    # the pass's gradient was all zero (a micro-batch whose loss counts nothing, 0 · terms):
    # its replays and sums compared zeros with zeros and proved nothing (PassAudit.finish)
    vacuous: bool = False

    @property
    def ok(self) -> bool:
        return (
            not self.unexplained
            and not self.unrecorded
            and not self.misattributed
            and self.unpermuted is None
            and not self.unverified_flat
            and not self.wrong_rules
        )

    @property
    def only_attribution(self) -> bool:
        return bool(self.misattributed) and not self.unexplained and self.unpermuted is None

    @property
    def only_sums(self) -> bool:
        return bool(self.unexplained) and not self.misattributed and self.unpermuted is None

    def unexplained_params(self) -> list[int]:
        return list(self.unexplained)

    def misattributed_modules(self, _: Callable[[Any], Any] | None = None) -> list[Any]:
        """Each misattributed target's owner: the layer whose call it hooked, a lookup's key
        (a tuple) for a parameter used directly, or ``None``."""
        return [t.module for t in self.misattributed]

    def message(
        self, labels: dict[nn.Module, str], _: Any = None, names: dict[int, str] | None = None
    ) -> str:
        parts = list(self.wrong_rules)
        if self.unpermuted:
            parts.append(self.unpermuted)
        if self.unexplained:
            items = ", ".join(
                f"'{(names or {}).get(pid, '?')}' (a remainder of about {100 * r:.2g}% of its "
                "gradient)"
                for pid, r in sorted(self.unexplained.items(), key=lambda kv: -kv[1])
            )
            parts.append(
                f"the per-example gradients of parameters {items} do not add up to the gradient "
                "autograd computed: a use of them was missed or counted twice (a parameter used "
                "outside the model's forward, e.g. a penalty added to the loss — use the "
                "optimizer's weight_decay instead —, or by a module around the model: a tracker "
                "given a submodule whose weights its parent also reads, as a tied autoencoder's "
                "decoder reads the encoder's — give the tracker the parent; one parameter "
                "registered on two modules that "
                "both use it in one computation; a module whose rule does not match its forward)"
                + (
                    ". Or, for "
                    + ", ".join(f"'{(names or {}).get(pid, '?')}'" for pid in self.sixteen_bit_sums)
                    + ": an embedding table stored in 16 bits on the CPU, whose gradient torch "
                    "adds up in 16 bits (1% off where a row is read a hundred times in a batch, "
                    "5% a thousand times), which the check cannot tell from a missed use — if "
                    "nothing else uses it, train with bfloat16 autocast over float32 "
                    "parameters (torch.autocast), or measure on a GPU"
                    if self.sixteen_bit_sums
                    else ""
                )
            )
        if self.unrecorded:
            items = ", ".join(f"'{(names or {}).get(pid, '?')}'" for pid in self.unrecorded)
            parts.append(
                f"the audit received no gradient of parameters {items} to check their "
                "per-example gradients against: the step's backward ran through forwards of the "
                "model whose audits it could not join (several forwards in one backward). Call "
                "backward() on each forward's loss in turn (gradient accumulation), or run the "
                "examples in one forward"
            )
        if self.misattributed:
            where = ", ".join(f"'{t.label}'" for t in self.misattributed)
            parts.append(
                f"the rows of {where} do not belong to the examples they are attributed to: "
                "its example dimension is not the batch's (a table indexed by positions whose "
                "count equals the batch size, a time-major activation — keep dim 0 the "
                "examples — or an operation that mixes examples, such as BatchNorm in training "
                "mode or a loss computed inside the model from an inner activation — or a batch "
                "reordered inside the forward, as sorted by length for pack_padded_sequence: "
                "pass it in its own order with enforce_sorted=False, which torch sorts and "
                "restores itself — or a gradient hook on an activation that changes its "
                "gradient other than by a fixed factor, h.register_hook(lambda g: g.clamp(...)), "
                "whose rows are then no example's own gradient)"
                + (
                    f". A dimension that has the batch's size {self.batch_size} by coincidence "
                    "(positions, image tokens, a pooled length) is told apart by a batch of "
                    "another size: if one is measured exactly, that was the cause"
                    if self.batch_size
                    else ""
                )
                + (
                    ". An expansion of a parameter to as many rows as the batch has examples "
                    "('expand of …') is taken for a meeting with them; where it is not one — a "
                    "kernel expanded over C = N channels as a convolution's weight, "
                    "k.expand(C, 1, kh, kw) —, GradientNoiseTracker learns so on its first "
                    "step and measures it from the next (a one-shot measurement cannot: use a "
                    "batch size other than C there)"
                    if any(
                        t.label.startswith("expand of") and t.module is not None
                        for t in self.misattributed
                    )
                    else ""
                )
                + (
                    # (an elementwise meeting has no key to learn: a fixed position table of
                    # T = N rows was refused at every step while this said the tracker
                    # learns it, a hunt of 2026-12-06)
                    ". A tensor computed from parameters broadcast against one whose dim 0 "
                    "has the batch's size but that has no autograd history is taken for a "
                    "meeting with the examples' rows, as the raw input would be, and nothing "
                    "tells the two apart — a fixed table of T = N positions built from "
                    "arange/sin (h + p * sin(pos), RoPE's arange(T)[:, None] * inv_freq, a "
                    "decay window exp(-t * |a|)) is refused so at every step, by "
                    "GradientNoiseTracker too: build the table with a leading dim of 1 "
                    "(pos[None], arange(T)[None, :, None]) so that it broadcasts over the "
                    "examples, or use a batch size other than T"
                    if any(
                        t.label.startswith("expand of") and t.module is None
                        for t in self.misattributed
                    )
                    else ""
                )
            )
        return (
            "noisescale's audit of this step failed, so it refuses to report per-example norms "
            "that could be wrong: " + "; ".join(parts) + ". Fix the model as suggested, register a "
            "rule for the layer (noisescale.register_layer), or use per_example=False "
            "(micro-batch norms need no per-example attribution)"
        )


class PassAudit:
    """The audit of one pass: created at the end of its forward, finished when it is collected.

    Args:
        signature: The pass's structure (remembered when the audit passes).
        generator: The engine's generator on the pass's device (signs, projections).
        n: Examples in the pass.
        amp: The forward ran under autocast (looser tolerances).
        replay: Run the attribution check (not under FSDP2, whose backward hooks reshard).
        float16: float16 takes part in the step (autocast to it, or a parameter in it): the
            replay's coefficients are ±2^e with e in -2..0 (a float16 gradient also makes them
            so).
    """

    def __init__(
        self,
        signature: tuple,
        generator: torch.Generator,
        n: int,
        amp: bool = False,
        replay: bool = True,
        float16: bool = False,
    ) -> None:
        self.signature = signature
        self.nodes: int | None = None  # autograd nodes the forward made (eager; the engine)
        # the model's parameters, whose .grad a replay must leave as it found it (the engine)
        self.params: list[Tensor] = []
        self.buffers: list[Tensor] = []  # the model's (put back after a replay ran a forward)
        self.n = n
        self.amp = amp
        self.float16 = float16  # (float16 in the step: factors of at most one, see below)
        self.generator = generator
        self.device = generator.device
        # one coefficient per example, ±2^e with e in -2..2, **distinct** where the batch has
        # at most 10 examples and each value as often as another beyond (rows mixed between
        # examples with the same coefficient pass the check: drawn independently, two
        # examples drew the same one time in ten, and at N = 2 a time-major model's rows —
        # T = N — passed an audit in one draw of ten and were then measured up to 7× off on
        # every step after, 2026-12-05). Powers of two scale exactly, so the replay
        # reproduces the backward's rounding (a Gaussian coefficient did not: RWKV's
        # exponentials then failed the check in float64). Where float16 takes part, whose
        # range a factor of 4 may overflow in a scaled gradient, e in -2..0: six values,
        # distinct up to six examples (signs alone until 2026-12-05: a float16 model mixing
        # examples of one sign passed; _sign decides on the first replay; bfloat16 has
        # float32's range).
        self.signs = _distinct(_COEFFICIENTS, n, generator, self.device)
        self._signs16 = _distinct(_COEFFICIENTS16, n, generator, self.device)
        self._signs_decided = False
        self._base_seed = int(
            torch.randint(0, 2**31 - 1, (1,), generator=generator, device=self.device)
        )
        self.targets: list[_Target] = []
        self.roots: list[_Target] = []
        # reentrant checkpoints' nodes (by key) met by a replay, and the targets made on their
        # inputs (_checkpoint_inputs)
        self._checkpoints: dict[int, list[_Target]] = {}
        self._handles: list[Any] = []
        self._grad: dict[int, tuple[Tensor, Tensor]] = {}  # pid -> (|G|², projections)
        self._sums: dict[int, Tensor] = {}  # pid -> projections of Σ factors
        self.findings = Findings()
        self.skip_sums: set[int] = set()
        # embedding tables stored in 16 bits on the CPU, whose .grad torch adds up in 16 bits: a
        # refusal over one names that cause too (PerExampleNorms._note_16_bit_embeddings)
        self.sixteen_bit_tables: set[int] = set()
        self._sixteen: set[int] = set()  # parameters whose gradient is 16-bit (TOL_16)
        self._dtype = torch.float64  # lowered to float32 when any gradient is
        self.unverified: str | None = (
            None if replay else "the attribution check does not replay backwards under FSDP2"
        )
        self.replay = replay
        if replay:
            _AWAITING.add(self)

    # -- registration (end of forward) --------------------------------------------------------

    def add_root(self, edge: Any, dim: int) -> None:
        """A model output (or the tensor it was cast from, or the logits a loss was computed
        from), by its gradient edge (kept by key: see :class:`_Target`)."""
        key, nr = _node_key(edge.node), edge.output_nr
        target = _Target(key, nr, dim, None, "model output", root=True, seed=len(self.roots))
        self.roots.append(target)

    def add_target(self, edge: Any, dim: int, module: nn.Module | None, label: str) -> None:
        node, nr = edge.node, edge.output_nr
        target = _Target(_node_key(node), nr, dim, module, label, seed=1000 + len(self.targets))
        self.targets.append(target)

        def prehook(grad_outputs: tuple) -> None:
            # (held by the node: it holds the target, which holds no node)
            if self._ignored():
                return
            g = grad_outputs[nr] if nr < len(grad_outputs) else None
            if g is not None:
                self._on_target(target, g)

        self._handles.append(node.register_prehook(prehook))

    def _ignored(self) -> bool:
        return replay_active()

    # -- attribution --------------------------------------------------------------------------

    def _by_example(self, g: Tensor, dim: int) -> Tensor | None:
        """``g`` as [N, ...] (a view), or ``None`` when it has no example dimension of size N."""
        if isinstance(dim, Packed):
            if g.dim() == 0 or int(dim.batch_sizes[0]) != self.n:
                return None
            packed = PackedSequence(g, dim.batch_sizes, dim.sorted_indices, dim.unsorted_indices)
            return pad_packed_sequence(packed, batch_first=True)[0]
        if dim == FLAT:
            if g.dim() == 0 or g.shape[0] % self.n:
                return None
            return g.unflatten(0, (self.n, -1))
        if dim == 1 and g.dim() == 2:
            # [T·N, E], T-major: attention's flattened projections in a time-major context
            if g.shape[0] % self.n:
                return None
            return g.reshape(-1, self.n, g.shape[-1]).transpose(0, 1)
        if g.dim() <= dim or g.shape[dim] != self.n:
            return None
        return g.movedim(dim, 0)

    def _sign(self, g: Tensor, dim: int) -> Tensor:
        if not self._signs_decided:
            self._signs_decided = True
            # (factors of at most one only where float16 takes part — its range is what a
            # factor of 4 may overflow; bfloat16 has float32's: with signs alone, two examples
            # sharing one passed rows mixed between them — a bf16 model at N = 4 one audit in
            # three, then 10–18% off without a word, a hunt of 2026-12-05)
            if self.float16 or g.dtype == torch.float16:
                self.signs = self._signs16
        if isinstance(dim, Packed):
            signs = self.signs.to(g.device, g.dtype)[dim.examples(g.device)]
            return g * signs.reshape(-1, *([1] * (g.dim() - 1)))
        rows = self._by_example(g, dim)
        assert rows is not None
        signed = rows * self.signs.to(g.dtype).reshape(-1, *([1] * (rows.dim() - 1)))
        if dim == 1 and g.dim() == 2:
            return signed.transpose(0, 1).reshape(g.shape)
        if dim == FLAT:
            return signed.reshape(g.shape)
        return signed.movedim(0, dim)

    def _projection(self, target: _Target, g: Tensor) -> Tensor:
        """One number per example: ⟨row_i, w⟩ with a random w fixed per target (a complex
        gradient's real and imaginary parts both: a Fourier layer's spectra — cast to real until
        2026-12-06, which checked the real parts alone and warned at every audit, a hunt)."""
        view = self._by_example(g, target.dim)
        assert view is not None
        if view.is_complex():
            view = torch.view_as_real(view.resolve_conj())
        rows = _acc(view).reshape(self.n, -1)
        gen = torch.Generator(device=rows.device)
        gen.manual_seed(self._base_seed + target.seed)
        w = torch.randn(rows.shape[1], generator=gen, device=rows.device, dtype=rows.dtype)
        return (rows @ w).to(torch.float64)

    def on_root(self, output_nr: int, grad: Tensor) -> None:
        """A batched model output received its gradient: replay what earlier replays missed.
        Called by a pre-hook on the output's node, input ``output_nr``: the node is the one
        the backward is running (:func:`_running_node`)."""
        node = _running_node()
        if node is None:  # (a backward that runs hooks outside autograd's engine)
            self._not_replayed("the backward ran the output's hook outside autograd's engine")
            return
        key = _key_of(node)
        target = next((t for t in self.roots if t.node == key and t.output_nr == output_nr), None)
        if target is None or self._by_example(grad, target.dim) is None:
            return
        signed = self._sign(grad, target.dim)
        if target.got is not None:
            signed = signed - target.got.to(signed.dtype)
            tol = ATTRIBUTION_TOL_AMP if self.amp or grad.dtype in _SIXTEEN else ATTRIBUTION_TOL
            if float(signed.norm()) <= tol * float(grad.norm()) + 1e-30:
                return
        self._launch(node, output_nr, signed)

    def _on_target(self, target: _Target, grad: Tensor) -> None:
        if self._by_example(grad, target.dim) is None:
            return
        target.seen = True
        if target.compared:
            return
        target.compared = True
        if not target.reached:
            # nothing replayed reaches it: a frontier (e.g. a model that returns a scalar loss)
            # (from the target's own pre-hook: its node is the one the backward is running)
            node = _running_node()
            if node is None or _key_of(node) != target.node:
                self._not_replayed("the backward ran a hook outside autograd's engine")
                return
            self._launch(node, target.output_nr, self._sign(grad, target.dim))
            return
        target.verified = True
        got = target.got
        # (detached: a create_graph backward — a double backward — gives gradients that
        # require grad)
        projected = self._projection(target, grad.detach())
        want = self.signs * projected
        scale = float(projected.norm())
        tol = ATTRIBUTION_TOL_AMP if self.amp or grad.dtype in _SIXTEEN else ATTRIBUTION_TOL
        if got is None or float((got - want).norm()) > tol * scale + 1e-30 * (1 + scale):
            self.findings.misattributed.append(target)

    def _launch(self, node: Any, output_nr: int, grad: Tensor) -> None:
        """Replay the backward from input ``output_nr`` of ``node`` (the node the backward is
        running) with ``grad``, to every target not yet compared and every root."""
        self._replay([GradientEdge(node, output_nr)], [grad])

    def on_recomputed(
        self, outputs: Sequence[Tensor], grads: Sequence[Tensor], node: Any = None
    ) -> None:
        """A reentrant checkpoint's real backward (its node ``node``) is about to backpropagate
        its recomputed outputs with ``grads`` (the wrapper of :func:`install_reentrant_support`):
        the layers inside were hooked in that recomputation, a graph no replay from the model's
        outputs reaches. Replay it first from those outputs with their gradients signed per
        example, so that each such layer is compared as any target is (examples mixed inside on
        a branch that reaches no input requiring grad — a frozen encoder's states — were
        measured 0.16–0.51 off without a word, a review of 2026-12-05). Unverified, and said:
        an output without the batch's size in dim 0 (it cannot be signed), and a
        checkpoint no replay ran through (the backward reached it first: a model that returns
        only its loss) with hooked layers below it, whose rows there no replay compares."""
        if not self.replay:
            return
        keys = {t.node for t in self.targets if not t.compared and not t.reached}
        if not keys:
            return
        if node is not None and _node_key(node) not in self._checkpoints:
            below = [c for c, _ in getattr(node, "next_functions", ()) if c is not None]
            if any(_find_nodes(c, keys)[0] for c in below):
                self.unverified = self.unverified or (
                    "the attribution check could not replay the backward through a "
                    "torch.utils.checkpoint(use_reentrant=True) that the backward reached "
                    "before any replay (a model that returns only its loss)"
                )
        # (an output that is one of the function's inputs, returned as it is, has no graph
        # here: its gradient goes straight to the input; a review found it crashing the step)
        pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if o.grad_fn is not None]
        if not pairs or not any(_find_nodes(o.grad_fn, keys)[0] for o, _ in pairs):
            return
        # (dim 0 taken for the examples' where it has their count, as everywhere in the engine:
        # a width that equals the batch size is common; a coincidence in dim 0 is refused)
        if not all(self._by_example(g, 0) is not None for _, g in pairs):
            self.unverified = self.unverified or (
                "the attribution check could not replay the backward inside a "
                "torch.utils.checkpoint(use_reentrant=True) whose output does not have the "
                "batch's size in dim 0"
            )
            return
        edges = [GradientEdge(o.grad_fn, o.output_nr) for o, _ in pairs]
        self._replay(edges, [self._sign(g, 0) for _, g in pairs], roots=False)

    def _replay(self, edges: list[Any], grads: list[Tensor], roots: bool = True) -> None:
        """Replay the backward from ``edges`` with ``grads`` to every target not yet compared
        (and, with ``roots``, every root) below them."""
        if not self.replay:
            return
        pending = [t for t in [*self.roots, *self.targets] if not t.compared or (roots and t.root)]
        if not pending:
            return
        # The targets' nodes, found again below the replay's own: a target no walk from it
        # reaches is one autograd.grad would answer None for (allow_unused), and stays so
        found: dict[int, Any] = {}
        checkpoints: list[Any] = []
        for e in edges:
            f, c = _find_nodes(e.node, {t.node for t in pending})
            found.update(f)
            checkpoints += [n for n in c if all(n is not m for m in checkpoints)]
        pending = [t for t in pending if t.node in found]
        for checkpoint in checkpoints:
            pending.extend(
                t for t in self._checkpoint_inputs(checkpoint, found) if t not in pending
            )
        # one input per edge: torch.autograd.grad given an edge twice captures it twice into
        # one slot, and each of its targets read twice its gradient (a checkpoint's input that
        # is a layer's output, 2026-12-05)
        slot: dict[tuple[int, int], int] = {}
        inputs = []
        for t in pending:
            if slot.setdefault((t.node, t.output_nr), len(inputs)) == len(inputs):
                inputs.append(GradientEdge(found[t.node], t.output_nr))
        at = [slot[t.node, t.output_nr] for t in pending]
        if not inputs:
            return
        # torch.autograd.grad leaves every .grad alone, but a custom Function whose backward
        # calls .backward() itself (Reformer's reversible layers, re-running their forward)
        # accumulates the replay's signed gradients into the parameters it reaches: the
        # .grad the optimizer steps on would hold them. Each parameter's .grad is set aside
        # for the replay and put back after it (references, not copies; the main backward
        # waits while its hook runs the replay).
        kept = [(p, p.grad) for p in self.params]
        for p, _ in kept:
            p.grad = None
        # What each target's node receives, read as the engine reads it in the backward: after
        # every tensor hook on the output (a user's gradient scaling). torch.autograd.grad
        # captures an input edge whose node it must also run (a target with another below it)
        # before those hooks (torch 2.13), one it need not run after them: a hook's factor on
        # a layer's output read as rows not the examples' (2026-12-05, a helper's hunt).
        seen: dict[int, Tensor] = {}
        watches = []
        for i, e in enumerate(inputs):
            nr = e.output_nr

            def received(grads: tuple, i: int = i, nr: int = nr) -> None:
                if nr < len(grads) and grads[nr] is not None:
                    seen[i] = grads[nr]

            watches.append(e.node.register_prehook(received))
        try:
            with replaying(), _state_kept(self.buffers, bool(checkpoints)):
                captured = torch.autograd.grad(
                    edges, inputs, grads, retain_graph=True, allow_unused=True
                )
            got = tuple(seen.get(i, captured[i]) for i in at)
        except Exception as err:  # (never the user's backward's error: the pass unverified)
            # (a replay that cannot run: a reentrant checkpoint of a torch built otherwise, a
            # custom Function's backward that cannot take the replay's gradients)
            self._not_replayed(f"{type(err).__name__}: {err}")
            return
        finally:
            for p, g in kept:
                p.grad = g
            for watch in watches:
                watch.remove()
        for target, g in zip(pending, got, strict=True):
            if g is None:
                continue
            if self._by_example(g, target.dim) is None:
                continue  # no example dimension to check (a packed sequence's data)
            target.reached = True
            if target.root:
                target.got = g.detach() if target.got is None else target.got + g.detach()
            else:
                p = self._projection(target, g)
                target.got = p if target.got is None else target.got + p

    def _checkpoint_inputs(self, node: Any, found: dict[int, Any]) -> list[_Target]:
        """Targets, made the first time a replay meets reentrant checkpoint ``node``, on the
        edges to its inputs whose dim 0 has the batch's size (and no target yet). The layers
        inside were hooked in the backward's own recomputation, which a replay through the
        checkpoint does not reach (it recomputes the function again), and are compared from
        the recomputed outputs (:meth:`on_recomputed`); what the function's inputs receive is
        compared here, from above, as any target's: examples mixed inside below the first
        layer show there (with no hooked layer below, nowhere else: a frozen first layer, a
        review)."""
        key = _node_key(node)
        made = self._checkpoints.get(key)
        if made is None:
            made = self._checkpoints[key] = []
            taken = {(t.node, t.output_nr) for t in self.targets}
            label = "the input of torch.utils.checkpoint(use_reentrant=True)"
            for child, nr in node.next_functions:
                shape = node_shape(child, nr)
                if not shape or shape[0] != self.n:
                    continue
                if (_node_key(child), nr) not in taken:
                    self.add_target(GradientEdge(child, nr), 0, None, label)
                    made.append(self.targets[-1])
        for child, _ in node.next_functions:
            if child is not None and _key_of(child) is not None:
                found[_key_of(child)] = child
        return [t for t in made if not t.compared]

    def _not_replayed(self, why: str) -> None:
        """The backward could not be replayed: the pass is unverified, as reported."""
        self.unverified = f"the attribution check could not replay the backward ({why})"
        for t in [*self.roots, *self.targets]:
            t.compared = True

    # -- a user's rule ------------------------------------------------------------------------

    def check_rule(
        self,
        label: str,
        edges: Sequence[Any],
        grads: Sequence[Tensor],
        params: dict[str, nn.Parameter],
        factors: dict[str, Factor],
        shapes: Sequence[torch.Size] | None = None,
    ) -> None:
        """Does a rule registered by the user give each example its own gradient? The coverage
        check sees only the factors' sum over the examples: a rule that spreads the batch's
        gradient evenly over the examples, or hands example i's to example i + 1, passes it.
        Here the layer's own backward runs again from its outputs (``edges``, whose gradients
        ``grads`` hold the examples in dim 0) with each example's rows weighted by the audit's
        coefficient s_i: autograd then gives Σ_i s_i g_i(θ), which the factors must reproduce
        (Σ_i s_i f_i). A parameter the layer's inputs also depend on (used again upstream: the
        backward from the outputs reaches that use too) shows as a plain sum that is not the
        factors', and is left to the coverage check. Two backwards of the layer, on audited
        steps, for rules registered outside noisescale only. ``grads`` are in the layout of the
        layer's outputs (examples in dim 0); ``shapes``, where given, are the edges' own (the
        whole base [N·T, …] of an output that is a view of it: signed as the output, then
        reshaped)."""
        shapes = shapes if shapes is not None else [g.shape for g in grads]
        pairs = [
            (e, g, shape)
            for e, g, shape in zip(edges, grads, shapes, strict=True)
            if e is not None and g is not None
        ]
        if not pairs or not params:
            return
        if any(g.dim() == 0 or g.shape[0] != self.n for _, g, _ in pairs):
            return
        # (as _sign: factors of at most one where float16 takes part; bfloat16 draws them all —
        # signs alone under any 16-bit type until 2026-12-05, which passed a rule handing
        # example i's gradient to an example of the same sign)
        sixteen = self.float16 or any(g.dtype == torch.float16 for _, g, _ in pairs)
        s = self._signs16 if sixteen else self.signs
        plain = [g.reshape(shape) for _, g, shape in pairs]
        signed = [
            (g * s.to(g.dtype).reshape(-1, *([1] * (g.dim() - 1)))).reshape(shape)
            for _, g, shape in pairs
        ]
        tensors = list(params.values())
        kept = [(p, p.grad) for p in self.params]  # (see _launch)
        for p, _ in kept:
            p.grad = None
        # the gradient hooks on the parameters (a logger's, the engine's) would see these
        # backwards' gradients: set aside while they run
        hooks = [(d, dict(d)) for d in (getattr(p, "_backward_hooks", None) for p in tensors) if d]
        for d, _ in hooks:
            d.clear()
        try:
            with replaying():
                out = [e for e, _, _ in pairs]
                got = torch.autograd.grad(out, tensors, plain, retain_graph=True, allow_unused=True)
                got_s = torch.autograd.grad(
                    out, tensors, signed, retain_graph=True, allow_unused=True
                )
        except RuntimeError:
            return  # (a backward that cannot run twice: the coverage check still stands)
        finally:
            for p, g in kept:
                p.grad = g
            for d, items in hooks:
                d.update(items)
        for (name, p), total, weighted in zip(params.items(), got, got_s, strict=True):
            factor = factors.get(name)
            if factor is None or total is None or weighted is None:
                continue
            try:
                sq = factor.sqnorm()
                mine = _acc(_weighted_sum(factor, s, p.shape))
                own_sum = _acc(factor.summed(p.shape))
            except (NotImplementedError, AssertionError):
                continue  # (a NormFactor keeps no per-example gradient)
            if sq.shape[0] != self.n:
                continue
            total, weighted = _acc(total.detach()), _acc(weighted.detach())
            tol = TOL_AMP if self.amp else TOL_16 if p.dtype in _SIXTEEN else TOL
            floor = 64 * _eps(mine.dtype)
            plain_scale = float(sq.to(torch.float64).sum().sqrt())
            own = float((total.reshape(own_sum.shape) - own_sum).norm())
            if own > tol * float(total.norm()) + floor * plain_scale + 1e-30:
                continue  # the layer's input depends on the parameter too: not this call's alone
            scale = float((sq.to(torch.float64) * s.to(torch.float64) ** 2).sum().sqrt())
            off = float((weighted.reshape(mine.shape) - mine).norm())
            if off > tol * scale + floor * scale + 1e-30:
                self.findings.wrong_rules.append(
                    f"the rule registered for '{label}' does not give each example its own "
                    f"gradient of '{name}': with the examples weighted by random coefficients, "
                    f"its per-example gradients add up to {_percent(off / max(scale, 1e-300))} "
                    "(relative) away from what autograd computes through the layer, while their "
                    "plain sum agrees — a rule that spreads, averages or shifts the batch's "
                    "gradient among the examples. Check it against one backward per example "
                    "(examples/register_layer.py shows how), or remove it "
                    "(noisescale.unregister_layer) to measure the layer through the fallback"
                )

    # -- coverage -----------------------------------------------------------------------------

    def _random(self, pid_index: int, like: Tensor, k: int) -> Tensor:
        gen = torch.Generator(device=like.device)
        gen.manual_seed(self._base_seed * 7919 + pid_index * 97 + k)
        return torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)

    def record_grad(self, pid: int, grad: Tensor) -> None:
        """The gradient autograd computed for one parameter in this pass (param hook)."""
        if grad.dtype in _SIXTEEN:
            self._sixteen.add(pid)
        g = _acc(grad.detach())
        if g.dtype != torch.float64:
            self._dtype = torch.float32
        index = self._index(pid)
        proj = torch.stack(
            [(g * self._random(index, g, k)).sum() for k in range(K_PROJECTIONS)]
        ).to(torch.float64)
        sq = g.pow(2).sum().to(torch.float64)
        if pid in self._grad:  # two backwards through the pass (refused elsewhere)
            old_sq, old_proj = self._grad[pid]
            sq, proj = old_sq + sq, old_proj + proj
        self._grad[pid] = (sq, proj)

    def add_sum(self, pid: int, factor: Factor, shape: torch.Size) -> None:
        """A use's per-example gradients, summed over the examples (a factor arrived)."""
        total = _acc(factor.summed(shape))
        index = self._index(pid)
        proj = torch.stack(
            [(total * self._random(index, total, k)).sum() for k in range(K_PROJECTIONS)]
        ).to(torch.float64)
        self._sums[pid] = proj if pid not in self._sums else self._sums[pid] + proj

    def _index(self, pid: int) -> int:
        if not hasattr(self, "_pids"):
            self._pids: dict[int, int] = {}
        return self._pids.setdefault(pid, len(self._pids))

    def share_projections(self, other: PassAudit) -> None:
        """Project gradients and sums on ``other``'s random directions (its seed, its
        parameters' indices): the audits of one step's forwards, which one backward may run
        through, so that :meth:`absorb` can add up what they recorded."""
        self._base_seed = other._base_seed
        if not hasattr(other, "_pids"):
            other._pids = {}
        self._pids = other._pids  # (one dict, which both fill from here on)

    def absorb(self, other: PassAudit) -> None:
        """Take in the audit of another forward that the same backward ran through (a batch
        in two forwards, two views of it): the backward's gradients were recorded into one of
        the forwards' audits and each forward's factors' sums into its own, so only all of them
        together compare the gradient with the sum of every forward's per-example gradients.
        Both audits must project on the same directions (:meth:`share_projections`)."""
        assert other._base_seed == self._base_seed and other._pids is self._pids
        _AWAITING.discard(other)
        for pid, (sq, proj) in other._grad.items():
            if pid in self._grad:
                old_sq, old_proj = self._grad[pid]
                sq, proj = old_sq + sq, old_proj + proj
            self._grad[pid] = (sq, proj)
        for pid, proj in other._sums.items():
            self._sums[pid] = proj if pid not in self._sums else self._sums[pid] + proj
        self.skip_sums |= other.skip_sums
        self.sixteen_bit_tables |= other.sixteen_bit_tables
        self._sixteen |= other._sixteen
        if other._dtype != torch.float64:
            self._dtype = other._dtype
        self.amp = self.amp or other.amp
        self.targets += other.targets
        self.roots += other.roots
        self._handles += other._handles
        other._handles = []
        found, theirs = self.findings, other.findings
        found.unexplained.update(theirs.unexplained)
        found.sixteen_bit_sums |= theirs.sixteen_bit_sums
        found.misattributed += theirs.misattributed
        found.unpermuted = found.unpermuted or theirs.unpermuted
        found.wrong_rules += theirs.wrong_rules

    def finish(self, received: set[int], names: dict[int, str]) -> Findings:
        """Compare what was recorded; remove the audit's hooks."""
        _AWAITING.discard(self)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.findings.unverified_flat = [
            t for t in self.targets if t.dim == FLAT and t.seen and not t.verified
        ]
        # (a pass all in float64 first: autocast casts no float64 tensor, and a float64 model
        # under autocast had 3·10⁻² — a rule 1% off passed, a review of 2026-12-07)
        tol = TOL_64 if self._dtype == torch.float64 else TOL_AMP if self.amp else TOL
        # rounding of sums of many terms: a floor relative to the whole pass's gradient, so a
        # parameter whose gradient is zero up to rounding (attention's key bias, which softmax
        # ignores) does not fail on its rounding noise
        total = sum(float(sq) for sq, _ in self._grad.values())
        floor = (64 * _eps(self._dtype)) ** 2 * total
        self.findings.vacuous = bool(self._grad) and total == 0
        for pid in received:
            if pid in self.skip_sums:
                continue
            if pid not in self._grad:
                # per-example gradients with nothing to compare them with: a check that would
                # pass vacuously (several forwards in one backward recorded the gradients into
                # another forward's audit until 2026-12-07, whose sums were never compared —
                # a tied head or a penalty was measured 13% off without a word, a hunt)
                if pid in self._sums:
                    self.findings.unrecorded.append(pid)
                continue
            sq, proj = self._grad[pid]
            mine = self._sums.get(pid)
            diff = proj if mine is None else proj - mine.to(proj.device)
            lhs = float(diff.pow(2).sum())
            own = TOL_16 if pid in self._sixteen and not self.amp else tol
            rhs = K_PROJECTIONS * (own * own * float(sq) + floor)
            if lhs > rhs and lhs > 1e-60:
                self.findings.unexplained[pid] = math.sqrt(
                    lhs / K_PROJECTIONS / max(float(sq), 1e-300)
                )
                if pid in self.sixteen_bit_tables:
                    self.findings.sixteen_bit_sums.add(pid)
        return self.findings


def _weighted_sum(factor: Factor, s: Tensor, shape: torch.Size) -> Tensor:
    """Σ_i s_i f_i of a factor's per-example gradients, without making them where the factor
    is compact (an embedding's [N, V, D] would not fit in memory: a review found 596 MiB for an
    8 MiB table)."""
    if isinstance(factor, LinearFactor):
        a = factor.a * s.to(factor.a.dtype).repeat_interleave(factor.groups)[:, None, None]
        return LinearFactor(a, factor.d, factor.groups, factor.transposed).summed(shape)
    if isinstance(factor, EmbeddingFactor):
        d = factor.d * s.to(factor.d.dtype)[:, None, None]
        return EmbeddingFactor(factor.idx, d, factor.num_rows).summed(shape)
    if isinstance(factor, SliceFactor):
        block = torch.Size((factor.stop - factor.start, *shape[1:]))
        out = _acc(_weighted_sum(factor.inner, s, block))
        whole = out.new_zeros(shape)
        whole[factor.start : factor.stop] = out
        return whole
    dense = _acc(factor.dense(shape))
    return (dense * s.to(dense.dtype).reshape(-1, *([1] * (dense.dim() - 1)))).sum(0)


def _percent(x: float) -> str:
    return f"{100 * x:.2g}%" if x < 1 else f"{100 * x:.0f}%"


#: The audit's coefficients: ±2^e, e in -2..2; where float16 takes part, e in -2..0 (a factor
#: above one may overflow a scaled float16 gradient; one below it only shifts its exponent)
_COEFFICIENTS = tuple(s * 2.0**e for s in (1, -1) for e in range(-2, 3))
_COEFFICIENTS16 = tuple(s * 2.0**e for s in (1, -1) for e in range(-2, 1))


def _distinct(values: tuple[float, ...], n: int, generator: torch.Generator, device: Any) -> Tensor:
    """``n`` coefficients drawn from ``values`` without replacement: distinct while
    ``n <= len(values)``, beyond that each value ⌊n/V⌋ or ⌈n/V⌉ times, at random places (the
    pool of values shuffled once per round of V, the first ``n`` taken, then shuffled across
    the examples)."""
    v = len(values)
    rounds = -(-n // v) if n else 0
    # (every round's permutation in one call: a randperm per round made 32,768 calls for the
    # signs of 65,536 examples, ≈ 0.1 s an audit on the CPU, a review)
    rows = torch.rand(rounds, v, generator=generator, device=device).argsort(dim=1)
    picked = rows.reshape(-1)[:n]
    picked = picked[torch.randperm(n, generator=generator, device=device)]
    return torch.tensor(values, dtype=torch.float64, device=device)[picked]


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


#: The name of the key an audited node holds in its metadata dict (:func:`_node_key`)
_KEY = "noisescale.audit"
_KEYS = itertools.count()


def _node_key(node: Any) -> int:
    """An autograd node's key, given to it here and held by the node itself, in its metadata
    dict (which lives with the C++ node). Not its Python object's id: torch versions that keep
    only a weak pointer to that object let it go between the forward and the backward and make
    another, elsewhere; and not the node, which would keep its graph alive."""
    meta = node.metadata
    key = meta.get(_KEY)
    if key is None:
        key = meta[_KEY] = next(_KEYS)
    return key


def _key_of(node: Any) -> int | None:
    """The key :func:`_node_key` gave ``node``, or ``None``."""
    return node.metadata.get(_KEY)


def _running_node() -> Any:
    """The autograd node the backward is running (called from a pre-hook on it: autograd's
    engine runs a node's pre-hooks with the node current), or ``None``."""
    return torch._C._current_autograd_node()


def node_shape(node: Any, nr: int) -> tuple[int, ...] | None:
    """The shape of output ``nr`` of autograd node ``node``'s forward (None if unknown)."""
    try:
        return tuple(int(x) for x in node._input_metadata[nr].shape)
    except (AttributeError, IndexError, TypeError, RuntimeError):
        return None


def _find_nodes(start: Any, keys: set[int]) -> tuple[dict[int, Any], list[Any]]:
    """The nodes of ``keys`` that ``start`` or the nodes below it are (autograd's next
    functions, as a backward from ``start`` follows them): where the audit finds its targets
    again at a replay, held by key until then (:class:`_Target`); and the reentrant
    checkpoints' nodes among those below (:func:`install_reentrant_support`). Walks the
    whole graph below ``start``, once per replay (an audited pass's)."""
    found: dict[int, Any] = {}
    seen = {id(start)}
    queue = [start]  # (holds each node's Python object: an id is one node's for the walk)
    reentrant: list[Any] = []
    for node in queue:
        key = _key_of(node)
        if key in keys:
            found[key] = node
        if type(node).__name__ == _REENTRANT_NODE:
            reentrant.append(node)
        for child, _ in node.next_functions:
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                queue.append(child)
    return found, reentrant


# -- torch.utils.checkpoint(use_reentrant=True) ------------------------------------------------
#
# Its backward recomputes the checkpointed function and backpropagates the recomputed graph with
# torch.autograd.backward, accumulating into every leaf it reaches — the parameters used inside
# included —, and reads its inputs' gradients from their .grad. Under torch.autograd.grad it
# refuses to run (torch.autograd._is_checkpoint_valid), so a replay that met one failed and the
# whole pass went unchecked (until 2026-12-05: examples mixed before, after or inside such a
# checkpoint measured 0.05–2.2x off with a warning alone; a review). While an engine exists,
# torch.autograd.backward and torch.autograd._is_checkpoint_valid are wrapped (once per
# process, however many engines: install_reentrant_support), and the wrappers act only when
# called from the checkpoint's backward (its code object, found on the calling frames):
#
# * inside a replay, on the replaying thread, the checkpoint's backward may run, and its one
#   torch.autograd.backward is run as torch.autograd.grad to its detached inputs: nothing is
#   accumulated into the parameters inside and none of their hooks run (DDP's, a user's); the
#   replay goes on below the checkpoint with its inputs' gradients, as through any node. The
#   checkpointed forward runs once more (its forward and tensor hooks too), so the model's
#   buffers and the random generators are put back after such a replay (_state_kept);
# * in an audited pass's real backward, the recomputed outputs are first replayed with their
#   gradients signed per example (PassAudit.on_recomputed), so that the layers hooked in that
#   recomputation are compared as any target is.
#
# Called from anywhere else, the wrappers pass the call through to torch's functions. On a
# torch whose checkpoint is built otherwise, a replay fails there as before: unverified, with
# the tracker's warning. (The checkpoint's backward is found a few frames up: another
# library's wrapper may stand between; a wrapper put over ours is left in place at release.)

_REENTRANT_NODE = "CheckpointFunctionBackward"
_REENTRANT_LOCK = threading.Lock()
_REENTRANT: dict[str, Any] = {"holds": 0, "originals": None}
# the audits whose pass's real backward may run a reentrant checkpoint (PassAudit.replay)
_AWAITING: weakref.WeakSet[PassAudit] = weakref.WeakSet()


def _checkpoint_backward_code() -> Any:
    try:
        from torch.utils.checkpoint import CheckpointFunction

        return CheckpointFunction.backward.__code__
    except (ImportError, AttributeError):  # pragma: no cover - another torch
        return None


def _replaying_here() -> bool:
    return getattr(_THREAD, "replays", 0) > 0


def _checkpoint_frame(code: Any, tensors: Any) -> Any:
    """The frame of the reentrant checkpoint's backward whose own torch.autograd.backward
    call this is — a few frames up (another library's wrapper of torch.autograd.backward
    between them), called with the checkpoint's recomputed outputs (``outputs_with_grad``: a
    custom Function inside the checkpoint whose backward calls torch.autograd.backward itself,
    a reversible layer's, is not it, a review) — or None."""
    frame = sys._getframe(2)
    for _ in range(_FRAMES):
        if frame is None:
            return None
        if frame.f_code is code:
            expected = frame.f_locals.get("outputs_with_grad")
            given = [tensors] if isinstance(tensors, Tensor) else list(tensors or ())
            if expected is None or len(expected) != len(given):
                return None
            return frame if all(a is b for a, b in zip(expected, given, strict=True)) else None
        frame = frame.f_back
    return None


_FRAMES = 6

#: Why an audit of a pass under selective activation checkpointing does not replay (the
#: settle step warns with it once: its prefix is the unreplayed one).
SELECTIVE = (
    "the attribution check could not replay the backward (selective activation "
    "checkpointing, checkpoint(..., context_fn=create_selective_checkpoint_contexts(...)), "
    "allows one backward through its region)"
)


#: Functions told of every backward's roots before it runs (``torch.autograd.backward``, which
#: ``Tensor.backward`` calls), while an engine holds :func:`install_reentrant_support`:
#: noisescale.tokens asks whether a model's own loss is all of what is backpropagated.
BACKWARD_STARTS: list[Callable[[Any], None]] = []


def _wrapped_backward(original: Callable, code: Any) -> Callable:
    @functools.wraps(original)
    def backward(tensors: Any, grad_tensors: Any = None, *args: Any, **kwargs: Any) -> Any:
        if BACKWARD_STARTS:
            if not isinstance(tensors, Tensor | list | tuple) and tensors is not None:
                tensors = tuple(tensors)  # (a generator: read once, for them and for torch)
            # (a copy: a collected engine's callback drops itself from the list, which
            # skipped the next one — a live engine's walk of the loss — until 2026-12-07)
            for started in list(BACKWARD_STARTS):
                started(tensors)
        if (
            args
            or set(kwargs) - {"retain_graph", "create_graph"}
            or (caller := _checkpoint_frame(code, tensors)) is None
            # (a wrapper of ours below another of ours, given the call the outer one handles)
            or getattr(_THREAD, "handling", None) is caller
        ):
            return original(tensors, grad_tensors, *args, **kwargs)
        outputs = [tensors] if isinstance(tensors, Tensor) else list(tensors)
        grads = [grad_tensors] if isinstance(grad_tensors, Tensor) else list(grad_tensors or ())
        if not _replaying_here():
            outer, _THREAD.handling = getattr(_THREAD, "handling", None), caller
            try:
                if len(grads) == len(outputs):
                    node = caller.f_locals.get("ctx")
                    for audit in list(_AWAITING):
                        audit.on_recomputed(outputs, grads, node)
                return original(tensors, grad_tensors, *args, **kwargs)
            finally:
                _THREAD.handling = outer
        detached = caller.f_locals.get("detached_inputs", ())
        leaves = [t for t in detached if isinstance(t, Tensor) and t.requires_grad]
        if leaves:
            got = torch.autograd.grad(outputs, leaves, grads or None, allow_unused=True, **kwargs)
            for leaf, g in zip(leaves, got, strict=True):
                leaf.grad = g
        return None

    backward._noisescale_reentrant = True  # type: ignore[attr-defined]
    return backward


def _ours_installed() -> bool:
    """Whether torch.autograd.backward is our wrapper, or wraps it (functools.wraps; at most
    :data:`_FRAMES` wrappers deep, as the frames searched)."""
    f: Any = torch.autograd.backward
    for _ in range(_FRAMES):
        if getattr(f, "_noisescale_reentrant", False):
            return True
        f = getattr(f, "__wrapped__", None)
        if f is None:
            return False
    return False


def install_reentrant_support() -> None:
    """Wrap torch's functions for reentrant checkpoints (see the notes above); once per
    process, counted: :func:`release_reentrant_support` undoes it at the last release."""
    with _REENTRANT_LOCK:
        _REENTRANT["holds"] += 1
        if _REENTRANT["originals"] is not None or _REENTRANT["holds"] != 1:
            return
        code = _checkpoint_backward_code()
        if code is None:  # pragma: no cover - another torch
            return
        backward, valid = torch.autograd.backward, torch.autograd._is_checkpoint_valid

        def is_valid() -> bool:
            # (only while our wrapper is reached from the checkpoint's backward: without it
            # torch's own backward would accumulate the replay's gradients)
            return (_replaying_here() and _ours_installed()) or valid()

        wrapped = _wrapped_backward(backward, code)
        _REENTRANT["originals"] = (backward, valid, wrapped, is_valid)
        torch.autograd.backward = wrapped
        torch.autograd._is_checkpoint_valid = is_valid


def release_reentrant_support() -> None:
    """Undo :func:`install_reentrant_support` at the last release — each function only if
    it is still ours (a wrapper another library put over ours is left, ours passing calls
    through)."""
    with _REENTRANT_LOCK:
        _REENTRANT["holds"] = max(0, _REENTRANT["holds"] - 1)
        if _REENTRANT["holds"] or _REENTRANT["originals"] is None:
            return
        backward, valid, wrapped, is_valid = _REENTRANT["originals"]
        if torch.autograd.backward is wrapped:
            torch.autograd.backward = backward
        if torch.autograd._is_checkpoint_valid is is_valid:
            torch.autograd._is_checkpoint_valid = valid
        _REENTRANT["originals"] = None


class ReentrantHold:
    """An engine's hold on :func:`install_reentrant_support`, released once — at
    ``remove()``, or when the hold is collected (a tracker dropped and collected; an engine
    kept alive by its model's hooks keeps the wrappers, which then pass calls through)."""

    def __init__(self) -> None:
        install_reentrant_support()
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            release_reentrant_support()

    def __del__(self) -> None:
        self.release()


@contextmanager
def _state_kept(buffers: Sequence[Tensor], active: bool) -> Iterator[None]:
    """Put back what a replay that ran a reentrant checkpoint's forward again changed: the
    buffers (an InstanceNorm's running statistics) and the random generators (with
    ``preserve_rng_state=False`` its dropout drew from them: the user's stream moved on, and
    the backward's own recomputation drew other masks than the replay's, a review)."""
    if not active:
        yield
        return
    kept = [(b, b._version, b.detach().clone()) for b in buffers]
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        with torch.no_grad():
            for b, version, value in kept:
                if b._version != version:
                    b.copy_(value)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


_REPLAYS = [0]


def replay_active() -> bool:
    """Whether a replayed backward is running (every engine's hooks then stand aside)."""
    return _REPLAYS[0] > 0


_THREAD = threading.local()  # .replays: this thread's replays in progress


@contextmanager
def replaying() -> Iterator[None]:
    """Mark a backward started by noisescale itself (an audit replay, a batched vjp)."""
    _REPLAYS[0] += 1
    _THREAD.replays = getattr(_THREAD, "replays", 0) + 1
    try:
        yield
    finally:
        _REPLAYS[0] -= 1
        _THREAD.replays -= 1
