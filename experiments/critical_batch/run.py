"""B_simple predicts B_crit: the central claim of McCandlish et al. (2018) on Fashion-MNIST.

Three experiments, each written as CSV/JSON next to its figures:

1. **Grid** (sec. 2.3, App. A.2–A.3): SGD (and Adam) at batch sizes spanning ≥ 6 powers of two,
   a few learning rates per batch size centred on ε(B) = ε*/(1 + B*/B)^α (eq. A.3), widened
   when the best one is at an edge. The training loss is measured on a fixed subset of the
   training set at geometrically spaced steps (every ~5%), and B_simple (eq. 2.9) by a
   :class:`noisescale.GradientNoiseTracker` in every run. ``runs_<optimizer>.csv`` is what
   ``noisescale fit`` reads.
2. **Fit** (eq. 2.11–2.12, App. D.1): per training-loss goal, the Pareto front, B_crit with its
   standard error, and B_simple averaged over training up to the goal, with
   :mod:`noisescale.sweep` (``results.json``, ``pareto_<optimizer>.png``).
3. **Temperature** (App. C, Fig. 15): one run whose temperature ε/B is divided by 16 for a
   while (ε ÷ 16, B × 16, or ε ÷ 4 with B × 4) beside an unchanged control run from the same
   seed; B_simple should rise about 16× and come back (``temperature.csv``,
   ``temperature.png``).

``--scale cpu`` (a 784→256→10 MLP, batch sizes 8…1024) runs in minutes on two CPU cores;
``--scale full`` is the paper's CNN (App. A.4.1) at batch sizes 16…4096 for a GPU
(``--device cuda``). A grid that is stopped can be resumed: finished runs in the output folder
are kept and not run again. Nothing is downloaded: the data are the IDX files of the Debian
package ``dataset-fashion-mnist``.

Usage::

    python experiments/critical_batch/run.py --scale cpu
    python experiments/critical_batch/run.py --scale full --device cuda --out runs/full
    noisescale fit experiments/critical_batch/results/cpu/runs_sgd.csv --ema 0.7 \\
        --goal 1.0,0.8,0.65,0.55,0.47,0.4,0.35
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from noisescale.errors import NoiseScaleInputError
from noisescale.reference_models import PaperCNN
from noisescale.sweep import GoalResult, Run, critical_batch_sizes, ema_smoothed, goal_crossing
from noisescale.theory import lr_central
from noisescale.tracker import GradientNoiseTracker

HERE = Path(__file__).resolve().parent
#: Where the Debian package ``dataset-fashion-mnist`` puts the files, then a git-ignored copy
#: (the GPU machine has no apt: copy the folder to .data/ and carry it).
DATA_DIRS = (Path("/usr/share/datasets/fashion-mnist"), Path(".data/fashion-mnist"))
#: Columns of ``runs_<optimizer>.csv``; ``noisescale fit`` reads run … b_simple.
RUN_COLUMNS = (
    "run",
    "batch_size",
    "learning_rate",
    "step",
    "examples",
    "loss",
    "error",
    "b_simple",
)
#: A run has diverged when its training loss exceeds this multiple of the loss at step 1.
DIVERGED_FACTOR = 3.0


# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """The batch-size × learning-rate grid of one optimizer (App. A.2).

    Attributes:
        batch_sizes: examples per step.
        lr_star: ε* of eq. A.3, the learning rate approached as B → ∞.
        b_star: B* of eq. A.3, where the learning rate stops growing.
        alpha: exponent of eq. A.3 (1 for SGD, 0.5–1 for Adam).
        lr_multiples: learning rates tried at each batch size, as multiples of ε(B).
        max_extensions: how many more multiples (×2 or ×½) may be added on a side when the
            fastest run for some goal used the largest or smallest learning rate tried.
    """

    batch_sizes: tuple[int, ...]
    lr_star: float
    b_star: float
    alpha: float
    lr_multiples: tuple[float, ...] = (0.5, 1.0, 2.0)
    max_extensions: int = 2

    def central_lr(self, batch_size: int) -> float:
        """ε(B) = ε*/(1 + B*/B)^α (eq. A.3)."""
        return float(lr_central(batch_size, self.lr_star, self.b_star, self.alpha))


@dataclass(frozen=True)
class Temperature:
    """The App. C experiment: temperature ε/B divided by ``factor`` between two steps.

    Attributes:
        batch_size: B before and after the window.
        lr: ε before and after the window.
        change_at: first step of the window.
        restore_at: first step after the window.
        steps: length of each run.
        variants: name → (learning-rate divisor, batch-size multiplier) in the window; their
            product is the factor by which ε/B falls. ``"control"`` changes nothing.
        beta: the tracker's EMA decay: its ~1/(1 − β) steps must be short against the
            window, and long enough to average the noisy |G|² of a cold run.
        record_every: steps between recorded points.
        eval_every: steps between training-loss evaluations.
    """

    batch_size: int
    lr: float
    change_at: int
    restore_at: int
    steps: int
    variants: dict[str, tuple[float, int]] = field(
        default_factory=lambda: {
            "control": (1.0, 1),
            "lr_div16": (16.0, 1),
            "batch_x16": (1.0, 16),
            "lr_div4_batch_x4": (4.0, 4),
        }
    )
    beta: float = 0.995
    record_every: int = 10
    eval_every: int = 100


@dataclass(frozen=True)
class Scale:
    """Everything that differs between the CPU-sized and the GPU-sized experiment.

    Attributes:
        name: ``"cpu"`` or ``"full"``.
        model: ``"mlp"`` (784→256→10) or ``"cnn"`` (the paper's, App. A.4.1).
        grids: optimizer name → its grid.
        goals: training-loss goals (App. A.3); runs stop at the smallest (the hardest).
        ema: decay of the bias-corrected EMA over recorded points that smooths each curve
            before looking for a goal (App. A.3). The loss on a fixed subset has no minibatch
            noise, but SGD near its largest stable rate makes it oscillate. With geometrically
            spaced points the EMA's lag is a fixed fraction of the step count: it scales S_min
            and E_min alike and cancels in B_crit = E_min/S_min.
        s_min_guess, e_min_guess: a guess of S_min and E_min at the hardest goal; a run at batch
            size B stops after ``budget_factor·(s_min_guess + e_min_guess/B)`` steps at most
            (the eq. 2.11 shape), so that batch sizes far from B_crit are not starved.
        budget_factor: see above.
        eval_examples: size of the fixed training subset the loss is measured on.
        eval_spacing: ratio between successive measurement steps (geometric spacing makes
            every step count S known to the same relative precision).
        window_examples: the tracker's EMA of |G|² and tr Σ spans about this many examples
            (β = 1 − B/window, clipped to ``beta_range``): equal statistical precision at
            every batch size, and a lag of the same number of examples.
        beta_range: bounds on that β.
        temperature: the App. C experiment.
    """

    name: str
    model: str
    grids: dict[str, Grid]
    goals: tuple[float, ...]
    ema: float
    s_min_guess: float
    e_min_guess: float
    budget_factor: float
    eval_examples: int
    eval_spacing: float
    window_examples: float
    beta_range: tuple[float, float]
    temperature: Temperature

    def max_steps(self, batch_size: int) -> int:
        """The most steps a run at ``batch_size`` may take (the eq. 2.11 shape, widened)."""
        return math.ceil(self.budget_factor * (self.s_min_guess + self.e_min_guess / batch_size))

    def beta(self, batch_size: int) -> float:
        """The tracker's EMA decay at ``batch_size`` (a window of ``window_examples``)."""
        lo, hi = self.beta_range
        return min(hi, max(lo, 1.0 - batch_size / self.window_examples))


SCALES: dict[str, Scale] = {
    # ε* and B* from a coarse pilot (2 epochs, factor-2 learning rates at B = 8, 16, 128, 1024):
    # the best rates were 0.025, 0.05, 0.2 and 0.2–0.4, and every rate ≥ 0.8 diverged.
    "cpu": Scale(
        name="cpu",
        model="mlp",
        grids={
            "sgd": Grid(
                batch_sizes=(8, 16, 32, 64, 128, 256, 512, 1024),
                lr_star=0.3,
                b_star=64.0,
                alpha=1.0,
            ),
            # Adam pilot (40k examples): best rates 0.5–1e-3 at B = 16, 2–4e-3 at B = 512. Adam's
            # best rate differs most between early and late goals, so edges are widened only
            # once, and B = 8 is left out: the Adam grid costs about as much as the SGD one.
            "adam": Grid(
                batch_sizes=(16, 32, 64, 128, 256, 512, 1024),
                lr_star=4e-3,
                b_star=100.0,
                alpha=0.75,
                max_extensions=1,
            ),
        },
        goals=(1.0, 0.8, 0.65, 0.55, 0.47, 0.4, 0.35),
        ema=0.7,
        s_min_guess=500.0,
        e_min_guess=60_000.0,
        budget_factor=2.0,
        eval_examples=2048,
        eval_spacing=1.05,
        window_examples=12_800.0,
        beta_range=(0.95, 0.999),
        temperature=Temperature(batch_size=32, lr=0.1, change_at=2000, restore_at=4000, steps=6000),
    ),
    # The paper's CNN; ε* and B* are first guesses (App. A.2 widens the grid at its edges).
    "full": Scale(
        name="full",
        model="cnn",
        grids={
            "sgd": Grid(
                batch_sizes=(16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
                lr_star=0.3,
                b_star=128.0,
                alpha=1.0,
                lr_multiples=(0.25, 0.5, 1.0, 2.0, 4.0),
            ),
            "adam": Grid(
                batch_sizes=(16, 64, 256, 1024, 4096),
                lr_star=3e-3,
                b_star=128.0,
                alpha=0.75,
                lr_multiples=(0.25, 0.5, 1.0, 2.0, 4.0),
            ),
        },
        goals=(1.0, 0.7, 0.5, 0.4, 0.33, 0.28, 0.24),
        ema=0.7,
        s_min_guess=1000.0,
        e_min_guess=300_000.0,
        budget_factor=2.0,
        eval_examples=4096,
        eval_spacing=1.04,
        window_examples=25_600.0,
        beta_range=(0.95, 0.999),
        temperature=Temperature(
            batch_size=128, lr=0.1, change_at=5000, restore_at=10_000, steps=15_000
        ),
    ),
}


# -- data and model --------------------------------------------------------------------------


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (the MNIST format, optionally gzipped) as a NumPy array.

    Header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then
    each dimension as a big-endian 32-bit integer; the data follow in C order.

    Raises:
        NoiseScaleInputError: the file is not an unsigned-byte IDX file or is truncated.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise NoiseScaleInputError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != math.prod(shape):
        raise NoiseScaleInputError(
            f"{path}: the header says {shape} ({math.prod(shape)} bytes) but "
            f"{len(raw) - header} bytes follow"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


@dataclass(frozen=True)
class Data:
    """Training images [N, 1, 28, 28] standardised, labels [N], and the fixed evaluation subset."""

    x: torch.Tensor
    y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor


def find_data_dir(data_dir: Path | None) -> Path:
    """The folder holding ``train-images-idx3-ubyte.gz``: ``data_dir`` or a default location."""
    candidates = (data_dir,) if data_dir is not None else DATA_DIRS
    for d in candidates:
        if (d / "train-images-idx3-ubyte.gz").is_file():
            return d
    raise NoiseScaleInputError(
        "Fashion-MNIST not found in "
        + ", ".join(str(d) for d in candidates)
        + ": apt-get install dataset-fashion-mnist, or give --data-dir"
    )


def load_data(data_dir: Path, eval_examples: int, device: torch.device, seed: int = 1234) -> Data:
    """Fashion-MNIST's 60,000 training images on ``device`` and a fixed subset to measure on.

    Pixels are standardised with the training set's mean and standard deviation, so one
    learning-rate grid suits the MLP and the CNN.
    """
    images = read_idx(data_dir / "train-images-idx3-ubyte.gz")
    labels = read_idx(data_dir / "train-labels-idx1-ubyte.gz")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    x = (x - x.mean()) / x.std()
    y = torch.from_numpy(labels.astype(np.int64))
    subset = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    subset = subset[:eval_examples]
    x, y = x.to(device), y.to(device)
    return Data(x=x, y=y, eval_x=x[subset.to(device)], eval_y=y[subset.to(device)])


def make_model(kind: str) -> nn.Module:
    """``"mlp"``: 784→256→10 with ReLU; ``"cnn"``: the paper's MNIST CNN (App. A.4.1)."""
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    if kind == "cnn":
        return PaperCNN()
    raise NoiseScaleInputError(f"unknown model {kind!r}; choose mlp or cnn")


def make_optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    """Plain SGD (no momentum, as the paper's MNIST runs) or Adam with default betas."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise NoiseScaleInputError(f"unknown optimizer {name!r}; choose sgd or adam")


def batches(
    n: int, batch_size: int, generator: torch.Generator, device: torch.device
) -> Iterator[torch.Tensor]:
    """Index tensors of ``batch_size`` examples, sampling without replacement epoch by epoch."""
    while True:
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024
) -> tuple[float, float]:
    """(mean cross-entropy, classification error) of ``model`` on ``x, y`` in eval mode."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=x.device)
    wrong = torch.zeros((), device=x.device)
    for i in range(0, x.shape[0], chunk):
        logits = model(x[i : i + chunk])
        loss += F.cross_entropy(logits, y[i : i + chunk], reduction="sum")
        wrong += (logits.argmax(1) != y[i : i + chunk]).sum()
    model.train(was_training)
    n = x.shape[0]
    return float(loss) / n, float(wrong) / n


def eval_schedule(max_steps: int, spacing: float) -> list[int]:
    """Steps 1, 2, … then every ``spacing``-fold step, ending at ``max_steps``."""
    steps = {max_steps}
    s = 1.0
    while s < max_steps:
        steps.add(round(s))
        s = max(s * spacing, s + 1.0)
    return sorted(steps)


# -- one training run ------------------------------------------------------------------------


@dataclass
class RunRecord:
    """One grid run: its setting, the measured curve and how it ended.

    Attributes:
        optimizer, batch_size, learning_rate, multiple: the setting (``multiple`` of ε(B)).
        rows: one dict per measurement with the :data:`RUN_COLUMNS`.
        reached_final_at: the measured step at which the smoothed loss first met the hardest
            goal, or ``None``.
        diverged: the loss became non-finite or exceeded :data:`DIVERGED_FACTOR` × its start.
        seconds: wall time of the run (``None`` for a run read back from disk).
    """

    optimizer: str
    batch_size: int
    learning_rate: float
    multiple: float
    rows: list[dict[str, Any]]
    reached_final_at: int | None
    diverged: bool
    seconds: float | None = None

    @property
    def name(self) -> str:
        return run_name(self.optimizer, self.batch_size, self.multiple)

    @property
    def steps(self) -> int:
        return int(self.rows[-1]["step"]) if self.rows else 0

    def to_run(self) -> Run:
        """The :class:`noisescale.sweep.Run` of this record (for goal crossings and fits)."""
        return Run.from_arrays(
            self.name,
            self.batch_size,
            self.learning_rate,
            [r["step"] for r in self.rows],
            [r["loss"] for r in self.rows],
            b_simple=[r["b_simple"] for r in self.rows],
        )

    def summary(self) -> dict[str, Any]:
        return {
            "run": self.name,
            "optimizer": self.optimizer,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "multiple": self.multiple,
            "steps": self.steps,
            "final_loss": _finite(self.rows[-1]["loss"]) if self.rows else None,
            "reached_final_at": self.reached_final_at,
            "diverged": self.diverged,
            "seconds": self.seconds,
        }


def run_name(optimizer: str, batch_size: int, multiple: float) -> str:
    return f"{optimizer}_B{batch_size}_x{multiple:g}"


def train_run(
    data: Data,
    scale: Scale,
    optimizer: str,
    batch_size: int,
    multiple: float,
    *,
    max_steps: int,
    device: torch.device,
    seed: int,
) -> RunRecord:
    """Train one grid point, measuring loss and B_simple at geometrically spaced steps.

    Stops at the first measurement whose smoothed loss meets the hardest goal, after
    ``max_steps``, or when the loss diverges (the last row's loss is then NaN, which
    ``noisescale fit`` reads as divergence). Every run starts from the same initial weights and
    sees the same data order (``seed``): common random numbers make the learning rates at a
    batch size differ only by the learning rate.
    """
    lr = scale.grids[optimizer].central_lr(batch_size) * multiple
    torch.manual_seed(seed)
    model = make_model(scale.model).to(device)
    opt = make_optimizer(optimizer, model.parameters(), lr)
    tracker = GradientNoiseTracker(model, optimizer=opt, beta=scale.beta(batch_size), sync_every=64)
    final_goal = min(scale.goals)
    measure_at = set(eval_schedule(max_steps, scale.eval_spacing))
    stream = batches(data.x.shape[0], batch_size, torch.Generator().manual_seed(seed), device)
    rows: list[dict[str, Any]] = []
    smoothed, weight = 0.0, 0.0
    start_loss = math.nan
    reached, diverged = None, False
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # a diverging learning rate is part of the grid; the tracker's warning about its
        # non-finite gradients says nothing new here
        warnings.filterwarnings("ignore", message=".*non-finite gradients.*")
        for step in range(1, max_steps + 1):
            idx = next(stream)
            loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
            loss.backward()
            tracker.step(loss=loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step not in measure_at:
                continue
            value, error = evaluate(model, data.eval_x, data.eval_y)
            if step == 1:
                start_loss = value
            if not math.isfinite(value) or value > DIVERGED_FACTOR * start_loss:
                rows.append(_row(optimizer, batch_size, lr, multiple, step, math.nan, None, None))
                diverged = True
                break
            b_simple = tracker.estimate().b_simple
            rows.append(_row(optimizer, batch_size, lr, multiple, step, value, error, b_simple))
            # the same bias-corrected EMA as noisescale.sweep.ema_smoothed, point by point
            smoothed = scale.ema * smoothed + (1.0 - scale.ema) * value
            weight = scale.ema * weight + (1.0 - scale.ema)
            if smoothed / weight <= final_goal:
                reached = step
                break
    tracker.remove()
    return RunRecord(
        optimizer, batch_size, lr, multiple, rows, reached, diverged, time.perf_counter() - t0
    )


def _row(
    optimizer: str,
    batch_size: int,
    lr: float,
    multiple: float,
    step: int,
    loss: float,
    error: float | None,
    b_simple: float | None,
) -> dict[str, Any]:
    ok = b_simple is not None and math.isfinite(b_simple) and b_simple > 0
    return {
        "run": run_name(optimizer, batch_size, multiple),
        "batch_size": batch_size,
        "learning_rate": lr,
        "step": step,
        "examples": step * batch_size,
        "loss": loss,
        "error": error,
        "b_simple": b_simple if ok else None,
    }


# -- the grid (App. A.2) ---------------------------------------------------------------------


def run_grid(
    data: Data,
    scale: Scale,
    optimizer: str,
    out: Path,
    *,
    device: torch.device,
    seed: int,
    log: Callable[[str], None] = print,
) -> list[RunRecord]:
    """All runs of one optimizer's grid; finished runs found in ``out`` are reused.

    At each batch size the central learning rate ε(B) runs first, then the other multiples.
    A run never needs to go past the step at which an earlier run at the same batch size met
    the hardest goal: for every goal that run got there no later, so a slower run cannot be on
    any Pareto front beyond that step. When the fastest run for some goal used the largest
    (smallest) multiple tried, the next one up (down) by a factor of 2 is added (App. A.2).
    """
    grid = scale.grids[optimizer]
    csv_path = out / f"runs_{optimizer}.csv"
    index_path = out / f"runs_{optimizer}.jsonl"
    done = read_records(csv_path, index_path)
    _drop_unfinished(csv_path, done)
    records: list[RunRecord] = []
    for batch_size in grid.batch_sizes:
        base = sorted(grid.lr_multiples, key=lambda m: (abs(math.log(m)), m))
        queue = list(base)
        tried: dict[float, RunRecord] = {}
        extensions = {"up": 0, "down": 0}
        while queue:
            multiple = queue.pop(0)
            record = done.get(run_name(optimizer, batch_size, multiple))
            if record is None:
                reached = [r.reached_final_at for r in tried.values() if r.reached_final_at]
                cap = min([scale.max_steps(batch_size), *reached])
                record = train_run(
                    data,
                    scale,
                    optimizer,
                    batch_size,
                    multiple,
                    max_steps=cap,
                    device=device,
                    seed=seed,
                )
                append_record(record, csv_path, index_path)
                log(_describe(record))
            tried[multiple] = record
            if not queue:
                queue = _extend(tried, scale, extensions, grid.max_extensions)
        records.extend(tried[m] for m in sorted(tried))
    return records


def _extend(
    tried: dict[float, RunRecord], scale: Scale, extensions: dict[str, int], limit: int
) -> list[float]:
    """The multiple to add when a goal's fastest run is at an edge of the tried range."""
    lo, hi = min(tried), max(tried)
    fastest = set()
    for goal in scale.goals:
        best = None
        for m, record in tried.items():
            if not record.rows:
                continue
            run = record.to_run()
            crossing = goal_crossing(
                run.step, run.examples, ema_smoothed(run.metric, scale.ema), goal
            )
            if crossing is not None and (best is None or crossing.step < best[0]):
                best = (crossing.step, m)
        if best is not None:
            fastest.add(best[1])
    if hi in fastest and extensions["up"] < limit and not tried[hi].diverged:
        extensions["up"] += 1
        return [hi * 2.0]
    if lo in fastest and extensions["down"] < limit:
        extensions["down"] += 1
        return [lo / 2.0]
    return []


def _describe(r: RunRecord) -> str:
    end = (
        "diverged"
        if r.diverged
        else f"loss {r.rows[-1]['loss']:.3f}" + (" (hardest goal)" if r.reached_final_at else "")
    )
    return (
        f"{r.optimizer} B={r.batch_size:<5d} lr={r.learning_rate:<9.4g} (×{r.multiple:g}): "
        f"{r.steps:6d} steps, {end}, {r.seconds:.1f} s"
    )


def append_record(record: RunRecord, csv_path: Path, index_path: Path) -> None:
    """Append a finished run to the CSV (its rows), then to the JSON Lines index (its summary).

    A run counts as finished once it is in the index; see :func:`_drop_unfinished`.
    """
    _append_rows(record, csv_path)
    with index_path.open("a") as f:
        f.write(json.dumps(record.summary()) + "\n")


def _append_rows(record: RunRecord, csv_path: Path) -> None:
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RUN_COLUMNS)
        if new:
            writer.writeheader()
        for row in record.rows:
            writer.writerow({k: _cell(row[k]) for k in RUN_COLUMNS})


def _drop_unfinished(csv_path: Path, done: dict[str, RunRecord]) -> None:
    """Rewrite the CSV without the rows of a run missing from the index.

    A process killed between the two appends of :func:`append_record` leaves such rows; the
    run is then trained again, and its old rows would repeat its steps.
    """
    if not csv_path.exists():
        return
    with csv_path.open(newline="") as f:
        names = {row["run"] for row in csv.DictReader(f)}
    if names <= done.keys():
        return
    csv_path.unlink()
    for record in done.values():
        _append_rows(record, csv_path)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return value


def read_records(csv_path: Path, index_path: Path) -> dict[str, RunRecord]:
    """Runs finished earlier, by name (a run is finished once its summary is in the index)."""
    if not index_path.exists() or not csv_path.exists():
        return {}
    summaries = [json.loads(line) for line in index_path.read_text().splitlines() if line]
    rows: dict[str, list[dict[str, Any]]] = {}
    with csv_path.open(newline="") as f:
        for row in csv.DictReader(f):
            rows.setdefault(row["run"], []).append(
                {
                    "run": row["run"],
                    "batch_size": int(row["batch_size"]),
                    "learning_rate": float(row["learning_rate"]),
                    "step": int(row["step"]),
                    "examples": int(row["examples"]),
                    "loss": float(row["loss"]),
                    "error": float(row["error"]) if row["error"] else None,
                    "b_simple": float(row["b_simple"]) if row["b_simple"] else None,
                }
            )
    out = {}
    for s in summaries:
        out[s["run"]] = RunRecord(
            s["optimizer"],
            s["batch_size"],
            s["learning_rate"],
            s["multiple"],
            rows.get(s["run"], []),
            s["reached_final_at"],
            s["diverged"],
            s["seconds"],
        )
    return out


# -- the fit (eq. 2.11, App. A.3, D.1) -------------------------------------------------------


def analyse(
    records: Sequence[RunRecord], goals: Sequence[float], ema: float
) -> tuple[dict[str, Any], list[GoalResult]]:
    """B_crit per goal with its standard error, beside B_simple (App. D.1 average and at goal).

    Returns a JSON-ready summary and the :class:`noisescale.sweep.GoalResult` of each goal
    fitted. Goals that fewer than three batch sizes reach are listed under ``"skipped"`` with
    the reason. ``b_simple_at_goal`` is the median over the front's runs of the tracker's
    B_simple at the first measurement that meets the goal; ``b_simple`` (from
    :mod:`noisescale.sweep`) the median of each run's B_simple averaged over full-batch steps
    up to the goal (D.1).
    """
    # a run that diverged at its first measurement has no curve
    runs = [r.to_run() for r in records if r.rows and math.isfinite(r.rows[0]["loss"])]
    by_name = {r.name: r for r in runs}
    results, entries, skipped = [], [], []
    for goal in goals:
        try:
            (result,) = critical_batch_sizes(runs, [goal], decay=ema)
        except NoiseScaleInputError as err:
            skipped.append({"goal": goal, "reason": str(err)})
            continue
        entry = result.as_dict()
        entry["b_simple_at_goal"] = _b_simple_at_goal(result, by_name, ema)
        entries.append(entry)
        results.append(result)
    return {"goals": entries, "skipped": skipped}, results


def _b_simple_at_goal(result: GoalResult, runs: dict[str, Run], ema: float) -> float | None:
    values = []
    for p in result.points:
        run = runs[p.run]
        crossing = goal_crossing(run.step, run.examples, ema_smoothed(run.metric, ema), result.goal)
        if crossing is not None and run.b_simple is not None:
            b = run.b_simple[crossing.index]
            if math.isfinite(b):
                values.append(float(b))
    return float(np.median(values)) if values else None


# -- the temperature experiment (App. C, Fig. 15) --------------------------------------------


def temperature_run(
    data: Data, scale: Scale, variant: str, *, device: torch.device, seed: int
) -> list[dict[str, Any]]:
    """One SGD run whose ε/B falls by the variant's factor between ``change_at`` and
    ``restore_at``; B_simple recorded every ``record_every`` steps (App. C, Fig. 15).

    All variants share the seed, so they follow the control run exactly until the window.
    """
    t = scale.temperature
    lr_divisor, batch_multiplier = t.variants[variant]
    torch.manual_seed(seed)
    model = make_model(scale.model).to(device)
    opt = make_optimizer("sgd", model.parameters(), t.lr)
    tracker = GradientNoiseTracker(model, optimizer=opt, beta=t.beta, sync_every=t.record_every)
    generator = torch.Generator().manual_seed(seed)
    n = data.x.shape[0]
    normal = batches(n, t.batch_size, generator, device)
    changed = batches(n, t.batch_size * batch_multiplier, generator, device)
    rows = []
    examples = 0
    loss_value: float | None = None
    for step in range(1, t.steps + 1):
        in_window = t.change_at <= step < t.restore_at
        lr = t.lr / lr_divisor if in_window else t.lr
        for group in opt.param_groups:
            group["lr"] = lr
        idx = next(changed if in_window else normal)
        loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
        loss.backward()
        tracker.step(loss=loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        examples += idx.shape[0]
        if step % t.eval_every == 0 or step == 1:
            loss_value = evaluate(model, data.eval_x, data.eval_y)[0]
        if step % t.record_every == 0:
            e = tracker.estimate()
            rows.append(
                {
                    "variant": variant,
                    "step": step,
                    "examples": examples,
                    "batch_size": idx.shape[0],
                    "learning_rate": lr,
                    "temperature": lr / idx.shape[0],
                    "loss": loss_value,
                    "b_simple": e.b_simple,
                    "b_simple_low": e.low,
                    "b_simple_high": e.high,
                }
            )
    tracker.remove()
    return rows


def temperature_summary(rows: Sequence[dict[str, Any]], t: Temperature) -> dict[str, Any]:
    """Per variant: B_simple over the control's at equal steps, late in the window and after.

    "window" is the second half of the changed window (time to settle into the new
    temperature); "after" the second half of the stretch after it. App. C predicts the
    variant's temperature ratio (16) in the window and 1 after. The ratio is the median over
    the span's recorded steps: a cold run's |G|² is small and its B_simple has spikes.
    """
    by_variant: dict[str, dict[int, float]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], {})[r["step"]] = r["b_simple"]
    control = by_variant.get("control")
    if control is None:
        return {}
    spans = {
        "before": (t.change_at // 2, t.change_at),
        "window": ((t.change_at + t.restore_at) // 2, t.restore_at),
        "after": ((t.restore_at + t.steps) // 2, t.steps + 1),
    }
    out = {}
    for variant, values in by_variant.items():
        lr_divisor, batch_multiplier = t.variants[variant]
        entry: dict[str, Any] = {"temperature_ratio": lr_divisor * batch_multiplier}
        for span, (lo, hi) in spans.items():
            steps = [s for s in values if lo <= s < hi and math.isfinite(values[s])]
            ratio = [
                values[s] / control[s] for s in steps if math.isfinite(control.get(s, math.nan))
            ]
            entry[f"b_simple_ratio_{span}"] = float(np.median(ratio)) if ratio else None
            entry[f"b_simple_{span}"] = (
                float(np.median([values[s] for s in steps])) if steps else None
            )
        out[variant] = entry
    return out


# -- figures ---------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(records: Sequence[RunRecord], goals: Sequence[float], path: Path) -> None:
    """Training loss against steps and examples for every run; the fastest per batch size bold."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    sizes = sorted({r.batch_size for r in records})
    cmap = plt.get_cmap("viridis")
    fastest: dict[int, RunRecord] = {}
    for r in records:
        incumbent = fastest.get(r.batch_size)
        if r.reached_final_at and (
            incumbent is None or r.reached_final_at < incumbent.reached_final_at
        ):
            fastest[r.batch_size] = r
    for r in records:
        if not r.rows:
            continue
        color = cmap(sizes.index(r.batch_size) / max(1, len(sizes) - 1))
        steps = [row["step"] for row in r.rows]
        loss = [row["loss"] for row in r.rows]
        best = fastest.get(r.batch_size) is r
        style = {"color": color, "lw": 1.6 if best else 0.6, "alpha": 1.0 if best else 0.45}
        label = f"B={r.batch_size}" if best else None
        axes[0].plot(steps, loss, label=label, **style)
        axes[1].plot([s * r.batch_size for s in steps], loss, **style)
    for ax, xlabel in zip(axes, ("optimizer steps", "examples"), strict=True):
        for g in goals:
            ax.axhline(g, color="grey", lw=0.5, ls=":")
        ax.set(xscale="log", yscale="log", xlabel=xlabel)
    axes[0].set_ylabel("training loss (fixed training subset)")
    axes[0].legend(fontsize=7, ncol=2)
    axes[0].set_title("bold: fastest learning rate to the hardest goal")
    axes[1].set_title("dotted: the goals")
    fig.tight_layout()
    fig.savefig(path, dpi=80)  # dozens of noisy curves: a small file to commit
    plt.close(fig)


def plot_comparison(analyses: dict[str, dict[str, Any]], path: Path) -> None:
    """B_crit ± standard error per goal beside B_simple (D.1 average and at goal), like Fig. 7."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for k, (optimizer, analysis) in enumerate(analyses.items()):
        g = analysis["goals"]
        if not g:
            continue
        goals = [x["goal"] for x in g]
        ax.errorbar(
            goals,
            [x["b_crit"] for x in g],
            yerr=[x["b_crit_stderr"] or 0.0 for x in g],
            fmt="o-",
            color=f"C{k}",
            capsize=3,
            label=f"B_crit ({optimizer})",
        )
        for key, marker, text in (
            ("b_simple", "s--", "D.1 average"),
            ("b_simple_at_goal", "^:", "at goal"),
        ):
            pts = [(x["goal"], x[key]) for x in g if x[key] is not None]
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    marker,
                    color=f"C{k}",
                    alpha=0.7,
                    label=f"B_simple {text} ({optimizer})",
                )
    ax.set(xscale="log", yscale="log", xlabel="training-loss goal", ylabel="batch size (examples)")
    ax.invert_xaxis()
    ax.set_title("Critical batch size and simple noise scale (Fashion-MNIST)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_temperature(rows: Sequence[dict[str, Any]], t: Temperature, path: Path) -> None:
    """B_simple of each variant and its ratio to the control, window shaded (Fig. 15)."""
    plt = _pyplot()
    fig, (top, bottom, low) = plt.subplots(
        3, 1, figsize=(8, 8), sharex=True, gridspec_kw={"height_ratios": [3, 3, 2]}
    )
    series: dict[str, tuple[list[int], list[float], list[float]]] = {}
    for r in rows:
        s = series.setdefault(r["variant"], ([], [], []))
        s[0].append(r["step"])
        s[1].append(r["b_simple"])
        s[2].append(r["loss"])
    control = dict(zip(*series.get("control", ([], [], []))[:2], strict=True))
    for k, (variant, (steps, values, loss)) in enumerate(series.items()):
        top.plot(steps, values, color=f"C{k}", lw=1, label=variant)
        low.plot(steps, loss, color=f"C{k}", lw=1)
        ratio = [(s, v / control[s]) for s, v in zip(steps, values, strict=True) if control.get(s)]
        if variant != "control" and ratio:
            bottom.plot(*zip(*ratio, strict=True), color=f"C{k}", lw=1, label=variant)
    for ax in (top, bottom, low):
        ax.axvspan(t.change_at, t.restore_at, color="grey", alpha=0.15)
        ax.set_yscale("log")
    bottom.axhline(16, color="black", ls="--", lw=0.8, label="16 (App. C prediction)")
    bottom.axhline(1, color="black", ls=":", lw=0.8)
    top.set_ylabel("B_simple (examples)")
    bottom.set_ylabel("B_simple / control")
    low.set_ylabel("training loss")
    low.set_xlabel("optimizer step")
    top.set_title(f"Temperature ε/B ÷ 16 in the shaded window (SGD, B={t.batch_size}, ε={t.lr})")
    top.legend(fontsize=7)
    bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})


def read_csv(path: Path) -> list[dict[str, Any]]:
    def value(v: str) -> Any:
        try:
            return float(v) if v else math.nan
        except ValueError:
            return v

    with path.open(newline="") as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, …)")
    p.add_argument("--out", type=Path, help="output folder (default results/<scale> here)")
    p.add_argument("--data-dir", type=Path, help="folder with the Fashion-MNIST *.gz IDX files")
    p.add_argument(
        "--parts",
        default="sgd,adam,temperature",
        help="comma-separated: sgd, adam, temperature (default all); the fit runs on what exists",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the MLP's matrices are small, and on a shared "
        "machine one thread is faster than two)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    scale = SCALES[args.scale]
    out = args.out or HERE / "results" / scale.name
    out.mkdir(parents=True, exist_ok=True)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - {"sgd", "adam", "temperature"}
    if unknown:
        raise NoiseScaleInputError(
            f"unknown --parts {sorted(unknown)}; choose sgd, adam, temperature"
        )
    device = torch.device(args.device)
    data = load_data(find_data_dir(args.data_dir), scale.eval_examples, device)
    t_start = time.perf_counter()
    print(f"Fashion-MNIST: {data.x.shape[0]} training images on {device}; scale {scale.name}")
    timing = {}
    for optimizer in ("sgd", "adam"):
        if optimizer in parts:
            t0 = time.perf_counter()
            run_grid(data, scale, optimizer, out, device=device, seed=args.seed)
            timing[optimizer] = time.perf_counter() - t0
    if "temperature" in parts:
        t0 = time.perf_counter()
        rows = []
        for variant in scale.temperature.variants:
            v0 = time.perf_counter()
            rows.extend(temperature_run(data, scale, variant, device=device, seed=args.seed))
            print(f"temperature {variant}: {time.perf_counter() - v0:.1f} s")
        write_csv(rows, out / "temperature.csv")
        timing["temperature"] = time.perf_counter() - t0
    summary = report(scale, out)
    summary["seconds"] = {**timing, "total": time.perf_counter() - t_start}
    summary["device"] = str(device)
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"Results: {out / 'results.json'}  ({time.perf_counter() - t_start:.0f} s)")
    return 0


def report(scale: Scale, out: Path) -> dict[str, Any]:
    """Fit what the output folder holds, write the figures and print the tables."""
    summary: dict[str, Any] = {
        "kind": "noisescale.reproduction",
        "scale": scale.name,
        "config": asdict(scale),
    }
    analyses = {}
    for optimizer in scale.grids:
        records = list(
            read_records(out / f"runs_{optimizer}.csv", out / f"runs_{optimizer}.jsonl").values()
        )
        if not records:
            continue
        analysis, results = analyse(records, scale.goals, scale.ema)
        analysis["runs"] = [r.summary() for r in records]
        analyses[optimizer] = analysis
        plot_curves(records, scale.goals, out / f"curves_{optimizer}.png")
        if results:
            from noisescale.sweep.plot import write_pareto_png

            write_pareto_png(results, out / f"pareto_{optimizer}.png")
        print_table(optimizer, analysis)
    summary["fits"] = analyses
    if analyses:
        plot_comparison(analyses, out / "b_crit_vs_b_simple.png")
    temperature_path = out / "temperature.csv"
    if temperature_path.exists():
        rows = read_csv(temperature_path)
        summary["temperature"] = temperature_summary(rows, scale.temperature)
        plot_temperature(rows, scale.temperature, out / "temperature.png")
        print("\nTemperature (App. C): B_simple / control (median over the span)")
        for variant, s in summary["temperature"].items():
            print(
                f"  {variant:18s} ε/B ÷{s['temperature_ratio']:<4g} before "
                f"{_fmt(s['b_simple_ratio_before'])}  window {_fmt(s['b_simple_ratio_window'])}  "
                f"after {_fmt(s['b_simple_ratio_after'])}"
            )
    return summary


def print_table(optimizer: str, analysis: dict[str, Any]) -> None:
    print(
        f"\n{optimizer.upper()}: goal   B_crit ± se      S_min    E_min   B_simple(D.1)  "
        "at goal  batch sizes"
    )
    for g in analysis["goals"]:
        print(
            f"  {g['goal']:8.3g}  {g['b_crit']:7.3g} ± {_fmt(g['b_crit_stderr']):7s} "
            f"{g['s_min']:8.4g} {g['e_min']:8.4g}   {_fmt(g['b_simple']):>10s}  "
            f"{_fmt(g['b_simple_at_goal']):>7s}  {len(g['points'])}"
        )
    for s in analysis["skipped"]:
        print(f"  {s['goal']:8.3g}  skipped: {s['reason']}")


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except NoiseScaleInputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
