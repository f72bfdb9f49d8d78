"""torch.compile, continued from ``tests/test_compile.py`` (its helpers, models and tolerance):
the ``transformers`` models whose parameters their own module uses directly (Llama's RMSNorm,
ViT's class token and position table), inductor's own kernels, and ``measure_every`` under
compile — measured and unmeasured steps traced into graphs of their own.

A file of its own so that pytest-xdist's workers, which take one file at a time, can run it
beside ``tests/test_compile.py``: Dynamo's tracing makes the two ≈ 200 s each on this project's
2-core machine, which in one file set the whole suite's length.
"""

from __future__ import annotations

import functools
import math
import shutil
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from noisescale.per_example import PerExampleNorms
from test_compile import (  # (the autouse fixture too: a tracker left over gives the stance back)
    Batch,
    N,
    T,
    _eager,
    _no_tracker_left_over,  # noqa: F401
    _tokens,
    _untracked,
    assert_same_norms,
    assert_same_numbers,
    gpt,
    gpt2,
    layer_scale,
    mlp,
    train,
)
from test_subbatch import tiny_gpt2

pytestmark = pytest.mark.usefixtures("float64_default")


def llama() -> tuple[nn.Module, Callable, Batch]:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    _, loss, batch = gpt2()
    return transformers.LlamaForCausalLM(config), loss, batch


def vit() -> tuple[nn.Module, Callable, Batch]:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=10, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip

    def loss(out: Any, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.logits, y)

    def batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(N, 3, 8, 8, generator=gen), torch.randint(0, 10, (N,), generator=gen)

    return transformers.ViTForImageClassification(config), loss, batch


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["subbatch", "per_example"])
@pytest.mark.parametrize("factory", [llama, vit], ids=["llama", "vit"])
def test_parameters_used_directly_in_their_module(factory: Callable, mode: str) -> None:
    """Llama's RMSNorm (``weight * x``), ViT's class token (``expand``) and position table
    (``x + table``): parameters their own module uses directly, followed inside the graph."""
    history, breaks, graphs, warned = train(factory, mode, "torch.compile")
    plain_breaks, plain_graphs = _untracked(factory, "torch.compile")
    eager, *_ = train(factory, mode, None)
    assert (breaks, warned) == (plain_breaks, [])
    assert graphs <= max(plain_graphs, 1)
    assert history is not None and eager is not None
    assert_same_numbers(history, eager)


@pytest.mark.slow
@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="inductor needs C++"
)
def test_inductor() -> None:
    """The compiler users run: inductor generates its own kernels for the forward and the
    backward, and may reuse a buffer once its last reader is done — so what the engine keeps of
    a tensor an event handed it (the first of two uses of a tied weight) must be its own."""
    history, breaks, _, warned = train(gpt2, "per_example", "torch.compile", backend="inductor")
    # the graph breaks are Dynamo's, counted while it traces, before any backend sees a graph:
    # the untracked baseline compiled with aot_eager (shared with test_measure_every_compiled)
    # breaks where inductor's would
    plain_breaks, _ = _untracked(gpt2, "torch.compile")
    eager = _eager("gpt2", "per_example")
    assert (breaks, warned) == (plain_breaks, [])
    assert history is not None and eager is not None
    assert_same_numbers(history, eager)  # (measured: 2e-16 apart, inductor's own kernels)


class LabelledGPT2(nn.Module):
    """A transformers GPT-2 computing its own loss from ``labels=``: the loss is a mean over
    tokens, which the tracker counts."""

    def __init__(self) -> None:
        super().__init__()
        self.lm = tiny_gpt2(layers=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, labels=ids).loss


def labelled_gpt2() -> tuple[nn.Module, Callable, Batch]:
    return LabelledGPT2(), lambda loss, _: loss, _tokens(30)


@functools.cache
def _eager_every(factory: Callable, mode: str, every: int, steps: int) -> list[dict[str, Any]]:
    history, *_ = train(factory, mode, None, steps=steps, measure_every=every)
    assert history is not None
    return history


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["subbatch", "per_example"])
@pytest.mark.parametrize("factory", [mlp, gpt2], ids=["mlp", "gpt2"])
def test_measure_every_compiled(factory: Callable, mode: str) -> None:
    """measure_every=3 on a compiled model: the unmeasured steps run a graph of their own, with
    no hook in it but the one that opens and counts their pass (Dynamo guards the graphs on the
    engine's state, which the hooks read while tracing). No graph break, one graph more than
    without the tracker, and every record — the measured steps' norms and estimates, the
    examples and tokens of the steps between them — the same as eager's. Measured steps 1, 4,
    7, 10, 13; of those 1, 4 and 10 are audited and run eagerly, with the unmeasured steps just
    before them (the stance is held from the step before an audit); steps 5–7 and 11–13 run
    compiled, unmeasured and measured."""
    history, breaks, graphs, warned = train(
        factory, mode, "torch.compile", steps=13, measure_every=3
    )
    plain_breaks, plain_graphs = _untracked(factory, "torch.compile")
    assert breaks == plain_breaks
    assert max(plain_graphs, 1) < graphs <= 2 * max(plain_graphs, 1), (graphs, plain_graphs)
    assert not warned, warned
    assert history is not None
    assert [r["step"] for r in history] == [1, 4, 7, 10, 13]
    assert_same_numbers(history, _eager_every(factory, mode, 3, 13), records=5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["subbatch", "per_example"])
def test_measure_every_with_blocks_compiled_one_by_one(mode: str) -> None:
    """The reference GPT with each block compiled by itself: the model's own hook runs eagerly
    and opens the unmeasured steps' passes, the blocks' traced hooks record nothing on them (a
    second graph per block) — the same records as eager."""
    history, breaks, graphs, warned = train(gpt, mode, "blocks", steps=13, measure_every=3)
    assert breaks == 0 and not warned, (breaks, warned)
    assert graphs >= 2, graphs  # a measured and an unmeasured graph (the blocks share them)
    assert history is not None
    assert_same_numbers(history, _eager_every(gpt, mode, 3, 13), records=5)


@pytest.mark.slow
@pytest.mark.parametrize("style", ["torch.compile", "model.compile"])
def test_measure_every_on_a_model_the_traced_hooks_do_not_follow(style: str) -> None:
    """A directly used parameter with measure_every=3: as with every step measured, the model
    runs eagerly while it is measured and says so; ``torch.compile(model)`` is seen when its
    graph first runs on a measured step — step 7 (steps 1 and 4 are audited, eagerly) — and
    that step is withheld. Every step's examples are counted."""
    history, _, _, warned = train(layer_scale, "per_example", style, steps=13, measure_every=3)
    eager = _eager_every(layer_scale, "per_example", 3, 13)
    assert history is not None
    runs_eagerly = [w for w in warned if "runs eagerly" in w and "force_eager" in w]
    assert len(runs_eagerly) == 1 and "'gamma'" in runs_eagerly[0], warned
    withheld = [7] if style == "torch.compile" else []
    assert [r["step"] for r in history] == [1, 4, 7, 10, 13]
    assert [r["step"] for r in history if "per_example" not in r["sources"]] == withheld
    for got, want in zip(history, eager, strict=True):
        assert got["examples"] == want["examples"]
        assert got.get("unmeasured_steps") == want.get("unmeasured_steps")
        if got["step"] not in withheld:
            assert_same_norms(got, want)


@pytest.mark.slow
def test_measure_every_compiled_counts_every_step_s_tokens() -> None:
    """A compiled transformers GPT-2 computing its loss from ``labels=`` (a mean over tokens):
    with measure_every=3 the unmeasured steps' tokens and examples are counted as eagerly. (This
    model's graph breaks inside its loss, so one compiled step meets a structure not audited
    yet and waits for an eager audit — as with every step measured.)"""
    history, *_ = train(labelled_gpt2, "subbatch", "torch.compile", steps=13, measure_every=3)
    assert history is not None
    eager = _eager_every(labelled_gpt2, "subbatch", 3, 13)
    assert [r["step"] for r in history] == [r["step"] for r in eager] == [1, 4, 7, 10, 13]
    for got, want in zip(history, eager, strict=True):
        for key in ("examples", "tokens", "tokens_seen", "unmeasured_steps"):
            assert got.get(key) == want.get(key), (got["step"], key)
    assert history[-1]["tokens_seen"] == 13 * N * (T - 1)  # every step's shifted labels
    assert history[-1]["examples"] == 13 * N
    assert math.isfinite(history[-1]["b_simple"])


def test_a_graph_for_the_other_kind_of_step_is_refused() -> None:
    """Were a graph traced for a measured step run on an unmeasured one, or the reverse (if
    Dynamo stopped guarding on the engine's state), the step is refused, not miscounted."""
    from noisescale.errors import UnsupportedModuleError

    model = nn.Linear(3, 2)
    engine = PerExampleNorms(model, subbatches=2)
    x = torch.randn(4, 3)
    for traced_idle, idle in ((0, True), (1, False)):
        engine.idle = idle
        with pytest.raises(UnsupportedModuleError, match="measure_every=1"):
            engine.on_forward_event("open", traced_idle, [x], [])
    engine.idle = True
    engine.on_forward_event("open", 1, [x], [])
    assert engine.passes[-1].idle
    # a block compiled by itself, its measured graph run in an unmeasured pass
    with pytest.raises(UnsupportedModuleError, match="traced for a measured step"):
        engine.on_forward_event("call", 0, [x], [1, 0])
    engine.remove()


_TWO_INSTANCES = """
import sys, warnings
import torch
from torch import nn
import noisescale

warnings.simplefilter("ignore")
if sys.argv[1] == "import-first":
    import torch._dynamo
def build():
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
model, copy = build(), build()
tracker = noisescale.GradientNoiseTracker(model)
call = torch.compile(model, backend="aot_eager")
other = torch.compile(copy, backend="aot_eager")
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(3):
    x = torch.randn(16, 4, 6)
    opt.zero_grad()
    other(x).pow(2).mean().backward()  # an untracked copy of the same class, compiled first
    call(x).pow(2).mean().backward()
    try:
        tracker.step()
    except noisescale.NoiseScaleInputError as err:
        print("REFUSED", err)
        raise SystemExit(0)
    opt.step()
print("MEASURED", len(tracker.history))
"""


@pytest.mark.parametrize("order", ["import-first", "tracker-first"])
def test_an_untracked_copy_compiled_too_is_told_apart_or_refused_naming_dynamo(
    order: str, tmp_path
) -> None:
    """Dynamo shares a graph between instances of one class unless told to check module hooks,
    which the tracker does once ``torch._dynamo`` is imported. With a tracker made before that,
    a copy of the model compiled first (a reference model, a teacher) hands the tracked model
    its graph without the hooks: the step is refused, naming Dynamo and the one-line fix —
    which measures. A process of its own: whether Dynamo is imported is the process's state."""
    import subprocess
    import sys

    script = tmp_path / "two.py"
    script.write_text(_TWO_INSTANCES)
    run = subprocess.run(
        [sys.executable, str(script), order], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    if order == "import-first":
        assert "MEASURED 3" in run.stdout, run.stdout
    else:
        assert "REFUSED" in run.stdout and "import torch._dynamo" in run.stdout, run.stdout
        assert "shares the graphs it compiles between instances" in run.stdout


@pytest.mark.parametrize("style", ["torch.compile", "model.compile"])
def test_a_hook_put_before_the_engine_s_mid_run_never_makes_a_compiled_step_wrong(
    style: str,
) -> None:
    """A forward hook prepended to a product layer after step 4 (a steering hook that doubles
    its output) comes between the layer and the engine's hooks. Dynamo recompiles (it guards
    the hooks); the graph traced then used the sub-batch products as the hooks were at the last
    step's end, and the weight's .grad came out 50% off. The traced hooks now read the hooks'
    order while tracing. The audit that follows learns what it cannot measure compiled, and a
    ``torch.compile(model)`` graph traced with that then opened no pass (the step was refused
    blaming the tracker's creation): the model's own hook now opens it, so that the step is
    withheld and the model runs eagerly. Every step: .grad autograd's own, and the step
    recorded exactly (as eager), withheld, or refused — as eager refuses this hook."""
    from noisescale import GradientNoiseTracker
    from noisescale.errors import NoiseScaleInputError
    from test_compile import BACKEND, _compiled

    torch._dynamo.reset()

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
        )

    def double(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out * 2

    model, reference = build(), build()
    tracker = GradientNoiseTracker(model)
    call = _compiled(model, style, BACKEND)
    gen = torch.Generator().manual_seed(3)
    recorded, refused = [], None
    try:
        for step in range(1, 12):
            if step == 5:
                model[2].register_forward_hook(double, prepend=True)
                reference[2].register_forward_hook(double)
            reference.load_state_dict(model.state_dict())
            x = torch.randn(N, T, 12, generator=gen)
            model.zero_grad()
            reference.zero_grad()
            call(x).pow(2).mean().backward()
            reference(x).pow(2).mean().backward()
            for got, want in zip(model.parameters(), reference.parameters(), strict=True):
                torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)
            try:
                tracker.step()
            except NoiseScaleInputError as err:
                refused = str(err)
                break
            record = tracker.history[-1]
            if record["sources"]:
                recorded.append(step)
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
    finally:
        tracker.remove()
        torch._dynamo.reset()
    assert refused is not None and "audit of this step failed" in refused, refused
    assert recorded == [1, 2, 3, 4]  # from step 5 on: withheld until the audit refuses


@pytest.mark.parametrize("what", ["prepended hook", "global hook", "patched forward"])
def test_a_hook_put_between_after_an_audit_withholds_the_compiled_step(what: str) -> None:
    """(A review, 2026-12-05.) Something put between a layer and the engine's hooks after the
    audits of steps 1 and 2: eager withholds step 3 (its autograd graph changed) and the audit
    of step 4 refuses; compiled, the graph Dynamo traced for the new hooks kept the audited
    signature and step 3 was recorded, its mean per-example norm 28% off. A compiled pass run
    with other hooks than the last audit saw is now withheld and the next step audited eagerly."""
    from noisescale import GradientNoiseTracker
    from noisescale.errors import NoiseScaleInputError
    from test_compile import BACKEND

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    )
    tracker = GradientNoiseTracker(model)
    call = torch.compile(model, backend=BACKEND)
    gen = torch.Generator().manual_seed(3)
    handle = None
    recorded, refused = [], None
    try:
        for step in range(1, 10):
            if step == 3:
                if what == "prepended hook":
                    handle = model[2].register_forward_hook(lambda m, a, o: o * 2, prepend=True)
                elif what == "global hook":
                    handle = torch.nn.modules.module.register_module_forward_hook(
                        lambda m, a, o: o * 2 if m is model[2] else None
                    )
                else:
                    layer = model[2]
                    layer.forward = lambda x, s=layer: nn.Linear.forward(s, x) * 2
            model.zero_grad()
            call(torch.randn(N, T, 12, generator=gen)).pow(2).mean().backward()
            try:
                tracker.step()
            except NoiseScaleInputError as err:
                refused = str(err)
                break
            if tracker.history[-1]["sources"]:
                recorded.append(step)
    finally:
        tracker.remove()
        if handle is not None:
            handle.remove()
        torch._dynamo.reset()
    assert recorded == [1, 2], recorded
    assert refused is not None and "audit of this step failed" in refused, refused


class _FrozenByNoGrad(nn.Module):
    """A submodule run under no_grad (a frozen feature extractor, its parameters still
    trainable): the compiled backward calls their hooks with no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(10, 16)
        self.head = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = self.enc(x)
        return self.head(h)


@pytest.mark.parametrize(
    "mode", [{"per_example": False}, {"per_example_fraction": 0.5}, {}], ids=str
)
def test_a_submodule_run_without_gradients_under_compile_with_accumulation(mode):
    """The compiled backward calls the hooks of parameters it gave no gradient, with None:
    until 2026-12-05 that crashed the backward (AttributeError on None.detach(), every mode,
    per_example=False from step 1) or withheld the first compiled step blaming a graph break
    and ran compiled code eagerly from then on (a hunt). Now the same records as eager."""
    import torch._dynamo

    from noisescale import GradientNoiseTracker

    histories = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = _FrozenByNoGrad()
        call = torch.compile(model, backend="aot_eager") if compiled else model
        tracker = GradientNoiseTracker(model, sync_every=1, **mode)
        gen = torch.Generator().manual_seed(1)
        try:
            for _ in range(5):
                for _ in range(2):
                    x = torch.randn(16, 10, generator=gen)
                    y = torch.randint(0, 5, (16,), generator=gen)
                    (F.cross_entropy(call(x), y) / 2).backward()
                tracker.step()
                model.zero_grad()
            histories.append([dict(r) for r in tracker.history])
            assert torch._dynamo.eval_frame._stance.stance == "default"
        finally:
            tracker.remove()
    eager, compiled_run = histories
    assert len(compiled_run) == len(eager) == 5
    for got, want in zip(compiled_run, eager, strict=True):
        if mode:
            assert_same_norms(got, want)
        else:
            # (the default, under accumulation: compiled steps split every micro-batch where
            # eager ones split one — other sub-batches, as unbiased; the step's gradient alike)
            assert got["sqnorm_big"] == pytest.approx(want["sqnorm_big"], rel=1e-9)
            assert set(got["sources"]) == set(want["sources"])


def test_a_short_batch_does_not_stop_a_compiled_model_s_subbatch_graph():
    """After a split pass whose layers' sub-batch products did not pay (a short sequence on an
    audited step), passes are measured per example; a compiled graph traced before, with
    products, ran on them — refused as a graph break that was not, and compiled code ran
    eagerly for the rest of the process (a hunt, 2026-12-05). The traced decision reads that
    state now: no step withheld, the stance back to default."""
    import torch._dynamo

    from noisescale import GradientNoiseTracker

    torch._dynamo.reset()
    torch.manual_seed(0)
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    ))  # fmt: skip
    call = torch.compile(model, backend="aot_eager")
    tracker = GradientNoiseTracker(model, sync_every=1)
    gen = torch.Generator().manual_seed(1)
    try:
        for length in (8, 8, 8, 6, 8, 8):  # step 4, audited and eager, has T = 6
            x = torch.randint(0, 64, (16, length), generator=gen)
            y = torch.randint(0, 64, (16, length), generator=gen)
            F.cross_entropy(call(x).logits.flatten(0, 1), y.flatten()).backward()
            tracker.step()
            model.zero_grad()
        assert all(r["sources"] and not r["skipped"] for r in tracker.history)
        assert torch._dynamo.eval_frame._stance.stance == "default"
    finally:
        tracker.remove()


def _outcomes(model: nn.Module, losses: list) -> list[str]:
    """Each step's outcome under one engine, a step a loss to backpropagate: "measured", the
    reason it was withheld, or "refused"."""
    from noisescale.errors import UnsupportedModuleError

    engine = PerExampleNorms(model)
    seen = []
    try:
        for loss in losses:
            model.zero_grad()
            try:
                loss().backward()
                (p,) = engine.collect()
                seen.append(p.withheld if p.raw_sqnorms is None else "measured")
            except UnsupportedModuleError:
                seen.append("refused")
    finally:
        engine.remove()
    return seen


@pytest.mark.parametrize("how", ["index", "index_add", "where"])
def test_rows_routed_by_the_data_run_eagerly_under_compile(how: str) -> None:
    """A head on rows the data picks along the examples (``h[idx]``) or puts together
    (``index_add``): an eager step reads the index or audits the rows, a compiled step cannot —
    such steps were measured as the examples under torch.compile, 78% off (a review,
    2026-12-06). The first compiled step of such a structure is withheld, naming the rows, and
    compiled code runs eagerly from then on, where a step whose rows are not the examples is
    refused."""
    from test_never_silently_wrong import _REGION_LABELS, _Regions

    model = _Regions(how)
    x = torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, backend="aot_eager")
    seen = _outcomes(
        model,
        [
            lambda owner=owner: F.cross_entropy(compiled(x, owner), _REGION_LABELS)
            for owner in ([0, 1, 2, 3],) * 3 + ([0, 0, 1, 2],)
        ],
    )
    assert seen[:2] == ["measured", "measured"]
    assert "runs on rows the data picks or puts together" in seen[2]
    assert seen[3] == "refused"


def test_rows_picked_from_flattened_tokens_run_eagerly_under_compile() -> None:
    """N·k rows picked from the examples' tokens flattened [N·T, D] and viewed back to
    [N, k, D] (DynamicViT's ``batch_index_select``): an eager step reads whether each block
    holds its own example's rows, a compiled one cannot — the first compiled step of that
    structure is withheld, naming the rows, and compiled code runs eagerly from then on, where a
    step whose picks give an example another's rows is refused (until 2026-12-06 such rows were
    taken for the examples' on every step, a hunt)."""
    from test_never_silently_wrong import _BlockPicks

    model = _BlockPicks("index")
    x = torch.randn(4, 6, 4, generator=torch.Generator().manual_seed(1))
    in_blocks = (torch.tensor([[0, 3]] * 4) + torch.arange(4)[:, None] * 6).reshape(-1)
    compiled = torch.compile(model, backend="aot_eager")
    seen = _outcomes(
        model,
        [
            lambda idx=idx: compiled(x, idx).pow(2).sum()
            for idx in (in_blocks,) * 3 + (torch.arange(8),)
        ],
    )
    assert seen[:2] == ["measured", "measured"]
    assert "runs on rows the data picks or puts together" in seen[2]
    assert seen[3] == "refused"
