"""After the backward: each pass's norms kept, withheld while the engine learns (a direct use
of a parameter, a layer for the fallback), or refused with a message that names the cause.
A mixin of :class:`~.engine.PerExampleNorms`."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from noisescale.errors import UnsupportedModuleError
from noisescale.per_example import audit as audit_mod
from noisescale.per_example import fallback, norms
from noisescale.per_example.messages import (
    UNRERUN,
    _ambiguous_message,
    _auxiliary_loss_cause,
    _coupled_message,
    _experts_hint,
    _experts_setting,
    _follows_experts_setting,
    _input_sizes_clause,
    _penalty_cause,
    _qualified,
    _tensordot_hint,
    loss_side_message,
    loss_side_unchecked_message,
    parametrized_layer,
    parametrized_message,
    ruleless_hint,
    unrerun_warning,
)
from noisescale.per_example.passes import PassNorms
from noisescale.per_example.values import _time_major

# an nn.Module's own state (_parameters, _modules, hooks' dicts): not a container of the user's
_MODULE_STATE = frozenset(vars(nn.Module()))


#: The fix named where float16 gradients lie below float16's normal range (Settle).
_SUBNORMAL_FIX = (
    "torch's GradScaler refuses float16 parameters: train in bfloat16 "
    "(model.to(torch.bfloat16)), or under float16 autocast over float32 parameters with a "
    "GradScaler given to the tracker (scaler=)"
)


class Settle:
    """:class:`~noisescale.per_example.engine.PerExampleNorms`' decisions after a backward: what
    :meth:`_settle` does with each collected pass, and the refusals' messages."""

    def _settle(self, pass_: PassNorms, learn: bool) -> None:
        """Check the pass's coverage and audit; adapt or refuse. A structure whose audit found
        rows attributed to the wrong examples (or a rule that splits its gradient wrongly, or
        outputs that do not follow a permutation of the examples) is refused at every later
        pass of that structure while the engine has learned nothing new — not audited again
        until a random draw lets it pass: the audit's coefficients and permutations are random,
        and one lucky draw certified a structure whose every later step was measured wrong
        (a hunt, 2026-12-05; a caller who catches the refusal and goes on met it)."""
        key = None if pass_.audit is None else (pass_.audit.signature, self._learned_state())
        refused = None if key is None else self._refused_structures.get(key)
        if refused is not None and not pass_.skipped:
            raise UnsupportedModuleError(refused)
        try:
            self._settle_once(pass_, learn)
        except UnsupportedModuleError as err:
            found = None if pass_.audit is None else pass_.audit.findings
            if (
                key is not None
                and found is not None
                and (found.misattributed or found.wrong_rules or found.unpermuted is not None)
            ):
                # (kept by _collect only where it refuses: a micro-batch set aside because an
                # earlier one of its step taught the engine is not refused)
                pass_.sticky = (
                    key,
                    f"{str(err).rstrip('.')}. Refused again: this structure's audit failed on an "
                    "earlier step, and it stays refused (its audit draws random coefficients, "
                    "and a later draw that let it pass would certify it for the steps after). "
                    "If the model has changed since, create a new tracker "
                    "(tracker.remove(), then GradientNoiseTracker(model)) to audit it afresh",
                )
            raise

    def _settle_once(self, pass_: PassNorms, learn: bool) -> None:
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
        if self.checkpoint_first and self._settle_compiled(pass_):
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
        if pass_.coupled is not None and pass_.batch_size > 1:
            # (one example alone — a group of one forward of one example — has nothing to
            # combine with: the watch follows such passes for the groups they join)
            modules = self.model.modules() if self.model is not None else ()
            time_major = [self._labels.get(m, "") for m in modules if _time_major(m)]
            text = _coupled_message(pass_, time_major)
            # (led by the routers' loss where the model adds one, as the audit's refusals are:
            # a mixture of experts' router logits [tokens, E] with E = N, read as rows with the
            # batch's size outside dim 0, were named as such alone until 2026-12-07 — and the
            # routers' loss at any other N —, a hunt)
            raise UnsupportedModuleError(self._with_cause(text, penalty=False))
        if pass_.loss_side is not None:
            # (on every step, audited or not: the audit's value check alone, on its scheduled
            # steps, let a penalty switched on between them through — 52-94% off — and one under
            # its tolerance through on every step, a hunt of 2026-12-07)
            raise UnsupportedModuleError(loss_side_message(pass_.loss_side))
        if pass_.loss_side_unchecked:
            if not learn:  # (one-shot: nothing to withhold for)
                raise UnsupportedModuleError(loss_side_unchecked_message())
            self._withhold(pass_, loss_side_unchecked_message())
            return
        if learn and self._new_loss_shape(pass_):
            return
        if pass_.loss_unfollowed is not None:
            if not learn:
                raise UnsupportedModuleError(pass_.loss_unfollowed)
            # (the next step: the flag the forward set was reset by collect before settling,
            # and the steps until the next scheduled audit were all withheld — a review of
            # 2026-12-07)
            self._audit_due = True
            self._withhold(pass_, f"{pass_.loss_unfollowed}; the next step is audited to check")
            return
        if pass_.partly_audited:
            # (one forward's structure new after another's ran unaudited: the audit of some
            # forwards cannot account for the gradient of all; a second forward of another
            # shape — DINO's local crops — was refused so, a hunt)
            self._audit_due = True
            self._withhold(
                pass_,
                "one backward ran through several forwards of the model, of which only some "
                "were audited (a structure new after the step's first forward); the next step "
                "audits them all",
            )
            return
        findings = (
            pass_.audit.finish(pass_.received, self._param_name)
            if pass_.audit is not None
            else audit_mod.Findings()
        )
        findings.batch_size = pass_.batch_size
        missing = pass_.received - pass_.covered
        # Per-example gradients credited to a parameter whose own gradient autograd never
        # computed: the layer ran on another tensor (swapped and put back within the call, by
        # a patched forward or hooks around the engine's) — the tensor used is counted again
        # through its own uses. (The fallback's re-run gives every parameter of its module a
        # gradient, zeros included: its parameters are left to the coverage check.)
        phantom = sorted(
            self._param_name[pid]
            for pid in pass_.covered - pass_.received
            if not any(holder in self._fallback for holder, _ in self._holders(pid))
        )
        if phantom and pass_.audit is not None:
            raise UnsupportedModuleError(
                f"noisescale attributed per-example gradients to parameters {phantom}, which "
                "received no gradient in this step's backward: their layer ran on another "
                "tensor (a weight swapped for the call and put back within it — a patched "
                "forward, a pre-hook and a forward hook around the engine's; an EMA copy, a "
                "tie by hook). Tie weights by sharing the Parameter itself before creating the "
                "tracker, or use per_example=False"
            )
        if (not findings.ok or missing) and self._gradients_not_finite(pass_):
            # (a diverging loss, an overflow: the audit's comparisons of inf and nan fail
            # whatever the model does, and would name a cause it does not have)
            self._audit_due = True
            self._withhold(
                pass_,
                "its gradients are not finite (inf or nan: the loss diverged or overflowed), so "
                "the audit could not check it; its per-example norms are left out and the next "
                "step is audited",
            )
            return
        if (not findings.ok or missing) and pass_.inner_used is not None:
            raise UnsupportedModuleError(
                _inner_message(pass_.inner_used, self._audit_message(findings))
            )
        if (not findings.ok or missing) and pass_.between:
            raise UnsupportedModuleError(
                _between_message(pass_.between, self._audit_message(findings))
            )
        if (not findings.ok or missing) and pass_.assembled:
            raise UnsupportedModuleError(
                _assembled_message(pass_.assembled, self._audit_message(findings))
            )
        if findings.wrong_rules:
            raise UnsupportedModuleError(self._audit_message(findings))
        if findings.unpermuted:
            # (a shared call that never met the batch says more about the cause: first)
            self._refuse_unmet_shared(pass_, missing)
            raise UnsupportedModuleError(self._audit_message(findings))
        if pass_.ambiguous:
            # (after the permutation check, which names the cause when it is time-major data)
            # (a tensor of parameters alone: a penalty's, never a router's auxiliary loss)
            raise UnsupportedModuleError(self._with_cause(_ambiguous_message(pass_), False))
        if findings.ok and not missing:
            if pass_.child_loss is not None and not self._child_loss_warned:
                self._child_loss_warned = True
                warnings.warn(
                    f"noisescale: the loss was computed inside a module of the model with "
                    f"parameters ({pass_.child_loss}), whose code noisescale does not follow: "
                    "a loss there that combines the examples (in-batch negatives, a batch "
                    "statistic) would not be refused. Compute the loss in the model's own "
                    "forward or outside it to have it checked (said once)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            if findings.vacuous:
                # an audit of zeros proves no structure (until 2026-12-07 it did: a first
                # micro-batch that counted no token passed, a hunt): the next step audits
                self._audit_due = True
                return
            if pass_.audit is not None and pass_.batch_size > 1:
                # (a one-example pass's audit shows nothing of a term that combines examples:
                # its shape certified a 2-example micro-batch's coupled loss of the same
                # operations, found by the events fuzzer's seed 455, a review of 2026-12-07)
                self._audited_losses |= pass_.loss_shapes
            self._warn_subnormal()  # (an audited step reads back anyway)
            for audit in pass_.audits or ([pass_.audit] if pass_.audit is not None else []):
                # (every forward's structure of a merged pass: until 2026-12-06 the first's
                # alone, and a second forward of another shape was audited alone at every
                # step, against the gradient of both — refused, a hunt)
                self._audited_signatures.add(audit.signature)
                self._hooks_audited = self._hook_state()
                if audit.nodes is not None:
                    self._audited_nodes.add((audit.signature, audit.nodes))
                if audit.unverified:
                    self.audit_log.append(audit.unverified)
                    self._warn_unreplayed(audit.unverified)
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
        self._refuse_unmet_shared(pass_, missing, learn)
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
        text = findings.message(self._labels, None, self._param_name)
        # (the model's own term first: where it is there, it combines examples for certain)
        causes = [
            c
            for c in (self._model_cause(), self._fallback_cause(findings), self._subnormal_cause())
            if c
        ]
        if len(causes) > 1:
            also = " ".join(causes[1:])
            return f"{causes[0]} Also possible: {also} What noisescale found: {text}"
        return text if not causes else f"{causes[0]} What noisescale found: {text}"

    def _subnormal_cause(self) -> str | None:
        """float16 parameters whose gradient lies largely below float16's normal range
        (6.1e-5), where it keeps fewer significant bits (1e-6 is rounded by up to 3%): the
        audit's sums and autograd's then differ by that rounding, which it cannot tell from a
        missed use or mixed examples (a hunt, 2026-12-07: a float16 MLP whose loss was 3e-5
        times a squared error was refused at its second step, the message blaming rows that
        do not belong to the examples; at 1e-4 the per-layer preconditioned |G|² was 0.9%
        off the examples' own float16 gradients added up in float64)."""
        low = self._subnormal_params()
        if not low:
            return None
        return (
            f"The gradients of {low}, stored in float16, hold more than a tenth of their "
            "squared norm in entries below float16's normal range (6.1e-05), where float16 "
            "keeps fewer significant bits: the check's sums of per-example gradients and "
            "autograd's gradient then differ by that rounding, which it cannot tell from a "
            f"missed use or mixed examples. {_SUBNORMAL_FIX}."
        )

    def _subnormal_params(self) -> str:
        """The float16 parameters (quoted, comma-separated; empty if none) whose gradient
        entries below float16's normal range hold more than a tenth of its squared norm."""
        tiny = torch.finfo(torch.float16).tiny
        low: list[str] = []
        for p in self._params:
            g = p.grad
            if g is None or g.dtype != torch.float16:
                continue
            g = g.float().pow(2)
            total = float(g.sum())
            if total > 0 and float(torch.where(g < tiny * tiny, g, 0.0).sum()) > 0.1 * total:
                low.append(f"'{self._param_name.get(id(p), '?')}'")
        return ", ".join(low)

    def _warn_subnormal(self) -> None:
        """Say once, at an audit that passed, that float16 gradients below float16's normal
        range make the norms only as exact as their rounding (silent until 2026-12-07: a
        float16 MLP's per-layer preconditioned |G|² 0.9% off, against 0.03–0.08% documented
        for float16, a hunt)."""
        if "subnormal" in self._unreplayed_warned:
            return
        low = self._subnormal_params()
        if not low:
            return
        self._unreplayed_warned.add("subnormal")
        warnings.warn(
            f"the gradients of {low}, stored in float16, hold more than a tenth of their "
            "squared norm in entries below float16's normal range (6.1e-05), where float16 "
            "keeps fewer significant bits (1e-6 to within 3%): the norms are only as exact as "
            "that rounding (a layer's |G|² up to about 1% off, not the 0.03–0.08% of float16 "
            "gradients in its normal range), and an audit may refuse a step over it. "
            f"{_SUBNORMAL_FIX}",
            RuntimeWarning,
            stacklevel=4,
        )

    def _fallback_cause(self, findings: audit_mod.Findings) -> str | None:
        """Where parameters measured by the torch.func fallback do not add up and the fallback
        split more than one argument as examples: it splits every tensor argument of the
        module whose dim 0 has the batch's size, and one that has it by coincidence (Funnel's
        pooled positions, [T/2, …] with T/2 = N) is split as if it held the examples. (With
        one such argument, the input, that is not the cause: no lead.)"""
        split: dict[nn.Module, list[tuple[int, ...]]] = {}
        for pid in findings.unexplained:
            for holder, _ in self._holders(pid):
                shapes = self._fallback_split.get(holder, [])
                if holder in self._fallback and len(shapes) > 1:
                    split[holder] = shapes
        if not split:
            return None
        names = ", ".join(f"'{self._labels[m]}'" for m in split)
        shapes = "; ".join(", ".join(str(list(t)) for t in v) for v in split.values())
        n = findings.batch_size
        return (
            f"The per-example gradients the torch.func fallback gave for module(s) {names} do "
            "not add up to their gradient. The fallback re-runs such a module per example and "
            f"splits every tensor argument whose dim 0 has the batch's size ({n}) as if it "
            f"held the examples — here arguments of shapes {shapes}: if one of them has that "
            "size by coincidence (positions, a pooled length, a table), use a batch size other "
            f"than {n}. Otherwise the parameters are used elsewhere too (below). Registering a "
            "rule for the module (noisescale.register_layer) or per_example=False works in "
            "either case."
        )

    def _with_cause(self, text: str, auxiliary: bool = True, penalty: bool = True) -> str:
        """A refusal led by the likely cause where the model names one (a term its forward adds
        to its loss: a mixture of experts' auxiliary loss unless ``auxiliary`` is false,
        AdaLoRA's orthogonality penalty when the model returned a loss unless ``penalty`` is)."""
        cause = self._model_cause(auxiliary, penalty)
        return text if cause is None else f"{cause} What noisescale found: {text}"

    def _model_cause(self, auxiliary: bool = True, penalty: bool = True) -> str | None:
        """A term the model's forward adds to its loss, which combines examples (see
        :meth:`_with_cause`), or ``None``."""
        return (
            _auxiliary_loss_cause(self.model, self._returned_router_logits_only)
            if auxiliary
            else None
        ) or (_penalty_cause(self.model) if penalty and self._returned_loss else None)

    def _warn_unreplayed(self, unverified: str) -> None:
        """Say once per tracker that an audit passed a structure whose backward it could not
        replay (``torch.utils.checkpoint(use_reentrant=True)`` refuses ``autograd.grad``): its
        rows' attribution is unchecked, which until 2026-12-05 only the engine's internal log
        recorded (examples mixed inside such a checkpoint were measured 0.6% off, a review)."""
        kind = next((k for k in (_UNREPLAYED, UNRERUN) if unverified.startswith(k)), None)
        if kind is None or kind in self._unreplayed_warned:
            return
        self._unreplayed_warned.add(kind)
        # (a model the permutation check could not re-run was logged alone until 2026-12-06:
        # an auxiliary loss computed in its forward was then measured 5% off without a word)
        text = _unreplayed_warning if kind == _UNREPLAYED else unrerun_warning
        warnings.warn(text(unverified), RuntimeWarning, stacklevel=2)

    def _refuse_unmet_shared(
        self, pass_: PassNorms, missing: set[int], learn: bool = False
    ) -> None:
        """Refuse a pass in which parameters of a shared call, or parameters used directly,
        got gradients that no meeting with the batch gave. With ``learn``, a parameter used
        directly that is also registered on a module no scope hands an alias for — and was
        read there: MobileBERT's MLM bias, ``self.bias`` and ``self.decoder.bias`` one
        Parameter, read as the latter in the head's forward while the decoder is never called
        (refused every step naming other causes, a hunt of 2026-12-05) — is left to be
        learned as a direct use (:meth:`_learn_direct_uses`), both registrations followed
        from the next step."""
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
                    "handled), or use per_example=False." + _input_sizes_clause(pass_)
                )
        aliased_ids = missing & pass_.aliased
        if learn:
            scoped = {(id(h), n) for uses in self._scopes.values() for h, n, _ in uses}
            aliased_ids = {
                pid
                for pid in aliased_ids
                if all((id(h), n) in scoped for h, n in self._holders(pid))
            }
        aliased = sorted(self._param_name[pid] for pid in aliased_ids)
        through = {
            self._param_name[pid]: pass_.custom_functions[pid]
            for pid in aliased_ids
            if pid in pass_.custom_functions
        }
        if through:
            raise UnsupportedModuleError(_custom_function_message(through, aliased))
        sparse = sorted(self._param_name[pid] for pid in aliased_ids if pid in pass_.sparse_built)
        if sparse:
            # (until 2026-12-06 refused naming causes that were not this one — a loss term, a
            # time-major layout, a custom Function —, a hunt)
            ops = sorted(
                {pass_.sparse_built[pid] for pid in aliased_ids if pid in pass_.sparse_built}
            )
            others = sorted(set(aliased) - set(sparse))
            raise UnsupportedModuleError(
                _sparse_message(sparse, ops)
                + (
                    f". (Parameters {others} also received gradients that no use noisescale "
                    "followed gave)"
                    if others
                    else ""
                )
            )
        held = self._plain_holders(aliased_ids)
        if held:
            # (until 2026-12-06 refused naming a loss term, a reduced loss or a layout, a hunt:
            # DCN's self.wl = [self.w0, self.w1], iterated in the forward)
            raise UnsupportedModuleError(
                f"parameters {aliased} received gradients that no use noisescale followed "
                f"gave: they are held in a plain Python container ({', '.join(held)}) and the "
                "forward reaches them through it, not by attribute access — noisescale follows "
                "a parameter used directly where its module's forward reads it as an attribute. "
                "Read them as attributes in the forward (for w in (self.w0, self.w1), or "
                "getattr(self, f'w{i}')) instead of keeping the list, or use per_example=False"
            )
        flat = self._flat_unproven_cause(pass_, aliased_ids)
        if flat:
            raise UnsupportedModuleError(flat)
        met = pass_.met_elsewhere
        if aliased and met is not None and set(met[0]) & set(aliased):
            raise UnsupportedModuleError(
                f"parameters {aliased} received gradients that no use noisescale followed "
                f"gave: {met[1]} — a weight returned from the forward applied "
                "time-major (tok.t() * w[:, None] on [T, N]); noisescale follows such a "
                "tensor where it meets the examples in dim 0. Apply it batch-first, "
                "tok * w[None, :] on [N, T] (the same loss, measured), or use per_example=False"
            )
        if aliased:
            raise UnsupportedModuleError(
                f"parameters {aliased} received gradients that no use noisescale followed "
                "gave: read outside the model's forward (in the loss: model.temperature — "
                "return it from the forward instead, where it is followed), or combined with "
                "a loss already reduced over the examples (Kendall's uncertainty weighting, "
                "exp(-s)·L + s on the batch's mean L: a scalar with no per-example split — write "
                "it per example, (exp(-s)·losses + s).mean() with s returned by the forward), or "
                "used directly in "
                "their module's forward but never combined with a tensor whose dim 0 has the "
                f"batch's {pass_.batch_size} examples (time-major activations; examples "
                "flattened together with positions or routed to experts: x.reshape(-1, D), a "
                f"mixture of experts' eager loop — keep dim 0 the examples; "
                f"{self._experts_clause(aliased_ids)}; or a custom "
                "torch.autograd.Function, whose outputs noisescale cannot follow a parameter "
                "through), or use per_example=False"
            )

    def _plain_holders(self, pids: set[int]) -> list[str]:
        """The plain lists, tuples and dicts among the model's modules' attributes that hold
        one of the parameters ``pids``, named "'attribute' of 'module'"."""
        found = []
        for name, module in self.model.named_modules():
            for attr, value in vars(module).items():
                if attr in _MODULE_STATE:
                    continue
                items = value.values() if isinstance(value, dict) else value
                if isinstance(value, list | tuple | dict) and any(
                    isinstance(v, nn.Parameter) and id(v) in pids for v in items
                ):
                    found.append(f"'{attr}' of {f'module {name!r}' if name else 'the model'}")
        return found

    def _flat_unproven_cause(self, pass_: PassNorms, pids: set[int] | list[int]) -> str:
        """Parameters of ``pids`` used directly in a product with rows flattened from the
        examples that could not be proven each example's in turn (shared._flat_product): the
        cause, where the refusal would otherwise name others (a loss term read outside the
        forward, an operation without a rule; a hunt, 2026-12-06); or ``""``."""
        found = {pid: pass_.flat_unproven[pid] for pid in pids if pid in pass_.flat_unproven}
        if not found:
            return ""
        names = sorted(self._param_name.get(pid, "?") for pid in found)
        op, rows = next(iter(found.values()))
        n = pass_.batch_size
        return (
            f"parameters {names}, used directly, meet in '{op}' {rows} rows, {rows // n} per "
            f"example of the batch's {n}, whose history does not show each example's rows in "
            "turn (flattened position-first, h.transpose(0, 1).reshape(-1, D), or rows the "
            "data reordered or picked), so the product's rows cannot be given to their "
            "examples. Flatten the batch-first activation in order, h.reshape(-1, D) of "
            "[N, T, D] (measured), apply the product to the 3-D h, or use per_example=False"
        )

    def _experts_clause(self, pids: set[int]) -> str:
        """What to say of transformers' experts kernels where parameters were not followed:
        ``batched_mm`` is followed — unless the model runs it already (then what escaped is
        outside the batched product), or the experts holding them are written by hand and
        ignore the setting."""
        by_hand = sorted(
            {
                type(holder).__name__
                for pid in pids
                for holder, _ in self._holders(pid)
                if "Expert" in type(holder).__name__ and not _follows_experts_setting(holder)
            }
        )
        if by_hand:
            return (
                f"{', '.join(by_hand)} {'is' if len(by_hand) == 1 else 'are'} written by "
                "hand, not following transformers' "
                "experts_implementation (that setting would not change them): register a rule "
                "for the module (noisescale.register_layer)"
            )
        if _experts_setting(self.model) == "batched_mm":
            return (
                "this model already runs transformers' batched expert product "
                "(experts_implementation='batched_mm'), which is followed for the expert "
                "weights, not for what is outside it (expert biases gathered per token and "
                "added in place, GPT-OSS's; a router's own custom Function, PhiMoE's)"
            )
        return "transformers' experts_implementation='batched_mm' is followed"

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
        if self.checkpoint_first:
            self.checkpoint_first = False
            learned = (
                "the compiled graph's first measured layer runs inside "
                "checkpoint(use_reentrant=False), whose recomputation in the backward AOT "
                "autograd cannot replay with noisescale's operators (torch raises 'expected all "
                "tensors_saved_with_vc_check to be Tensors'); a measured layer before the first "
                "checkpoint, or a module around the model compiled as a whole (the tracker "
                "given the model), keeps it compiled"
            )
        elif pass_.compiled_unsupported is not None:
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
        elif pass_.unaudited and pass_.routed_compiled is not None:
            # (rows routed by the data: a compiled step's index values are not read, and such
            # steps were 78% off under torch.compile until 2026-12-06, a review)
            learned = (
                f"'{pass_.routed_compiled}' runs on rows the data picks or puts together "
                "(h[idx], index_select, a stack of crops, index_add), whose order must be "
                "checked on every step, which the traced hooks cannot"
            )
        elif pass_.unaudited and self._reentrant_seen:
            # (the recomputation of a checkpoint(use_reentrant=True) in the backward, traced
            # or not, gives compiled passes a structure no eager audit sees: without this,
            # every unaudited step was withheld and the next one run eagerly)
            learned = (
                "the model runs activation checkpoints with use_reentrant=True, whose "
                "recomputation in the backward the traced hooks do not follow (use_reentrant="
                "False is followed inside the graph)"
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

    def _scope_of(self, holder: nn.Module) -> nn.Module:
        """Where a direct use of ``holder``'s parameters is followed: the model's forward, or
        under FSDP2 that of the innermost ``fully_shard`` module around ``holder``, whose
        parameters stay sharded (``DTensor``) until its own forward begins (until 2026-12-07
        the model's pre-hook met a block's sharded parameter: a raw RuntimeError from
        ``shared.wrap``, the data-parallel fuzzer's seed 502)."""
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:
            return self.model
        assert self.model is not None
        scope = self.model
        for m in self.model.modules():
            if isinstance(m, FSDPModule) and any(c is holder for c in m.modules()):
                scope = m  # (modules() goes outside in: the last one found is the innermost)
        return scope

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
                scope = self._scope_of(holder)
                known = any(h is holder and n == name for h, n, _ in self._scopes.get(scope, []))
                if known:
                    return False  # already followed: the use is outside the forward
                new_scopes.append((scope, (holder, name, pid)))
        # used in their layer and outside it: sub-batch products keep what cross terms need
        # (or leave them to the factors) from the next step on, not a step later
        self._multi_use.update(pids)
        for scope, use in new_scopes:
            if scope not in self._scopes:
                self._scopes[scope] = []
                self._install_scope(scope)
            self._scopes[scope].append(use)
        self._update_compile_blocker()
        for _, (holder, _, _) in new_scopes:
            if holder in self._calls:  # (a rule-less holder's own forward hands out aliases)
                self._guard_holder(holder)
        names = sorted(self._param_name[pid] for pid in pids)
        self._withhold(
            pass_,
            f"parameters {names} are used outside the layers that own them; their direct uses "
            "in the model's forward are followed from the next step on",
        )
        return True

    def _gradients_not_finite(self, pass_: PassNorms) -> bool:
        """Whether a gradient this pass reached holds inf or nan (read on a failed audit only:
        it waits for the device)."""
        for pid in pass_.received:
            p = self._param.get(pid)
            grad = None if p is None else p.grad
            if hasattr(grad, "to_local"):  # (a DTensor: this process's shard, no collective)
                grad = grad.to_local()
            if isinstance(grad, torch.Tensor) and not bool(torch.isfinite(grad).all()):
                return True
        return False

    def _new_loss_shape(self, pass_: PassNorms) -> bool:
        """Whether an unaudited pass's loss, after the forward, has a shape no audited step's
        had (graph.loss_side_params: its operations and the dimensions they reduce): a term
        added — one that combines the examples, an in-batch negative, a batch mean —, removed,
        or reduced otherwise since the audit. The loss watch, which refuses a loss that
        combines the examples or whose reduction contradicts the declaration, follows the loss
        on audited steps only; such a change between them was measured without a word until
        the next audit (a term coupling the examples added at step 3: measured there, refused
        at step 4) until 2026-12-07. The pass is withheld and the steps after it audited until
        one has that shape (up to :data:`_LOSS_AUDITS` steps, three times a shape:
        Collect._audit_pending_losses); the shapes that passed an audit are kept, up to
        :data:`_MAX_LOSS_SHAPES` (a loss whose operations vary with the data, e.g. chunks of a
        varying length, past that is checked on the audits' steps alone, as before, said
        once). Not in compiled models (below)."""
        carried = pass_.carried_shapes - self._audited_losses
        if pass_.audit is not None and pass_.batch_size > 1:
            carried -= pass_.loss_shapes  # (its own watch follows these operations now)
        if carried and self.auditing_enabled and not (self._seen_compiled or pass_.compiled):
            # a skipped micro-batch's loss of a shape no audit followed (its watch never ran,
            # audited step or not): withheld, and the next step measures every micro-batch
            # (sub-batch mode), whose audit follows each one's loss
            self._audit_due = True
            self.last_step_passes, self.subset_position = 0, 0
            self._withhold(
                pass_,
                "the loss of another micro-batch of this step, which was not measured, ran "
                "operations after the model's forward that no audited step has checked (a term "
                "added or removed, a reduction over other dimensions); this step's norms are "
                "left out and the next step, audited, checks every micro-batch's loss",
            )
            return True
        if (
            pass_.audit is not None
            or pass_.batch_size == 1  # (one example's loss combines nothing)
            or not self.auditing_enabled
            or not pass_.loss_shapes
            # (a compiled model's steps: the audited ones run eagerly, the others through its
            # compiled function, whose outputs reach the loss through nodes of their own —
            # left to the audit, as a penalty inside the compiled function is)
            or self._seen_compiled
            or pass_.compiled
            or pass_.compiled_call
        ):
            return False
        new = pass_.loss_shapes - self._audited_losses
        if not new:
            return False
        if len(self._audited_losses) >= _MAX_LOSS_SHAPES:
            if not self._loss_shapes_warned:
                self._loss_shapes_warned = True
                warnings.warn(
                    f"noisescale: the loss's operations after the model's forward took "
                    f"{_MAX_LOSS_SHAPES} different forms on audited steps; from now on a new "
                    "form is checked at the next scheduled audit only (steps 1, 2, 4, …, then "
                    "one in 1,024) — a term that combines the examples added between audits "
                    "would be measured until then (said once)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return False
        self._audit_due = True
        for shape in new:
            # (the steps after audit until one has this shape — a term every k-th step lands
            # on none of them otherwise —, for up to _LOSS_AUDITS steps, three times a shape;
            # until a review of 2026-12-07 16 steps, and a term every 17th step or rarer was
            # withheld at every step it ran)
            tries = self._pending_losses.get(shape, 0)
            if tries < 3:
                self._pending_losses[shape] = tries + 1
                self._loss_audits_left = _LOSS_AUDITS
        self._withhold(
            pass_,
            "the loss's operations after the model's forward changed since the last audited "
            "step (a term added or removed, a reduction over other dimensions), and the checks "
            "that the loss keeps the examples apart and matches loss_reduction run on audited "
            "steps; this step's norms are left out and the next step, audited, checks the new "
            "loss",
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
                    (f"{pass_.items_cause} What noisescale found: " if pass_.items_cause else "")
                    + f"layer '{call.label}' was called on input that is not per-example "
                    f"({call.why}), and its output then met the batch in the operation '{op}', "
                    "which noisescale cannot attribute to examples (e.g. the cells of a "
                    "hand-written recurrent layer run on the active rows of a packed sequence, "
                    "a subset of the batch). Call layers on whole, batch-first activations "
                    "(nn.LSTM/GRU/RNN handle packed sequences exactly), or use per_example=False"
                    + _experts_hint(op, scope, self.model)
                    + _routed_rows_hint(op, pass_.batch_size)
                    + _reorder_hint(op)
                )
            labels = sorted({s.label for s in origin.sources})
            layer = parametrized_layer(scope, self.model)
            if layer is not None:
                # (followed through its parametrization: the fallback, which runs the layer on
                # its own parameters, would miss the originals — and crashed on an LSTM)
                raise UnsupportedModuleError(
                    parametrized_message(self._labels.get(layer, "?"), layer, labels, op)
                )
            if scope is not None:
                for name, sub in scope.named_modules():  # (switched to train() since)
                    if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                        norms.check(sub, self._labels.get(sub, name))
            if (
                scope is None
                or scope is self.model
                or not self.allow_fallback
                or not learn
                # (transformers' grouped expert product runs on the tokens routed to each
                # expert, never on per-example rows: the fallback would refuse it a step later
                # with a cause that does not name the setting that works)
                or "grouped_mm" in op
            ):
                pids = [s.pid if isinstance(s.pid, int) else id(s.pid) for s in origin.sources]
                flat = self._flat_unproven_cause(pass_, pids)
                raise UnsupportedModuleError(
                    flat
                    or self._unsupported_message(origin, op, labels, scope)
                    + _coincidence_hint(pass_.batch_size)
                )
            owners[scope] = op
        for scope in owners:
            if scope in self._fallback:
                # (an earlier micro-batch of this step sent it there already: its hooks are in
                # place, and a second set would count its gradients twice)
                continue
            fallback.check(scope, self._labels[scope])
            if id(scope) in pass_.scopes_unbatched:
                # (the fallback runs a module per example, along dim 0 of its inputs: it would
                # refuse this one a step later, naming its input — JetMoE's experts, called on
                # the tokens routed to them, were withheld "for the fallback" and refused
                # every step after; a hunt, 2026-12-05)
                labels = sorted(
                    {s.label for o, _ in pass_.unsupported if o.scope is scope for s in o.sources}
                )
                raise UnsupportedModuleError(
                    f"parameters {labels} meet the batch inside module "
                    f"'{self._labels.get(scope, '?')}' ({type(scope).__name__}) in the "
                    f"operation '{owners[scope]}', which has no per-example rule, and that "
                    "module was called with no input whose dim 0 has the batch's "
                    f"{pass_.batch_size} examples (examples flattened together with positions, "
                    "or tokens routed to experts): the torch.func fallback, which runs a module "
                    "per example along dim 0, cannot take it either. Keep dim 0 the examples, "
                    "register a rule for the module (noisescale.register_layer), or use "
                    f"per_example=False{_experts_hint(owners[scope], scope, self.model)}"
                    + ruleless_hint(scope)
                    + _coincidence_hint(pass_.batch_size)
                )
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
                f"per_example=False{_experts_hint(op, scope, self.model)}{_tensordot_hint(op)}"
                + ruleless_hint(scope)
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
            "into a layer with a rule, or use per_example=False" + _tensordot_hint(op)
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
            module.register_forward_pre_hook(
                self._hook(fallback.pre_hook(self), owner=module), with_kwargs=True
            )
        )
        self._handles.append(
            module.register_forward_hook(
                self._hook(self._on_forward, owner=module, post=True), with_kwargs=True
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
        if not self._replay_allowed:
            # (learned as shared, such a layer's output met the batch at the next step and was
            # refused naming an unfollowed layout: the wrong cause, until 2026-12-07, the
            # data-parallel fuzzer's seed 238)
            raise UnsupportedModuleError(
                f"layer(s) {names} are called on the examples' rows flattened together with "
                "another dimension (x.reshape(-1, D) of a batch-first [N, T, D]), whose "
                "attribution to the examples noisescale checks by replaying the backward, and "
                "under FSDP2 it replays none (FSDP2 reshards the parameters in hooks of the "
                "backward), so it refuses to report per-example norms that could be wrong. "
                "Call the layer on the batch-first activation itself (nn.Linear takes [N, T, D] "
                "as it is), or use per_example=False"
            )
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
            # (lookups by indices: an expansion's key — a kernel expanded over C = N channels
            # — has no input to follow, nor an embedding_bag's offsets here)
            indexed = [key for key in lookups if key[3] in _INDEXED_LOOKUPS]
            following = self._inputs_follow_examples(pass_, [*learnable_calls, *indexed])
            if following is None or following:
                names = ", ".join(
                    f"'{self._labels[m]}'"
                    if isinstance(m, nn.Module)
                    else "'{}'".format(
                        next((t.label for t in findings.misattributed if t.module == m), "lookup")
                    )
                    for m in following or [*learnable_calls, *indexed]
                )
                text = (
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
                    "context, minibatch features, BatchNorm in training mode, per-example "
                    "weights looked up from a parameter and normalised over the batch: "
                    "sigmoid(a - a.mean()), softmax(a, 0)) or one example's "
                    "activations mixed into another's (Manifold Mixup) —, and such a model has "
                    "no per-example gradient: measure it with per_example=False and two or more "
                    "gradient-accumulation micro-batches a step; or the batch was reordered "
                    "inside the forward (sorted by length for pack_padded_sequence: pass the "
                    "batch in its own order with enforce_sorted=False, which torch sorts and "
                    "restores itself and noisescale follows)"
                )
                cause = self._subnormal_cause()  # (float16 rounding, not mixed examples)
                raise UnsupportedModuleError(
                    text if cause is None else f"{cause} What noisescale found: {text}"
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
                "count equal to the batch size, or a parameter expanded over as many rows — a "
                "kernel over C = N channels, a convolution's weight); they are treated as shared "
                "from the next step on",
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


# the lookups whose indices the re-run of the permutation check records (example_check.
# _lookup_indices): table[idx] and F.embedding(idx, table)
_INDEXED_LOOKUPS = ("__getitem__", "embedding")
# the most loss shapes kept as audited, and the steps audited after one is met unaudited
# (Settle._new_loss_shape)
_MAX_LOSS_SHAPES = 64
_LOSS_AUDITS = 64


def _routed_rows_hint(op: str, n: int) -> str:
    """Where rows picked out of flattened tokens were added back (a hand-written mixture of
    experts: ``index_add``, ``scatter_add``, ``index_copy``): an expert that got exactly as many
    rows as the batch has examples looked called on them, on that batch alone (measured on
    every other, refused at random; a hunt of 2026-12-06)."""
    if op.rstrip("_") not in ("index_add", "scatter_add", "index_copy", "index_put", "scatter"):
        return ""
    return (
        f". If this layer is an expert given the token rows routed to it, and got {n} of them "
        f"on this batch — as many as the batch has examples —, those rows were taken for the "
        "examples: such batches cannot be measured per example (others can); per_example=False "
        "measures every batch"
    )


def _reorder_hint(op: str) -> str:
    """Where a shared call's output was put back in the batch's order by ``index_select``: a
    batch sorted inside the forward (``h.index_select(0, order)``) whose rows a layer took
    after a flattening (``h.reshape(B*T, D)``) on a step whose order was not the examples'
    — measured wrong on unaudited steps until 2026-12-06, 4× off, a hunt."""
    if op not in ("index_select", "gather", "take_along_dim"):
        return ""
    return (
        ". If the batch was sorted inside the forward (h.index_select(0, order), for packing) "
        "and put back by this operation, the layers between ran on rows not in the examples' "
        "order: sort and put back with h[order] and h[inv] (measured on every step), or sort "
        "outside the model"
    )


def _coincidence_hint(n: int) -> str:
    """What to try when an operation met the batch only through a dimension that has the
    batch's size by coincidence (experts stacked [E, ...] with E = N, GShard's einsum over the
    experts: measured at every other batch size, a hunt of 2026-12-06)."""
    return (
        f". If the dimension of size {n} that met them is not the examples' (experts, heads or "
        f"positions that happen to number {n}, as many as the batch), a batch of another "
        "size tells: if it is measured, that was the cause"
    )


_UNREPLAYED = "the attribution check could not replay the backward"


def _unreplayed_warning(why: str) -> str:
    fix = (
        "plain checkpointing, without context_fn, while measuring lets the audit check it"
        if "selective activation" in why
        else "torch.utils.checkpoint(..., use_reentrant=False) (in transformers: "
        "gradient_checkpointing_kwargs={'use_reentrant': False}) lets the audit check it"
    )
    return (
        f"noisescale: {why}, so which example each row of the model's activations belongs to "
        "was not checked on this structure, anywhere in its pass (examples mixed by the model "
        f"would be measured without a further word). Where it is activation checkpointing, {fix}"
    )


def _sparse_message(names: list[str], ops: list[str]) -> str:
    """The refusal of parameters that built a sparse tensor on their way to the batch."""
    plural = len(names) > 1
    return (
        f"parameter{'s' if plural else ''} {names} {'build' if plural else 'builds'} a "
        f"sparse tensor (torch.sparse: '{', '.join(ops)}') on {'their' if plural else 'its'} "
        "way to the batch — peft's SHiRA adds a sparse_coo_tensor of its values to a copy of "
        "the frozen weight —, and noisescale does not follow a parameter through sparse "
        "tensors, so it cannot attribute their gradients to examples. Use per_example=False "
        "(micro-batch norms need no per-example attribution)"
    )


def _custom_function_message(through: dict[str, str], missing: list[str]) -> str:
    """The refusal of parameters passed through a custom ``torch.autograd.Function`` (a
    straight-through estimator, a product written with its own backward): ``through`` maps
    each one's name to the Function's class name; ``missing`` names every parameter not
    followed."""
    names = ", ".join(f"'{name}'" for name in sorted(through))
    classes = sorted(set(through.values()))
    applied = ", ".join(f"{c}.apply" for c in classes)
    others = sorted(set(missing) - set(through))
    plural = len(through) > 1
    return (
        f"parameter{'s' if plural else ''} {names} {'are' if plural else 'is'} passed through "
        f"the custom torch.autograd.Function{'s' if len(classes) > 1 else ''} "
        f"{', '.join(classes)} ({applied} in the forward), so {'their' if plural else 'its'} "
        "per-example gradients cannot be measured: autograd hands the Function's backward — "
        "your own code — the gradient of its output summed over the batch, and noisescale "
        "cannot follow a parameter through it. For a straight-through estimator, write the "
        "quantised weight as w + (q(w) - w).detach() instead of a Function (measured exactly: "
        "its gradient to w is the identity's); otherwise register a rule for the module that "
        "applies the Function (noisescale.register_layer), or use per_example=False"
        + (f". Also not followed: {others}" if others else "")
    )


def _first_named(found: dict) -> str:
    """The first four ``label: what`` of ``found`` as ``'label' (what); …``."""
    return "; ".join(f"'{label}' ({what})" for label, what in list(found.items())[:4])


def _between_message(between: dict, found: str) -> str:
    """The refusal of a pass whose audit failed while a layer's output reached the engine's
    forward hook through something that may have changed it (engine._changed_on_the_way)."""
    layers = _first_named(between)
    return (
        f"the output of layer(s) {layers} reached noisescale's hooks changed, and this step's "
        "audit found that the per-example gradients do not add up: noisescale reads such a "
        "layer's output gradient after what changed it, so a hook that scales the output "
        "(out * alpha) is measured wrong. Register forward hooks that change a layer's output "
        "after creating the tracker (they then run after noisescale's, and are measured "
        "exactly), put the change in the model's own forward, or use per_example=False. What "
        f"noisescale found: {found}"
    )


def _assembled_message(assembled: dict, found: str) -> str:
    """The refusal of a pass whose audit failed while a layer (or a parameter used directly)
    ran on rows of the batch's size put together by a stack, a cat or an index_add (engine:
    PassNorms.assembled, graph._assembled_rows): the likely cause, named as such beside what
    the audit found (another may have failed it: a batch statistic, a review of 2026-12-06)."""
    layers = _first_named(assembled)
    return (
        f"this step's audit failed, and layer(s) or parameter use(s) {layers} ran on rows put "
        "together from the batch's (crops or regions stacked by image, instances pooled with "
        "index_add; or a time-major activation, a scan's steps stacked with torch.stack(hs, "
        "0) as [T, N, D] with T = N — keep dim 0 the examples, torch.stack(hs, 1)), as many "
        "as the examples: if they are not one per example in order, that "
        "is the cause — which example each row holds changes with the data (a detection "
        "head's regions, an image's instances), so a layer on them cannot be split by "
        "example; such passes are audited every step, and refused where the rows are not the "
        "examples: measure this model with per_example=False. Otherwise the cause is what "
        f"noisescale found: {found}"
    )


def _inner_message(shape: tuple, found: str) -> str:
    """The refusal of a pass whose audit failed while its loss used an activation of the
    model's forward that the forward did not return (loss_watch: PassNorms.inner_used)."""
    return (
        f"the loss used an activation of shape {list(shape)} that the model's forward computed "
        "but did not return (one a forward hook captured, or a module keeps, for an activation "
        "penalty or a feature loss), and this step's audit found that the per-example gradients "
        "do not add up: the audit starts at the model's outputs and cannot weigh such a term by "
        "example. Return the activation from the forward (the same term on it is measured "
        "exactly), compute the term inside the forward and return it per example, or use "
        f"per_example=False. What noisescale found: {found}"
    )
