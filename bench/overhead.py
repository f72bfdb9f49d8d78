"""What measuring the gradient noise scale costs, side by side with the peers, in one run.

    python bench/overhead.py --device cpu                 # this 2-core machine, CPU sizes
    python bench/overhead.py --device cuda                # full sizes (the H100 table)
    python bench/overhead.py --workload gpt --steps 100   # one workload, more steps
    python bench/overhead.py --compile --no-memory        # compiled plain vs compiled tracked

Per workload, every method trains its own copy of one model (same initial weights, same stream
of batches, plain SGD) and the methods take turns step by step, so drift of the machine hits all
of them alike. Each method's step is a whole training step: forward, backward, whatever the
method adds, optimizer step. Reported per method:

* time: median over the steps after warm-up (CUDA: wall clock between synchronisations; CPU:
  the process's CPU time, which other jobs on a shared machine disturb far less than wall time)
  and its ratio to the plain step (the "accum×4" rows also against the plain accumulation step);
* memory: peak bytes the method needs for a step over what was allocated before it was built
  (CUDA: ``max_memory_allocated``; CPU: the resident-set high-water mark ``VmHWM`` of a fresh
  process, minus its resident set before building) and the ratio to the plain step;
* precision: B_simple with its 95% interval after all N steps, the interval's relative width
  (high − low)/B_simple after N steps, and after a fixed wall-clock budget — the time the plain
  step needs for N steps, in which a slower method fits fewer steps. Methods that give
  per-example norms of all examples (Opacus, BackPACK, torch.func) feed them to the same
  estimator as noisescale (paper eq. A.2, EMA β = 0.99, Fieller interval); gns-pytorch returns a
  clamped per-step ratio over a random subset of 10 parameter tensors, so its row shows the 95%
  interval of the mean of those ratios, a different (biased) quantity.

A peer that is not installed or fails is reported with its error instead of stopping the run.
Results: ``<out>/overhead-<device>.json`` and ``.md``.

``--compile``: every method's model is ``torch.compile``d (``--backend``, inductor by default)
and the peers are left out: the tracked compiled step against the plain compiled step, in the
default sub-batch mode, the exact mode and the micro-batch mode. Steps 1, 2, 4, 8, 16, 32 of a
tracked model are audited and run eagerly (the median leaves them out), the warm-up covers the
compilations, and the graph breaks of the whole run are counted with Dynamo's own counter.
Results: ``<out>/overhead-<device>-compile.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import noisescale
from noisescale import estimators as est
from noisescale.reference_models import GPT, GPTConfig, PaperCNN

ROOT = Path(__file__).resolve().parent
SEED = 0
BETA, CONFIDENCE = 0.99, 0.95  # the tracker's defaults, used for every method's interval
ACCUMULATE = 4
SUBSET_FRACTIONS = (1 / 4, 1 / 16, 1 / 64)

# -- models ---------------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """conv 3×3 → GroupNorm → ReLU → conv 3×3 → GroupNorm, plus a (projected) skip."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(8, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(8, c_out)
        self.skip = (
            nn.Conv2d(c_in, c_out, 1, stride, bias=False)
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.gn1(self.conv1(x)))
        return F.relu(self.gn2(self.conv2(h)) + self.skip(x))


class ResNetGN(nn.Module):
    """A small ResNet with GroupNorm (per-example gradients are defined, unlike BatchNorm)."""

    def __init__(self, widths: tuple[int, int, int], classes: int = 10) -> None:
        super().__init__()
        w0, w1, w2 = widths
        self.stem = nn.Conv2d(3, w0, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(8, w0)
        self.blocks = nn.Sequential(
            ResidualBlock(w0, w0, 1), ResidualBlock(w0, w1, 2), ResidualBlock(w1, w2, 2)
        )
        self.fc = nn.Linear(w2, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(F.relu(self.gn(self.stem(x))))
        return self.fc(h.mean((2, 3)))


# -- workloads ------------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    description: str
    build: Callable[[], nn.Module]
    batches: list[tuple[Tensor, Tensor]]
    per_example_loss: Callable[[Tensor, Tensor], Tensor]  # (output, target) -> [N]
    lr: float
    amp: torch.dtype | None
    device: torch.device
    compile: str | None = None  # the torch.compile backend every method's model is compiled with

    @property
    def batch_size(self) -> int:
        return int(self.batches[0][0].shape[0])

    def autocast(self) -> Any:
        if self.amp is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def model(self) -> nn.Module:
        torch.manual_seed(SEED)  # every method starts from the same weights
        return self.build().to(self.device)


def image_batches(
    n: int, batch: int, shape: tuple[int, ...], device: torch.device
) -> list[tuple[Tensor, Tensor]]:
    """Smooth random images labelled by a fixed random linear teacher of their quadrant means.

    Gaussian noise at 1/4 resolution, upsampled: the networks learn this task within a few dozen
    steps, so the noise scale is bounded early (white-noise images leave it unbounded).
    """
    gen = torch.Generator().manual_seed(SEED)
    c, h, w = shape
    teacher = torch.randn(4 * c, 10, generator=gen)
    z = torch.randn(n * batch, c, h // 4, w // 4, generator=gen)
    y = (F.adaptive_avg_pool2d(z, 2).flatten(1) @ teacher).argmax(-1).view(n, batch)
    x = F.interpolate(z, scale_factor=4, mode="bilinear").view(n, batch, *shape)
    return [(x[i].to(device), y[i].to(device)) for i in range(n)]


def token_batches(
    n: int, batch: int, length: int, vocab: int, device: torch.device
) -> list[tuple[Tensor, Tensor]]:
    """Sequences of a fixed sparse Markov chain (four likely successors per token)."""
    gen = torch.Generator().manual_seed(SEED)
    successors = torch.randint(0, vocab, (vocab, 4), generator=gen)
    choice = torch.multinomial(
        torch.tensor([0.55, 0.25, 0.15, 0.05]), n * batch * length, True, generator=gen
    ).view(n * batch, length)
    tokens = torch.empty(n * batch, length + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (n * batch,), generator=gen)
    for t in range(length):
        tokens[:, t + 1] = successors[tokens[:, t], choice[:, t]]
    tokens = tokens.view(n, batch, length + 1)
    return [(tokens[i, :, :-1].to(device), tokens[i, :, 1:].to(device)) for i in range(n)]


def image_loss(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out.float(), y, reduction="none")


def sequence_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Each sequence's mean next-token loss: an example is a sequence."""
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
    return per_token.view(y.shape).mean(1)


WORKLOADS = ("cnn", "gpt", "gpt-bf16", "resnet-gn", "hf-gpt2", "hf-llama", "hf-vit")


class HFLogits(nn.Module):
    """A Hugging Face model called the way its users call it, returning its logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.long:
            return self.model(input_ids=x).logits
        return self.model(pixel_values=x).logits


def hf_model(
    name: str, small: bool, width: int | None = None
) -> tuple[Callable[[], nn.Module], str]:
    """transformers GPT-2, Llama and ViT from their own classes, random weights (no download);
    ``width``: the CPU size's hidden size instead of 128."""
    import transformers

    d, layers, heads = (width or 128, 2, 4) if small else (768, 12, 12)
    if name == "hf-gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=2048 if small else 50257, n_positions=64 if small else 256, n_embd=d,
            n_layer=layers, n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        return (
            lambda: HFLogits(transformers.GPT2LMHeadModel(cfg)),
            f"transformers GPT2LMHeadModel {layers}×{d} (Conv1D, tied head)",
        )
    if name == "hf-llama":
        cfg = transformers.LlamaConfig(
            vocab_size=2048 if small else 32000, hidden_size=d, intermediate_size=2 * d,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
            max_position_embeddings=64 if small else 256,
        )  # fmt: skip
        return (
            lambda: HFLogits(transformers.LlamaForCausalLM(cfg)),
            f"transformers LlamaForCausalLM {layers}×{d} (its RMSNorm, GQA)",
        )
    cfg = transformers.ViTConfig(
        image_size=32, patch_size=4, num_channels=3, hidden_size=d, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=2 * d, num_labels=10,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return (
        lambda: HFLogits(transformers.ViTForImageClassification(cfg)),
        f"transformers ViTForImageClassification {layers}×{d}, patch 4 (class token)",
    )


def make_workload(
    name: str, small: bool, n: int, device: torch.device, width: int | None = None
) -> Workload:
    """The benchmark's workloads; ``small`` are the CPU sizes (full sizes take minutes a step).
    ``width`` (CPU sizes; steady.py's ``--width``): the transformers models' hidden size instead
    of 128, the ResNet's widths (width/8, width/4, width/2) instead of (16, 32, 64)."""
    if name == "cnn":
        return Workload(
            name,
            "paper MNIST CNN (App. A.4.1), batch 128, 1×28×28, fp32",
            PaperCNN,
            image_batches(n, 128, (1, 28, 28), device),
            image_loss,
            0.05,
            None,
            device,
        )
    if name in ("gpt", "gpt-bf16"):
        if small:
            cfg = GPTConfig(vocab_size=2048, block_size=64, n_layer=2, n_head=4, d_model=128)
        else:
            cfg = GPTConfig.benchmark()
        amp = torch.bfloat16 if name == "gpt-bf16" else None
        return Workload(
            name,
            f"GPT {cfg.n_layer}×{cfg.d_model}, {cfg.n_head} heads, T={cfg.block_size}, "
            f"vocab {cfg.vocab_size}, batch 16, {'bf16 autocast' if amp else 'fp32'}",
            lambda: GPT(cfg),
            token_batches(n, 16, cfg.block_size, cfg.vocab_size, device),
            sequence_loss,
            0.3,
            amp,
            device,
        )
    if name == "resnet-gn":
        widths, batch = ((16, 32, 64), 64) if small else ((64, 128, 256), 128)
        if small and width:
            widths = (width // 8, width // 4, width // 2)
        return Workload(
            name,
            f"ResNet, 7 convs + GroupNorm {widths}, batch {batch}, 3×32×32, fp32",
            lambda: ResNetGN(widths),
            image_batches(n, batch, (3, 32, 32), device),
            image_loss,
            0.1,
            None,
            device,
        )
    if name in ("hf-gpt2", "hf-llama"):
        build, what = hf_model(name, small, width)
        length, vocab = (64, 2048) if small else (256, 50257 if name == "hf-gpt2" else 32000)
        return Workload(
            name,
            f"{what}, T={length}, batch 32, fp32",
            build,
            token_batches(n, 32, length, vocab, device),
            sequence_loss,
            0.3,
            None,
            device,
        )
    if name == "hf-vit":
        build, what = hf_model(name, small, width)
        return Workload(
            name,
            f"{what}, batch 32, 3×32×32, fp32",
            build,
            image_batches(n, 32, (3, 32, 32), device),
            image_loss,
            0.05,
            None,
            device,
        )
    raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


# -- methods --------------------------------------------------------------------------------------


def grad_sqnorm(params: list[nn.Parameter]) -> Tensor:
    norms = torch._foreach_norm([p.grad for p in params if p.grad is not None])
    return torch.stack([x.float() for x in norms]).square().sum()


class Method:
    """One way of training (and measuring): its own model copy and optimizer."""

    baseline = "plain"

    def __init__(self, wl: Workload) -> None:
        self.wl = wl
        self.model = wl.model()
        # what the training step calls: the model, or the model compiled (the tracker is given
        # the model itself, as a user would)
        self.call: Callable[[Tensor], Tensor] = self.model
        if wl.compile is not None:
            self.call = torch.compile(self.model, backend=wl.compile)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=wl.lr)

    def step(self, x: Tensor, y: Tensor) -> None:
        raise NotImplementedError

    def intervals(self) -> list[tuple[float, float, float]]:
        """(B_simple, low, high) after each step so far; empty for a method that measures none."""
        return []


class Plain(Method):
    def __init__(self, wl: Workload, accumulate: int = 1) -> None:
        super().__init__(wl)
        self.accumulate = accumulate

    def backward(self, x: Tensor, y: Tensor) -> Tensor:
        for xs, ys in zip(x.chunk(self.accumulate), y.chunk(self.accumulate), strict=True):
            with self.wl.autocast():
                loss = self.wl.per_example_loss(self.call(xs), ys).mean() / self.accumulate
            loss.backward()
        return loss.detach()

    def step(self, x: Tensor, y: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(x, y)
        self.optimizer.step()


class NoiseScale(Plain):
    """noisescale's tracker, two lines in the plain loop."""

    def __init__(self, wl: Workload, accumulate: int = 1, **tracker: Any) -> None:
        super().__init__(wl, accumulate)
        self.tracker = noisescale.GradientNoiseTracker(self.model, **tracker)
        if accumulate > 1:
            self.baseline = f"plain accum×{accumulate}"

    def step(self, x: Tensor, y: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.backward(x, y)
        self.tracker.step(loss=loss)
        self.optimizer.step()

    def intervals(self) -> list[tuple[float, float, float]]:
        return [
            (_nan(r["b_simple"]), _nan(r["b_simple_low"]), _nan(r["b_simple_high"]))
            for r in self.tracker.history
        ]


class PerExamplePeer(Method):
    """A peer giving every example's squared gradient norm; the estimator is noisescale's."""

    def __init__(self, wl: Workload) -> None:
        super().__init__(wl)
        self.norms: list[tuple[Tensor, Tensor]] = []  # (mean |g_i|², |G_big|²), kept on device

    def backward_with_norms(self, x: Tensor, y: Tensor) -> Tensor:
        """Leave the mean gradient in ``.grad``; return |g_i|² of each example's own loss."""
        raise NotImplementedError

    def step(self, x: Tensor, y: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            sq = self.backward_with_norms(x, y)
            self.norms.append((sq.float().mean(), grad_sqnorm(self.params)))
        self.optimizer.step()

    def intervals(self) -> list[tuple[float, float, float]]:
        values = torch.stack([torch.stack(v) for v in self.norms]).cpu().double().numpy()
        state, out = est.init_state(BETA), []
        for small, big in values:
            g2, tr = est.unbiased_g2_trace(1.0, small, float(self.wl.batch_size), big)
            state = est.update_state(state, g2, tr)
            e = est.b_simple_interval(state, CONFIDENCE)
            out.append((e.b_simple, e.low, e.high))
        return out


class Opacus(PerExamplePeer):
    def __init__(self, wl: Workload) -> None:
        from opacus import GradSampleModule

        super().__init__(wl)
        self.gsm = GradSampleModule(self.model, loss_reduction="mean", batch_first=True)

    def backward_with_norms(self, x: Tensor, y: Tensor) -> Tensor:
        self.gsm.zero_grad(set_to_none=True)  # also drops the previous step's grad_sample
        with torch.enable_grad(), self.wl.autocast():
            loss = self.wl.per_example_loss(self.gsm(x), y).mean()
        loss.backward()
        missing = [p for p in self.params if getattr(p, "grad_sample", None) is None]
        if missing:
            raise RuntimeError(f"{len(missing)} parameters got no grad_sample")
        return sum(p.grad_sample.flatten(1).float().square().sum(1) for p in self.params)


class BackPACK(PerExamplePeer):
    def __init__(self, wl: Workload) -> None:
        from backpack import backpack, extend
        from backpack.extensions import BatchL2Grad

        super().__init__(wl)
        self.model = extend(self.model)
        self.context = lambda: backpack(BatchL2Grad())

    def backward_with_norms(self, x: Tensor, y: Tensor) -> Tensor:
        with torch.enable_grad(), self.wl.autocast():
            loss = self.wl.per_example_loss(self.model(x), y).mean()
        with self.context():
            loss.backward()
        missing = [n for n, p in self.model.named_parameters() if not hasattr(p, "batch_l2")]
        if missing:
            raise RuntimeError(f"BatchL2Grad left out parameters {missing[:3]}")
        # BackPACK's individual gradients are those of ℓ_i/N under a mean loss
        return sum(p.batch_l2 for p in self.params) * self.wl.batch_size**2


class TorchFunc(PerExamplePeer):
    """torch.func: vmap over examples of grad of one example's loss; .grad is their mean."""

    def __init__(self, wl: Workload) -> None:
        from torch.func import functional_call, grad, vmap

        super().__init__(wl)
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]

        def loss_one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            with self.wl.autocast():
                out = functional_call(self.model, p, (x.unsqueeze(0),))
            return self.wl.per_example_loss(out, y.unsqueeze(0)).squeeze(0)

        self.names = names
        self.per_example_grads = vmap(grad(loss_one), in_dims=(None, 0, 0), randomness="different")

    def backward_with_norms(self, x: Tensor, y: Tensor) -> Tensor:
        params = {n: p.detach() for n, p in zip(self.names, self.params, strict=True)}
        with torch.enable_grad():
            grads = self.per_example_grads(params, x, y)
        for n, p in zip(self.names, self.params, strict=True):
            p.grad = grads[n].mean(0)
        return sum(g.flatten(1).float().square().sum(1) for g in grads.values())


class GnsPytorch(Method):
    """gns-pytorch's compute_gns on per-example losses, then the usual backward."""

    def __init__(self, wl: Workload) -> None:
        from gns_pytorch import compute_gns

        super().__init__(wl)
        self.compute_gns = compute_gns
        self.values: list[float] = []
        random.seed(SEED)  # it samples parameter tensors with Python's random

    def step(self, x: Tensor, y: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.wl.autocast():
            per_example = self.wl.per_example_loss(self.model(x), y)
        self.values.append(self.compute_gns(per_example, self.model))
        per_example.mean().backward()
        self.optimizer.step()

    def intervals(self) -> list[tuple[float, float, float]]:
        out = []
        for n in range(1, len(self.values) + 1):
            v = np.asarray(self.values[:n])
            half = 1.96 * v.std(ddof=1) / math.sqrt(n) if n > 1 else math.nan
            out.append((v.mean(), v.mean() - half, v.mean() + half))
        return out


@dataclass(frozen=True)
class Spec:
    name: str
    group: str  # "baseline", "noisescale" or "peer"
    build: Callable[[Workload], Method]


def method_specs(batch_size: int) -> list[Spec]:
    specs = [
        Spec("plain", "baseline", Plain),
        Spec("noisescale sub-batches (default)", "noisescale", lambda wl: NoiseScale(wl)),
        Spec(
            "noisescale exact (all examples)",
            "noisescale",
            lambda wl: NoiseScale(wl, per_example_fraction=1.0),
        ),
    ]
    seen = set()
    for fraction in SUBSET_FRACTIONS:
        k = math.ceil(fraction * batch_size)
        if k < batch_size and k not in seen:
            seen.add(k)
            specs.append(
                Spec(
                    f"noisescale subset, {k} of {batch_size} (f=1/{round(1 / fraction)})",
                    "noisescale",
                    lambda wl, f=fraction: NoiseScale(wl, per_example_fraction=f),
                )
            )
    a = ACCUMULATE
    specs += [
        Spec(f"plain accum×{a}", "baseline", lambda wl: Plain(wl, accumulate=a)),
        Spec(
            f"noisescale micro-batch only, accum×{a}",
            "noisescale",
            lambda wl: NoiseScale(wl, accumulate=a, per_example=False),
        ),
        Spec(
            f"noisescale sub-batches (default) + micro-batch, accum×{a}",
            "noisescale",
            lambda wl: NoiseScale(wl, accumulate=a),
        ),
        Spec(
            f"noisescale subset f=1/16 + micro-batch, accum×{a}",
            "noisescale",
            lambda wl: NoiseScale(wl, accumulate=a, per_example_fraction=1 / 16),
        ),
        Spec("Opacus GradSampleModule", "peer", Opacus),
        Spec("BackPACK BatchL2Grad", "peer", BackPACK),
        Spec("torch.func vmap(grad)", "peer", TorchFunc),
        Spec("gns-pytorch compute_gns", "peer", GnsPytorch),
    ]
    return specs


def compiled_specs() -> list[Spec]:
    """``--compile``: the tracker's modes against the plain step, every model compiled."""
    a = ACCUMULATE
    return [
        Spec("plain", "baseline", Plain),
        Spec("noisescale sub-batches (default)", "noisescale", lambda wl: NoiseScale(wl)),
        Spec(
            "noisescale exact (all examples)",
            "noisescale",
            lambda wl: NoiseScale(wl, per_example_fraction=1.0),
        ),
        Spec(f"plain accum×{a}", "baseline", lambda wl: Plain(wl, accumulate=a)),
        Spec(
            f"noisescale micro-batch only, accum×{a}",
            "noisescale",
            lambda wl: NoiseScale(wl, accumulate=a, per_example=False),
        ),
    ]


# -- measuring ------------------------------------------------------------------------------------


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


class ChildError(RuntimeError):
    """A failure in a measuring subprocess; its message already names the error type."""


def error_string(err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return (first if isinstance(err, ChildError) else f"{type(err).__name__}: {first}")[:240]


def graph_breaks() -> int:
    """Dynamo's count of graph breaks so far in this process (0 while it is not imported)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def long_run_time(measured: list[float], rest: list[float], every: int) -> float:
    """The time per step of a tracker that measures one step in ``every``: the median of its
    measured steps and that of its other steps, weighed 1 : every − 1 (a long run's proportion).
    ``steady.py`` and ``precision.py`` both report ``measure_every`` this way."""
    return (statistics.median(measured) + (every - 1) * statistics.median(rest)) / every


def relative_width(b: float, low: float, high: float) -> float:
    if not (math.isfinite(b) and b > 0 and math.isfinite(low) and math.isfinite(high)):
        return math.inf
    return (high - low) / b


def norm_error(wl: Workload) -> float:
    """Max relative error of the exact per-example norms against torch.func in fp32."""
    model = wl.model().eval()  # no dropout: both sides must see the same function
    x, y = wl.batches[0]
    with noisescale.per_example_sqnorms(model) as pe, wl.autocast():
        wl.per_example_loss(model(x), y).mean().backward()
    reference = TorchFunc(Workload(**{**wl.__dict__, "amp": None}))
    reference.model.eval()
    with torch.no_grad():
        truth = reference.backward_with_norms(x, y).double()
    return float(((pe.sqnorms.double() - truth).abs() / truth).max())


def peak_memory_cuda(spec: Spec, wl: Workload, steps: int = 3) -> float:
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(wl.device)
    torch.cuda.reset_peak_memory_stats(wl.device)
    method = spec.build(wl)
    for x, y in wl.batches[:steps]:
        method.step(x, y)
    synchronize(wl.device)
    peak = torch.cuda.max_memory_allocated(wl.device) - base
    del method
    return peak / 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: resident-set growth (MiB) of building one method and 3 steps.

    A first, throwaway instance runs 2 steps before the baseline is read, so the code pages and
    kernel caches its first calls map in are not counted as the method's memory; the high-water
    mark is then reset (``/proc/self/clear_refs``). The parent sets a fixed malloc mmap threshold,
    so freed tensors go back to the system and do not linger in the resident set.
    """
    torch.set_num_threads(args.threads)
    wl = make_workload(args.workload, args.size == "cpu", 3, torch.device("cpu"))
    spec = next(s for s in method_specs(wl.batch_size) if s.name == args.memory_child)
    warm = spec.build(wl)
    for x, y in wl.batches[:2]:
        warm.step(x, y)
    del warm
    gc.collect()
    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    method = spec.build(wl)
    for x, y in wl.batches:
        method.step(x, y)
    print(json.dumps({"peak_mb": (_status_kib("VmHWM") - base) / 1024}))


def peak_memory_cpu(spec: Spec, args: argparse.Namespace, workload: str) -> float:
    cmd = [sys.executable, __file__, "--device", "cpu", "--workload", workload]
    cmd += ["--size", args.size, "--threads", str(args.threads), "--memory-child", spec.name]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if done.returncode != 0:
        raise ChildError(done.stderr.strip().splitlines()[-1])
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"])


def run_workload(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    rounds = args.warmup + args.steps
    wl = make_workload(name, args.size == "cpu", rounds, device)
    specs = method_specs(wl.batch_size)
    if args.compile:
        wl.compile = args.backend
        specs = compiled_specs()
    print(f"\n== {name}: {wl.description} ({rounds} steps per method, {len(specs)} methods)")
    errors: dict[str, str] = {}
    rows: dict[str, dict[str, Any]] = {s.name: {"method": s.name, "group": s.group} for s in specs}

    try:
        norm_err = norm_error(wl)
        print(f"   exact per-example norms vs torch.func fp32: max rel. error {norm_err:.1e}")
    except Exception as err:  # a model torch.func cannot run leaves the check out
        norm_err = math.nan
        print(f"   norm check failed: {error_string(err)}")

    if args.memory:
        for spec in specs:
            try:
                if device.type == "cuda":
                    rows[spec.name]["peak_mb"] = peak_memory_cuda(spec, wl)
                else:
                    rows[spec.name]["peak_mb"] = peak_memory_cpu(spec, args, name)
            except Exception as err:
                errors[spec.name] = error_string(err)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    methods: dict[str, Method] = {}

    def build(spec: Spec) -> None:
        try:
            methods[spec.name] = spec.build(wl)
        except Exception as err:
            errors[spec.name] = error_string(err)

    names = [s.name for s in specs if s.name not in errors]
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    breaks = dict.fromkeys(names, 0)  # Dynamo's graph breaks during each method's steps

    def one_step(m: str, r: int, x: Tensor, y: Tensor) -> None:
        if m in errors:
            return
        synchronize(device)
        before = graph_breaks()
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            methods[m].step(x, y)
            synchronize(device)
        except Exception as err:
            errors[m] = error_string(err)
            return
        breaks[m] += graph_breaks() - before
        if r >= args.warmup:
            wall[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)

    if not args.compile:
        for spec in specs:
            if spec.name not in errors:
                build(spec)
        order = list(methods)
        for r, (x, y) in enumerate(wl.batches):
            for m in order[r % len(order) :] + order[: r % len(order)]:  # rotate who goes first
                one_step(m, r, x, y)
            if r % 10 == 0:
                print(f"   step {r}/{rounds}", flush=True)
    else:
        # Compiled: one method at a time, each built just before its steps (a tracker removed
        # after them) and Dynamo's caches reset before it. A tracker runs its audited steps
        # eagerly through the compiler's stance, which is process-wide: taking turns step by
        # step, one method's audit — or a tracker that runs its model eagerly for good — would
        # run every other method's compiled steps eagerly too. And the methods' models are
        # instances of one class, whose compiled graphs would be offered from one to the next.
        from torch import _dynamo

        for spec in specs:
            if spec.name in errors:
                continue
            _dynamo.reset()
            build(spec)
            for r, (x, y) in enumerate(wl.batches):
                one_step(spec.name, r, x, y)
            method = methods.get(spec.name)
            if isinstance(method, NoiseScale):
                method.tracker.remove()
            print(f"   {spec.name}: done", flush=True)

    timed = wall if device.type == "cuda" else cpu
    median = {n: statistics.median(t) for n, t in timed.items() if t and n not in errors}
    plain = median.get("plain", math.nan)
    budget = rounds * plain  # what the plain step needs for all N steps
    for spec in specs:
        row = rows[spec.name]
        if spec.name in errors:
            row["error"] = errors[spec.name]
            continue
        method = methods[spec.name]
        row["baseline"] = method.baseline
        if args.compile:
            row["graph_breaks"] = breaks[spec.name]
        row["median_ms"] = 1e3 * statistics.median(wall[spec.name])
        row["median_cpu_ms"] = 1e3 * statistics.median(cpu[spec.name])
        row["time_ratio"] = median[spec.name] / plain
        row["time_ratio_baseline"] = median[spec.name] / median.get(method.baseline, math.nan)
        peak_plain = rows["plain"].get("peak_mb", math.nan)
        row["memory_ratio"] = row.get("peak_mb", math.nan) / peak_plain
        intervals = method.intervals()
        if intervals:
            b, low, high = intervals[-1]
            row.update(b_simple=b, b_simple_low=low, b_simple_high=high)
            row["rel_width_steps"] = relative_width(*intervals[-1])
            n_budget = min(len(intervals), int(budget / median[spec.name] + 1e-9))
            row["steps_in_budget"] = n_budget
            row["rel_width_budget"] = (
                relative_width(*intervals[n_budget - 1]) if n_budget >= 2 else math.inf
            )
    for method in methods.values():
        if isinstance(method, NoiseScale):
            method.tracker.remove()
    return {
        "name": name,
        "description": wl.description
        + (f", every model torch.compile(backend={args.backend!r})" if args.compile else ""),
        "batch_size": wl.batch_size,
        "steps": rounds,
        "warmup": args.warmup,
        "budget_ms": 1e3 * budget,
        "norm_error": norm_err,
        "methods": list(rows.values()),
    }


# -- output ---------------------------------------------------------------------------------------


def result_header(script: str, device: torch.device) -> dict[str, Any]:
    """What every bench result file starts with: its kind, the machine, the date, torch and
    the command that wrote it (``bench/<script>.py`` with this process's arguments)."""
    return {
        "kind": f"noisescale.bench.{script}",
        "version": 1,
        "device": device_name(device),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "command": f"python bench/{script}.py " + " ".join(sys.argv[1:]),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line
        )
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {torch.get_num_threads()} thread(s) used"


def _fmt(x: float | None, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return format(x, spec)


def markdown(result: dict[str, Any]) -> str:
    cpu = result["device_type"] == "cpu"
    lines = [
        f"# Measurement overhead — {result['device']}",
        "",
        f"{result['date']}, torch {result['torch']}, `{result['command']}`.",
        "",
        "Time: median "
        + ("process CPU time" if cpu else "wall time (synchronised)")
        + " of a whole training step after warm-up; ratio to the plain step of the same run. "
        "Memory: peak over the memory held before the method was built "
        + ("(resident-set high-water mark of a fresh process)" if cpu else "(max_memory_allocated)")
        + ". Width: (high − low)/B_simple of the 95% interval after N steps, and after the time "
        "the plain step needs for N steps (a slower method fits fewer steps in it).",
    ]
    for wl in result["workloads"]:
        n = wl["steps"]
        lines += [
            "",
            f"## {wl['name']}: {wl['description']}",
            "",
            f"N = {n} steps ({wl['warmup']} of them warm-up, not timed); budget "
            f"{wl['budget_ms'] / 1e3:.1f} s. Exact per-example norms vs torch.func in fp32: max "
            f"relative error {_fmt(wl['norm_error'], '.1e')}."
            + (
                " Graph breaks (Dynamo's counter) during each method's steps: "
                + ", ".join(
                    f"{r['method']} {r['graph_breaks']}"
                    for r in wl["methods"]
                    if "graph_breaks" in r
                )
                + "."
                if any("graph_breaks" in r for r in wl["methods"])
                else ""
            ),
            "",
            "| method | ms/step | × time | × memory | B_simple [95% CI] | width, N steps "
            "| steps in budget | width, budget |",
            "|---|---:|---:|---:|---|---:|---:|---:|",
        ]
        for row in wl["methods"]:
            if "error" in row:
                lines.append(f"| {row['method']} | failed: {row['error']} | | | | | | |")
                continue
            ratio = _fmt(row["time_ratio"], ".3f")
            if row["baseline"] != "plain":
                ratio += f" ({_fmt(row['time_ratio_baseline'], '.3f')} vs {row['baseline']})"
            ms = row["median_cpu_ms"] if cpu else row["median_ms"]
            ci = "—"
            if "b_simple" in row:
                ci = (
                    f"{_fmt(row['b_simple'], '.3g')} [{_fmt(row['b_simple_low'], '.3g')}, "
                    f"{_fmt(row['b_simple_high'], '.3g')}]"
                )
            lines.append(
                f"| {row['method']} | {_fmt(ms, '.1f')} | {ratio} | "
                f"{_fmt(row.get('memory_ratio'), '.2f')} | {ci} | "
                f"{_fmt(row.get('rel_width_steps'), '.2f')} | {row.get('steps_in_budget', '—')} | "
                f"{_fmt(row.get('rel_width_budget'), '.2f')} |"
            )
        lines += ["", agreement(wl)]
    return "\n".join(lines) + "\n"


def agreement(wl: dict[str, Any]) -> str:
    """Whether the exact mode's B_simple lies in every other estimate's 95% interval."""
    rows = {r["method"]: r for r in wl["methods"] if "b_simple" in r}
    exact = rows.get("noisescale exact (all examples)")
    if exact is None:
        return "No exact-mode estimate to compare with."
    b = exact["b_simple"]
    others = [r for name, r in rows.items() if r is not exact and not name.startswith("gns")]
    outside = [r["method"] for r in others if not r["b_simple_low"] <= b <= r["b_simple_high"]]
    verdict = (
        f"inside the interval of all {len(others)} other estimates"
        if not outside
        else f"outside the interval of: {', '.join(outside)}"
    )
    return (
        f"Exact mode's B_simple {_fmt(b, '.3g')}: {verdict} (gns-pytorch left out: a different "
        "quantity)."
    )


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--workload", default="all", help=f"'all' or a comma list of {', '.join(WORKLOADS)}"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps (CPU 30, CUDA 200)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (CPU 3, CUDA 20)")
    parser.add_argument(
        "--size", choices=("cpu", "full"), default=None, help="model sizes (default by device)"
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument(
        "--compile", action="store_true", help="compile every model (plain vs tracked, no peers)"
    )
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (--compile)")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.size = args.size or ("full" if cuda else "cpu")
    args.steps = args.steps or (200 if cuda else 30)
    if args.warmup is None:
        # compiled: a tracked model compiles at step 3, after the audited steps 1 and 2
        args.warmup = 20 if cuda else 5 if args.compile else 3
    if args.compile:
        from torch import _dynamo  # (``import torch._dynamo`` would make ``torch`` local here)

        # every method compiles its own copy of one model class: more cache entries per frame
        # than Dynamo's default limit, beyond which it would run the rest eagerly
        _dynamo.config.recompile_limit = 64
        if args.memory:
            raise SystemExit(
                "--compile measures time only: a fresh process per method would measure the "
                "compiler's memory too; add --no-memory"
            )
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.memory_child:
        memory_child(args)
        return
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if not cuda:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = WORKLOADS if args.workload == "all" else tuple(args.workload.split(","))
    result = result_header("overhead", device)
    result.update(device_type=device.type, size=args.size, workloads=[])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"overhead-{args.device}{'-compile' if args.compile else ''}"
    for name in names:
        result["workloads"].append(run_workload(name, args, device))
        # written after every workload, so a long run shows (and keeps) what it has measured
        stem.with_suffix(".json").write_text(json.dumps(_json_safe(result), indent=1) + "\n")
        table = markdown(result)
        stem.with_suffix(".md").write_text(table)
        print(table.split("\n## ")[-1])
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
