"""measure_every=m: one step in m measured, the others plain and only counted.

The measured steps' numbers must be exactly those of a tracker that saw only those steps (the
same passes, the same random sub-batches): the unmeasured steps may change nothing but the step
numbers and the running totals of examples and tokens, which must count every step. The
unmeasured steps must do no measuring work, keep the misuse checks and survive a checkpoint in
the middle of a cycle; under DDP and FSDP2 every process counts them alike. Compiled models:
tests/test_compile.py (test_measure_every_compiled).
"""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import noisescale
from noisescale import GradientNoiseTracker, NoiseScaleInputError
from noisescale.per_example import PerExampleNorms
from noisescale.per_example import subbatch as subbatch_mod
from test_subbatch import tiny_gpt2

pytestmark = pytest.mark.usefixtures("float64_default")

M = 3
STEPS = 10  # measured: 1, 4, 7, 10


class Sequence(nn.Module):
    """A Linear over 8 positions per example: its weight takes the sub-batch products."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 16)
        self.norm = nn.LayerNorm(16)
        self.down = nn.Linear(16, 3)

    def forward(self, x):
        return self.down(torch.tanh(self.norm(self.up(x)))).mean(1)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


MODES = {
    "subbatches": ({}, 1),
    "every example": ({"per_example_fraction": 1.0}, 1),
    "subset": ({"per_example_fraction": 0.25}, 1),
    "micro-batches": ({"per_example": False}, 2),
    "subbatches, accumulation": ({}, 2),
}


def _run(make, kwargs, micro, how, steps=STEPS, state=None):
    """Train ``steps`` steps; ``how``: "every" (measure_every=M) or "paused" (a plain tracker
    that sees only the steps measure_every=M measures: the others run inside paused() and do
    not call step())."""
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = GradientNoiseTracker(
        model, measure_every=M if how == "every" else 1, sync_every=2, **kwargs
    )
    g = torch.Generator().manual_seed(1)
    shape = (8, 6) if isinstance(model, Sequence) else (6,)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        tracker.load_state_dict(state["tracker"])
        g.set_state(state["data"])
        start = tracker.steps
    for step in range(start + 1, steps + 1):
        measured = (step - 1) % M == 0
        paused = how == "paused" and not measured
        opt.zero_grad()
        for _ in range(micro):
            x = torch.randn(16, *shape, generator=g)
            y = torch.randint(0, 3, (16,), generator=g)
            with tracker.paused() if paused else contextlib.nullcontext():
                (F.cross_entropy(model(x), y) / micro).backward()
        if not paused:
            tracker.step()
        opt.step()
    return tracker, model, g


def _numbers(tracker):
    keys = ("b_big", "sqnorm_big", "g2", "trace_sigma", "b_simple", "b_simple_low")
    return [
        [h[k] for k in keys] + [s[k] for s in h["sources"].values() for k in sorted(s)]
        for h in tracker.history
    ]


@pytest.mark.parametrize("name", list(MODES))
@pytest.mark.parametrize("make", [_mlp, Sequence], ids=["mlp", "sequence"])
def test_measured_steps_equal_a_tracker_that_saw_only_them(name, make):
    kwargs, micro = MODES[name]
    every, _, _ = _run(make, kwargs, micro, "every")
    only, _, _ = _run(make, kwargs, micro, "paused")
    assert _numbers(every) == _numbers(only)  # bit for bit: the same passes, the same draws
    assert every.estimate() == only.estimate()
    assert [h["step"] for h in every.history] == [1, 4, 7, 10]
    assert [h["step"] for h in only.history] == [1, 2, 3, 4]
    # every step's examples counted, the unmeasured ones at the next measured step
    assert [h["examples"] for h in every.history] == [16 * micro * s for s in (1, 4, 7, 10)]
    assert [h.get("unmeasured_steps") for h in every.history] == [None, 2, 2, 2]
    assert every.steps == STEPS and every.examples == 16 * micro * STEPS


def test_unmeasured_steps_do_no_measuring_work(monkeypatch):
    """No sub-batch product, and no layer hook even asks for the pass it would record into
    (they return at their first check), on an unmeasured step."""
    calls, asked = [], []
    real = subbatch_mod.linear_subbatch_grads
    monkeypatch.setattr(
        subbatch_mod,
        "linear_subbatch_grads",
        lambda *a, **k: calls.append(1) or real(*a, **k),
    )
    hook_pass = PerExampleNorms._hook_pass
    monkeypatch.setattr(
        PerExampleNorms, "_hook_pass", lambda self: asked.append(1) or hook_pass(self)
    )
    torch.manual_seed(0)
    model = Sequence()
    plain = copy.deepcopy(model)  # (before the tracker's hooks)
    tracker = GradientNoiseTracker(model, measure_every=M)
    per_step, asks = [], []
    for step in range(1, 8):
        x, y = torch.randn(16, 8, 6), torch.randint(0, 3, (16,))
        before, asked_before = len(calls), len(asked)
        for m in (model, plain):
            m.zero_grad()
            F.cross_entropy(m(x), y).backward()
        # the same gradients as without a tracker (the weights never ran detached)
        for p, q in zip(model.parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0)
        per_step.append(len(calls) - before)
        asks.append(len(asked) - asked_before)
        assert tracker.engine.idle == (step % M != 1 and M > 1)
        tracker.step()
    measured = [(s - 1) % M == 0 for s in range(1, 8)]
    assert [n > 0 for n in per_step] == measured
    assert [n > 0 for n in asks] == measured


def test_tokens_of_unmeasured_steps_are_counted():
    model = tiny_gpt2(1)
    tracker = GradientNoiseTracker(model, measure_every=2, sync_every=1)
    g = torch.Generator().manual_seed(0)
    total_tokens, seen = 0, []
    for step in range(1, 6):
        ids = torch.randint(0, 30, (4, 9), generator=g)
        labels = ids.clone()
        labels[:, : step % 4] = -100  # a different number of counted tokens at every step
        model.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        # the loss shifts the labels by one: the first position never counts
        total_tokens += int((labels[:, 1:] != -100).sum())
        seen.append(total_tokens)
        tracker.step()
    history = tracker.history
    assert [h["step"] for h in history] == [1, 3, 5]
    assert [h["tokens_seen"] for h in history] == [seen[0], seen[2], seen[4]]
    assert [h["examples"] for h in history] == [4, 12, 20]
    assert history[-1]["tokens_per_example"] == pytest.approx(seen[4] / 20, rel=1e-12)


@pytest.mark.parametrize("micro", [1, 2])
def test_unmeasured_steps_count_every_forward_of_a_backward(micro):
    """A batch of 6 sent through the model in two forwards under one backward
    (``torch.cat([model(x[:2]), model(x[2:])])``), in ``micro`` accumulation micro-batches,
    each beside an evaluation forward of 5 with gradients on that no backward reaches: an
    unmeasured step counts the 6 examples of both forwards, and none of the evaluation's.
    Until 2026-12-07 the parameters' gradients went to the step's last forward alone there:
    examples [6, 16, 26] for [6, 18, 30] (and the evaluation's 5 taken for the 4 where it ran
    last), tokens_seen short by as much, without a word (a hunt)."""
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = GradientNoiseTracker(
        model, measure_every=2, sync_every=1, per_example_fraction=1.0, tokens_per_example=10
    )
    for _ in range(5):
        opt.zero_grad()
        for _ in range(micro):
            x, y = torch.randn(6, 6), torch.randint(0, 3, (6,))
            out = torch.cat([model(x[:2]), model(x[2:])])
            model(torch.randn(5, 6))  # an evaluation forward with gradients on
            (F.cross_entropy(out, y) / micro).backward()
        tracker.step()
        opt.step()
    history = tracker.history
    assert [h["step"] for h in history] == [1, 3, 5]
    assert [h["examples"] for h in history] == [6 * micro * s for s in (1, 3, 5)]
    assert [h["tokens_seen"] for h in history] == [60 * micro * s for s in (1, 3, 5)]
    assert tracker.examples == 30 * micro  # what the integrations hand a batch-size schedule


def test_examples_trained_counts_every_step_at_once():
    """``tracker.examples_trained`` is every step's examples so far, measured or not (batches
    of 3 to 8 under measure_every=3), also after a checkpoint inside a cycle; ``examples``
    counts the unmeasured ones only with the next measured step. What the integrations hand a
    batch-size schedule: until 2026-12-07 the callbacks counted micro-batches ×
    micro_batch_size, every smaller batch whole (a hunt)."""
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = GradientNoiseTracker(model, measure_every=3, sync_every=4)
    done, folded, state = 0, 0, None
    for step in range(1, 9):
        b = 3 + step % 6
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(b, 6)), torch.randint(0, 3, (b,))).backward()
        tracker.step()
        opt.step()
        done += b
        folded = done if step % 3 == 1 else folded  # measured: 1, 4, 7
        assert (tracker.examples_trained, tracker.examples) == (done, folded)
        if step == 5:
            state = tracker.state_dict()
    resumed = GradientNoiseTracker(model, measure_every=3)
    resumed.load_state_dict(state)
    assert resumed.examples_trained == sum(3 + s % 6 for s in range(1, 6))


@pytest.mark.parametrize("every", [1, 4])
def test_examples_trained_reads_nothing_from_the_device(every):
    """``examples_trained`` is read by the callbacks at every step of a schedule: on one
    process it counts from the host (batch shapes), so the only host reads are the tracker's
    own every ``sync_every`` measured steps. Until 2026-12-07 it synced at every access: 64
    reads in 64 steps where there were 2, each a stall of an accelerator's queue (a review)."""
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = GradientNoiseTracker(model, measure_every=every, sync_every=8)
    reads, read = [0], tracker._read

    def counted(pending):
        reads[0] += 1
        return read(pending)

    tracker._read = counted
    done = 0
    for step in range(1, 33):
        b = 3 + step % 6
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(b, 6)), torch.randint(0, 3, (b,))).backward()
        tracker.step()
        opt.step()
        done += b
        assert tracker.examples_trained == done
    assert reads[0] == 32 // every // 8  # the sync_every reads only
    tracker.sync()  # the same count once everything is folded
    assert tracker.examples_trained == done


class _ReturnsItsTemperature(nn.Module):
    """A model that returns a Parameter of its own beside its logits, ``(logits, self.T)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()
        self.t = nn.Parameter(torch.tensor(1.3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(x), self.t


def test_unmeasured_steps_count_a_model_returning_a_parameter_once():
    """The model returns its temperature Parameter, the loss reads logits / T, beside an
    evaluation forward of 5 with gradients on: the Parameter's node is every forward's, and
    the hooks an unmeasured step put on its outputs noted every pass at each backward — history
    examples [12, 46, 80] for [12, 36, 60] (a review of 2026-12-07's fix above, before it
    landed)."""
    torch.manual_seed(0)
    model = _ReturnsItsTemperature()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tracker = GradientNoiseTracker(model, measure_every=2, sync_every=1, per_example_fraction=1.0)
    for _ in range(5):
        opt.zero_grad()
        for _ in range(2):
            x, y = torch.randn(6, 6), torch.randint(0, 3, (6,))
            model(torch.randn(5, 6))  # an evaluation forward with gradients on
            logits, t = model(x)
            (F.cross_entropy(logits / t, y) / 2).backward()
        tracker.step()
        opt.step()
    assert [h["examples"] for h in tracker.history] == [12, 36, 60]
    assert tracker.examples == 60


def test_a_checkpoint_inside_a_cycle_resumes_exactly():
    kwargs, micro = MODES["subbatches"]
    whole, _, _ = _run(Sequence, kwargs, micro, "every", steps=STEPS)
    # stop after step 5 (the cycle's second step: one unmeasured step carried), resume
    half, model, g = _run(Sequence, kwargs, micro, "every", steps=5)
    state = {"model": model.state_dict(), "tracker": half.state_dict(), "data": g.get_state()}
    assert state["tracker"]["unmeasured"] == [1, 16, None]
    resumed, _, _ = _run(Sequence, kwargs, micro, "every", steps=STEPS, state=state)
    # (a resumed engine audits its first step: sums in another order, a few rounding errors)
    for got, want in zip(_numbers(resumed), _numbers(whole)[-2:], strict=True):
        assert got == pytest.approx(want, rel=1e-12)
    assert [h["step"] for h in resumed.history] == [7, 10]
    assert [h["examples"] for h in resumed.history] == [16 * 7, 16 * 10]
    assert resumed.estimate().b_simple == pytest.approx(whole.estimate().b_simple, rel=1e-12)


def test_misuse_is_still_refused_on_unmeasured_steps():
    torch.manual_seed(0)
    model = _mlp()
    tracker = GradientNoiseTracker(model, measure_every=2)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    tracker.step()  # measured
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    tracker.step()  # unmeasured
    with pytest.raises(NoiseScaleInputError, match="once per optimizer step"):
        tracker.step()


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2"])
def test_measure_every_must_be_a_positive_integer(bad):
    with pytest.raises(NoiseScaleInputError, match="measure_every must be a positive integer"):
        GradientNoiseTracker(_mlp(), measure_every=bad)


def test_data_parallel_in_one_process(tmp_path):
    """DDP over one gloo process (two processes: tests/test_distributed.py): the unmeasured
    step's examples go through the step's all-reduce; a constructor refusal under DDP leaves
    no hook on the model."""
    dist = pytest.importorskip("torch.distributed")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        model = nn.parallel.DistributedDataParallel(_mlp())
        with pytest.raises(NoiseScaleInputError, match="not supported under data parallelism"):
            GradientNoiseTracker(model, groups=True, measure_every=2)
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        tracker = GradientNoiseTracker(model, measure_every=2, sync_every=1)
        for _ in range(5):
            model.zero_grad()
            F.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
            tracker.step()
        assert [h["step"] for h in tracker.history] == [1, 3, 5]
        assert [h["examples"] for h in tracker.history] == [8, 24, 40]
        tracker.remove()
    finally:
        dist.destroy_process_group()


def test_dataset_size_corrects_the_data_parallel_source_and_measured_steps(tmp_path):
    """dataset_size= under DDP (one gloo process) with measure_every=2: each measured step's
    |G|² and tr Σ, resolved from the all-reduced sums, are the uncorrected run's corrected for
    draws without replacement from N — |G|² + tr Σ/N and tr Σ·(N − 1)/N — on the same batches."""
    from noisescale.estimators import finite_population

    dist = pytest.importorskip("torch.distributed")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        runs = []
        for size in (None, 50):
            torch.manual_seed(1)  # (the same model in both runs)
            model = nn.parallel.DistributedDataParallel(_mlp())
            tracker = GradientNoiseTracker(model, measure_every=2, sync_every=1, dataset_size=size)
            g = torch.Generator().manual_seed(0)
            for _ in range(5):
                model.zero_grad()
                x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
                F.cross_entropy(model(x), y).backward()
                tracker.step()
            runs.append([(h["step"], h["g2"], h["trace_sigma"]) for h in tracker.history])
            tracker.remove()
        plain, fixed = runs
        assert [s for s, _, _ in fixed] == [1, 3, 5]
        for (_, g2, tr), (_, g2_fixed, tr_fixed) in zip(plain, fixed, strict=True):
            want = finite_population(g2, tr, 50)
            assert (g2_fixed, tr_fixed) == pytest.approx(tuple(map(float, want)), rel=1e-9)
            assert tr_fixed == pytest.approx(tr * 49 / 50, rel=1e-9) and g2_fixed > g2
    finally:
        dist.destroy_process_group()


def test_the_readme_example_runs():
    """The README's two lines for a long run."""
    model = _mlp()
    tracker = noisescale.GradientNoiseTracker(model, measure_every=4)
    for _ in range(8):
        model.zero_grad()
        F.cross_entropy(model(torch.randn(32, 6)), torch.randint(0, 3, (32,))).backward()
        tracker.step()
    assert [h["step"] for h in tracker.history] == [1, 5]


def test_a_report_counts_the_unmeasured_steps(tmp_path):
    """The report's run (steps and examples between the first and last estimate) from a
    history with gaps in its step numbers: every step trained counts."""
    from noisescale.report import data

    torch.manual_seed(0)
    model = _mlp()
    path = tmp_path / "history.jsonl"
    tracker = GradientNoiseTracker(model, measure_every=3, history_path=path, beta=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        model.zero_grad()
        x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
        F.cross_entropy(model(x), y).backward()
        tracker.step()
    tracker.sync()
    run = data.run_cost(data.trajectory(data.load_history(path)))
    assert run.last_step == 40 and (run.last_step - run.first_step) % 3 == 0
    assert run.examples == 32 * (run.last_step - run.first_step)


@pytest.mark.parametrize("world", [1, 2])
def test_unmeasured_steps_do_not_count_toward_sync_every(world, monkeypatch):
    """measure_every=4, sync_every=4, 12 steps (3 measured): the host reads nothing during the
    steps, in one process and under data parallelism alike (torch's fake process group of 2,
    the hand-averaged source). Until 2026-12-06 a data-parallel tracker's unmeasured steps
    counted toward sync_every: m times as many host reads (2 blocking syncs here, 0 in one
    process; a review)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    reads = []
    sync = GradientNoiseTracker.sync
    monkeypatch.setattr(GradientNoiseTracker, "sync", lambda t: reads.append(1) or sync(t))
    if world > 1:
        assert not dist.is_initialized()
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        torch.manual_seed(0)
        model = _mlp()
        group = dist.group.WORLD if world > 1 else None
        tracker = GradientNoiseTracker(model, measure_every=4, sync_every=4, process_group=group)
        for _ in range(12):
            x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
            F.cross_entropy(model(x), y).backward()
            tracker.step()
            model.zero_grad()
        assert reads == []
        assert [h["step"] for h in tracker.history] == [1, 5, 9]
        assert len(reads) == 1
    finally:
        if world > 1:
            dist.destroy_process_group()


def test_a_record_spanning_a_length_change_converts_b_noise_by_its_own_steps_tokens(tmp_path):
    """measure_every=3, 4 sequences a step of 5 tokens to step 5 and 9 after: the record at
    step 7 counts steps 5–7 (its running counts mix 4 and 8 labels a sequence), but its
    measured step, 7, counted 8 a sequence, and it records that step's own ``tokens`` and
    ``tokens_examples``. A BNoiseTracker's B_noise at step 7 in tokens is 8 times its value
    per example; it was refused until 2026-12-08 (the record's own count "not known"), though
    the record holds it. The hand count: labels shifted by one, (length − 1) a sequence."""
    from noisescale.branch import read_b_noise
    from noisescale.report.data import load_history

    path = tmp_path / "h.jsonl"
    model = tiny_gpt2(1)
    tracker = GradientNoiseTracker(model, measure_every=3, sync_every=1, history_path=path)
    g = torch.Generator().manual_seed(0)
    own = {}
    for step in range(1, 11):
        length = 5 if step <= 5 else 9
        ids = torch.randint(0, 30, (4, length), generator=g)
        model.zero_grad()
        model(input_ids=ids, labels=ids.clone()).loss.backward()
        own[step] = length - 1
        tracker.step()
    tracker.sync()
    history = load_history(path)
    assert history.step.tolist() == [1, 4, 7, 10]
    assert (history.tokens / history.tokens_examples).tolist() == [4, 4, 8, 8]
    record = {"step": 7, "ghg": 2.0, "trace_h_sigma": 300.0}
    (point,) = read_b_noise([record], history, "tokens")
    assert point.trace_h_sigma == pytest.approx(own[7] * 300.0, rel=1e-12)
    assert point.b_noise == pytest.approx(own[7] * 150.0, rel=1e-12)
    # a history without the step's own counts (written before) is refused, as it was
    for r in (lines := path.read_text().splitlines()[1:]):
        assert '"tokens_examples"' in r
    stripped = tmp_path / "old.jsonl"
    old = [json.loads(r) for r in lines]
    for r in old:
        r.pop("tokens_examples")
    stripped.write_text("\n".join([path.read_text().splitlines()[0], *map(json.dumps, old)]) + "\n")
    with pytest.raises(NoiseScaleInputError, match="measure_every=1"):
        read_b_noise([record], load_history(stripped), "tokens")
