"""A batch that holds each example several times (repeated augmentation, views made with
``repeat_interleave``) is not a set of independent draws: README "Known limits". The pairs of
copies count as pairs of different examples, so the unbiased |G|² gains (m − 1)/(B − 1)·tr Σ
and B_simple reads B/(1 + B/(B − 1)) for m = 2 — checked here against that closed form, and
the documented way out (``per_example=False`` on micro-batches holding whole groups of copies,
B_simple in rows: twice the distinct examples' for m = 2) against the distinct run.

A frozen MLP (lr = 0) on a linear teacher: every run estimates the same population, so the
runs differ only by the estimator and the sampling noise (intervals of ≈ ±3% after 400 steps).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import noisescale

B, STEPS = 64, 400


def _run(copies: int, micro: int, **kw) -> noisescale.NoiseEstimate:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 10))
    teacher = torch.randn(20, 10)
    tracker = noisescale.GradientNoiseTracker(model, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(B // copies, 20, generator=g)
        y = (x @ teacher + 0.5 * torch.randn(B // copies, 10, generator=g)).argmax(1)
        x, y = x.repeat_interleave(copies, 0), y.repeat_interleave(copies, 0)
        for xm, ym in zip(x.chunk(micro), y.chunk(micro), strict=True):
            (F.cross_entropy(model(xm), ym) / micro).backward()
        tracker.step()
        model.zero_grad()
    return tracker.estimate()


@pytest.fixture(scope="module")
def distinct() -> noisescale.NoiseEstimate:
    return _run(1, 1)


@pytest.mark.parametrize("kw", [{}, {"per_example_fraction": 1.0}], ids=["default", "exact"])
def test_copies_in_one_batch_cap_b_simple_as_the_closed_form_says(distinct, kw):
    copied = _run(2, 1, **kw)
    predicted = distinct.b_simple / (1 + distinct.b_simple / (B - 1))  # (m − 1)/(B − 1) tr Σ
    assert copied.low <= predicted <= copied.high
    assert copied.high < distinct.low  # wrong by about half here, without a word
    assert copied.trace_sigma == pytest.approx(distinct.trace_sigma, rel=0.05)  # tr Σ unbiased


def test_micro_batches_of_whole_copy_groups_measure_b_simple_in_rows(distinct):
    rows = _run(2, 4, per_example=False)  # each micro-batch: 8 examples, twice each
    # a row of a copy carries half an example: twice the distinct examples' B_simple
    assert rows.low <= 2 * distinct.b_simple <= rows.high
    assert rows.low > distinct.high  # not the distinct examples' B_simple: a different unit


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Dropout(0.1))
        self.heads = nn.ModuleList([nn.Linear(32, 10), nn.Linear(32, 10)])

    def forward(self, x: torch.Tensor, head: int = 0, mask: torch.Tensor | None = None):
        h = self.body(x)
        return self.heads[head](h if mask is None else h * mask[:, None])


def _same_input_twice(form: str, model: _TwoHeads, x: torch.Tensor, y: torch.Tensor):
    if form == "multi-sample dropout":  # one batch, two dropout masks, losses summed
        return F.cross_entropy(model(x), y) + F.cross_entropy(model(x), y)
    if form == "two heads in turn":
        return F.cross_entropy(model(x, head=0), y) + F.cross_entropy(model(x, head=1), y)
    if form == "a view of the batch":
        return F.cross_entropy(model(x), y) + F.cross_entropy(model(x.view(x.shape)), y)
    if form == "the batch indexed again":  # buf[idx] for each forward (an actor-critic's)
        return F.cross_entropy(model(x[torch.arange(16)], head=0), y) + F.cross_entropy(
            model(x[torch.arange(16)], head=1), y
        )
    if form == "a copy beside the same mask":  # model(ids, att), model(ids.clone(), att)
        mask = torch.ones(x.shape[0])
        return F.cross_entropy(model(x, mask=mask), y) + F.cross_entropy(
            model(x.clone(), head=1, mask=mask), y
        )
    # a copy (equal values, another tensor)
    return F.cross_entropy(model(x), y) + F.cross_entropy(model(x.clone()), y)


FORMS = ["multi-sample dropout", "two heads in turn", "a view of the batch"]


@pytest.mark.parametrize("kw", [{}, {"per_example_fraction": 1.0}], ids=["default", "exact"])
@pytest.mark.parametrize(
    "form",
    [
        *FORMS,
        "a copy",
        "the batch indexed again",
        "a copy beside the same mask",
    ],
)
def test_one_backward_through_the_same_input_twice_is_refused(form, kw):
    """The same input tensor through two forwards that one backward runs through: each
    example's gradient is the sum of its two rows', and a merged pass took the 2N rows for 2N
    independent examples — measured without a word until 2026-12-04. Refused from the first
    step, with the records before it kept. Equal values in another tensor (a copy, the batch
    indexed again for each head) are refused on the audits' steps, where values are compared
    (until 2026-12-06 they were measured as 2N rows: an actor-critic's heads each fed
    buf[idx] read B_simple 15.9 for a truth of 7.2, a hunt); two augmented views, whose values
    differ, cannot be told from two batches (documented). A copy of the ids beside the very
    same attention mask (an actor-critic's second forward) made the comparison give up until
    2026-12-06: 2N rows, tr Σ 82% high (a hunt)."""
    torch.manual_seed(0)
    model = _TwoHeads()
    tracker = noisescale.GradientNoiseTracker(model, **kw)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 20, generator=g), torch.randint(0, 10, (16,), generator=g)
    F.cross_entropy(model(x), y).backward()  # one step of one forward, recorded
    tracker.step()
    model.zero_grad()
    _same_input_twice(form, model, x, y).backward()  # (step 2: audited)
    with pytest.raises(noisescale.NoiseScaleInputError, match="on the same input tensor"):
        tracker.step()
    assert len(tracker.history) == 1


@pytest.mark.parametrize("kw", [{}, {"per_example": False}], ids=["default", "micro-batches"])
def test_the_same_input_in_two_accumulated_backwards_is_refused(kw):
    """Two backwards of one step, one per forward, on one batch — a task head each: the same
    examples in two micro-batches, which the step takes for two independent draws of 16
    (with per-example norms, 32 examples). Refused, in every mode."""
    torch.manual_seed(0)
    model = _TwoHeads().eval()
    tracker = noisescale.GradientNoiseTracker(model, **kw)
    x, y = torch.randn(16, 20), torch.randint(0, 10, (16,))
    for head in (0, 1):
        (F.cross_entropy(model(x, head=head), y) / 2).backward()
    with pytest.raises(noisescale.NoiseScaleInputError, match="backward passes of one step"):
        tracker.step()
    assert tracker.history == []


def test_equal_inputs_in_two_accumulated_backwards_are_not_taken_for_the_same_examples():
    """Equal values in two micro-batches, a backward each, may be independent draws (a sampler
    with replacement at small batches draws one example twice) or other examples whose labels
    differ: values are compared within one backward only (a review found a first version
    refusing both: the same examples fed to two heads this way stay a documented limit)."""
    torch.manual_seed(0)
    model = _TwoHeads().eval()
    tracker = noisescale.GradientNoiseTracker(model, per_example_fraction=1.0)
    x = torch.randn(16, 20)
    for y in (torch.randint(0, 10, (16,)), torch.randint(0, 10, (16,))):
        (F.cross_entropy(model(x.clone()), y) / 2).backward()
    tracker.step()  # (step 1: audited, values compared)
    assert [r["examples"] for r in tracker.history] == [32]


def test_an_input_buffer_refilled_in_place_between_micro_batches_is_other_examples():
    """One input tensor refilled with ``copy_`` for each micro-batch (a static buffer, as
    CUDA-graph loops keep): the same storage at another version holds other examples, and the
    step is measured — exactly as with two tensors."""
    torch.manual_seed(0)
    model = _TwoHeads().eval()
    tracker = noisescale.GradientNoiseTracker(model, per_example_fraction=1.0)
    g = torch.Generator().manual_seed(1)
    xs, y = torch.randn(2, 16, 20, generator=g), torch.randint(0, 10, (16,), generator=g)
    buffer = torch.empty(16, 20)
    for x in xs:
        buffer.copy_(x)
        (F.cross_entropy(model(buffer), y) / 2).backward()
    tracker.step()
    model.zero_grad()
    for x in xs:
        (F.cross_entropy(model(x), y) / 2).backward()
    tracker.step()
    first, second = tracker.history
    assert second["examples"] - first["examples"] == first["examples"] == 32
    assert first["sqnorm_big"] == pytest.approx(second["sqnorm_big"], rel=1e-12)
    assert first["sources"].keys() == second["sources"].keys() == {"per_example", "microbatch"}
    for name, source in first["sources"].items():
        assert source == pytest.approx(second["sources"][name], rel=1e-12)


class _Scaled(nn.Module):
    """A model given a tensor that is not the batch before it: a time, a prompt."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 20)
        self.fc = nn.Linear(20, 10)

    def forward(self, first: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if first.dtype == torch.long:  # a prompt expanded over the batch
            return self.fc(x + self.emb(first).mean(1))
        return self.fc(x * first)  # a 0-dim time shared by the examples


@pytest.mark.parametrize(
    "form",
    [
        "0-dim time first",
        "prompt expanded first",
        "saliency probe",
        "inference tensors",
        "equal masks first",
    ],
)
def test_the_same_input_check_leaves_correct_loops_alone(form):
    """What the review of 2026-12-04 found the first version refused: two micro-batches of
    other examples given the same tensor that is not the batch (a 0-dim time, a prompt
    expanded over the batch: the examples are read from the batch, and a row broadcast to
    every example is none); a saliency probe's backward to the input on the training batch
    (it reaches no parameter); batches made under ``torch.inference_mode()`` (they have no
    version counter: it crashed) — and a new tensor on one reused numpy buffer per micro-batch,
    which numpy refills without a version (taken for other examples) — and, since values are
    compared on the audits' steps (2026-12-06), micro-batches whose first argument is an equal
    all-ones mask and whose batches differ."""
    import numpy as np

    torch.manual_seed(0)
    model = _Scaled()
    tracker = noisescale.GradientNoiseTracker(model)
    g = torch.Generator().manual_seed(1)
    t, prompt = torch.tensor(0.5), torch.randint(0, 10, (1, 4))
    buffer = np.zeros((16, 20), dtype=np.float32)
    for _ in range(3):
        for _ in range(2):
            x, y = torch.randn(16, 20, generator=g), torch.randint(0, 10, (16,), generator=g)
            if form == "inference tensors":
                with torch.inference_mode():
                    x = x * 1.0
                buffer[:] = x.numpy()
                x = torch.from_numpy(buffer)
            first = prompt.expand(16, -1) if form == "prompt expanded first" else t
            if form == "equal masks first":  # an all-ones mask per micro-batch: equal values
                first = torch.ones(16, 20)
            if form == "saliency probe":  # on the training batch itself
                x.requires_grad_()
                torch.autograd.grad(model(t, x).sum(), x)
            (F.cross_entropy(model(first, x), y) / 2).backward()
        tracker.step()
        model.zero_grad()
    assert [r["examples"] for r in tracker.history] == [32, 64, 96]
