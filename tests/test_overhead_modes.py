"""The measurement modes of bench/overhead.py are exact and agree with each other.

* exact per-example norms of the benchmark's models (small versions) equal a brute-force loop
  over examples to 1e-3 relative in float32, and both conv forms (grouped-convolution
  materialised, in chunks, and Gram) to 1e-9 in float64;
* ``per_example_fraction`` measures exactly the brute-force norms of the rows it draws, the same
  rows for every layer (fallback modules included), a fresh subset each pass, without touching
  training's random stream, and the subset mean is unbiased;
* on one training run every mode's B_simple lies inside the exact mode's interval and the exact
  one inside each mode's.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import noisescale
from noisescale.errors import NoiseScaleInputError
from noisescale.per_example import PerExampleNorms
from noisescale.per_example import conv as conv_module
from noisescale.reference_models import GPT, GPTConfig, PaperCNN

pytestmark = pytest.mark.usefixtures("gc_frozen")  # (tests/conftest.py)


def _load_bench(script: str = "overhead", register: bool = True):
    """``bench/<script>.py`` as a module (``register``: in ``sys.modules``, where dataclasses
    look their module up while building)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{script}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{script}", path)
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[f"bench_{script}"] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def brute_force(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss) -> torch.Tensor:
    """|∇θ ℓ_i|² by one backward pass per example."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(loss(model(x[i : i + 1]), y[i : i + 1]).sum(), params)
        out.append(sum(g.double().pow(2).sum() for g in grads))
    return torch.stack(out)


def exact(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss) -> torch.Tensor:
    with noisescale.per_example_sqnorms(model) as pe:
        loss(model(x), y).mean().backward()
    return pe.sqnorms.double()


def _small_models():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(5, 1, 28, 28, generator=g), torch.randint(0, 10, (5,), generator=g)
    rgb = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)
    tokens = torch.randint(0, 50, (4, 9), generator=g)
    cfg = GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, d_model=32)
    return [
        pytest.param(lambda: PaperCNN(dropout=0.0), images, bench.image_loss, id="paper-cnn"),
        pytest.param(
            lambda: GPT(cfg),
            (tokens[:, :-1], tokens[:, 1:]),
            bench.sequence_loss,
            id="gpt",
        ),
        pytest.param(lambda: bench.ResNetGN((8, 16, 16)), rgb, bench.image_loss, id="resnet-gn"),
    ]


@pytest.mark.parametrize(("build", "batch", "loss"), _small_models())
def test_exact_norms_of_bench_models_match_brute_force_fp32(build, batch, loss):
    torch.manual_seed(0)
    model = build()
    x, y = batch
    truth = brute_force(model, x, y, loss)
    measured = exact(model, x, y, loss)
    assert torch.allclose(measured, truth, rtol=1e-3, atol=0)


@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        # L·(CK+O) ≥ CK·O, and the per-example weight is larger than an example's input and
        # output: grouped-convolution gradients in chunks of one example
        (nn.Conv1d(8, 8, 7, padding=3), (5, 8, 12)),
        (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="circular"), (5, 4, 7, 7)),
        (nn.Conv3d(2, 3, 2, dilation=(1, 2, 1)), (5, 2, 4, 5, 3)),
        # small feature map, many channels: the Gram form
        (nn.Conv2d(16, 16, 3, padding=1), (5, 16, 3, 3)),
        (nn.Conv2d(16, 16, 3, padding=1, groups=4), (5, 16, 3, 3)),
    ],
    ids=["chunked-1d", "grouped-circular-2d", "dilated-3d", "gram", "gram-groups"],
)
@pytest.mark.parametrize("floor", [0, None], ids=["chunks", "floor"])
def test_conv_forms_match_brute_force_float64(conv, shape, floor, monkeypatch):
    # floor 0: chunks bounded by the layer's input/output alone (one example each here);
    # the default floor builds these small layers' gradients in one grouped convolution
    if floor is not None:
        monkeypatch.setattr(conv_module, "_CHUNK_FLOOR", floor)
    calls = []
    grads = conv_module.per_example_weight_grads
    monkeypatch.setattr(
        conv_module,
        "per_example_weight_grads",
        lambda m, x, d: calls.append(x.shape[0]) or grads(m, x, d),
    )
    conv = conv.double()
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.zeros(shape[0])

    def loss(out, _):
        return out.flatten(1).sin().sum(1)

    assert torch.allclose(exact(conv, x, y, loss), brute_force(conv, x, y, loss), rtol=1e-9)
    if calls:  # the materialised form: every example once, in chunks or all at once
        assert sum(calls) == shape[0]
        out_numel = conv(x).numel()
        chunk = max(1, max(x.numel(), out_numel) // conv.weight.numel())
        assert len(calls) == (math.ceil(shape[0] / chunk) if floor == 0 else 1)
    if floor == 0 and conv.kernel_size == (7,):
        assert len(calls) == shape[0]  # the chunks of one example this case is here for


class _WithFallback(nn.Module):
    """A closed-form layer, an attention module (torch.func fallback) and an embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        return self.out(self.attn(h, h, h, need_weights=False)[0] + h)


def test_subset_norms_are_those_of_the_drawn_rows():
    torch.manual_seed(0)
    model = _WithFallback().double()
    idx = torch.randint(0, 11, (8, 5))
    y = torch.zeros(8)

    def loss(out, _):
        return out.flatten(1).pow(2).mean(1)

    truth = brute_force(model, idx, y, loss)
    engine = PerExampleNorms(model, per_example_fraction=0.25)
    loss(model(idx), y).mean().backward()
    (pass_,) = engine.collect()
    assert pass_.rows is not None and pass_.rows.numel() == 2  # ⌈0.25·8⌉
    # undo the mean over the pass's 8 examples and the importance weights (each ≤ 2)
    assert bool((pass_.row_weights <= 2.0 + 1e-12).all())
    measured = pass_.raw_sqnorms * 8**2 / pass_.row_weights
    assert torch.allclose(measured, truth[pass_.rows], rtol=1e-9)


def test_subset_is_fresh_each_pass_unbiased_and_leaves_training_rng_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(8, 6), torch.randn(8, 2)
    with noisescale.per_example_sqnorms(model) as pe:
        F.mse_loss(model(x), y).backward()
    all_rows = pe.sqnorms

    engine = PerExampleNorms(model, per_example_fraction=1 / 8)
    draws, rows, estimates = 2000, [], []
    rng_before = torch.get_rng_state()
    for _ in range(draws):
        F.mse_loss(model(x), y).backward()
        (pass_,) = engine.collect()
        rows.append(int(pass_.rows))
        estimates.append(float(pass_.raw_sqnorms.sum()) * 8**2)  # one row; undo the mean
    assert torch.equal(torch.get_rng_state(), rng_before)  # the engine drew from its own generator
    # every example can be drawn, the larger gradients more often: the draws follow
    # q_i = ½/8 + ½·|δ_i|²/Σ|δ|² (δ the output gradient), Pearson χ² with 7 degrees of freedom
    # below its 0.999 quantile, 24.3
    delta2 = (model(x) - y).detach().pow(2).sum(1)
    q = 0.5 / 8 + 0.5 * delta2 / delta2.sum()
    counts = torch.bincount(torch.tensor(rows), minlength=8).double()
    assert ((counts - draws * q) ** 2 / (draws * q)).sum() < 24.3
    # the weighted single-row draws estimate the mean over all rows (Hansen–Hurwitz; 4 s.e.)
    est = torch.tensor(estimates, dtype=torch.float64)
    assert abs(float(est.mean()) - float(all_rows.mean())) < 4 * float(est.std()) / math.sqrt(draws)


def test_importance_draws_find_the_few_examples_that_carry_the_noise():
    """Late-training shape: 2 of 64 examples have gradients 100× the rest. A uniform 1-of-16
    subset misses them most steps; the importance draws catch them, with a far smaller spread."""
    torch.manual_seed(0)
    model = nn.Linear(10, 3)
    x = torch.randn(64, 10)
    y = model(x).detach()
    y[:2] += 100.0  # two badly fitted examples
    with noisescale.per_example_sqnorms(model, loss_reduction="sum") as pe:
        F.mse_loss(model(x), y, reduction="sum").backward()
    truth = pe.sqnorms
    engine = PerExampleNorms(model, per_example_fraction=1 / 16)
    estimates = []
    for _ in range(500):
        F.mse_loss(model(x), y, reduction="sum").backward()
        (pass_,) = engine.collect()
        estimates.append(float(pass_.raw_sqnorms.mean()))
    est = torch.tensor(estimates, dtype=torch.float64)
    assert abs(float(est.mean()) - float(truth.mean())) < 4 * float(est.std()) / math.sqrt(500)
    # the spread of a uniform 4-row mean, drawn without replacement, in closed form
    n, k = 64, 4
    uniform_sd = float(truth.std()) / math.sqrt(k) * math.sqrt((n - k) / (n - 1))
    assert float(est.std()) < uniform_sd / 3


def test_tracker_rejects_a_fraction_outside_zero_one():
    model = nn.Linear(3, 2)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(NoiseScaleInputError, match="per_example_fraction"):
            noisescale.GradientNoiseTracker(model, per_example_fraction=bad)


def _modes_run(seed: int, steps: int = 150) -> dict[str, noisescale.NoiseEstimate]:
    """One training run (4 accumulation micro-batches per step) watched by four trackers."""
    torch.manual_seed(seed)
    teacher = torch.randn(10, 3)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    modes = {
        "exact": noisescale.GradientNoiseTracker(model, per_example_fraction=1.0, microbatch=False),
        "subset": noisescale.GradientNoiseTracker(
            model, per_example_fraction=1 / 8, microbatch=False
        ),
        "microbatch": noisescale.GradientNoiseTracker(model, per_example=False),
        "subset+microbatch": noisescale.GradientNoiseTracker(model, per_example_fraction=1 / 8),
    }
    for _ in range(steps):
        x = torch.randn(64, 10)
        y = (x @ teacher).argmax(1)
        optimizer.zero_grad()
        for xs, ys in zip(x.chunk(4), y.chunk(4), strict=True):
            (F.cross_entropy(model(xs), ys) / 4).backward()
        for tracker in modes.values():
            tracker.step()
        optimizer.step()
    return {name: t.estimate() for name, t in modes.items()}


def test_every_mode_agrees_with_the_exact_one_within_its_interval():
    """Over 8 runs, each mode's 95% interval holds the exact mode's estimate (a mode's own
    subset or micro-batch noise is what its interval is for), and no mode is off on average."""
    runs = [_modes_run(seed) for seed in range(8)]
    for name in ("subset", "microbatch", "subset+microbatch"):
        held = sum(r[name].low <= r["exact"].b_simple <= r[name].high for r in runs)
        assert held >= 7, (name, held)  # P(≤ 6 of 8) = 1% at 95% coverage
        ratios = [r[name].b_simple / r["exact"].b_simple for r in runs]
        assert abs(sum(ratios) / len(ratios) - 1) < 0.06, (name, ratios)
    # with the micro-batch source beside it, a subset is about as precise as every example
    widths = [r["subset+microbatch"].relative_width / r["exact"].relative_width for r in runs]
    assert sum(widths) / len(widths) < 1.25 and max(widths) < 1.5, widths


def test_subset_of_an_accumulated_step_comes_from_one_micro_batch_at_a_random_position():
    """The hooks' per-example work runs once per step, not once per micro-batch, on a
    micro-batch drawn uniformly among the step's (a sampler may order them, e.g. by length)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    with noisescale.per_example_sqnorms(model) as pe:
        F.mse_loss(model(x), y).backward()
    truth = pe.sqnorms  # all 16 examples; micro-batch j holds examples 4j … 4j + 3

    engine = PerExampleNorms(model, per_example_fraction=1 / 8)
    draws, estimates, positions = 600, [], []
    for draw in range(draws):
        for xs, ys in zip(x.chunk(4), y.chunk(4), strict=True):
            (F.mse_loss(model(xs), ys) / 4).backward()
        passes = engine.collect()
        assert len(passes) == 4
        measured = [j for j, p in enumerate(passes) if p.raw_sqnorms is not None]
        assert len(measured) == 1
        (j,) = measured
        assert [p.skipped for p in passes] == [k != j for k in range(4)]
        assert all(p.grad_sqnorm is not None for k, p in enumerate(passes) if k > 0)
        # ⌈16/8⌉ = 2 rows, sized by the whole step (the first step knows only its first 4)
        rows = passes[j].rows.tolist()
        assert len(rows) == (1 if draw == 0 else 2)
        norms = passes[j].raw_sqnorms * (4 * 4) ** 2  # undo the /4 and the mean
        unweighted = norms / passes[j].row_weights
        assert torch.allclose(unweighted, truth[[4 * j + r for r in rows]], rtol=1e-5)
        positions.append(j)
        estimates.append(float(norms.mean()))
    assert engine.last_step_examples == 16
    assert positions[0] == 0  # the first step cannot know how many micro-batches follow
    counts = torch.bincount(torch.tensor(positions[1:]), minlength=4).double()
    expected = (draws - 1) / 4
    # uniform positions: Pearson χ² with 3 degrees of freedom below its 0.999 quantile, 16.3
    assert ((counts - expected) ** 2 / expected).sum() < 16.3
    # the mean over draws estimates the mean over all 16 examples (4 standard errors)
    est = torch.tensor(estimates, dtype=torch.float64)
    assert abs(float(est.mean()) - float(truth.mean())) < 4 * float(est.std()) / math.sqrt(draws)


def test_large_tensors_are_summed_to_float32_accuracy():
    """The fused CPU norm sums sequentially (1e-3 off at 1.6·10⁷ elements); ours must not."""
    from noisescale.per_example.factors import DenseFactor, sqnorm

    x = torch.randn(1 << 24, generator=torch.Generator().manual_seed(3)) + 1.0
    truth = x.double().pow(2).sum()
    assert abs(float(sqnorm(x)) / float(truth) - 1) < 1e-6
    rows = x.view(2, -1)
    per_row = DenseFactor(rows).sqnorm().double()
    assert torch.allclose(per_row, rows.double().pow(2).sum(1), rtol=1e-6, atol=0)


def test_subset_mode_resumes_exactly_from_a_state_dict():
    """The subset generators and the step size are part of the checkpoint: same draws, same
    estimates after it (with accumulation, where the measured micro-batch's subset is sized by
    the last step's examples)."""

    def train(model, tracker, optimizer, data):
        for x, y in data:
            optimizer.zero_grad()
            for xs, ys in zip(x.chunk(2), y.chunk(2), strict=True):
                (F.cross_entropy(model(xs), ys) / 2).backward()
            tracker.step()
            optimizer.step()

    g = torch.Generator().manual_seed(4)
    data = [
        (torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g))
        for _ in range(20)
    ]
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = noisescale.GradientNoiseTracker(model, per_example_fraction=1 / 4)
    # checkpoint where the next step measures the second micro-batch, not the default first
    cut = 0
    while cut < 5 or tracker.engine.subset_position == 0:
        train(model, tracker, optimizer, data[cut : cut + 1])
        cut += 1
    checkpoint = (
        {k: v.clone() for k, v in model.state_dict().items()},
        tracker.state_dict(),
    )
    train(model, tracker, optimizer, data[cut:])

    resumed = nn.Linear(5, 3)
    resumed.load_state_dict(checkpoint[0])
    again = noisescale.GradientNoiseTracker(resumed, per_example_fraction=1 / 4)
    again.load_state_dict(checkpoint[1])
    assert checkpoint[1]["subset_step_examples"] == again.engine.last_step_examples == 16
    assert checkpoint[1]["subset_position"] == again.engine.subset_position == 1
    train(resumed, again, torch.optim.SGD(resumed.parameters(), lr=0.1), data[cut:])
    assert again.estimate() == tracker.estimate()
    assert again.history == tracker.history[cut:]


def test_bench_reports_which_intervals_miss_the_exact_estimate():
    def row(method, b, low, high):
        return {"method": method, "b_simple": b, "b_simple_low": low, "b_simple_high": high}

    wl = {
        "methods": [
            {"method": "plain"},
            row("noisescale exact (all examples)", 10.0, 8.0, 12.0),
            row("noisescale subset, 1 of 16 (f=1/16)", 11.0, 9.0, 14.0),
            row("Opacus GradSampleModule", 13.0, 10.5, 15.0),
            row("gns-pytorch compute_gns", 30.0, 20.0, 40.0),  # a different quantity
            {"method": "BackPACK BatchL2Grad", "error": "failed"},
        ]
    }
    assert "outside the interval of: Opacus GradSampleModule" in bench.agreement(wl)
    wl["methods"][3] = row("Opacus GradSampleModule", 10.0, 8.0, 12.0)
    assert "inside the interval of all 2 other estimates" in bench.agreement(wl)


def test_step_with_fewer_micro_batches_than_the_drawn_position():
    """Accumulation shrinking past the drawn position: that step has no per-example subset."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2))
    tracker = noisescale.GradientNoiseTracker(model, per_example_fraction=1 / 8, sync_every=1)

    def step(micro_batches):
        model.zero_grad()
        for _ in range(micro_batches):
            loss = F.mse_loss(model(torch.randn(8, 6)), torch.randn(8, 2))
            tracker.watch_loss(loss)  # (else a step of fewer micro-batches is left out)
            loss.backward()
        tracker.step()
        return tracker.history[-1]

    step(4)
    tracker.engine.subset_position = 3  # as if the last of 4 had been drawn
    record = step(2)  # two micro-batches: the micro-batch norms still measure the step
    assert not record["skipped"] and set(record["sources"]) == {"microbatch"}
    assert tracker.engine.subset_position in (0, 1)
    tracker.engine.subset_position = 1
    with pytest.warns(RuntimeWarning, match="fewer micro-batches than the one before"):
        record = step(1)
    assert record["skipped"]
    assert tracker.engine.subset_position == 0  # one micro-batch: the next step's is measured
    assert set(step(1)["sources"]) == {"per_example"}


@pytest.mark.slow
def test_the_bench_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command itself (a merge once broke its main() for every run without --compile)."""
    argv = [
        "overhead.py",
        "--workload",
        "gpt",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--no-memory",
        "--out",
    ]
    monkeypatch.setattr(sys, "argv", [*argv, str(tmp_path)])
    bench.main()
    result = json.loads((tmp_path / "overhead-cpu.json").read_text())
    rows = {r["method"]: r for r in result["workloads"][0]["methods"]}
    assert rows["plain"]["time_ratio"] == 1.0
    assert rows["noisescale sub-batches (default)"]["time_ratio"] > 0


def _steady_module():
    return _load_bench("steady", register=False)


def test_the_steady_state_bench_leaves_out_the_engine_s_audited_steps():
    from noisescale.per_example.pass_checks import _audit_scheduled

    steady = _steady_module()
    assert [s for s in range(1, 5000) if steady.audited(s)] == [
        s for s in range(1, 5000) if _audit_scheduled(s)
    ]


@pytest.mark.slow
def test_the_steady_state_bench_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    steady = _steady_module()
    argv = ["steady.py", "--workload", "gpt", "--steps", "61", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    steady.main()
    result = json.loads((tmp_path / "steady-cpu.json").read_text())
    modes = result["workloads"][0]["modes"]
    assert modes["plain"]["steady_ratio"] == modes["plain"]["early_ratio"] == 1.0
    assert modes["default"]["steady_ratio"] > 0 and modes["exact"]["early_ratio"] > 0
    assert "| GPT" in (tmp_path / "steady-cpu.md").read_text()
    monkeypatch.setattr(sys, "argv", ["steady.py", "--steps", "30"])
    with pytest.raises(SystemExit, match="at least 61"):
        steady.main()


def test_the_steady_state_bench_s_width_sets_the_models_sizes(monkeypatch: pytest.MonkeyPatch):
    """``--width``: the transformers models' hidden size and the ResNet's widths (width/8,
    width/4, width/2) — how the cost moves with model size; the defaults stay the CPU sizes."""
    pytest.importorskip("transformers")
    ob = _steady_module().ob
    cpu = torch.device("cpu")
    for name in ("hf-gpt2", "hf-llama", "hf-vit"):
        config = ob.make_workload(name, True, 1, cpu, 64).model().model.config
        assert config.hidden_size == 64, name
        assert ob.make_workload(name, True, 1, cpu).model().model.config.hidden_size == 128
    wide, default = (ob.make_workload("resnet-gn", True, 1, cpu, w).model() for w in (256, None))
    assert [m.out_channels for m in wide.modules() if isinstance(m, nn.Conv2d)][:1] == [32]
    assert [m.out_channels for m in default.modules() if isinstance(m, nn.Conv2d)][:1] == [16]
    assert "(32, 64, 128)" in ob.make_workload("resnet-gn", True, 1, cpu, 256).description
    steady = _steady_module()
    monkeypatch.setattr(sys, "argv", ["steady.py", "--width", "40"])
    with pytest.raises(SystemExit, match="multiple of 32"):
        steady.main()


def test_the_steady_state_bench_leaves_out_compiled_steps_that_run_eagerly():
    """Compiled, the unmeasured steps just before an audited measured step run eagerly (the
    stance is held from the step before an audit): with measure_every=4 the measured steps 1,
    5, 13, 29, 61 are audited (measured steps 1, 2, 4, 8, 16)."""
    steady = _steady_module()
    eager = [s for s in range(1, 70) if steady.eager_before_audit(s, 4)]
    assert eager == [2, 3, 4, 10, 11, 12, 26, 27, 28, 58, 59, 60]
    assert not any(steady.eager_before_audit(s, 1) for s in range(1, 70))


@pytest.mark.slow
def test_the_compiled_bench_runs_the_plain_step_compiled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--compile``: the methods run one at a time, so no tracker's audit (whose force_eager
    stance is process-wide) runs the plain step eagerly — taking turns step by step, trackers
    built up front held it from their creation on."""
    import gc

    from torch._dynamo import eval_frame

    from noisescale.per_example import compiled

    # a tracker an earlier test left unreferenced but not removed holds the stance until it is
    # collected; one still referenced is let go of (as in tests/test_compile.py)
    gc.collect()
    for key in list(compiled._HOLDING):
        compiled._release(key)
    stances = []
    real_step = bench.Plain.step

    def step(self, x, y):
        stances.append(eval_frame._stance.stance)
        return real_step(self, x, y)

    monkeypatch.setattr(bench.Plain, "step", step)
    argv = ["overhead.py", "--workload", "gpt", "--steps", "3", "--warmup", "1", "--no-memory"]
    argv += ["--compile", "--backend", "aot_eager", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    result = json.loads((tmp_path / "overhead-cpu-compile.json").read_text())
    rows = {r["method"]: r for r in result["workloads"][0]["methods"]}
    assert not any("error" in r for r in rows.values()), rows
    assert rows["noisescale sub-batches (default)"]["time_ratio"] > 0
    assert stances and set(stances) == {"default"}, stances  # plain and plain accum×4


def _precision_module():
    path = Path(__file__).resolve().parents[1] / "bench" / "precision.py"
    spec = importlib.util.spec_from_file_location("bench_precision", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_precision"] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def test_the_precision_bench_s_truth_is_every_example_s_gradient():
    """bench/precision.py's truth (torch.func over the whole pool) against a loop of one
    backward per example: |G|² of the mean gradient and tr Σ = E|g_i|² − |G|²."""
    bench = _precision_module()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(50, 5, dtype=torch.float64), torch.randint(0, 3, (50,))

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(out, target, reduction="none")

    truth = bench._truth(model, (x, y), loss_fn, chunk=16)
    grads = []
    for i in range(50):
        model.zero_grad()
        loss_fn(model(x[i : i + 1]), y[i : i + 1]).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    g = torch.stack(grads)
    g2 = float(g.mean(0).pow(2).sum())
    trace = float(g.pow(2).sum(1).mean()) - g2
    assert truth["g2"] == pytest.approx(g2, rel=1e-10)
    assert truth["trace_sigma"] == pytest.approx(trace, rel=1e-10)
    assert truth["b_simple"] == pytest.approx(trace / g2, rel=1e-10)


def test_the_precision_bench_runs_measure_every_by_step_number():
    """A mode with measure_every=2 through the precision bench: its history has the measured
    steps only (1, 3, 5, …), read by step number, and a time per step from both kinds."""
    bench = _precision_module()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    case = bench.Case(
        "tiny",
        "tiny MLP",
        model,
        (x, y),
        lambda out, t: torch.nn.functional.cross_entropy(out, t, reduction="none"),
        8,
        {"b_simple": 1.0},
    )
    out = bench.run_mode(case, {"measure_every": 2}, steps=12, seed=0)
    assert out["time"] > 0
    steps = [r[0] for r in out["history"]]
    assert steps == list(range(1, 13, 2))
    # a history with gaps is read by step number: after 4 steps, step 3's record
    gaps = [(1, 10.0, 5.0, 20.0), (3, 11.0, 6.0, 21.0), (5, 12.0, 7.0, 22.0)]
    assert bench._at(gaps, 4) == (11.0, 6.0, 21.0)
    assert bench._at(gaps, 5) == (12.0, 7.0, 22.0)


def _long_module():
    return _load_bench("long_sequences", register=False)


def test_the_long_sequence_bench_leaves_out_the_audited_steps_and_runs_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """bench/long_sequences.py: its audited steps are the engine's (within its steps), and a
    run writes both result files with a ratio from the unaudited steps (its real models take
    seconds a step: a small GPT stands in for them here)."""
    from noisescale.per_example.pass_checks import _audit_scheduled

    long = _long_module()
    assert [s for s in range(1, 5000) if long.audited(s)] == [
        s for s in range(1, 5000) if _audit_scheduled(s)
    ]
    cfg = GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, d_model=16)

    def small(name):
        def draw(gen):
            ids = torch.randint(0, 64, (4, 8), generator=gen)
            return ids, ids

        return GPT(cfg), f"small {name}", draw

    monkeypatch.setattr(long, "build", small)
    monkeypatch.setattr(sys, "argv", ["long_sequences.py", "--workload", "gpt2", "--steps", "20",
                                      "--out", str(tmp_path)])  # fmt: skip
    long.main()
    result = json.loads((tmp_path / "long-sequences-cpu.json").read_text())
    (row,) = result["rows"]
    assert row["workload"] == "gpt2" and row["ratio"] == row["default_s"] / row["plain_s"] > 0
    assert "| small gpt2 |" in (tmp_path / "long-sequences-cpu.md").read_text()
    monkeypatch.setattr(sys, "argv", ["long_sequences.py", "--steps", "10"])
    with pytest.raises(SystemExit, match="at least 20"):
        long.main()
