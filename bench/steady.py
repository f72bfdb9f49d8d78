"""The tracker's cost per step in a long run: the default and the exact mode against a plain step,
after the early audits.

``overhead.py`` times steps 4–33 of each method, interleaved with ten others and the peers, one
step each in turn. For the tracker that window is its densest: steps 4, 8, 16 and 32 are audited
(each replays the backward, 2–3× a step) and the steps after an audit run slower while the
memory it freed is handed back and faulted in again. Past step 1,024 one step in 1,024 is
audited. This script measures the steady state a long run spends its time in: the plain step,
the default (sub-batches) and the exact mode of the same workload in one process, in blocks of
ten consecutive steps (the order of the three alternating from block to block, so drift falls on
all alike), for 140 steps; the median process CPU time of the steps after step 40 that are not
audited (64 and 128 are), and, to compare with ``overhead.py``, of steps 4–33 that are not.

With ``measure_every=4`` (a tracker that measures one step in four and lets the others run
plain) a step's time depends on whether it is measured, so that mode is given as a long run's
time per step — the median of its measured steps that are not audited and that of its other
steps, weighed 1 : 3 — over the plain step's median.

    python bench/steady.py                       # every workload of overhead.py, CPU
    python bench/steady.py --workload gpt,hf-vit --steps 200
    python bench/steady.py --workload hf-vit,resnet-gn --width 512   # wider models
    python bench/steady.py --workload gpt,hf-gpt2,hf-llama --compile  # compiled (inductor)

``--width`` sets the transformers models' hidden size (128 by default) and the ResNet's widths
(width/8, width/4, width/2; (16, 32, 64) by default): the hooks' cost per layer is fixed, the
data work grows with the model, so the ratio depends on the model's size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead as ob

import noisescale

MODES: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "default": {},
    "exact": {"per_example_fraction": 1.0},
    "every 4th": {"measure_every": 4},
}
EVERY = 4  # the "every 4th" mode's measure_every
BLOCK = 10
STEADY_FROM = 41


def audited(step: int, every: int = 1) -> bool:
    """The engine's audit schedule (steps count from 1): 1, 2, 4, …, 1024, then every 1024th
    — of the measured steps, with measure_every=``every``."""
    if (step - 1) % every:
        return False
    step = (step - 1) // every + 1
    return step <= 1 or (step <= 1024 and step & (step - 1) == 0) or step % 1024 == 0


def eager_before_audit(step: int, every: int) -> bool:
    """Whether an unmeasured step of measure_every=``every`` runs eagerly in a compiled model:
    the stance is held at force_eager from the ``tracker.step()`` before an audited step."""
    if (step - 1) % every == 0:
        return False
    following = step + every - (step - 1) % every  # the next measured step
    return audited(following, every)


def run(
    name: str, steps: int, width: int | None = None, compile_backend: str | None = None
) -> dict[str, Any]:
    wl = ob.make_workload(name, True, 32, torch.device("cpu"), width)

    def make(kwargs: dict[str, Any] | None) -> Any:
        model = wl.model()
        tracker = None if kwargs is None else noisescale.GradientNoiseTracker(model, **kwargs)
        call = model if compile_backend is None else torch.compile(model, backend=compile_backend)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            opt.zero_grad()
            with wl.autocast():
                loss = wl.per_example_loss(call(x), y).mean()
            loss.backward()
            if tracker is not None:
                tracker.step()
            opt.step()

        return step, tracker

    times: dict[str, list[tuple[int, float]]] = {mode: [] for mode in MODES}

    def run_steps(mode: str, step: Any, start: int, stop: int) -> None:
        for i in range(start, stop):
            x, y = wl.batches[i % len(wl.batches)]
            c0 = time.process_time()
            step(x, y)
            times[mode].append((i + 1, time.process_time() - c0))

    if compile_backend is None:
        built = {mode: make(kwargs) for mode, kwargs in MODES.items()}
        order = list(MODES)
        for b, start in enumerate(range(0, steps, BLOCK)):
            for mode in order if b % 2 == 0 else order[::-1]:
                run_steps(mode, built[mode][0], start, min(start + BLOCK, steps))
            print(f"   {name}: step {min(start + BLOCK, steps)}/{steps}", flush=True)
        for _, tracker in built.values():
            if tracker is not None:
                tracker.remove()
    else:
        # Compiled, one mode at a time, each tracker built just before its run and removed
        # after it: a tracker runs its audited steps eagerly by setting the compiler's stance
        # to force_eager, which is process-wide — in alternating blocks one mode's audit would
        # run the others' compiled steps eagerly (from a tracker's creation to its first step,
        # and across a block boundary within a measure_every cycle). The plain step runs first
        # and last, and its median is that of both runs together (drift between them averages).
        # Dynamo's caches are reset before each: the modes' models are instances of one class,
        # whose compiled graphs would otherwise be offered to the next (one compiled without
        # hooks, or with another tracker's), which the tracker refuses and then runs eagerly.
        from torch import _dynamo

        for mode in [*MODES, "plain"]:
            _dynamo.reset()
            step, tracker = make(MODES[mode])
            run_steps(mode, step, 0, steps)
            if tracker is not None:
                tracker.remove()
            print(f"   {name}: {mode} done", flush=True)

    def median(mode: str, lo: int, hi: int) -> float:
        return statistics.median(t for s, t in times[mode] if lo <= s <= hi and not audited(s))

    def mixed(mode: str, lo: int, hi: int, every: int) -> float:
        # one step in ``every`` measured: the median of the measured steps that are not audited
        # and that of the others, weighed 1 : every − 1 (a long run's proportion, audits aside)
        window = [(s, t) for s, t in times[mode] if lo <= s <= hi]
        measured = [t for s, t in window if (s - 1) % every == 0 and not audited(s, every)]
        rest = [
            t
            for s, t in window
            if (s - 1) % every and not (compile_backend and eager_before_audit(s, every))
        ]
        return ob.long_run_time(measured, rest, every)

    out: dict[str, Any] = {"name": name, "description": wl.description, "modes": {}}
    for mode in MODES:
        if mode == "every 4th":
            early, steady = mixed(mode, 4, 33, EVERY), mixed(mode, STEADY_FROM, steps, EVERY)
            base_early, base_steady = median("plain", 4, 33), median("plain", STEADY_FROM, steps)
        else:
            early, steady = median(mode, 4, 33), median(mode, STEADY_FROM, steps)
            base_early, base_steady = median("plain", 4, 33), median("plain", STEADY_FROM, steps)
        out["modes"][mode] = {
            "early_ms": 1e3 * early,
            "steady_ms": 1e3 * steady,
            "early_ratio": early / base_early,
            "steady_ratio": steady / base_steady,
        }
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# The tracker's cost per step in a long run — {result['device']}",
        "",
        f"{result['date']}, torch {result['torch']}, `{result['command']}`.",
        "",
        "Median process CPU time of a step that is not audited, in one process, the plain step "
        f"and the tracker's modes in alternating blocks of {BLOCK} consecutive steps; ratio to "
        f"the plain step of the same window. Steady: steps {STEADY_FROM}–{result['steps']} "
        "(64 and 128 audited, left out); early: steps 4–33, the window `overhead.py` times "
        "(4, 8, 16, 32 audited, left out here, but the steps after each run slower). "
        f"measure_every={EVERY}: the median of its measured unaudited steps and that of its "
        f"other steps, weighed 1 : {EVERY - 1}."
        + (
            f" Every mode's model compiled (`torch.compile`, backend {result['compile']}), the "
            "modes run one after another, not in alternating blocks (an audited step's "
            "force_eager stance is process-wide: it would run the other modes eagerly too), the "
            "plain step before and after them (its median over both runs); audited steps run "
            "eagerly, and with measure_every so do the unmeasured steps just before an audited "
            "one: left out."
            if result.get("compile")
            else ""
        ),
        "",
        "| workload | plain ms, steady | default, steady | exact, steady | default, early | "
        f"exact, early | default with measure_every={EVERY}, steady |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for w in result["workloads"]:
        m = w["modes"]
        lines.append(
            f"| {w['description']} | {m['plain']['steady_ms']:.1f} | "
            f"**{m['default']['steady_ratio']:.2f}×** | {m['exact']['steady_ratio']:.2f}× | "
            f"{m['default']['early_ratio']:.2f}× | {m['exact']['early_ratio']:.2f}× | "
            f"{m['every 4th']['steady_ratio']:.2f}× |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--workload", default="all", help=f"'all' or a comma list of {', '.join(ob.WORKLOADS)}"
    )
    parser.add_argument(
        "--steps", type=int, default=140, help=f"steps per mode (≥ {STEADY_FROM + 20})"
    )
    parser.add_argument(
        "--width",
        type=int,
        default=None,
        help="the transformers models' hidden size (default 128) and the ResNet's widths "
        "(width/8, width/4, width/2; default (16, 32, 64)): how the cost moves with model size",
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="torch.compile every mode's model (backend: inductor unless given); the modes run "
        "one after another (the plain step first and last), and the unmeasured steps that run "
        "eagerly before an audited one are left out too",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    if args.width is not None and (args.width < 32 or args.width % 32):
        raise SystemExit(f"--width {args.width}: give a multiple of 32, at least 32")
    if args.steps < STEADY_FROM + 20:
        raise SystemExit(
            f"--steps {args.steps}: give at least {STEADY_FROM + 20} "
            f"(the steady window starts at step {STEADY_FROM})"
        )
    names = ob.WORKLOADS if args.workload == "all" else tuple(args.workload.split(","))
    unknown = [n for n in names if n not in ob.WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workload {unknown[0]!r}; choose from {', '.join(ob.WORKLOADS)}")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    result = ob.result_header("steady", torch.device("cpu"))
    result.update(steps=args.steps, width=args.width, workloads=[])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("steady-cpu" if args.width is None else f"steady-cpu-width{args.width}")
    if args.compile:
        from torch import _dynamo

        # every mode compiles its own copy of one model class (measure_every: two graphs)
        _dynamo.config.recompile_limit = 64
        stem = stem.with_name(stem.name + "-compile")
    result.update(compile=args.compile)
    for name in names:
        result["workloads"].append(run(name, args.steps, args.width, args.compile))
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
