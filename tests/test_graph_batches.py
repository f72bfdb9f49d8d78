"""Batches of graphs: the examples are graphs, dim 0 of the model's first tensor its nodes.

A graph classifier is called as ``model(x, edge_index, batch)`` (PyTorch Geometric's style)
or ``model(data)``: its layers hold nodes in dim 0, which the per-example hooks refuse, and
``per_example=False`` counted the nodes as the examples until 2026-12-06 — B_simple and tr Σ in
nodes, 5× too large with graphs of 5 nodes, without a word (a hunt). ``examples=`` tells the
tracker how many a call holds; every number then equals eq. A.2 over graphs, by brute force.
The message-passing model here is written by hand (PyG is not a dependency of the tests).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import noisescale

pytestmark = pytest.mark.usefixtures("float64_default")


class GraphClassifier(nn.Module):
    """One round of mean-aggregation message passing, a mean pool per graph, a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.msg, self.upd, self.head = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x, edge_index, batch):
        if isinstance(x, Graphs):
            x, edge_index, batch = x.x, x.edge_index, x.batch
        src, dst = edge_index
        agg = torch.zeros(x.shape[0], 4).index_add(0, dst, self.msg(x)[src])
        deg = torch.zeros(x.shape[0]).index_add(0, dst, torch.ones(dst.shape[0])).clamp(min=1)
        h = torch.relu(agg / deg[:, None] + self.upd(x))
        graphs = int(batch.max()) + 1
        pooled = torch.zeros(graphs, 4).index_add(0, batch, h)
        counts = torch.zeros(graphs).index_add(0, batch, torch.ones(batch.shape[0]))
        return self.head(pooled / counts[:, None])


@dataclasses.dataclass
class Graphs:
    """A batch of graphs as one object (PyG's ``Batch``: ``num_graphs`` a Python int)."""

    x: torch.Tensor
    edge_index: torch.Tensor
    batch: torch.Tensor
    y: torch.Tensor
    num_graphs: int


def graphs(g: torch.Generator, sizes: list[int]) -> Graphs:
    xs, edges, owner, at = [], [], [], 0
    for i, n in enumerate(sizes):
        xs.append(torch.randn(n, 3, generator=g))
        edges.append(torch.randint(0, n, (2, 2 * n), generator=g) + at)
        owner.append(torch.full((n,), i))
        at += n
    y = torch.randint(0, 2, (len(sizes),), generator=g)
    return Graphs(torch.cat(xs), torch.cat(edges, 1), torch.cat(owner), y, len(sizes))


def sqnorm(model: nn.Module) -> torch.Tensor:
    return sum(p.grad.pow(2).sum() for p in model.parameters())


@pytest.mark.parametrize("call", ["tensors", "object"])
def test_graphs_counted_by_examples_equal_eq_a2_over_graphs(call):
    """Four micro-batches of 3 graphs each (5–9 nodes a graph): |G|² and tr Σ of every step
    equal eq. A.2 with B_small = 3 graphs, B_big = 12, computed by brute force."""
    model = GraphClassifier()
    if call == "tensors":
        count = lambda args, kwargs: int(args[2].max()) + 1  # noqa: E731

        def forward(m, b):
            return m(b.x, b.edge_index, b.batch)
    else:
        count = lambda args, kwargs: args[0].num_graphs  # noqa: E731

        def forward(m, b):
            return m(b, None, None)

    tracker = noisescale.GradientNoiseTracker(model, per_example=False, examples=count)
    g = torch.Generator().manual_seed(3)
    k, per = 4, 3
    try:
        for _ in range(3):
            micro = [
                graphs(g, torch.randint(5, 10, (per,), generator=g).tolist()) for _ in range(k)
            ]
            model.zero_grad()
            for b in micro:
                (F.cross_entropy(forward(model, b), b.y) / k).backward()
            big = sqnorm(model)
            tracker.step()
            twin, small = copy.deepcopy(model), []
            for b in micro:
                twin.zero_grad()
                F.cross_entropy(forward(twin, b), b.y).backward()
                small.append(sqnorm(twin))
            s = torch.stack(small).mean()
            bs, bb = per, k * per
            want_g2 = (bb * big - bs * s) / (bb - bs)
            want_tr = (s - big) / (1 / bs - 1 / bb)
            rec = tracker.history[-1]
            assert rec["b_big"] == bb
            assert rec["g2"] == pytest.approx(float(want_g2), rel=1e-9)
            assert rec["trace_sigma"] == pytest.approx(float(want_tr), rel=1e-9)
    finally:
        tracker.remove()


def test_examples_goes_with_micro_batch_norms_and_is_checked():
    model = GraphClassifier()
    with pytest.raises(noisescale.NoiseScaleInputError, match="per_example=False"):
        noisescale.GradientNoiseTracker(model, examples=lambda a, k: 3)
    with pytest.raises(noisescale.NoiseScaleInputError, match="must be a function"):
        noisescale.GradientNoiseTracker(model, per_example=False, examples=3)
    tracker = noisescale.GradientNoiseTracker(
        model, per_example=False, examples=lambda a, k: "three"
    )
    b = graphs(torch.Generator().manual_seed(0), [5, 6])
    with pytest.raises(noisescale.NoiseScaleInputError, match="returned 'three'"):
        model(b.x, b.edge_index, b.batch)
    tracker.remove()


def test_a_graph_object_without_examples_names_the_option():
    """``model(data)`` has no tensor argument to count along: the refusal names examples=."""
    model = GraphClassifier()
    b = graphs(torch.Generator().manual_seed(0), [5, 6])
    with noisescale.GradientNoiseTracker(model, per_example=False):
        with pytest.raises(noisescale.NoiseScaleInputError, match="examples=lambda"):
            model(b, None, None)
