"""Sums in 16 bits that the coverage check compared with autograd's (a hunt, 2026-12-05).

The coverage check adds each parameter's per-example gradients up and compares the sum with
the gradient autograd computed. Two sums were wrong-cause refusals in bfloat16 — a step refused
partway through a run, blaming a missed use or a penalty:

* a bias's per-example gradient summed over positions in 16 bits was rounded per example, and
  where the examples' gradients cancel (a value head near its optimum) their sum missed
  autograd's, accumulated in float32, by more than the tolerance: 8 audits in 100 refused or
  withheld in bf16, 2 under bf16 autocast. The rules now sum in float32;
* torch's CPU embedding backward adds a row read many times up in 16 bits (bf16: 4.9% off at
  1,024 reads, 14% at 16,384): BERT in bf16 was refused over ``token_type_embeddings``. Such a
  table is compared with a tolerance of 25%, and a refusal names this cause too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from noisescale.errors import UnsupportedModuleError
from noisescale.per_example import PerExampleNorms


class ValueHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, T, 8] -> one value an example
        return self.b(torch.tanh(self.a(x))).mean((1, 2))


@pytest.mark.parametrize("form", ["bf16 model", "bf16 autocast"])
def test_a_bias_whose_examples_cancel_is_not_refused_in_16_bits(form):
    torch.manual_seed(0)
    model = ValueHead()
    if form == "bf16 model":
        model = model.to(torch.bfloat16)
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(1)
    for trial in range(40):
        x, y = torch.randn(16, 6, 8, generator=gen), torch.randn(16, generator=gen)
        engine = PerExampleNorms(model)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=form == "bf16 autocast"):
                out = model(x.to(dtype))
            (out.float() - y).pow(2).mean().backward()
            (p,) = engine.collect()
            assert p.withheld is None, (trial, p.withheld)
            # within bf16 rounding of one backward per example in the same dtype
            params = list(model.parameters())
            with engine.paused():
                want = []
                for i in range(16):
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=form != "bf16 model"):
                        o = model(x[i : i + 1].to(dtype))
                    grads = torch.autograd.grad((o.float() - y[i]).pow(2).sum() / 16, params)
                    want.append(sum(g.float().pow(2).sum() for g in grads))
            torch.testing.assert_close(
                p.raw_sqnorms.float(), torch.stack(want), rtol=3e-2, atol=1e-6
            )
        finally:
            engine.remove()
            model.zero_grad()


class Table(nn.Module):
    def __init__(self, penalty: float = 0.0) -> None:
        super().__init__()
        self.emb, self.head, self.penalty = nn.Embedding(4, 32), nn.Linear(32, 3), penalty

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids))).mean(1)


def test_a_bf16_embedding_read_many_times_is_measured_and_a_missed_use_still_refused():
    """4 rows each read about 256 times: autograd's bf16 gradient of the table is 12% off a
    float64 sum (torch's CPU backward adds the rows up in 16 bits) — refused until 2026-12-05,
    measured now, within bf16 rounding. A penalty on the table added to the loss (a use the
    engine cannot attribute) is still refused, the message naming both causes."""
    torch.manual_seed(0)
    ids = torch.randint(0, 4, (16, 64))
    y = torch.randint(0, 3, (16,))
    model = Table().to(torch.bfloat16)
    engine = PerExampleNorms(model)
    try:
        F.cross_entropy(model(ids).float(), y).backward()
        (p,) = engine.collect()
        assert p.raw_sqnorms is not None, p.withheld
        params = list(model.parameters())
        with engine.paused():
            want = torch.stack([
                sum(
                    g.double().pow(2).sum()
                    for g in torch.autograd.grad(
                        F.cross_entropy(model(ids[i : i + 1]).float(), y[i : i + 1]) / 16,
                        params,
                    )
                )
                for i in range(16)
            ])  # fmt: skip
        torch.testing.assert_close(p.raw_sqnorms.double(), want, rtol=3e-2, atol=0)

        def penalised() -> None:
            model.zero_grad()
            penalty = 0.5 * model.emb.weight.float().pow(2).sum()
            (F.cross_entropy(model(ids).float(), y) + penalty).backward()

        # (as in float32: the first such step is withheld while the engine looks for a direct
        # use in the forward, the next refused)
        penalised()
        (p,) = engine.collect()
        assert p.raw_sqnorms is None and "emb.weight" in p.withheld
        penalised()
        with pytest.raises(UnsupportedModuleError, match=r"'emb\.weight'") as err:
            engine.collect()
        assert "16 bits on the CPU" in str(err.value)
    finally:
        engine.remove()
