"""The Hessian-weighted noise scale B_noise = tr(HΣ)/GᵀHG (paper eq. 2.8) and its line-search check.

B_simple = tr(Σ)/|G|² (eq. 2.9) is B_noise under the assumption that the Hessian is a multiple of
the identity. This module measures the real thing without ever forming H:

* :func:`measure_b_noise` — unbiased single-step estimates of GᵀHG and tr(HΣ) from the gradients of
  k ≥ 2 disjoint parts of a batch and Hessian-vector products (double backward) on an
  *independent* batch. :class:`BNoiseTracker` averages them across steps (optionally every k-th
  step) into B_noise with a confidence interval, exactly as the tracker does for B_simple.
* :func:`line_search` / :func:`measure_delta_l_opt` — the paper's own method (sec. 2.2): the best
  loss improvement ΔL_opt(B) along gradients of batches of size B, found by line searches on a
  held-out batch, then :func:`fit_delta_l_opt` fits eq. 2.7, ΔL_opt = ΔL_max/(1 + B_noise/B).

Why the quadratic forms are unbiased. Let G_1..G_k be the mean gradients of k disjoint parts of a
batch, with n_i examples each, and H_h the Hessian of the mean loss on a further batch h,
independent of the k parts. By eq. 2.2, E[G_i] = G and cov(G_i, G_j) = δ_ij Σ/n_i, so for a fixed
matrix A, E[G_iᵀ A G_j] = GᵀAG + δ_ij tr(AΣ)/n_i. H is the Hessian of the *full-data* loss; H_h is
an unbiased estimate of it (E[H_h] = H) that is independent of every G_i, hence
E[G_iᵀ H_h G_j] = E[G_iᵀ E[H_h] G_j] = GᵀHG + δ_ij tr(HΣ)/n_i. Writing q_ij = G_iᵀ H_h G_j,

    GᵀHG   ≈ mean_{i≠j} q_ij                      (cross terms: no noise bias)
    tr(HΣ) ≈ mean_i n_i (q_ii − mean_{i≠j} q_ij)   (the excess of the own terms)

are unbiased; for equal parts they are paper eq. A.2 with b_small = n (the parts' own quadratic
forms) and b_big = k·n (the whole batch's, q_big = mean_ij q_ij). Taking H from the same examples
as the G_i would not be: a per-example Hessian correlates with that example's gradient (for a
cross-entropy, confidently right examples have both a small gradient and a small Hessian). The same
pairs with the identity for H give |G|² and tr(Σ), so B_simple comes out of the same gradients.

Cost: the k part gradients cost one forward and backward pass over the batch (in k pieces); the
Hessian batch costs one forward, one backward with ``create_graph=True`` and k double-backward
passes. On the CPU MLP and CNN of ``experiments/beyond`` a measurement (2×128 gradient and 128
Hessian examples) costs 4× a training step on the same 256 examples (``docs/beyond_b_simple.md``);
measure every k-th step with ``every=``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor, nn

from noisescale import estimators as est
from noisescale.errors import NoiseScaleInputError
from noisescale.per_example.fallback import _outside_rng_states, _restore_outside_rng_states

__all__ = [
    "BNoiseEstimate",
    "BNoiseTracker",
    "DeltaLCurve",
    "LineSearch",
    "batch_size",
    "fit_delta_l_opt",
    "line_search",
    "measure_b_noise",
    "measure_delta_l_opt",
    "split_batch",
]

Batch = Tensor | Sequence[Any] | Mapping[str, Any]
LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch)`` returns the *mean* loss over the batch's examples (a 0-d tensor)."""


class _Pausable(Protocol):
    def paused(self) -> AbstractContextManager[None]: ...


def _cuda_devices(tensors: Iterable[Tensor]) -> list[int]:
    """The CUDA devices that hold ``tensors`` (whose random generators a forward may draw from)."""
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


@contextmanager
def _model_state_kept(model: nn.Module, restored: Sequence[Tensor] = ()) -> Iterator[None]:
    """Every buffer (BatchNorm's running statistics and ``num_batches_tracked``, persistent or
    not), every module's ``training`` flag, the random-number generators and the weights of
    embeddings with ``max_norm`` (which a forward renormalises in place, see
    :func:`_restore_renormed`) exactly as they were, whatever the body did. Any other parameter
    the body changed in place (its ``_version`` moved: a forward calling
    ``F.embedding(max_norm=)`` on its own weight) cannot be put back and is refused, except
    those in ``restored``, which the body puts back itself (the line search's θ).

    Opacus's per-sample-gradient hooks are switched off meanwhile (see :func:`_opacus_hooks`).

    A forward in train mode updates BatchNorm's running statistics; the measurements here run
    many forwards (at perturbed parameters, for the line search) that are not training. The
    buffer objects are put back too, in case the body replaced one. Dropout in train mode draws
    its masks from torch's generators (CPU and the model's devices; a forward may draw from
    numpy's or Python's too): left moved on, the training run's later masks and its loader's
    shuffles would differ from those of the same run without the measurement (until
    2026-12-06 they did, a hunt: parameters 0.058 apart after 10 steps of an MLP).
    """
    buffers = [
        (module, name, buf, buf.detach().clone())
        for module in model.modules()
        for name, buf in module._buffers.items()
        if buf is not None
    ]
    flags = [(module, module.training) for module in model.modules()]
    renormed = [
        (name, weight, weight.detach().clone()) for name, weight in _max_norm_weights(model)
    ]
    versions = _versions(model, [*restored, *(weight for _, weight, _ in renormed)])
    moved: list[str] = []
    opacus = _opacus_hooks(model)
    outside = _outside_rng_states()
    try:
        for owner in opacus:
            owner.hooks_enabled = False
        with torch.random.fork_rng(devices=_cuda_devices([*model.parameters(), *model.buffers()])):
            yield
        moved = _moved(versions)
    finally:
        _restore_renormed(renormed)
        for owner, enabled in opacus.items():
            owner.hooks_enabled = enabled
        _restore_outside_rng_states(outside)
        with torch.no_grad():
            for module, name, buf, saved in buffers:
                module._buffers[name] = buf
                buf.copy_(saved)
        for module, training in flags:
            module.training = training
    _refuse_moved(moved)


def _max_norm_weights(model: nn.Module) -> list[tuple[str, Tensor]]:
    """The weights of ``model``'s embeddings with ``max_norm`` (a forward renormalises them)."""
    return [
        (name or type(model).__name__, module.weight)
        for name, module in model.named_modules()
        if isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.max_norm is not None
    ]


def _versions(model: nn.Module, skip: Iterable[Tensor]) -> list[tuple[str, Tensor, int]]:
    """Each parameter of ``model`` not in ``skip``, with its name and in-place version count."""
    own = {id(t) for t in skip}
    return [(name, p, p._version) for name, p in model.named_parameters() if id(p) not in own]


def _moved(versions: list[tuple[str, Tensor, int]]) -> list[str]:
    """The names of the parameters of :func:`_versions` changed in place since."""
    return [name for name, p, version in versions if p._version != version]


def _refuse_moved(moved: list[str]) -> None:
    """Refuse parameters a measurement's forwards changed in place (not put back: unknown)."""
    if moved:
        raise NoiseScaleInputError(
            f"the model's forward changed the parameter(s) {moved} in place (e.g. "
            "F.embedding(..., max_norm=) on its own weight renormalises the rows it reads): the "
            "measurement's forwards moved them and they cannot be put back. Use "
            "nn.Embedding(max_norm=...) (its weight is put back), or renormalise the rows before "
            "measuring and pass max_norm=None"
        )


def _restore_renormed(renormed: list[tuple[str, Tensor, Tensor]]) -> None:
    """Put back the weights of embeddings with ``max_norm`` that a forward renormalised in place.

    Such a forward scales each row it reads that is longer than ``max_norm`` down to it, in
    place, and differentiates as if the rows had been stored so: the gradients and Hessian
    measured are those of the model at its renormalised rows without the renormalisation's own
    derivative, the function the model's forwards compute with, as training's own gradients
    are (bit-identical to a measurement after renormalising the rows beforehand). The line
    search's numbers are losses, the model's at each trial θ − εV; it puts θ back itself.
    """
    with torch.no_grad():
        for _, weight, saved in renormed:
            if not torch.equal(weight, saved):
                weight.copy_(saved)


def _opacus_hooks(model: nn.Module) -> dict[Any, bool]:
    """The Opacus hook owners (a ``GradSampleModule`` or its hooks) on ``model``'s modules, with
    whether each is enabled; an ``ExpandedWeights`` wrapper is refused.

    Opacus's hooks take every forward and backward through the model for DP-SGD's: the
    measurements' passes (``autograd.grad`` on parts of other sizes) crashed inside them with a
    RuntimeError (until 2026-12-06, a hunt) and would otherwise add their per-sample gradients to
    the step's ``grad_sample``. With ``hooks_enabled`` off (``GradSampleModule.disable_hooks``)
    they return before touching anything, so the measurement runs on the plain model and the
    DP-SGD state is left as it was.
    """
    owners: dict[Any, bool] = {}
    for module in model.modules():
        kind = type(module)
        if _from_opacus(module) and kind.__name__.endswith("ExpandedWeights"):
            raise NoiseScaleInputError(
                f"the model is wrapped in Opacus's {kind.__name__}, whose forward computes "
                "per-sample gradients through ExpandedWeights: the gradients that B_noise and "
                "the line search take of the model's parameters come out zero. Measure on the "
                "wrapped module itself (its ._module, which holds the same parameters), or "
                "wrap the model in Opacus's hook-based GradSampleModule, whose hooks are "
                "switched off during a measurement"
            )
        for hook in module._forward_hooks.values():
            owner = getattr(hook, "__self__", None)
            if _from_opacus(owner) and hasattr(owner, "hooks_enabled"):
                owners.setdefault(owner, owner.hooks_enabled)
    return owners


def _from_opacus(obj: Any) -> bool:
    """Whether ``obj``'s class is Opacus's or derives from one of Opacus's."""
    return any(c.__module__.startswith("opacus.") for c in type(obj).__mro__)


# -- batches ----------------------------------------------------------------------------------


def batch_size(batch: Batch) -> int:
    """Examples in a batch: dim 0 of its first tensor (a tensor, a sequence or a mapping)."""
    if isinstance(batch, Tensor):
        if batch.dim() == 0:
            raise NoiseScaleInputError("a batch must have an example dimension (dim 0)")
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, Mapping) else batch
    for v in values:
        if isinstance(v, Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise NoiseScaleInputError(
        "the batch holds no tensor with an example dimension; pass a tensor, a tuple of tensors "
        "or a dict of tensors whose dim 0 counts the examples"
    )


def split_batch(batch: Batch, k: int) -> list[Batch]:
    """Split a batch into ``k`` disjoint parts along dim 0 (sizes differ by at most one).

    Tensors whose dim 0 is the batch size are split; anything else (a scalar, a shared tensor) is
    passed to every part unchanged. Each part has the batch's type (a namedtuple stays one).
    """
    n = batch_size(batch)
    if not 1 <= k <= n:
        raise NoiseScaleInputError(f"cannot split a batch of {n} examples into {k} parts")

    def parts(v: Any) -> list[Any]:
        if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n:
            return list(torch.tensor_split(v, k))
        return [v] * k

    if isinstance(batch, Tensor):
        return parts(batch)
    if isinstance(batch, Mapping):
        split = {key: parts(v) for key, v in batch.items()}
        return [{key: split[key][j] for key in batch} for j in range(k)]
    columns = [parts(v) for v in batch]
    return [_rebuild(batch, [col[j] for col in columns]) for j in range(k)]


def _rebuild(seq: Sequence[Any], items: list[Any]) -> Sequence[Any]:
    """A sequence of the batch's type holding ``items`` (a namedtuple takes them as fields)."""
    if isinstance(seq, tuple) and hasattr(type(seq), "_fields"):
        return type(seq)(*items)
    return type(seq)(items)  # type: ignore[call-arg]


def _map_examples(batch: Batch, fn: Callable[[Tensor], Tensor]) -> Batch:
    """The batch with ``fn`` applied to each tensor whose dim 0 counts its examples."""
    n = batch_size(batch)

    def one(v: Any) -> Any:
        return fn(v) if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n else v

    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {key: one(v) for key, v in batch.items()}
    return _rebuild(batch, [one(v) for v in batch])


def _example_tensors(batch: Batch) -> list[Tensor]:
    """The tensors of a batch whose dim 0 counts its examples."""
    found: list[Tensor] = []
    _map_examples(batch, lambda v: found.append(v) or v)
    return found


def _example_keys(batch: Batch) -> list[tuple[Any, ...]]:
    """Where each example of a batch lies: for each tensor whose dim 0 counts the examples, its
    storage, dtype, shape and strides and the row's offset. Equal keys are the same elements;
    rows of one dataset tensor that are different examples (disjoint slices, a column-major
    tensor's rows, sliding windows sharing a boundary token) have different keys."""
    columns = []
    for t in _example_tensors(batch):
        if t.layout != torch.strided or t.numel() == 0:
            columns.append([(id(t), i) for i in range(t.shape[0])])
            continue
        where = (t.device, t.dtype, t.untyped_storage().data_ptr(), t.shape[1:], t.stride()[1:])
        start, step = t.storage_offset(), t.stride(0)
        columns.append([(where, start + i * step) for i in range(t.shape[0])])
    return list(zip(*columns, strict=True))


# -- one measurement --------------------------------------------------------------------------


@dataclass(frozen=True)
class BNoiseEstimate:
    """B_noise (eq. 2.8) and B_simple (eq. 2.9) from the same gradients, with their parts.

    Attributes:
        b_noise: tr(HΣ)/GᵀHG in examples; ``nan`` while the (averaged) GᵀHG or tr(HΣ) is not
            positive (``reason`` says which; the interval is then [0, ∞)).
        low: Lower end of the confidence interval for B_noise (``nan`` with one measurement).
        high: Upper end (``inf`` when GᵀHG is not yet distinguishable from zero).
        ghg: Unbiased estimate of GᵀHG.
        trace_h_sigma: Unbiased estimate of tr(HΣ).
        b_simple: tr(Σ)/|G|² from the same part gradients.
        b_simple_low: Lower end of the B_simple interval.
        b_simple_high: Upper end of the B_simple interval.
        g2: Unbiased estimate of |G|².
        trace_sigma: Unbiased estimate of tr(Σ).
        confidence: Nominal coverage of the intervals.
        steps: Measurements averaged.
        effective_steps: Kish effective number of measurements under the EMA weights.
        reason: Why B_noise is not available (empty when it is).
    """

    b_noise: float
    low: float
    high: float
    ghg: float
    trace_h_sigma: float
    b_simple: float
    b_simple_low: float
    b_simple_high: float
    g2: float
    trace_sigma: float
    confidence: float = 0.95
    steps: int = 1
    effective_steps: float = 1.0
    reason: str = ""

    @property
    def available(self) -> bool:
        """True once B_noise is a finite number."""
        return math.isfinite(self.b_noise)

    @property
    def eps_max(self) -> float:
        """The best SGD step size along the true gradient, |G|²/GᵀHG (sec. 2.2, before eq. 2.6)."""
        return self.g2 / self.ghg if self.ghg > 0 and self.g2 > 0 else math.nan

    @property
    def delta_l_max(self) -> float:
        """The loss improvement of that step, ½|G|⁴/GᵀHG (eq. 2.7)."""
        return 0.5 * self.g2**2 / self.ghg if self.ghg > 0 and self.g2 > 0 else math.nan

    def as_dict(self) -> dict[str, float]:
        return {
            "b_noise": self.b_noise,
            "b_noise_low": self.low,
            "b_noise_high": self.high,
            "ghg": self.ghg,
            "trace_h_sigma": self.trace_h_sigma,
            "b_simple": self.b_simple,
            "b_simple_low": self.b_simple_low,
            "b_simple_high": self.b_simple_high,
            "g2": self.g2,
            "trace_sigma": self.trace_sigma,
            "confidence": self.confidence,
            "steps": self.steps,
            "effective_steps": self.effective_steps,
        }


def _estimate(
    hessian: est.NoiseScaleState, simple: est.NoiseScaleState, confidence: float
) -> BNoiseEstimate:
    h = est.b_simple_interval(hessian, confidence)
    s = est.b_simple_interval(simple, confidence)
    reason = h.reason and "no measurement yet"
    if h.steps:
        reason = est.b_noise_unavailable_reason(h.g2, h.trace_sigma)
    return BNoiseEstimate(
        b_noise=h.b_simple,
        low=h.low,
        high=h.high,
        ghg=h.g2,
        trace_h_sigma=h.trace_sigma,
        b_simple=s.b_simple,
        b_simple_low=s.low,
        b_simple_high=s.high,
        g2=s.g2,
        trace_sigma=s.trace_sigma,
        confidence=confidence,
        steps=h.steps,
        effective_steps=h.effective_steps,
        reason=reason,
    )


def unbiased_pairs(q: ArrayLike, sizes: ArrayLike) -> tuple[float, float]:
    """Unbiased (signal, noise) from the k×k matrix q_ij = G_iᵀ A G_j of k independent part means.

    With E[q_ij] = GᵀAG + δ_ij tr(AΣ)/n_i: signal = mean_{i≠j} q_ij estimates GᵀAG and
    noise = mean_i n_i (q_ii − signal) estimates tr(AΣ). For equal part sizes this is paper eq.
    A.2 with b_small = n and b_big = k·n. A = H gives (GᵀHG, tr HΣ), A = I gives (|G|², tr Σ).
    """
    q = np.asarray(q, dtype=float)
    n = np.asarray(sizes, dtype=float)
    k = q.shape[0]
    if k < 2 or q.shape != (k, k) or n.shape != (k,):
        raise ValueError(f"need a k×k matrix with k ≥ 2 and k sizes, got {q.shape}, {n.shape}")
    signal = (q.sum() - np.trace(q)) / (k * (k - 1))
    noise = float(np.mean(n * (np.diag(q) - signal)))
    return float(signal), noise


def _params_of(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise NoiseScaleInputError("the model has no trainable parameters")
    return params


def _mean_gradient(loss_fn: LossFn, model: nn.Module, batch: Any, params: list[nn.Parameter]):
    loss = loss_fn(model, batch)
    _check_loss(loss)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [
        torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)
    ]


def _check_loss(loss: Any) -> None:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise NoiseScaleInputError(
            "loss_fn(model, batch) must return the mean loss over the batch as a one-element "
            f"tensor, got {type(loss).__name__}"
            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else "")
        )


def _dots(a: list[Tensor], b: list[Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


def measure_b_noise(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    *,
    hessian_batch: Batch | None = None,
    splits: int = 2,
    check_loss: bool = True,
) -> BNoiseEstimate:
    """One unbiased measurement of GᵀHG and tr(HΣ), hence B_noise (eq. 2.8), at the current θ.

    The batch is split into ``splits`` disjoint parts; each part's mean gradient G_i is taken, and
    the Hessian-vector products H_h G_i come from double backward on ``hessian_batch`` (no
    Hessian is formed). The quadratic forms q_ij = G_iᵀ H_h G_j give GᵀHG and tr(HΣ) through
    :func:`unbiased_pairs` (eq. A.2 with b_small = part size, b_big = batch size); the plain dot
    products G_iᵀG_j give |G|² and tr(Σ), hence B_simple from the same examples.

    Args:
        model: The model. Dropout in train mode makes each loss evaluation a different function
            (the estimates are then those of the population of examples × dropout masks).
            BatchNorm must use its running statistics — ``model.eval()`` around the
            measurement — or the call is refused: with batch statistics each part's gradient
            depends on the part, not only on the model. Every buffer and train/eval flag is
            left as it was, and so are the random-number generators (torch's on the CPU and
            the model's devices, numpy's, Python's): the training run goes on as without the
            measurement. Two measurements with nothing drawn between them therefore draw the
            same dropout masks.
        loss_fn: ``loss_fn(model, batch)`` → the mean loss over the batch's examples. It must be
            twice differentiable (double backward through the model): a custom
            ``autograd.Function`` marked ``@once_differentiable`` in its graph is refused, and so
            is an op without a double backward (Hugging Face models: load them with
            ``attn_implementation="eager"``).
        batch: The examples whose gradients are measured (a tensor, a tuple or a dict of tensors
            with the examples along dim 0).
        hessian_batch: Examples for the Hessian-vector products, independent of ``batch``. When
            ``None``, ``batch`` is split into ``splits + 1`` parts and the last one is used.
        splits: Number of gradient parts k ≥ 2 (k HVPs). With an explicit ``hessian_batch``,
            ``splits = len(batch)`` uses per-example gradients (b_small = 1) at the cost of one
            HVP per example; with ``hessian_batch=None`` the batch must hold at least
            ``splits + 1`` examples (``splits = len(batch) - 1`` at most).
        check_loss: Check on a few examples that ``loss_fn`` is a mean over the examples (a sum,
            or a mean over tokens of sequences of unequal length, is refused). It costs a few
            small passes (a third more on a small MLP); :class:`BNoiseTracker` checks its
            measurements 1, 2, 4, 8, … and every 1024th.

    Returns:
        A single-measurement :class:`BNoiseEstimate` (``steps == 1``, no interval); average many
        with :class:`BNoiseTracker` before trusting the ratio (single-step GᵀHG is often ≤ 0).

    Raises:
        NoiseScaleInputError: for ``splits < 2``, a batch too small to split, an empty
            ``hessian_batch`` or one holding the batch's own examples (the same rows of the
            same tensors), a BatchNorm using batch statistics, a loss that is not twice
            differentiable, a bad loss (or one the check cannot evaluate: a shared tensor
            with as many rows as the batch), or a forward that changes a parameter in place
            (other than an embedding's ``max_norm``, whose weight is put back).
    """
    if splits < 2:
        raise NoiseScaleInputError(
            f"splits must be at least 2 (got {splits}): GᵀHG comes from cross terms between parts"
        )
    params = _params_of(model)
    _refuse_batch_statistics(model)
    with _model_state_kept(model):
        return _measure_b_noise(model, loss_fn, batch, hessian_batch, splits, params, check_loss)


def _refuse_batch_statistics(model: nn.Module) -> None:
    """Refuse a BatchNorm that normalises with the statistics of the batch it is given."""
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if module.training or module.running_mean is None or module.running_var is None:
            why = "in train mode" if module.training else "without running statistics"
            raise NoiseScaleInputError(
                f"module '{name or type(model).__name__}' ({type(module).__name__}, {why}) "
                "normalises each forward with the statistics of the batch it is given: each "
                "part's (each line-search direction's) gradient would use that part's own "
                "statistics, so the parts are not independent draws of one gradient and GᵀHG "
                "and tr(HΣ) (ΔL_opt(B)) would depend on the part size (splits, B), not only on "
                "the model. Measure B_noise in eval mode — "
                "model.eval() before the measurement (BatchNorm then uses its running "
                "statistics; dropout is off), model.train() after — or use a normalisation "
                "without batch statistics (GroupNorm, LayerNorm)"
            )


_ONCE_DIFFERENTIABLE_CODE = torch.autograd.function.once_differentiable(lambda ctx: None).__code__


def _refuse_once_differentiable(loss: Tensor) -> None:
    """Refuse a loss whose graph holds a custom ``autograd.Function`` whose backward is
    ``@once_differentiable``: torch lets the double backward pass through it without a word
    (its outputs' double-backward node leads to a detached copy), so the Hessian-vector
    products would silently lose the curvature that flows through the op."""
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        forward_cls = getattr(node, "_forward_cls", None)
        if forward_cls is not None:
            for attr in ("backward", "vjp"):
                fn = getattr(forward_cls, attr, None)
                if getattr(fn, "__code__", None) is _ONCE_DIFFERENTIABLE_CODE:
                    raise NoiseScaleInputError(
                        f"the loss passes through {forward_cls.__module__}."
                        f"{forward_cls.__qualname__}, a custom autograd.Function whose backward "
                        "is marked @once_differentiable: B_noise needs Hessian-vector products "
                        "(double backward), and torch would silently leave out the curvature "
                        "that passes through this op instead of raising. Use an implementation "
                        "that is twice differentiable (plain torch operations, or a Function "
                        "whose backward is itself differentiable) for the measurement"
                    )
        stack.extend(nxt for nxt, _ in node.next_functions)


_CHECK_EXAMPLES = 8  # examples of the batch that the loss-contract check uses


def _check_mean_over_examples(
    model: nn.Module, loss_fn: LossFn, batch: Batch, params: list[nn.Parameter]
) -> str | None:
    """:func:`_refuse_non_mean_loss`, or the model's error (``None`` if none) where the check's
    own batches (the first examples, twice, and halves) cannot be evaluated: a tensor that is
    not per-example but has as many rows as the batch (a shared causal mask [T, T] at B = T) is
    cut and doubled with the examples (a hunt: a raw RuntimeError out of measure_delta_l_opt).
    """
    try:
        _refuse_non_mean_loss(model, loss_fn, batch, params)
    except NoiseScaleInputError:
        raise
    except Exception as err:  # the model's own error: the check cannot run on this batch
        return f"{type(err).__name__}: {err}"
    return None


def _loss_unchecked(reason: str, fix: str) -> NoiseScaleInputError:
    """The refusal when :func:`_check_mean_over_examples` could not run (``reason``)."""
    return NoiseScaleInputError(
        "could not check that loss_fn is a mean over the examples: the model failed on the "
        f"check's own batches (its first examples, the same twice, halves) with {reason}. Every "
        "tensor of the batch whose dim 0 equals the batch size is taken as per-example (a "
        f"shared mask [T, T] at a batch size of T is cut with the examples): {fix}, or pass "
        "check_loss=False if loss_fn is known to be the mean over the examples"
    )


def _refuse_non_mean_loss(
    model: nn.Module, loss_fn: LossFn, batch: Batch, params: list[nn.Parameter]
) -> None:
    """Refuse a loss that is not an equal-weight mean over the batch's examples, where a few
    small, deterministic evaluations can tell.

    Every estimate here assumes E[G_i] = G and cov(G_i) = Σ/n_i, which holds for the mean over
    examples of per-example losses. On S, the first (at most 8) examples of ``batch`` (the
    function is checked, not the parts: parts of one example are checked too):

    * the loss of S repeated twice equals the loss of S for a mean and twice it for a sum (a sum
      makes GᵀHG and tr(HΣ) n_i²·n_h times too large); anything else is not a mean over examples
      (a loss that couples the examples, or one normalised by the batch);
    * the gradient of S is the size-weighted mean of the gradients of its two halves for a mean
      over examples, but not for a mean over tokens of sequences with unequal token counts
      (Hugging Face's causal-LM loss with padding), which weighs each example by its tokens and
      makes the parts' gradients depend on how the batch is split.

    A loss that is not deterministic (dropout in train mode) is not checked: two evaluations of
    S differ. The random-number generators are left as they were.
    """
    m = min(batch_size(batch), _CHECK_EXAMPLES)
    if m < 1:
        return
    s_batch = _map_examples(batch, lambda v: v[:m])
    with torch.random.fork_rng(devices=_cuda_devices(params)):
        # (with gradients on: a loss_fn may take a gradient itself — force matching, a
        # physics-informed residual, a gradient penalty — which no_grad would break)
        l_s = loss_fn(model, s_batch)
        _check_loss(l_s)
        l_s, again = float(l_s.detach()), float(loss_fn(model, s_batch).detach())
        if l_s != again or not math.isfinite(l_s) or l_s == 0.0:
            return  # random (dropout), or nothing to compare
        doubled = _map_examples(batch, lambda v: torch.cat([v[:m], v[:m]]))
        l_ss = float(loss_fn(model, doubled).detach())
        low = min(torch.finfo(p.dtype).eps for p in params if p.is_floating_point())
        tol = 2e-2 if low < 1e-3 else 0.25  # bfloat16/float16 parameters: coarser round-off
        if abs(l_ss - 2.0 * l_s) <= tol * abs(l_s):
            raise NoiseScaleInputError(
                f"loss_fn returns a sum over the examples, not their mean: the loss of {m} "
                f"examples is {l_s:.6g} and of the same examples twice {l_ss:.6g} (a mean would "
                "not change). GᵀHG and tr(HΣ) would come out (part size)²·(Hessian batch size) "
                "times too large, eps_max and delta_l_max off by as much. Return the mean over "
                "the batch's examples (reduction='mean', loss.mean())"
            )
        if abs(l_ss - l_s) > tol * max(abs(l_s), abs(l_ss)):
            raise NoiseScaleInputError(
                "loss_fn does not return a mean over the batch's examples: the loss of "
                f"{m} examples is {l_s:.6g} but of the same examples twice {l_ss:.6g} (a mean "
                "would not change). A loss that couples the examples (in-batch negatives, a "
                "normalisation by the batch) has no per-example gradients, and B_noise "
                "assumes them. Return the mean over the examples of per-example losses"
            )
        if m < 4:  # halves of one example: not every loss_fn takes them
            return
        h = m // 2
        # every part is cut from the batch itself: a tensor that is not per-example but happens
        # to have m rows must not be cut
        g_a = _mean_gradient(loss_fn, model, _map_examples(batch, lambda v: v[:h]), params)
        g_b = _mean_gradient(loss_fn, model, _map_examples(batch, lambda v: v[h:m]), params)
        g_s = _mean_gradient(loss_fn, model, s_batch, params)
    mixed = [(h * a.double() + (m - h) * b.double()) / m for a, b in zip(g_a, g_b, strict=True)]
    diff = [s.double() - x for s, x in zip(g_s, mixed, strict=True)]
    scale = max(_dots(g, g) for g in (g_a, g_b, g_s))
    if scale > 0 and _dots(diff, diff) > tol**2 * scale:
        raise NoiseScaleInputError(
            "loss_fn is not an equal-weight mean over the batch's examples of per-example "
            f"losses: the gradient of {m} examples differs from the mean of its two halves' "
            f"gradients by {math.sqrt(_dots(diff, diff) / scale):.2g} of its norm, so the "
            "parts' gradients, hence GᵀHG and tr(HΣ), would depend on how the batch is split. "
            "A mean over tokens of sequences with unequal token counts (Hugging Face's "
            "causal-LM .loss with padding) weighs each example by its tokens (|G|² came out "
            "3.5x too large with parts of one example): use a per-example mean loss, each "
            "sequence's mean over its own tokens, then the mean over the sequences. A loss "
            "that couples the examples (a normalisation by the batch's statistics) has no "
            "per-example gradients at all"
        )


def _measure_b_noise(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    hessian_batch: Batch | None,
    splits: int,
    params: list[nn.Parameter],
    check_loss: bool,
) -> BNoiseEstimate:
    if hessian_batch is None:
        n = batch_size(batch)
        if n < splits + 1:
            raise NoiseScaleInputError(
                f"a batch of {n} examples cannot give splits={splits} gradient parts and a "
                f"Hessian batch (it is split into splits + 1 = {splits + 1} parts, the last for "
                "the Hessian): pass a larger batch, or the Hessian's examples as hessian_batch="
            )
        *grad_parts, hessian_batch = split_batch(batch, splits + 1)
    else:
        if batch_size(hessian_batch) == 0:
            raise NoiseScaleInputError(
                "hessian_batch holds no examples: the Hessian of a mean over no examples is not "
                "defined (its loss is nan and its gradient zero, which would be taken as a "
                "measurement of GᵀHG = tr(HΣ) = 0). Pass a non-empty batch (a loader's short "
                "last batch can be empty), or hessian_batch=None"
            )
        if not set(_example_keys(batch)).isdisjoint(_example_keys(hessian_batch)):
            raise NoiseScaleInputError(
                "hessian_batch holds examples of batch itself (the same rows of the same "
                "tensors: the batch, its tensors in a new tuple, or a slice of its rows): "
                "the Hessian-vector products must come from examples independent of the "
                "gradient parts, since an example's Hessian correlates with its own gradient "
                "(GᵀHG came out 2.2× too large, tr(HΣ) 1.6×, B_noise 26% too small for a "
                "logistic model with per-example parts). Pass examples of their own (the "
                "loader's next batch, a held-out draw), or hessian_batch=None, which keeps a "
                "part of the batch for the Hessian"
            )
        grad_parts = split_batch(batch, splits)
    sizes = [batch_size(p) for p in grad_parts]
    if check_loss:
        reason = _check_mean_over_examples(model, loss_fn, batch, params)
        if reason is not None:  # the parts would be cut the same way
            raise _loss_unchecked(reason, "use a batch size that no such tensor's rows match")
    grads = [_mean_gradient(loss_fn, model, part, params) for part in grad_parts]

    loss_h = loss_fn(model, hessian_batch)
    _check_loss(loss_h)
    _refuse_once_differentiable(loss_h)
    grad_h = torch.autograd.grad(loss_h, params, create_graph=True, allow_unused=True)
    # entries that do not depend on θ again (a loss linear in some parameter) have zero HVPs
    live = [j for j, g in enumerate(grad_h) if g is not None and g.requires_grad]
    q = np.zeros((splits, splits))
    for j, g_j in enumerate(grads):
        if live:
            try:
                hv_live = torch.autograd.grad(
                    [grad_h[i] for i in live],
                    params,
                    grad_outputs=[g_j[i] for i in live],
                    retain_graph=j < splits - 1,
                    allow_unused=True,
                )
            except RuntimeError as err:
                if "not implemented" not in str(err) and "differentiate twice" not in str(err):
                    raise
                raise NoiseScaleInputError(
                    f"the loss is not twice differentiable: torch says '{err}'. B_noise needs "
                    "Hessian-vector products (double backward) through the model and loss. "
                    "Fused kernels often have no double backward: for a Hugging Face model "
                    "load it with attn_implementation=\"eager\" (sdpa's and flash attention's "
                    "kernels have none); elsewhere use the op's plain torch implementation"
                ) from err
            hv = [
                torch.zeros_like(p) if h is None else h
                for p, h in zip(params, hv_live, strict=True)
            ]
        else:
            hv = [torch.zeros_like(p) for p in params]
        for i, g_i in enumerate(grads):
            q[i, j] = _dots(g_i, hv)
    q = 0.5 * (q + q.T)  # H is symmetric; average away the round-off of the two products
    dots = np.array([[_dots(a, b) for b in grads] for a in grads])
    ghg, trace_h_sigma = unbiased_pairs(q, sizes)
    g2, trace_sigma = unbiased_pairs(dots, sizes)
    return _estimate(
        est.update_state(est.init_state(1.0), ghg, trace_h_sigma),
        est.update_state(est.init_state(1.0), g2, trace_sigma),
        0.95,
    )


class BNoiseTracker:
    """B_noise averaged over training: a measurement every ``every`` steps, ratio of EMAs.

    Like :class:`~noisescale.GradientNoiseTracker` for B_simple (App. A.1), the per-measurement
    unbiased GᵀHG and tr(HΣ) are averaged with bias-corrected EMAs and B_noise is their ratio,
    with a Fieller interval (:func:`noisescale.estimators.b_simple_interval`).

    Usage::

        bn = BNoiseTracker(model, loss_fn, every=10, tracker=tracker)
        for step, batch in enumerate(loader):
            ...
            bn.step(batch)        # at a step boundary: before the forward or after optimizer.step()
        bn.estimate().b_noise

    Args:
        model: The model being trained.
        loss_fn: ``loss_fn(model, batch)`` → mean loss over the batch (see :func:`measure_b_noise`).
        every: Measure on every ``every``-th call of :meth:`step`.
        splits: Gradient parts per measurement (:func:`measure_b_noise`).
        beta: EMA decay per *measurement*; ``1.0`` averages all measurements equally.
        confidence: Coverage of the intervals.
        tracker: A :class:`~noisescale.GradientNoiseTracker` on the same model, whose hooks are
            paused during the measurement so that its extra passes are not counted as training.
        dataset_size: The number of examples N of the data set when each measured batch is
            drawn from it without replacement (a batch of a shuffled epoch): the parts of such a
            batch are negatively correlated, which biases GᵀHG low by tr(HΣ)/N and |G|² by
            tr Σ/N. Given N, each measurement is corrected as it is folded in (:meth:`update`;
            :func:`noisescale.estimators.finite_population`), tr(HΣ) and tr Σ then being those of
            i.i.d. draws from the data set. Exact for GᵀHG and tr(HΣ) only with a
            ``hessian_batch`` drawn independently of ``batch`` (its own random draw from the data
            set, not another batch of the same epoch): a Hessian part of the same draw is
            correlated with the gradient parts through each example's Hessian and gradient, a
            bias of order 1/N that no correction from these numbers removes, and :meth:`step`
            warns. ``None``: no correction (sampling with replacement).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        every: int = 1,
        splits: int = 2,
        beta: float = 0.9,
        confidence: float = 0.95,
        tracker: _Pausable | None = None,
        dataset_size: int | None = None,
    ) -> None:
        if every < 1:
            raise NoiseScaleInputError(f"every must be at least 1, got {every}")
        if splits < 2:
            raise NoiseScaleInputError(f"splits must be at least 2, got {splits}")
        if not 0.0 < beta <= 1.0:
            raise NoiseScaleInputError(f"beta must be in (0, 1], got {beta}")
        if not 0.0 < confidence < 1.0:
            raise NoiseScaleInputError(f"confidence must be in (0, 1), got {confidence}")
        self.model = model
        self.loss_fn = loss_fn
        self.every = every
        self.splits = splits
        self.confidence = confidence
        self.tracker = tracker
        self.dataset_size = est.check_dataset_size(dataset_size)
        self._warned_same_draw = False
        self.calls = 0
        self._measured = 0  # measurements taken by step() since construction or resume
        self.seconds = 0.0
        self.beta = beta
        self._hessian = est.init_state(beta)
        self._simple = est.init_state(beta)
        self.history: list[dict[str, Any]] = []

    def step(self, batch: Batch, hessian_batch: Batch | None = None) -> BNoiseEstimate | None:
        """Count a training step; on every ``every``-th, measure and fold in (else ``None``).

        Returns the single measurement when one was taken.
        """
        self.calls += 1
        if (self.calls - 1) % self.every:
            return None
        if self.dataset_size is not None and hessian_batch is None and not self._warned_same_draw:
            self._warned_same_draw = True
            warnings.warn(
                f"noisescale: BNoiseTracker(dataset_size={self.dataset_size}) takes the Hessian "
                "from a part of the measured batch, drawn with its gradient parts without "
                "replacement: through each example's Hessian and gradient the parts are "
                "correlated, which leaves GᵀHG and tr(HΣ) a bias of order 1/N that the "
                "correction for dataset_size does not remove (|G|² and tr Σ are exact); pass "
                "hessian_batch= drawn independently of the batch (its own random draw from the "
                "data set)",
                RuntimeWarning,
                stacklevel=2,
            )
        pause = self.tracker.paused() if self.tracker is not None else nullcontext()
        start = time.perf_counter()
        self._measured += 1
        n = self._measured
        with pause:
            m = measure_b_noise(
                self.model,
                self.loss_fn,
                batch,
                hessian_batch=hessian_batch,
                splits=self.splits,
                check_loss=n & (n - 1) == 0 or n % 1024 == 0,  # 1, 2, 4, 8, …, every 1024th
            )
        seconds = time.perf_counter() - start
        self.seconds += seconds
        self.update(m, step=self.calls, seconds=seconds)
        return m

    def update(
        self, measurement: BNoiseEstimate, *, step: int | None = None, seconds: float = math.nan
    ) -> None:
        """Fold in a measurement taken elsewhere (e.g. by :func:`measure_b_noise` directly), as
        measured: corrected here for ``dataset_size`` (the history records it corrected)."""
        ghg, trace_h_sigma = est.finite_population(
            measurement.ghg, measurement.trace_h_sigma, self.dataset_size
        )
        g2, trace_sigma = est.finite_population(
            measurement.g2, measurement.trace_sigma, self.dataset_size
        )
        measurement = replace(
            measurement,
            ghg=float(ghg),
            trace_h_sigma=float(trace_h_sigma),
            g2=float(g2),
            trace_sigma=float(trace_sigma),
        )
        self._hessian = est.update_state(self._hessian, measurement.ghg, measurement.trace_h_sigma)
        self._simple = est.update_state(self._simple, measurement.g2, measurement.trace_sigma)
        e = self.estimate()
        self.history.append(
            {
                "step": self.calls if step is None else step,
                "seconds": seconds,
                "ghg": measurement.ghg,
                "trace_h_sigma": measurement.trace_h_sigma,
                "g2": measurement.g2,
                "trace_sigma": measurement.trace_sigma,
                "b_noise": e.b_noise,
                "b_noise_low": e.low,
                "b_noise_high": e.high,
                "b_simple": e.b_simple,
                "b_simple_low": e.b_simple_low,
                "b_simple_high": e.b_simple_high,
            }
        )

    def estimate(self) -> BNoiseEstimate:
        """B_noise and B_simple (ratios of the EMAs) with their intervals."""
        return _estimate(self._hessian, self._simple, self.confidence)

    def state_dict(self) -> dict[str, Any]:
        """The averages, the call count and time, and the history (all that resuming needs)."""
        return {
            "hessian": self._hessian._asdict(),
            "simple": self._simple._asdict(),
            "calls": self.calls,
            "seconds": self.seconds,
            "dataset_size": self.dataset_size,
            "history": [dict(r) for r in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: estimates, ``calls`` and ``history`` continue exactly.

        The state's EMAs were built with its ``beta`` and ``dataset_size``; a tracker
        constructed with another is refused rather than silently switched to the state's. A
        state saved before the history was kept resumes with an empty history.
        """
        saved_beta = float(state["hessian"]["beta"])
        if saved_beta != self.beta:
            raise NoiseScaleInputError(
                f"the state was averaged with beta={saved_beta} but this tracker was built with "
                f"beta={self.beta}; construct it with beta={saved_beta} to resume (the EMAs "
                "cannot change their decay midway)"
            )
        est.check_resumed_dataset_size(state.get("dataset_size"), self.dataset_size)
        self._hessian = est.load_state(state["hessian"])
        self._simple = est.load_state(state["simple"])
        self.calls = int(state["calls"])
        self.seconds = float(state["seconds"])
        self.history = [dict(r) for r in state.get("history", [])]


# -- the line-search method (sec. 2.2) --------------------------------------------------------


@dataclass(frozen=True)
class LineSearch:
    """The best step along a set of directions, for the loss averaged over the directions.

    Attributes:
        eps_opt: The step size ε that maximises the mean improvement L(θ) − mean_r L(θ − ε V_r).
        delta_l_opt: That maximal mean improvement ΔL_opt.
        eps: Every step size evaluated (grid, then golden-section refinement).
        delta_l: The mean improvement at each of them.
    """

    eps_opt: float
    delta_l_opt: float
    eps: np.ndarray
    delta_l: np.ndarray


_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


_SUB = 4  # sub-grid steps per grid interval around a peak of the grid
_PEAKS = 3  # local maxima of the grid refined (the best ones)


def _golden(f: Callable[[float], float], a: float, b: float, rtol: float) -> None:
    """Golden-section search for a maximum of ``f`` in [a, b] down to relative width ``rtol``
    (``f`` records what it evaluates)."""
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    while b - a > rtol * c:
        if f(c) >= f(d):
            b, d = d, c
            c = b - _GOLDEN * (b - a)
        else:
            a, c = c, d
            d = a + _GOLDEN * (b - a)


def line_search(
    model: nn.Module,
    loss_fn: LossFn,
    directions: Sequence[Sequence[Tensor]],
    eval_batch: Batch,
    *,
    eps_range: tuple[float, float] = (1e-4, 1e3),
    grid: int = 29,
    rtol: float = 1e-3,
) -> LineSearch:
    """Maximise the mean improvement of the held-out loss over step sizes ε (paper sec. 2.2).

    ΔL(ε) = L_eval(θ) − mean_r L_eval(θ − ε V_r). Averaging the *loss* over the directions before
    maximising is what eq. 2.5–2.7 describe (the best step for the expected loss); maximising each
    direction's own curve would instead favour lucky directions. A log-spaced grid over
    ``eps_range`` brackets the maximum, golden-section search refines it to relative width
    ``rtol``. The loss along ε can have several local maxima between two grid points (seen 1.4×
    apart in ε): around each of the best (3) local maxima of the grid a sub-grid of 4 steps per grid
    interval finds them and golden section refines each; peaks closer than the sub-grid's spacing
    (ε ratio ~1.13 at the default grid) can still be missed. The parameters are restored
    afterwards, and so are the random-number generators (as :func:`measure_b_noise` leaves them)
    and every buffer: a model in train mode updates BatchNorm's running statistics on each of
    the many trial forwards (at steps up to ``eps_range[1]``), which would otherwise be left as
    those of wildly perturbed networks. (BatchNorm in train mode normalises the held-out loss
    with the held-out batch's statistics: a fixed function, maximised exactly; the directions
    are the caller's. :func:`measure_delta_l_opt`, which takes them, refuses it.)

    When no step size on the grid improves the averaged loss (few, very noisy directions: the
    noise in mean_r GᵀV_r exceeds |G|²), the result is ``eps_opt = delta_l_opt = 0``.

    Args:
        model: The model at θ.
        loss_fn: ``loss_fn(model, batch)`` → mean loss (evaluated under ``torch.no_grad``).
        directions: One list of tensors per direction, shaped like the trainable parameters.
        eval_batch: The held-out batch that stands in for the true loss L.
        eps_range: The smallest and largest step size tried.
        grid: Grid points over ``eps_range``.
        rtol: Relative width of the final bracket.

    Raises:
        NoiseScaleInputError: if the best improving step lies at an end of ``eps_range`` (widen
            it), or the directions do not match the parameters.
    """
    params = _params_of(model)
    if not directions:
        raise NoiseScaleInputError("line_search needs at least one direction")
    for v in directions:
        if len(v) != len(params) or any(a.shape != p.shape for a, p in zip(v, params, strict=True)):
            raise NoiseScaleInputError(
                "each direction must hold one tensor per trainable parameter, with its shape"
            )
    lo, hi = eps_range
    if not 0 < lo < hi or grid < 3:
        raise NoiseScaleInputError(
            f"need 0 < eps_range[0] < eps_range[1] and grid ≥ 3, got {eps_range} and {grid}"
        )
    with _model_state_kept(model, restored=params):
        return _line_search(model, loss_fn, directions, eval_batch, params, lo, hi, grid, rtol)


def _line_search(
    model: nn.Module,
    loss_fn: LossFn,
    directions: Sequence[Sequence[Tensor]],
    eval_batch: Batch,
    params: list[nn.Parameter],
    lo: float,
    hi: float,
    grid: int,
    rtol: float,
) -> LineSearch:
    eps_range = (lo, hi)
    theta = [p.detach().clone() for p in params]
    with torch.no_grad():
        base = float(loss_fn(model, eval_batch))
    evaluated: dict[float, float] = {}

    def improvement(eps: float) -> float:
        if eps not in evaluated:
            total = 0.0
            for v in directions:
                for p, t, d in zip(params, theta, v, strict=True):
                    p.copy_(t - eps * d.to(t.dtype))
                value = float(loss_fn(model, eval_batch))
                total += value if math.isfinite(value) else math.inf
            evaluated[eps] = base - total / len(directions)
        return evaluated[eps]

    try:
        with torch.no_grad():
            points = np.geomspace(lo, hi, grid)
            values = np.array([improvement(float(e)) for e in points])
            best = int(np.argmax(values))
            if values[best] <= 0:
                return LineSearch(0.0, 0.0, points, values)
            if best in (0, grid - 1):
                raise NoiseScaleInputError(
                    f"the best step size lies at the end of eps_range={eps_range} "
                    f"(ε = {points[best]:.3g}); widen the range"
                )
            # the curve may have several peaks (between grid points too): refine around every
            # local maximum of the grid among its best few, each on a sub-grid, then each of
            # the sub-grid's local maxima by golden section
            peaks = [
                j
                for j in range(1, grid - 1)
                if values[j] > 0 and values[j] > values[j - 1] and values[j] >= values[j + 1]
            ]
            for j in sorted(peaks, key=lambda j: -values[j])[:_PEAKS]:
                sub = np.concatenate(
                    [
                        np.geomspace(points[j - 1], points[j], _SUB + 1)[:-1],
                        np.geomspace(points[j], points[j + 1], _SUB + 1),
                    ]
                )
                fine = [improvement(float(e)) for e in sub]
                for i in range(1, sub.size - 1):
                    if fine[i] > fine[i - 1] and fine[i] >= fine[i + 1]:
                        _golden(improvement, float(sub[i - 1]), float(sub[i + 1]), rtol)
            eps_opt = max(evaluated, key=evaluated.__getitem__)
    finally:
        with torch.no_grad():
            for p, t in zip(params, theta, strict=True):
                p.copy_(t)
    eps = np.array(sorted(evaluated))
    return LineSearch(eps_opt, evaluated[eps_opt], eps, np.array([evaluated[e] for e in eps]))


@dataclass(frozen=True)
class DeltaLCurve:
    """ΔL_opt(B) and ε_opt(B) from line searches, and eq. 2.7 / 2.6 fitted to them.

    Attributes:
        batch_sizes: The batch sizes B (examples).
        delta_l_opt: ΔL_opt at each B (best mean improvement over ``repeats`` directions); 0
            where no step improved the loss (those batch sizes are left out of the fits).
        eps_opt: The step size that achieved it.
        b_noise: B_noise of the fit ΔL_opt = ΔL_max/(1 + B_noise/B) (eq. 2.7).
        delta_l_max: ΔL_max of that fit.
        b_noise_eps: B_noise of the fit ε_opt = ε_max/(1 + B_noise/B) (eq. 2.6).
        eps_max: ε_max of that fit.
    """

    batch_sizes: np.ndarray
    delta_l_opt: np.ndarray
    eps_opt: np.ndarray
    b_noise: float
    delta_l_max: float
    b_noise_eps: float
    eps_max: float


def measure_delta_l_opt(
    model: nn.Module,
    loss_fn: LossFn,
    sample_batch: Callable[[int], Batch],
    eval_batch: Batch,
    batch_sizes: Sequence[int],
    *,
    repeats: int = 8,
    min_examples: int = 0,
    eps_range: tuple[float, float] = (1e-4, 1e3),
    grid: int = 29,
    rtol: float = 1e-3,
    check_loss: bool = True,
) -> DeltaLCurve:
    """The paper's line-search estimate of B_noise (sec. 2.2): fit eq. 2.7 to ΔL_opt(B).

    For each batch size B, ``repeats`` independent batches are drawn with ``sample_batch(B)``,
    their mean gradients are the directions, and :func:`line_search` finds the best step for the
    held-out loss averaged over them. Fitting ΔL_opt(B) = ΔL_max/(1 + B_noise/B) gives B_noise and
    ΔL_max; fitting ε_opt(B) = ε_max/(1 + B_noise/B) (eq. 2.6) gives a second B_noise.

    The noise of the linear term mean_r GᵀV_r has variance GᵀΣG/(B·repeats): it depends on the
    examples used, B·repeats, so small batches need many more directions (``min_examples``).
    Late in training a few directions of one example each may not improve the loss at all;
    such batch sizes are reported with ΔL_opt = 0 and left out of the fits, which biases the
    remaining small-B points upwards (B_noise downwards).

    Args:
        model: The model at θ (left unchanged: parameters, buffers and train/eval flags; the
            random-number generators too, ``sample_batch``'s draws from them included).
        loss_fn: ``loss_fn(model, batch)`` → mean loss.
        sample_batch: Draws a fresh batch of the given size (independent of ``eval_batch``).
        eval_batch: A large held-out batch standing in for the full-data loss.
        batch_sizes: At least two batch sizes, spanning B_noise if possible.
        repeats: Directions per batch size (at least).
        min_examples: Use at least ⌈min_examples/B⌉ directions at batch size B, so that every
            ΔL_opt(B) averages over about the same number of examples.
        eps_range: Step sizes searched (:func:`line_search`).
        grid: Grid points over ``eps_range``.
        rtol: Relative precision of each ε_opt.
        check_loss: Check on each size's first batch that ``loss_fn`` is a mean over the
            examples (as :func:`measure_b_noise` does); sizes where the model fails on the
            check's own batches (a shared tensor with as many rows as the batch) are skipped,
            and the call refused only if no size could be checked.

    Raises:
        NoiseScaleInputError: as :func:`measure_b_noise` does, for a BatchNorm using batch
            statistics (each direction would be normalised by its own batch of B: ΔL_opt(B),
            hence B_noise, came out 2× too large) and for a ``loss_fn`` that is not a mean over
            the examples (checked on the first batch of each size: a sum makes ε_opt(B) 1/B of
            the mean's and ΔL_opt the eval batch's size times too large); for fewer than two
            batch sizes, or fewer than two at which a line search improved the loss.
    """
    sizes = sorted({int(b) for b in batch_sizes})
    if len(sizes) < 2 or sizes[0] < 1:
        raise NoiseScaleInputError(f"need at least two positive batch sizes, got {batch_sizes}")
    if repeats < 1:
        raise NoiseScaleInputError(f"repeats must be at least 1, got {repeats}")
    params = _params_of(model)
    _refuse_batch_statistics(model)  # each direction would use its own batch's statistics
    delta_l, eps = [], []
    renormed = [weight for _, weight in _max_norm_weights(model)]
    checked: list[int] = []
    unchecked: list[str] = []
    with _model_state_kept(model, restored=params):  # the line search puts θ back itself
        for b in sizes:
            count = max(repeats, -(-min_examples // b))
            directions = []
            versions = _versions(model, renormed)
            for r in range(count):
                batch = sample_batch(b)
                if r == 0 and check_loss:  # a sum scales ε_opt(B) by 1/B, ΔL_opt(B) by n_eval
                    reason = _check_mean_over_examples(model, loss_fn, batch, params)
                    if reason is None:
                        checked.append(b)
                    else:
                        unchecked.append(reason)
                directions.append(_mean_gradient(loss_fn, model, batch, params))
            _refuse_moved(_moved(versions))
            ls = line_search(
                model, loss_fn, directions, eval_batch, eps_range=eps_range, grid=grid, rtol=rtol
            )
            delta_l.append(ls.delta_l_opt)
            eps.append(ls.eps_opt)
    if unchecked and not checked:
        raise _loss_unchecked(unchecked[0], "include a batch size that no such tensor's rows match")
    used = [j for j, d in enumerate(delta_l) if d > 0]
    if len(used) < 2:
        raise NoiseScaleInputError(
            f"the line searches improved the loss at fewer than two batch sizes ({sizes}); use "
            "more repeats or larger batch sizes"
        )
    b_noise, delta_l_max = fit_delta_l_opt([sizes[j] for j in used], [delta_l[j] for j in used])
    b_noise_eps, eps_max = fit_delta_l_opt([sizes[j] for j in used], [eps[j] for j in used])
    return DeltaLCurve(
        np.array(sizes, dtype=float),
        np.array(delta_l),
        np.array(eps),
        b_noise,
        delta_l_max,
        b_noise_eps,
        eps_max,
    )


def fit_delta_l_opt(batch_sizes: ArrayLike, delta_l_opt: ArrayLike) -> tuple[float, float]:
    """Fit ΔL_opt(B) = ΔL_max/(1 + B_noise/B) (eq. 2.7) in log space; returns (B_noise, ΔL_max).

    The same form fits ε_opt(B) = ε_max/(1 + B_noise/B) (eq. 2.6). The squared error of
    log ΔL_opt is minimised (the points span orders of magnitude); for a given B_noise, log ΔL_max
    is the mean residual, so the fit is a one-dimensional search over log B_noise (grid, then
    golden section). B_noise is searched in [min B / 10⁴, max B · 10⁴]; ``inf`` means the data are
    still linear in B (B_noise beyond the largest batch by far), ``0`` that they are flat.

    Raises:
        NoiseScaleInputError: with fewer than two distinct batch sizes (repeated points at one
            batch size do not fix B_noise) or a non-positive value.
    """
    b = np.asarray(batch_sizes, dtype=float).ravel()
    y = np.asarray(delta_l_opt, dtype=float).ravel()
    if b.size != y.size or b.size < 2:
        raise NoiseScaleInputError("need matching arrays with at least two batch sizes")
    if np.any(b <= 0) or np.any(~np.isfinite(y)) or np.any(y <= 0):
        raise NoiseScaleInputError(
            "batch sizes and values must be positive and finite to fit eq. 2.7 "
            f"(got {b.tolist()}, {y.tolist()})"
        )
    if np.unique(b).size < 2:
        raise NoiseScaleInputError(
            f"all {b.size} points are at one batch size ({b[0]:g}): they say nothing about how "
            "ΔL_opt changes with B, hence nothing about B_noise; measure at two or more "
            "distinct batch sizes, spanning B_noise if possible"
        )
    log_y, log_b = np.log(y), np.log(b)

    def fit(log_bn: float) -> tuple[float, float]:
        model = log_b - np.logaddexp(log_b, log_bn)  # log(B/(B + B_noise))
        log_max = float(np.mean(log_y - model))
        return float(np.sum((log_y - log_max - model) ** 2)), log_max

    lo, hi = math.log(b.min()) - 4 * math.log(10), math.log(b.max()) + 4 * math.log(10)
    grid = np.linspace(lo, hi, 161)
    errors = np.array([fit(g)[0] for g in grid])
    best = int(np.argmin(errors))
    if best == 0:
        return 0.0, float(np.exp(np.mean(log_y)))
    if best == grid.size - 1:
        return math.inf, math.inf
    a, c = float(grid[best - 1]), float(grid[best + 1])
    for _ in range(60):
        m1, m2 = c - _GOLDEN * (c - a), a + _GOLDEN * (c - a)
        if fit(m1)[0] <= fit(m2)[0]:
            c = m2
        else:
            a = m1
    log_bn = 0.5 * (a + c)
    return float(math.exp(log_bn)), float(math.exp(fit(log_bn)[1]))
