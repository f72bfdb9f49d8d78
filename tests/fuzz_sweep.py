"""``noisescale sweep`` workers on one storage, against the curves they should have stored.

Each seed draws a grid (batch sizes × learning rates, and 1-2 seeds of the training function,
each seed a study of its own) and a training function whose loss at each step is a known
function of (batch size, learning rate, seed, step) (:func:`truth_curve`), so every stored trial
can be checked against its truth. 1-4 workers (``python -m noisescale sweep`` processes, as on
several machines) run the grid on SQLite (or PostgreSQL with ``--postgres``), with random events
(:data:`EVENTS`): a worker killed by SIGKILL mid-run, a run raising (with and without
``--keep-going``), a run interrupted (KeyboardInterrupt), a diverged run (NaN loss), a worker
dying inside the queue (after its run finished and before the trial is COMPLETE: the next
claimer adopts it; after its claim and before its first heartbeat), ``noisescale fit`` read
again and again while the workers write, an SQLite write lock held for a while, the grid
changed on resume, and the storage opened read-only after the grid is done. Then the same
sweep is resumed (``--study`` again, one worker) until the grid is done. Checked:

* ``exit``: each worker's exit code is the documented one (0; 1 for a run that raised or was
  counted failed; 130 or 1 interrupted; -9 killed); exit 2 comes with a ``noisescale`` message,
  and no exit shows a traceback from inside noisescale (a crash);
* ``grid``: after the resume, every grid point of every study has exactly one COMPLETE trial,
  and no trial is left RUNNING or WAITING;
* ``curves``: each COMPLETE trial's stored curve (``trial_curve``) and value equal its truth
  (NaN stored as ``"nan"`` and the value +inf for a diverged run);
* ``once``: the training function finished each point exactly once over all workers and the
  resume (the calls log; a killed or raised run is rerun, never a finished one), and no trial
  complete after the first phase was replaced or changed by the resume;
* ``summary``: the resuming worker's ``--json`` summary skipped what was complete and ran or
  recovered the rest;
* ``fit``: ``noisescale fit STORAGE --study S --json`` equals ``noisescale fit truth.csv
  --json`` on the true curves of the grid (B_crit and every number of every goal);
* ``fit_live``: the fit read while the workers wrote either refused or equals the fit of the true
  curves of the points it read, and a point it left out is named in its warning;
* ``readonly``: on the read-only storage, ``fit`` gives the same numbers and ``sweep`` (grid done)
  exits 0 or refuses with exit 2 and a message, never a traceback.

Classes per check: ``ok``; ``refused`` (exit 2 with a message); ``crash`` (a traceback from
noisescale, or an exit code nobody documents); ``WRONG-SILENT`` (a lost, duplicated or wrong
trial, a fit that differs — no warning); ``wrong-warned``; ``wrong-cause`` (a refusal naming
the wrong cause); ``hang`` (a worker or the resume still waiting past its time: a point nobody
will run); ``skip``.

Run: ``python tests/fuzz_sweep.py --seeds 0:20 -v`` (10-60 s a seed: processes start).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import random
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKS = ("exit", "grid", "curves", "once", "summary", "fit", "fit_live", "readonly")
EVENTS = (
    "kill",
    "raise",
    "raise_keep",
    "interrupt",
    "nan",
    "fit_live",
    "lock",
    "regrid",
    "readonly",
)
FINDINGS = ("WRONG-SILENT", "wrong-warned", "crash", "wrong-cause", "hang")
#: Goals most runs reach (the loss falls from 2.1 towards 0.1), beside the fit's own choice.
GOALS = "1.5,1.0,0.6"
#: Goals of the fits read while the workers write: reached within the first steps.
LIVE_GOALS = "2.0,1.9"

TRAIN = textwrap.dedent(
    """
    import json
    import math
    import os
    import signal
    import sys

    sys.path.insert(0, os.environ["FUZZ_SWEEP_TESTS"])
    from fuzz_sweep import truth_loss

    CFG = json.loads(os.environ["FUZZ_SWEEP"])


    def _once(tag):
        # True the first time this event fires in the whole seed (a marker file says so).
        path = os.path.join(CFG["dir"], "fired_" + tag)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        return True


    def _log(what, batch_size, learning_rate):
        with open(os.path.join(CFG["dir"], "calls.txt"), "a") as f:
            f.write(f"{what},{CFG['seed']},{batch_size},{learning_rate!r},{os.getpid()}\\n")


    def train(batch_size, learning_rate, reporter, steps):
        seed = CFG["seed"]
        _log("start", batch_size, learning_rate)
        event = CFG["events"].get(f"{seed},{batch_size},{learning_rate!r}")
        for step in range(1, steps + 1):
            if event and step == event[1]:
                if event[0] == "kill" and _once("kill"):
                    os.kill(os.getpid(), signal.SIGKILL)
                if event[0] in ("raise", "raise_keep") and _once("raise"):
                    raise RuntimeError("fuzz: the run raised")
                if event[0] == "interrupt" and _once("interrupt"):
                    raise KeyboardInterrupt
            loss = truth_loss(batch_size, learning_rate, seed, step, CFG["nan"])
            extra = {"b_simple": 100.0 + step} if CFG["b_simple"] else {}
            reporter.report(step, loss, **extra)
            if math.isnan(loss):
                break
            if CFG["sleep"]:
                import time

                time.sleep(CFG["sleep"])
        _log("end", batch_size, learning_rate)
    """
)


def truth_loss(batch_size, learning_rate, seed, step, nan=None):
    """The loss of the run at (B, lr, seed) after ``step`` steps: an S(B) = S_min(1 + B_noise/B)
    curve whose speed depends on lr (best near ``lr_best``); NaN from the step ``nan`` names for
    that point (``nan``: ``[[seed, B, lr, step], ...]``)."""
    for s, b, lr, at in nan or ():
        if (s, b, lr) == (seed, batch_size, learning_rate) and step >= at:
            return math.nan
    b_noise = 40.0 + 10.0 * seed
    lr_best = 0.02 * math.sqrt(batch_size)
    quality = 1.0 / (1.0 + math.log(learning_rate / lr_best) ** 2)
    rate = quality * batch_size / (batch_size + b_noise) * 0.4
    return 0.1 + 2.0 * math.exp(-rate * step)


def truth_curve(batch_size, learning_rate, seed, steps, nan=None):
    """``(steps, losses, value)``: the curve the sweep should store, and the trial's value."""
    xs, ys = [], []
    for step in range(1, steps + 1):
        loss = truth_loss(batch_size, learning_rate, seed, step, nan)
        xs.append(step)
        ys.append("nan" if math.isnan(loss) else loss)
        if math.isnan(loss):
            return xs, ys, math.inf
    return xs, ys, ys[-1]


def draw_config(seed):
    rng = random.Random(seed)
    batch_sizes = sorted(rng.sample([4, 8, 16, 32, 64, 128, 256], rng.randint(3, 5)))
    learning_rates = sorted(rng.sample([0.05, 0.1, 0.2, 0.4, 0.8], rng.randint(1, 3)))
    seeds = list(range(rng.choice([1, 1, 2])))
    events = rng.sample(EVENTS, rng.randint(0, 3))
    cfg = {
        "batch_sizes": batch_sizes,
        "learning_rates": learning_rates,
        "seeds": seeds,
        "workers": rng.randint(1, 4),
        "steps": rng.randint(8, 40),
        "b_simple": rng.random() < 0.3,
        "sleep": rng.choice([0.0, 0.0, 0.01, 0.03]),
        "grace": rng.choice([3, 4, 6]),
        "stagger": rng.choice([0.0, 0.0, 0.5, 2.0]),
        "events": {},
        "nan": [],
        "event_names": sorted(events),
        "keep_going": "raise_keep" in events or rng.random() < 0.3,
        "fit_live": "fit_live" in events,
        "lock": "lock" in events,
        "readonly": "readonly" in events,
        "regrid": None,
        "backend": "sqlite",
    }
    points = [(s, b, lr) for s in seeds for b in batch_sizes for lr in learning_rates]
    for name in events:
        if name in ("kill", "raise", "raise_keep", "interrupt"):
            s, b, lr = rng.choice(points)
            cfg["events"][f"{s},{b},{lr!r}"] = [name, rng.randint(1, cfg["steps"])]
            if name == "raise_keep":
                cfg["keep_going"] = True
        elif name == "nan":
            s, b, lr = rng.choice(points)
            cfg["nan"].append([s, b, lr, rng.randint(1, cfg["steps"])])
        elif name == "regrid":
            extra = [b for b in (2, 512, 48) if b not in batch_sizes]
            cfg["regrid"] = {
                "batch_sizes": sorted({*batch_sizes, rng.choice(extra)}),
                "learning_rates": learning_rates,
            }
            if rng.random() < 0.5:  # drop one learning rate (its runs stay in the study)
                cfg["regrid"]["learning_rates"] = learning_rates[: max(1, len(learning_rates) - 1)]
    # A worker dying inside the queue (its own generator: the draws above stay as they were):
    # after its run finished and before the trial is COMPLETE (the next claimer adopts it), or
    # after its claim and before the first heartbeat.
    die = random.Random(seed * 7919 + 1).random()
    cfg["die"] = "finished" if die < 0.15 else "claimed" if die < 0.2 else None
    if cfg["die"]:
        cfg["event_names"] = sorted([*cfg["event_names"], f"die_{cfg['die']}"])
    if cfg["events"] and cfg["sleep"] == 0.0:
        cfg["sleep"] = 0.01  # give a kill a run to interrupt
    return cfg


# --- running the workers --------------------------------------------------------------------


def _env(cfg, directory, seed):
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
        "FUZZ_SWEEP_TESTS": str(REPO / "tests"),
        "FUZZ_SWEEP": json.dumps(
            {
                "dir": str(directory),
                "seed": seed,
                "events": cfg["events"],
                "nan": cfg["nan"],
                "b_simple": cfg["b_simple"],
                "sleep": cfg["sleep"],
            }
        ),
        "OMP_NUM_THREADS": "1",
    }


WORKER = textwrap.dedent(
    """
    import os
    import signal
    import sys

    from noisescale.sweep import queue

    WHERE = os.environ.get("FUZZ_SWEEP_DIE")


    def _once():
        path = os.path.join(os.getcwd(), "fired_die")
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True


    def _dying(method):
        def wrapped(self, *args, **kwargs):
            if _once():
                os.kill(os.getpid(), signal.SIGKILL)
            return method(self, *args, **kwargs)

        return wrapped


    if WHERE == "finished":
        queue.Claim.complete = _dying(queue.Claim.complete)
    elif WHERE == "claimed":
        queue.Claim.start_heartbeat = _dying(queue.Claim.start_heartbeat)
    from noisescale.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)


def sweep_args(cfg, storage, seed, grid=None, keep_going=None):
    grid = grid or cfg
    args = [sys.executable, "-c", WORKER, "sweep", "train_fn.py:train"]
    args += ["--batch-sizes", ",".join(map(str, grid["batch_sizes"]))]
    args += ["--learning-rates", ",".join(map(repr, grid["learning_rates"]))]
    args += ["--study", f"seed{seed}", "--steps", str(cfg["steps"]), "--storage", storage]
    args += ["--no-progress", "--json", "--heartbeat", "1", "--grace", str(cfg["grace"])]
    if cfg["keep_going"] if keep_going is None else keep_going:
        args.append("--keep-going")
    return args


def start(args, env, directory):
    return subprocess.Popen(
        args, env=env, cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc, timeout=150):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return {"rc": "timeout", "out": out, "err": err[-3000:]}
    return {"rc": proc.returncode, "out": out, "err": err[-3000:]}


def _json(out):
    try:
        return json.loads(out)
    except (json.JSONDecodeError, TypeError):
        return None


def fit_json(target, directory, extra=()):
    proc = subprocess.run(
        [sys.executable, "-m", "noisescale", "fit", target, "--json", "--ema", "0", *extra],
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return {"rc": proc.returncode, "out": proc.stdout, "err": proc.stderr[-3000:]}


def truth_csv(path, cfg, seed, points):
    """The true curves of ``points`` ((B, lr) pairs) as a runs CSV for ``noisescale fit``."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        extra = ["b_simple"] if cfg["b_simple"] else []
        w.writerow(["run", "batch_size", "learning_rate", "step", "loss", *extra])
        for b, lr in points:
            xs, ys, _ = truth_curve(b, lr, seed, cfg["steps"], cfg["nan"])
            for x, y in zip(xs, ys, strict=True):
                row = [f"B{b}_lr{lr!r}", b, repr(lr), x, y if y == "nan" else repr(y)]
                w.writerow(row + [repr(100.0 + x)] * len(extra))


def _goals(payload):
    """A fit's goals without the run names (the truth's names differ from trial numbers)."""
    goals = []
    for goal in payload["goals"]:
        goal = dict(goal)
        goal["points"] = [{k: v for k, v in p.items() if k != "run"} for p in goal["points"]]
        goals.append(goal)
    return goals


# --- the checks -----------------------------------------------------------------------------


def crashed(res):
    text = res.get("err", "")
    return "Traceback" in text and "/noisescale/" in text.split("Traceback", 1)[1]


def own_traceback(res):
    """A traceback whose innermost frame is the training function's (a raised run)."""
    text = res.get("err", "")
    return "Traceback" in text and "fuzz: the run raised" in text


def check_exit(cfg, phase1, seed_of):
    allowed = {0}
    names = cfg["event_names"]
    if "raise" in names or "raise_keep" in names:
        allowed.add(1)
    if "interrupt" in names:
        allowed |= {1, 130, -2}
    if "kill" in names or cfg.get("die"):
        allowed.add(-9)
    if "lock" in names:
        allowed.add(2)
    bad = []
    hung = [i for i, res in enumerate(phase1) if res["rc"] == "timeout"]
    if hung:
        return {"cls": "hang", "workers": hung, "err": phase1[hung[0]]["err"][-400:]}
    for i, res in enumerate(phase1):
        rc = res["rc"]
        if rc == 2 and "noisescale" in res["err"] and not crashed(res):
            continue
        if crashed(res) and not own_traceback(res):
            return {"cls": "crash", "worker": i, "rc": rc, "err": res["err"][-1500:]}
        if rc not in allowed:
            bad.append((i, rc, res["err"][-600:]))
    if bad:
        return {"cls": "crash", "bad": bad}
    return {"cls": "ok", "rcs": [r["rc"] for r in phase1]}


def stored(storage, study):
    import optuna

    from noisescale.sweep.study import trial_curve

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        trials = optuna.load_study(study_name=study, storage=storage).get_trials()
    except KeyError:  # no worker got as far as creating the study
        return []
    out = []
    for t in trials:
        curve = trial_curve(t)
        out.append(
            {
                "number": t.number,
                "state": t.state.name,
                "b": t.params.get("batch_size"),
                "lr": t.params.get("learning_rate"),
                "steps_attr": t.user_attrs.get("steps"),
                "value": t.value,
                "step": curve.get("step", []),
                "loss": curve.get("loss", []),
            }
        )
    return out


def grid_points(cfg, grid=None):
    grid = grid or cfg
    return [(b, lr) for b in grid["batch_sizes"] for lr in grid["learning_rates"]]


def check_grid(cfg, final, grid):
    problems = []
    for seed, trials in final.items():
        complete = Counter((t["b"], t["lr"]) for t in trials if t["state"] == "COMPLETE")
        for point in grid_points(cfg, grid):
            if complete[point] != 1:
                problems.append((seed, point, complete[point]))
        # (a point the changed grid dropped may keep a WAITING trial: nobody runs that grid)
        now = set(grid_points(cfg, grid))
        live = [
            t["number"]
            for t in trials
            if t["state"] in ("RUNNING", "WAITING") and (t["b"], t["lr"]) in now
        ]
        if live:
            problems.append((seed, "live", live))
    return {"cls": "WRONG-SILENT", "problems": problems[:8]} if problems else {"cls": "ok"}


def check_curves(cfg, final):
    problems = []
    for seed, trials in final.items():
        for t in trials:
            if t["state"] != "COMPLETE":
                continue
            xs, ys, value = truth_curve(t["b"], t["lr"], seed, cfg["steps"], cfg["nan"])
            if t["step"] != xs or t["loss"] != ys:
                problems.append((seed, t["number"], t["b"], t["lr"], len(t["step"]), len(xs)))
            elif not (t["value"] == value or (math.isinf(value) and t["value"] == math.inf)):
                problems.append((seed, t["number"], "value", t["value"], value))
    return {"cls": "WRONG-SILENT", "problems": problems[:8]} if problems else {"cls": "ok"}


def calls(directory):
    path = directory / "calls.txt"
    rows = [line.split(",") for line in path.read_text().split()] if path.exists() else []
    return [(w, int(s), int(b), float(lr), int(pid)) for w, s, b, lr, pid in rows]


def check_once(cfg, directory, after_phase1, final, lost_notes):
    ends = Counter((s, b, lr) for w, s, b, lr, _ in calls(directory) if w == "end")
    dup = {k: n for k, n in ends.items() if n > 1}
    changed = []
    for seed, trials in after_phase1.items():
        now = {t["number"]: t for t in final[seed]}
        for t in trials:
            if t["state"] == "COMPLETE" and now.get(t["number"]) != t:
                changed.append((seed, t["number"]))
    if changed:
        return {"cls": "WRONG-SILENT", "changed": changed[:8]}
    if dup:
        # A finished run measured twice: a live worker's claim was taken (its notes say so).
        cls = "wrong-warned" if lost_notes else "WRONG-SILENT"
        return {"cls": cls, "twice": [list(k) for k in dup][:8], "notes": lost_notes[:2]}
    return {"cls": "ok"}


def check_summary(cfg, resume, before):
    problems = []
    hung = [seed for seed, res in resume.items() if res["rc"] == "timeout"]
    if hung:
        return {"cls": "hang", "seeds": hung, "err": resume[hung[0]]["err"][-400:]}
    for seed, res in resume.items():
        summary = _json(res["out"])
        if summary is None:
            if res["rc"] == 2 and not crashed(res):
                continue
            problems.append((seed, "no summary", res["rc"], res["err"][-500:]))
            continue
        for run in summary["runs"]:
            point = (run["batch_size"], run["learning_rate"])
            was = point in before.get(seed, set())
            if was and run["state"] != "skipped":
                problems.append((seed, point, "complete before, now", run["state"]))
            if not was and run["state"] not in ("complete", "recovered"):
                problems.append((seed, point, run["state"], run.get("error")))
    return {"cls": "WRONG-SILENT", "problems": problems[:8]} if problems else {"cls": "ok"}


def compare_fit(db, truth, what):
    if db["rc"] != truth["rc"]:
        if db["rc"] == 2 and not crashed(db):
            return {"cls": "refused", "what": what, "err": db["err"][-400:]}
        return {
            "cls": "crash" if crashed(db) else "WRONG-SILENT",
            "what": what,
            "rc": (db["rc"], truth["rc"]),
            "err": db["err"][-800:],
            "truth": truth["err"][-400:],
        }
    if db["rc"] != 0:
        return {"cls": "ok", "both_refused": db["err"][-200:]}
    got, want = _goals(json.loads(db["out"])), _goals(json.loads(truth["out"]))
    if got != want:
        diffs = [
            (g["goal"], g["b_crit"], w["b_crit"], sorted(k for k in g if g[k] != w.get(k)))
            for g, w in zip(got, want, strict=False)
            if g != w
        ]
        return {"cls": "WRONG-SILENT", "what": what, "diffs": diffs[:4], "n": (len(got), len(want))}
    return {"cls": "ok"}


def check_fit(cfg, directory, storage, final, grid):
    """The fit of the stored trials against the fit of the true curves of the points complete
    (the whole grid unless the grid check failed: then the fit must name what it left out)."""
    out = {}
    for seed in final:
        path = directory / f"truth{seed}.csv"
        done = {(t["b"], t["lr"]) for t in final[seed] if t["state"] == "COMPLETE"}
        missing = set(grid_points(cfg, grid)) - done
        truth_csv(path, cfg, seed, sorted(done))
        for goals in ((), ("--goal", GOALS)):
            db = fit_json(storage, directory, ("--study", f"seed{seed}", *goals))
            truth = fit_json(str(path), directory, goals)
            res = compare_fit(db, truth, f"seed{seed} {' '.join(goals)}")
            if missing and db["rc"] == 0 and "have no finished run" not in db["err"]:
                res = {"cls": "WRONG-SILENT", "what": "points left out unnamed", "missing": missing}
            out[f"{seed}{goals}"] = res
    worst = _worst(list(out.values()))
    return {**worst, "seeds": len(out)}


def _worst(results):
    order = (
        "hang",
        "crash",
        "WRONG-SILENT",
        "wrong-cause",
        "wrong-warned",
        "refused",
        "ok",
        "skip",
    )
    results = results or [{"cls": "skip"}]
    return min(results, key=lambda r: order.index(r["cls"]))


def live_fit(cfg, directory, storage, seed, procs, result):
    """``noisescale fit`` again and again while the workers write (each fit's goals given, so
    that a partial grid is fitted rather than refused)."""
    time.sleep(random.Random(seed).uniform(0.5, 2.0))
    fits = result.setdefault("fits", [])
    while any(p.poll() is None for p in procs) and len(fits) < 12:
        fits.append(fit_json(storage, directory, ("--study", f"seed{seed}", "--goal", LIVE_GOALS)))


def check_fit_live(cfg, directory, result, seed=0):
    fits = result.get("fits")
    if not fits:
        return {"cls": "skip"}
    out = [_check_live(cfg, directory, res, seed) for res in fits]
    worst = _worst(out)
    return {**worst, "fits": len(fits), "ok": sum(r["cls"] == "ok" for r in out)}


def _check_live(cfg, directory, res, seed):
    if res["rc"] != 0:
        if res["rc"] == 2 and not crashed(res):
            return {"cls": "refused", "err": res["err"][-300:]}
        return {"cls": "crash", "err": res["err"][-1500:]}
    payload = json.loads(res["out"])
    used = payload["runs"]
    unfinished = payload.get("unfinished_points", [])
    expected = len(grid_points(cfg))
    if used + len(unfinished) < expected:
        return {
            "cls": "WRONG-SILENT",
            "why": "grid points left out of the fit and not named in its warning",
            "runs": used,
            "unfinished": len(unfinished),
            "grid": expected,
        }
    # The runs it read: the truth of the same points, fitted the same way.
    path = directory / "truth_live.csv"
    truth_csv(path, cfg, seed, _points_read(payload))
    truth = fit_json(str(path), directory, ("--goal", LIVE_GOALS))
    if truth["rc"] != 0:
        return {"cls": "skip", "truth_refused": truth["err"][-200:]}
    if _goals(payload) != _goals(json.loads(truth["out"])):
        return {"cls": "WRONG-SILENT", "why": "the fit differs from the truth's"}
    return {"cls": "ok", "runs": used}


def _points_read(payload):
    return sorted(
        {(p["batch_size"], p["learning_rate"]) for g in payload["goals"] for p in g["points"]}
    )


def hold_lock(db_path, seconds):
    """An SQLite write lock held by another connection for ``seconds``."""
    conn = sqlite3.connect(db_path, timeout=30, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    time.sleep(seconds)
    conn.execute("ROLLBACK")
    conn.close()


def check_readonly(cfg, directory, storage, final, grid, db_path):
    """The finished study opened read-only: SQLite's ``mode=ro`` URI (root writes through a
    file's permissions, so a read-only file is no test as root) and the file made read-only."""
    if not cfg["readonly"] or db_path is None:
        return {"cls": "skip"}
    seed = next(iter(final))
    ro = f"sqlite:///file:{db_path}?mode=ro&uri=true"
    mode = db_path.stat().st_mode
    db_path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    try:
        truth = fit_json(str(directory / f"truth{seed}.csv"), directory)
        db = fit_json(ro, directory, ("--study", f"seed{seed}"))
        env = _env(cfg, directory, seed)
        sweep = finish(start(sweep_args(cfg, ro, seed, grid), env, directory))
    finally:
        db_path.chmod(mode)
    if crashed(sweep) or sweep["rc"] not in (0, 2):
        return {"cls": "crash", "what": "sweep", "rc": sweep["rc"], "err": sweep["err"][-800:]}
    if db["rc"] == 2 and "no such database" in db["err"]:
        return {"cls": "wrong-cause", "what": "fit", "err": db["err"][-300:]}
    fit = compare_fit(db, truth, "readonly fit")
    if fit["cls"] != "ok":
        return fit
    return {"cls": "ok" if sweep["rc"] == 0 else "refused", "sweep_rc": sweep["rc"]}


# --- one seed -------------------------------------------------------------------------------


def check_seed(seed, override=None, storage=None):
    cfg = draw_config(seed)
    cfg.update(override or {})
    record = {"seed": seed, "cfg": cfg}
    root = Path(tempfile.mkdtemp(prefix=f"fuzz_sweep_{seed}_"))
    try:
        (root / "train_fn.py").write_text(TRAIN)
        db_path = None
        if storage is None:
            db_path = root / "sweep.db"
            storage = f"sqlite:///{db_path}"
        else:
            cfg["backend"] = "postgresql"
        record["checks"] = run_phases(cfg, root, storage, db_path)
    except Exception as err:  # the fuzzer's own failure: a crash of the harness, say so
        import traceback

        record["checks"] = {"harness": {"cls": "crash", "exc": traceback.format_exc()[-2000:]}}
        record["harness_error"] = f"{type(err).__name__}: {err}"
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return record


def run_phases(cfg, root, storage, db_path):
    seeds = cfg["seeds"]
    # phase 1: the workers, spread over the seeds' studies, started together (or staggered)
    procs = []
    for i in range(cfg["workers"] * len(seeds)):
        seed = seeds[i % len(seeds)]
        env = {**_env(cfg, root, seed), "FUZZ_SWEEP_DIE": cfg["die"] or ""}
        procs.append(start(sweep_args(cfg, storage, seed), env, root))
        if cfg["stagger"]:
            time.sleep(cfg["stagger"] * random.Random(i).random())
    side = []
    live = {}
    if cfg["fit_live"]:
        args = (cfg, root, storage, seeds[0], procs, live)
        side.append(threading.Thread(target=live_fit, args=args))
    if cfg["lock"] and db_path is not None:
        side.append(threading.Thread(target=_lock_later, args=(db_path,)))
    for t in side:
        t.start()
    limit = time.monotonic() + resume_timeout(cfg, cfg) + 20
    phase1 = [finish(p, timeout=max(1.0, limit - time.monotonic())) for p in procs]
    for t in side:
        t.join()
    after1 = {seed: stored(storage, f"seed{seed}") for seed in seeds}
    before = {
        seed: {(t["b"], t["lr"]) for t in after1[seed] if t["state"] == "COMPLETE"}
        for seed in seeds
    }
    # phase 2: resume each study with one worker (the changed grid, if any), until done
    grid = cfg["regrid"] or cfg
    # (a run may raise in a resume, its event not yet fired: the next resume reruns it; the
    # last resume's summary is checked against what was complete before it)
    resume = {}
    for seed in seeds:
        for _ in range(3):
            trials = stored(storage, f"seed{seed}")
            before[seed] = {(t["b"], t["lr"]) for t in trials if t["state"] == "COMPLETE"}
            proc = start(sweep_args(cfg, storage, seed, grid, True), _env(cfg, root, seed), root)
            resume[seed] = res = finish(proc, timeout=resume_timeout(cfg, grid))
            if res["rc"] in (0, "timeout"):
                break
    final = {seed: stored(storage, f"seed{seed}") for seed in seeds}
    notes = [
        line for r in phase1 for line in r["err"].splitlines() if "handed to another worker" in line
    ]
    fired = sorted(p.name.removeprefix("fired_") for p in root.glob("fired_*"))
    checks = {
        "exit": {**check_exit(cfg, phase1, seeds), "fired": fired},
        "grid": check_grid(cfg, final, grid),
        "curves": check_curves(cfg, final),
        "once": check_once(cfg, root, after1, final, notes),
        "summary": check_summary(cfg, resume, before),
        "fit": check_fit(cfg, root, storage, final, grid),
        "fit_live": check_fit_live(cfg, root, live, seeds[0]),
        "readonly": check_readonly(cfg, root, storage, final, grid, db_path),
    }
    return checks


def resume_timeout(cfg, grid):
    """Seconds a resume may take: its runs twice over, the grace period, and slack."""
    runs = len(grid_points(cfg, grid)) * cfg["steps"] * max(cfg["sleep"], 0.005)
    return 40 + 2 * runs + 3 * cfg["grace"]


def _lock_later(db_path):
    time.sleep(1.5)
    if db_path.exists():
        with contextlib.suppress(sqlite3.OperationalError):
            hold_lock(str(db_path), 3.0)


def findings(record):
    return [(name, res) for name, res in record["checks"].items() if res["cls"] in FINDINGS]


def describe(record):
    cfg = record["cfg"]
    return (
        f"seed {record['seed']}: B={cfg['batch_sizes']} lr={cfg['learning_rates']} "
        f"seeds={len(cfg['seeds'])} workers={cfg['workers']} steps={cfg['steps']} "
        f"events={','.join(cfg['event_names']) or '-'} {cfg['backend']}"
    )


def main(argv=None):
    from fuzz_runner import _seeds, print_class_table, run_check_seeds

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0:10", help="A:B (a range), or seeds A,B,C")
    parser.add_argument("--jsonl", help="append each seed's full record to this file")
    parser.add_argument("--override", help="JSON dict replacing entries of each seed's config")
    parser.add_argument("--postgres", action="store_true", help="a throw-away PostgreSQL server")
    parser.add_argument("-v", "--verbose", action="store_true", help="each check's result")
    args = parser.parse_args(argv)
    override = json.loads(args.override) if args.override else None
    server = None
    if args.postgres:
        sys.path.insert(0, str(REPO / "tests"))
        import postgres_server

        server = postgres_server.start()
    begin = time.time()
    try:
        table, found, _ = run_check_seeds(
            _seeds(args.seeds),
            lambda seed: check_seed(seed, override, server.create_database() if server else None),
            findings, args.jsonl, args.verbose, describe,
        )  # fmt: skip
    finally:
        if server:
            server.stop()
    print_class_table(table, [c for c in (*CHECKS, "harness") if c in table])
    print(f"\n{len(_seeds(args.seeds))} seeds in {time.time() - begin:.0f} s")
    if not found:
        print("no finding")
        return 0
    print(f"\n{len(found)} findings:")
    for record, name, res in found:
        print(f"  {res['cls']} in {name}: {str(res)[:600]}\n    {describe(record)}")
    return 1


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise SystemExit(main())
