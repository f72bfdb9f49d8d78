"""torch.compile: the tracker inside the model's compiled graph.

For a plain MLP, a small CNN, the reference GPT and a tiny Hugging Face GPT-2 (random weights),
each compiled with ``torch.compile(model)`` and with ``model.compile()``, in the three modes —
sub-batches (default), every example (``per_example_fraction=1.0``) and micro-batches
(``per_example=False``, two per step):

* **no graph break caused by noisescale**: Dynamo's own counter of graph breaks is the same as for
  the same compiled model without a tracker (which may break on its own);
* **no recompilation**: the tracked model compiles into no more graphs than the plain one — a
  Python value a traced hook read that changed every step would make Dynamo recompile every step,
  and run the model eagerly once its recompile limit is reached: silently slow;
* **the same numbers as eager**: every step's squared norms (the big batch's and each small
  batch source's) and B_simple equal those of the same run without compile, on the audited steps
  (which run eagerly) and the compiled ones alike. Everything runs in float64; the tolerance
  is a few hundred rounding errors of it (measured differences: 0 for the per-example and
  sub-batch norms, which the engine computes eagerly from the same tensors in both runs, and
  ~1e-16 for micro-batch norms read from gradients the compiled backward computed).

Steps 1, 2 and 4 are audited and run eagerly; step 3 compiles the graph and step 5 reuses it.
``aot_eager`` runs AOT autograd — the functionalised forward and backward graphs, the ordered
effects that keep the hooks' operators in them — without inductor's code generation. The models
have no dropout: compiled code draws its random masks differently from eager.

Then what the traced hooks do not follow: the tracker says so once, runs its hooks outside the
graph (graph breaks) and keeps exact numbers; a structure change under compile withholds one
step and audits the next eagerly. The transformers models whose modules use their parameters
directly, inductor, and ``measure_every`` under compile are in ``tests/test_compile_more.py``
(a file of its own, so that two pytest-xdist workers can run the two at once).
"""

from __future__ import annotations

import functools
import gc
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from noisescale import GradientNoiseTracker
from noisescale.per_example import PerExampleNorms
from noisescale.reference_models import GPT, GPTConfig, PaperCNN
from test_subbatch import tiny_gpt2

torch._dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

pytestmark = pytest.mark.usefixtures("float64_default")

N = 16  # with T = 8 and 8 sub-batches: Linear weights take the sub-batch product path
T = 8
STEPS = 5
BACKEND = "aot_eager"


@pytest.fixture(autouse=True)
def _no_tracker_left_over() -> None:
    """Trackers an earlier test left unreferenced but not removed give the compiler stance
    back when they are collected (an audited step holds it at force_eager, process-wide).
    One still referenced from another test module (a traceback pytest keeps, a module-level
    object) is let go of here: its steps are over."""
    from noisescale.per_example import compiled

    if compiled._HOLDING:  # (gc.collect() costs 1-2 s a test once transformers is loaded)
        gc.collect()
    for key in list(compiled._HOLDING):
        compiled._release(key)


EPS = torch.finfo(torch.float64).eps
RTOL = 256 * EPS
MODES: dict[str, dict[str, Any]] = {
    "subbatch": {},
    "per_example": {"per_example_fraction": 1.0},
    "microbatch": {"per_example": False},
}

Batch = Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def mlp() -> tuple[nn.Module, Callable, Batch]:
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 5))

    def batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(N, 10, generator=gen), torch.randint(0, 5, (N,), generator=gen)

    return model, F.cross_entropy, batch


def cnn() -> tuple[nn.Module, Callable, Batch]:
    model = PaperCNN(image_size=8, dropout=0.0)

    def batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(N, 1, 8, 8, generator=gen), torch.randint(0, 10, (N,), generator=gen)

    return model, F.cross_entropy, batch


def _tokens(vocab: int) -> Batch:
    def batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.randint(0, vocab, (N, T), generator=gen),
            torch.randint(0, vocab, (N, T), generator=gen),
        )

    return batch


def gpt() -> tuple[nn.Module, Callable, Batch]:
    config = GPTConfig(n_layer=2, d_model=32, n_head=2, block_size=16, vocab_size=64, dropout=0.0)
    model = GPT(config)

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    return model, loss, _tokens(64)


def gpt2() -> tuple[nn.Module, Callable, Batch]:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)  # its head is tied to the token embedding

    def loss(out: Any, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.logits.flatten(0, 1), y.flatten())

    return model, loss, _tokens(64)


MODELS = {"mlp": mlp, "cnn": cnn, "gpt": gpt, "gpt2": gpt2}


class Wrapper(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(x)


def _compiled(model: nn.Module, style: str | None, backend: str) -> Callable:
    if style in ("torch.compile", "torch.compile, tracked"):
        return torch.compile(model, backend=backend)
    if style == "wrapper":
        return torch.compile(Wrapper(model), backend=backend)
    if style == "model.compile":
        model.compile(backend=backend)
    if style == "blocks":  # each transformer block compiled by itself, the rest eager
        for module in model.modules():
            if type(module).__name__ == "Block":
                module.compile(backend=backend)
    return model


def train(
    factory: Callable,
    mode: str | None,
    style: str | None,
    backend: str = BACKEND,
    steps: int = STEPS,
    **options: Any,
) -> tuple[list[dict[str, Any]] | None, int, int, list[str]]:
    """``steps`` training steps: (history, graph breaks, graphs compiled, noisescale's
    warnings); ``options``: more of the tracker's arguments."""
    from noisescale.per_example import compiled

    if compiled._HOLDING:  # a tracker of an earlier test, not removed, gives the stance back
        gc.collect()
    assert torch._dynamo.eval_frame._stance.stance == "default"
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model, loss_fn, batch = factory()
    call = _compiled(model, style, backend)
    accumulation = 2 if mode == "microbatch" else 1
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = None
        if mode is not None:
            # ("torch.compile, tracked": the tracker is given what torch.compile returned)
            tracked = call if style == "torch.compile, tracked" else model
            tracker = GradientNoiseTracker(tracked, sync_every=1, **MODES[mode], **options)
        for _ in range(steps):
            for _ in range(accumulation):
                x, y = batch(gen)
                (loss_fn(call(x), y) / accumulation).backward()
            if tracker is not None:
                tracker.step()
            model.zero_grad()
    history = None
    if tracker is not None:
        history = [dict(r) for r in tracker.history]
        tracker.remove()
    breaks = sum(counters["graph_break"].values())
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    ours = [str(w.message) for w in caught if "noisescale" in str(w.message)]
    return history, breaks, graphs, ours


@functools.cache
def _eager(model: str, mode: str) -> list[dict[str, Any]]:
    history, *_ = train(MODELS[model], mode, None)
    assert history is not None
    return history


@functools.cache
def _plain(model: str, style: str) -> tuple[int, int]:
    # "torch.compile, tracked" differs from "torch.compile" only in what the tracker is given
    # (_compiled compiles both alike): without a tracker, the two are one run, compiled once
    if style == "torch.compile, tracked":
        style = "torch.compile"
    return _untracked(MODELS[model], style)


@functools.cache
def _untracked(factory: Callable, style: str, backend: str = BACKEND) -> tuple[int, int]:
    """(graph breaks, graphs compiled) of the model trained without a tracker: the baseline of
    every measurement mode, compiled once."""
    _, breaks, graphs, _ = train(factory, None, style, backend)
    return breaks, graphs


def assert_same_numbers(
    got: list[dict[str, Any]], want: list[dict[str, Any]], records: int = STEPS
) -> None:
    assert len(got) == len(want) == records
    for g, w in zip(got, want, strict=True):
        step = g["step"]
        assert step == w["step"] and g["skipped"] == w["skipped"], step
        for key in ("examples", "tokens", "tokens_seen", "unmeasured_steps"):
            assert g.get(key) == w.get(key), (step, key)
        assert g["sqnorm_big"] == pytest.approx(w["sqnorm_big"], rel=RTOL), step
        assert set(g["sources"]) == set(w["sources"]), (step, g["sources"], w["sources"])
        for name, source in w["sources"].items():
            mine = g["sources"][name]
            assert mine["count"] == source["count"] and mine["b_small"] == source["b_small"]
            assert mine["sqnorm_small"] == pytest.approx(source["sqnorm_small"], rel=RTOL), (
                step,
                name,
            )
        for key in ("g2", "trace_sigma", "b_simple"):
            # differences of the norms above: their rounding, relative to the norms' scale
            scale = abs(w["trace_sigma"]) + abs(w["g2"]) * w["b_big"]
            if w[key] is None or g[key] is None:
                assert w[key] is g[key], (step, key)
            elif key == "b_simple":
                rel = RTOL * scale / abs(w["trace_sigma"])
                assert g[key] == pytest.approx(w[key], rel=rel, nan_ok=True), step
            else:
                assert g[key] == pytest.approx(w[key], rel=RTOL, abs=RTOL * scale), (step, key)


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("style", ["torch.compile", "torch.compile, tracked", "model.compile"])
@pytest.mark.parametrize("model", list(MODELS))
def test_no_graph_break_and_the_same_numbers(model: str, style: str, mode: str) -> None:
    history, breaks, graphs, warned = train(MODELS[model], mode, style)
    plain_breaks, plain_graphs = _plain(model, style)
    assert breaks == plain_breaks, f"{breaks} graph breaks, {plain_breaks} without the tracker"
    assert graphs <= max(plain_graphs, 1), f"{graphs} graphs, {plain_graphs} without the tracker"
    assert not warned, warned
    assert history is not None
    assert_same_numbers(history, _eager(model, mode))


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("model", ["mlp", "gpt"])
def test_a_wrapper_compiled_as_a_whole(model: str, mode: str) -> None:
    """The tracked model inside a module compiled as a whole: its own hooks are then traced into
    the graph too (compiled by itself, Dynamo runs a model's own hooks as frames of their own)."""
    history, breaks, graphs, warned = train(MODELS[model], mode, "wrapper")
    plain_breaks, plain_graphs = _plain(model, "wrapper")
    assert breaks == plain_breaks
    assert graphs <= max(plain_graphs, 1)
    assert not warned, warned
    assert history is not None
    assert_same_numbers(history, _eager(model, mode))


class LayerScale(nn.Module):
    """A parameter used directly in the forward (``gamma * h``), which the traced hooks do not
    follow: the eager hooks run outside the compiled graph."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 16)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 16))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gamma * torch.tanh(self.fc(x)))


def layer_scale() -> tuple[nn.Module, Callable, Batch]:
    _, loss, batch = mlp()
    return LayerScale(), loss, batch


class ScaledPositions(nn.Module):
    """A position table whose output is scaled before it meets the batch: an operation on a
    shared tensor the traced hooks do not follow, found only when the compiled graph runs."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(64, 16)
        self.pos = nn.Embedding(T, 16)
        self.head = nn.Linear(16, 64)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = self.pos(torch.arange(idx.shape[1], device=idx.device)) * 0.5
        return self.head(self.tok(idx) + positions)


def scaled_positions() -> tuple[nn.Module, Callable, Batch]:
    _, loss, batch = gpt()
    return ScaledPositions(), loss, batch


class FlattenedFeedForward(nn.Module):
    """OPT's decoder layer: a LayerNorm and a feed-forward block on the tokens flattened with
    the examples, [N·T, D] — measured per example by the eager hooks only."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(64, 16)
        self.norm = nn.LayerNorm(16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 64)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.tok(idx)
        flat = h.reshape(-1, h.shape[-1])
        flat = flat + self.fc2(torch.relu(self.fc1(self.norm(flat))))
        return self.head(flat.view(h.shape))


def flattened_feed_forward() -> tuple[nn.Module, Callable, Batch]:
    _, loss, batch = gpt()
    return FlattenedFeedForward(), loss, batch


def assert_same_norms(got: dict[str, Any], want: dict[str, Any]) -> None:
    """One step's squared norms (not B_simple, whose averages see the steps before)."""
    assert got["sqnorm_big"] == pytest.approx(want["sqnorm_big"], rel=RTOL)
    assert set(got["sources"]) == set(want["sources"])
    for name, source in want["sources"].items():
        assert got["sources"][name]["sqnorm_small"] == pytest.approx(
            source["sqnorm_small"], rel=RTOL
        )


@pytest.mark.slow
@pytest.mark.parametrize("style", ["torch.compile", "model.compile"])
def test_a_model_the_traced_hooks_do_not_follow_runs_eagerly_and_says_so(style: str) -> None:
    """A directly used parameter: the model runs eagerly while it is measured, and a warning
    says why and what runs compiled. ``model.compile()`` is seen when the tracker is created;
    ``torch.compile(model)`` only when its graph runs — step 3, withheld."""
    history, _, _, warned = train(layer_scale, "per_example", style)
    eager, *_ = train(layer_scale, "per_example", None)
    assert history is not None and eager is not None
    runs_eagerly = [w for w in warned if "runs eagerly" in w and "force_eager" in w]
    assert len(runs_eagerly) == 1 and "'gamma'" in runs_eagerly[0], warned
    assert "per_example=False" in runs_eagerly[0]
    withheld = [3] if style == "torch.compile" else []
    assert [r["step"] for r in history if "per_example" not in r["sources"]] == withheld
    for got, want in zip(history, eager, strict=True):
        if got["step"] not in withheld:
            assert_same_norms(got, want)


class OutsideUse(nn.Module):
    """A weight used outside its own layer: a head tied to the embedding,
    ``F.linear(h, emb.weight)``, or a Linear's weight reused, ``h @ lin.weight.T``."""

    def __init__(self, use: str) -> None:
        super().__init__()
        self.use = use
        self.emb, self.lin = nn.Embedding(7, 6), nn.Linear(6, 6)
        self.head = nn.Linear(6, 7) if use == "reuse" else None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(self.emb(idx))).mean(1)
        if self.use == "tied":
            return F.linear(h, self.emb.weight)
        assert self.head is not None
        return self.head(h + torch.tanh(h @ self.lin.weight.T))


def brute_force_sqnorms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each example's squared gradient norm of its own loss, one backward per example."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        out.append(sum(g.pow(2).sum() for g in torch.autograd.grad(loss, params)))
    return torch.stack(out)


@pytest.mark.parametrize("use", ["tied", "reuse"])
def test_a_weight_used_outside_its_layer_runs_eagerly_and_is_exact(use: str) -> None:
    """Step 1 (eager, audited) learns the direct use, and compiled code runs eagerly from then
    on, with one warning naming the weight: every later step's per-example norms equal brute
    force's. Until 2026-12-07 the engine decided whether the traced hooks follow the model
    before it recorded the use it had just learned: the model stayed compiled, the eager hooks'
    shared aliases entered the graph, and step 3 raised a RecursionError from inside Dynamo."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = OutsideUse(use)
    call = torch.compile(model, backend=BACKEND)
    gen = torch.Generator().manual_seed(1)
    n = 5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = PerExampleNorms(call)
        measured = []
        for _ in range(5):
            x = torch.randint(0, 7, (n, 4), generator=gen)
            y = torch.randint(0, 7, (n,), generator=gen)
            model.zero_grad()
            F.cross_entropy(call(x), y, reduction="sum").backward()
            (pass_,) = engine.collect()
            if pass_.raw_sqnorms is not None:
                with engine.paused():
                    want = brute_force_sqnorms(model, x, y)
                assert torch.allclose(pass_.raw_sqnorms, want, rtol=RTOL), (pass_.raw_sqnorms, want)
                measured.append(pass_)
        engine.remove()
    torch._dynamo.reset()
    weight = "emb.weight" if use == "tied" else "lin.weight"
    warned = [str(w.message) for w in caught if "force_eager" in str(w.message)]
    assert len(warned) == 1 and f"'_orig_mod.{weight}'" in warned[0], warned
    assert len(measured) == 4  # every step but the first, which learned the use


class Checkpointed(nn.Module):
    """A residual block under ``torch.utils.checkpoint``, between two layers."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.inp, self.head = nn.Linear(10, 16), nn.Linear(16, 5)
        self.block = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        h = torch.tanh(self.inp(x))
        h = h + checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.head(h)


@pytest.mark.slow
@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("style", ["torch.compile", "torch.compile, tracked"])
def test_activation_checkpointing_inside_a_compiled_model(style: str, reentrant: bool) -> None:
    """``checkpoint(use_reentrant=False)`` is followed inside the graph: eager's numbers, no
    warning. ``use_reentrant=True``, whose recomputation in the backward gave every compiled
    pass a structure the eager audits never saw (each unaudited step was withheld and the next
    run eagerly, half the steps lost), runs eagerly with one warning naming it; step 3 (the
    first compiled one) is withheld. Until 2026-12-05 the tracker given ``torch.compile``'s
    result crashed inside Dynamo at step 3 ("already tracked for mutation")."""

    def factory() -> tuple[nn.Module, Callable, Batch]:
        return Checkpointed(reentrant), F.cross_entropy, mlp()[2]

    history, _, _, warned = train(factory, "per_example", style, steps=8)
    eager, *_ = train(factory, "per_example", None, steps=8)
    assert history is not None and eager is not None
    runs_eagerly = [w for w in warned if "runs eagerly" in w and "force_eager" in w]
    withheld = [3] if reentrant else []
    if reentrant:
        assert len(runs_eagerly) == 1 and "use_reentrant=True" in runs_eagerly[0], warned
    else:
        assert not warned, warned
    assert [r["step"] for r in history if "per_example" not in r["sources"]] == withheld
    for got, want in zip(history, eager, strict=True):
        if got["step"] not in withheld:
            assert_same_norms(got, want)


class CheckpointFirst(nn.Module):
    """A checkpointed block fed the data itself: the compiled graph's first layer runs inside
    ``checkpoint(use_reentrant=False)``."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.LayerNorm(6))
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        return self.head(checkpoint(self.block, x, use_reentrant=False).mean(1))


def test_a_checkpoint_holding_the_graph_s_first_layer_runs_eagerly_and_is_exact() -> None:
    """AOT autograd recomputes a checkpointed region's events in the backward, which needs the
    graph's input effect token — None at run time: with no event before the region, step 3 (the
    first compiled one) raised "expected all tensors_saved_with_vc_check to be Tensors" from
    inside the compiled forward until 2026-12-07 (a precision fuzzer's seed 163). Now that step
    is withheld, with one warning naming the checkpoint and the fixes, and compiled code runs
    eagerly: every other step's per-example norms equal brute force's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = CheckpointFirst()
    call = torch.compile(model, backend=BACKEND)
    gen = torch.Generator().manual_seed(1)
    n = 6
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = PerExampleNorms(call)
        withheld = []
        for step in range(1, 6):
            x = torch.randn(n, 3, 4, generator=gen)
            y = torch.randint(0, 3, (n,), generator=gen)
            model.zero_grad()
            F.cross_entropy(call(x), y, reduction="sum").backward()
            (pass_,) = engine.collect()
            if pass_.raw_sqnorms is None:
                withheld.append(step)
                continue
            with engine.paused():
                want = brute_force_sqnorms(model, x, y)
            assert torch.allclose(pass_.raw_sqnorms, want, rtol=RTOL), (pass_.raw_sqnorms, want)
        engine.remove()
    torch._dynamo.reset()
    assert withheld == [3], withheld
    warned = [str(w.message) for w in caught if "force_eager" in str(w.message)]
    assert len(warned) == 1 and "inside checkpoint(use_reentrant=False)" in warned[0], warned
    assert "a measured layer before the first checkpoint" in warned[0]


class BilinearMix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bil, self.head = nn.Linear(10, 6), nn.Bilinear(6, 10, 5), nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.bil(torch.tanh(self.a(x)), x)))


def bilinear() -> tuple[nn.Module, Callable, Batch]:
    return BilinearMix(), F.cross_entropy, mlp()[2]


def test_a_rule_that_saves_both_inputs_runs_eagerly_with_the_same_numbers() -> None:
    """``nn.Bilinear``'s rule saves its two inputs, which the traced hooks do not: one warning
    naming the layer, step 3 (the first compiled one) withheld, the others as eager."""
    history, _, _, warned = train(bilinear, "subbatch", "torch.compile")
    eager, *_ = train(bilinear, "subbatch", None)
    assert history is not None and eager is not None
    runs_eagerly = [w for w in warned if "runs eagerly" in w and "force_eager" in w]
    assert len(runs_eagerly) == 1 and "'bil' (Bilinear)" in runs_eagerly[0], warned
    assert [r["step"] for r in history if r["skipped"]] == [3]
    for got, want in zip(history, eager, strict=True):
        if got["step"] != 3:
            assert_same_norms(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["subbatch", "per_example"])
def test_examples_flattened_with_positions_run_eagerly_with_the_same_numbers(mode: str) -> None:
    """Only the eager hooks can prove from the input's history that a layer's rows are each
    example's in turn: step 3, the first compiled one, is withheld and said why, and from step
    4 on the model runs eagerly, with the eager run's numbers."""
    history, _, _, warned = train(flattened_feed_forward, mode, "torch.compile")
    eager, *_ = train(flattened_feed_forward, mode, None)
    assert history is not None and eager is not None
    withheld = [g["step"] for g, w in zip(history, eager, strict=True) if not g["sources"]]
    assert withheld == [3] and all(w["sources"] for w in eager), (history, eager)
    assert sum("force_eager" in w and "flattened" in w for w in warned) == 1, warned
    for got, want in zip(history, eager, strict=True):
        if got["step"] != 3:
            assert_same_norms(got, want)


@pytest.mark.slow
def test_an_operation_found_at_run_time_withholds_the_step_and_moves_the_hooks_out() -> None:
    """Step 3, the first compiled one, meets ``pos(…) * 0.5``: its per-example norms are withheld
    and said why, and from step 4 on the model runs eagerly."""
    history, _, _, warned = train(scaled_positions, "per_example", "torch.compile")
    eager, *_ = train(scaled_positions, "per_example", None)
    assert history is not None and eager is not None
    assert [r["step"] for r in history if "per_example" not in r["sources"]] == [3]
    assert history[2]["sqnorm_big"] == pytest.approx(eager[2]["sqnorm_big"], rel=RTOL)
    assert any("step 3" in w and "'mul'" in w for w in warned), warned
    assert sum("force_eager" in w and "'mul'" in w for w in warned) == 1, warned
    for got, want in zip(history[3:], eager[3:], strict=True):
        assert_same_norms(got, want)


@pytest.mark.slow
def test_a_structure_never_audited_is_audited_eagerly_on_the_next_step() -> None:
    """Sequences as long as the batch from step 5 on (T = N: the ambiguity the audit resolves):
    a new structure under compile withholds step 5 and runs step 6 eagerly, audited."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, loss_fn, _ = gpt()
    call = torch.compile(model, backend=BACKEND)
    tracker = GradientNoiseTracker(model, sync_every=1, per_example_fraction=1.0)
    gen = torch.Generator().manual_seed(1)
    ran_compiled = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(1, 8):
            length = T if step < 5 else N
            x = torch.randint(0, 64, (N, length), generator=gen)
            loss_fn(call(x), x).backward()
            ran_compiled.append(tracker.engine.current_pass().compiled)
            tracker.step()
            model.zero_grad()
    history = tracker.history
    tracker.remove()
    torch._dynamo.reset()
    #                 1      2      3     4      5     6      7
    assert ran_compiled == [False, False, True, False, True, False, True]
    withheld = [r["step"] for r in history if "per_example" not in r["sources"]]
    assert withheld == [5]


def test_a_tied_head_measured_alike_eager_and_compiled() -> None:
    """A head tied to its embedding takes sub-batch products in an eager model; once the model
    has run compiled, whose traced hooks merge its factors instead, its audited eager steps do
    the same, so the structures match: one compiled step waits for an audit (step 3, the first
    compiled), not every other one."""
    torch._dynamo.reset()
    model = tiny_gpt2(layers=1).double()
    call = torch.compile(model, backend=BACKEND)
    tracker = GradientNoiseTracker(model, sync_every=1)
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(8):
            ids = torch.randint(0, 30, (8, 16), generator=gen)  # 16 rows per sub-batch
            call(input_ids=ids, labels=ids).loss.backward()
            tracker.step()
            model.zero_grad()
    history = tracker.history
    tracker.remove()
    torch._dynamo.reset()
    withheld = [r["step"] for r in history if "subbatch" not in r["sources"]]
    assert withheld == [3], withheld


def test_audited_steps_force_eager_and_give_the_stance_back() -> None:
    """The stance is force_eager from tracker.step() before an audited step to the one after it,
    and the user's own stance is restored then (and by remove())."""
    from torch._dynamo import eval_frame

    model = nn.Linear(3, 2)
    with torch.compiler.set_stance("eager_on_recompile"):
        tracker = GradientNoiseTracker(model, per_example_fraction=1.0)
        stances = [eval_frame._stance.stance]
        for _ in range(3):
            model(torch.randn(4, 3)).square().mean().backward()
            tracker.step()
            model.zero_grad()
            stances.append(eval_frame._stance.stance)
        tracker.remove()
        stances.append(eval_frame._stance.stance)
    user = "eager_on_recompile"
    # before steps 1, 2 (audited), 3, 4 (audited), after remove()
    assert stances == ["force_eager", "force_eager", user, "force_eager", user]


def sequence_mlp() -> tuple[nn.Module, Callable, Batch]:
    """A first layer without bias on input data (its output needs a gradient only through the
    weight: sub-batch products must still give the weight one), an in-place activation on a
    tapped output, a Linear at T positions per example (sub-batch products)."""
    model = nn.Sequential(nn.Linear(6, 16, bias=False), nn.ReLU(inplace=True), nn.Linear(16, 3))

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (out.mean(1) - y).pow(2).sum(1).mean()

    def batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(N, T, 6, generator=gen), torch.randn(N, 3, generator=gen)

    return model, loss, batch


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["subbatch", "per_example"])
def test_a_first_layer_without_bias_under_compile(mode: str) -> None:
    history, breaks, graphs, warned = train(sequence_mlp, mode, "torch.compile")
    plain_breaks, plain_graphs = _untracked(sequence_mlp, "torch.compile")
    eager, *_ = train(sequence_mlp, mode, None)
    assert (breaks, graphs, warned) == (plain_breaks, plain_graphs, [])
    assert history is not None and eager is not None
    assert_same_numbers(history, eager)


@pytest.mark.slow
def test_a_product_layer_s_bias_comes_with_its_weight_in_the_graph(monkeypatch) -> None:
    """In the compiled backward too, the bias of a layer with sub-batch products gets its
    gradient with the weight's (``noisescale::weight_bias_grad``), as in eager steps; the
    numbers are the eager ones."""
    seen = []
    original = PerExampleNorms.on_weight_grad

    def spy(self, site, token, x, d, weight, bias):
        seen.append(bias is not None)
        return original(self, site, token, x, d, weight, bias)

    monkeypatch.setattr(PerExampleNorms, "on_weight_grad", spy)
    history, _, _, warned = train(sequence_mlp, "subbatch", "torch.compile")
    assert warned == [] and history is not None
    assert True in seen, seen  # the Linear(16, 3) at T positions; the first layer has no bias
    monkeypatch.undo()
    eager, *_ = train(sequence_mlp, "subbatch", None)
    assert_same_numbers(history, eager)


@pytest.mark.slow
def test_a_graph_compiled_before_the_tracker_is_recompiled() -> None:
    """Dynamo does not guard on module hooks by default: a graph compiled before the tracker's
    hooks existed keeps running without them. The first compiled step that ran it is withheld,
    the compiled code is reset, and the steps after it run the hooks inside the graph."""
    gc.collect()
    torch._dynamo.reset()
    # Dynamo's default, as in a fresh process (an earlier tracker in this one turned the guards on)
    torch._dynamo.config.skip_nnmodule_hook_guards = True
    torch.manual_seed(0)
    model, loss_fn, batch = gpt()
    call = torch.compile(model, backend=BACKEND)
    gen = torch.Generator().manual_seed(1)
    x, y = batch(gen)
    loss_fn(call(x), y).backward()  # compiled before the tracker exists
    model.zero_grad()
    ran_compiled = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracker = GradientNoiseTracker(model, sync_every=1, per_example_fraction=1.0)
        for _ in range(STEPS + 1):
            x, y = batch(gen)
            loss_fn(call(x), y).backward()
            ran_compiled.append(tracker.engine.current_pass().compiled)
            tracker.step()
            model.zero_grad()
    history = tracker.history
    tracker.remove()
    torch._dynamo.reset()
    assert [r["step"] for r in history if "per_example" not in r["sources"]] == [3]
    assert ran_compiled == [False, False, False, False, True, True]


@pytest.mark.parametrize("mode", ["subbatch", "per_example"])
@pytest.mark.parametrize("called", ["torch.compile(model)", "a compiled function"])
def test_a_penalty_switched_on_at_a_compiled_step_is_refused_there(mode: str, called: str) -> None:
    """The tracker given the model, the user calling ``torch.compile(model)`` (or a compiled
    function that calls it): the model-level hooks run inside the graph, and its passes had no
    span of autograd sequence numbers, so the walk of the loss (which refuses a parameter read
    outside the forward) did not run: a penalty switched on at step 6, a compiled step between
    the audits of 4 and 8, read 33% off at steps 6 and 7 without a word until 2026-12-07 (the
    audit of step 8 refused it)."""
    from noisescale.errors import UnsupportedModuleError

    torch.manual_seed(0)
    model, loss_fn, batch = mlp()
    call = (
        torch.compile(model, backend=BACKEND)
        if called == "torch.compile(model)"
        else torch.compile(lambda x: model(x), backend=BACKEND)
    )
    gen = torch.Generator().manual_seed(1)
    compiled, steps = [], 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracker = GradientNoiseTracker(model, **MODES[mode])
        try:
            with pytest.raises(UnsupportedModuleError, match=r"\['2.weight'\] read outside"):
                for step in range(1, 9):
                    steps = step
                    x, y = batch(gen)
                    loss = loss_fn(call(x), y)
                    if step >= 6:
                        loss = loss + 0.5 * model[2].weight.pow(2).sum()
                    loss.backward()
                    compiled.append(tracker.engine.current_pass().compiled)
                    tracker.step()
                    model.zero_grad()
        finally:
            tracker.remove()
            torch._dynamo.reset()
    assert steps == 6
    assert compiled[2] and compiled[4]  # (steps 3 and 5 ran the compiled graph)
