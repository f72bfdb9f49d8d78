"""The command line under random and broken input: exit codes, messages, files and numbers.

Each seed draws one subcommand (``calc``, ``recommend``, ``report``, ``explore``, ``fit``,
``branch``, ``profile``, ``sweep``; not ``demo``), a valid argv for it and, on most seeds, one
or two breakages: a flag's value made an edge (0, negative, nan, inf, 1e308, 1e-320, empty, not
a number), a required flag dropped, a flag given twice (argparse keeps the last: the oracle
does too), an unknown flag, a path that does not exist, is a directory or is an input given as
the output; and an input file derived from a real one — a history written by a
``GradientNoiseTracker`` run on a tiny model, a hardware profile in ``noisescale profile``'s
format, a runs file for ``fit`` — truncated, a line corrupted, a value made NaN/inf/huge/a
string/null, a key removed, the header's kind or version changed, CRLF line ends, a byte-order
mark, unicode, a record repeated (a resume), an empty file, another command's file.

The command runs in-process (``noisescale.cli.main(argv)`` in the seed's own directory, its
output captured); on every tenth seed as a subprocess (``python -m noisescale``). Every file in
the directory is hashed before and after. Classes:

* ``ok``: exit 0 and its numbers equal the oracle's: ``calc`` eq. 2.11 (theory's
  ``steps_over_min``/``examples_over_min``) on the noise scale given (or Kaplan's B_crit(L),
  or the temperature's B·T0/T1, or the history's last B_simple read here by hand), eq. 2.6's
  ε/ε_max = 1/(1 + B_noise/B) and --lr scaled by its rule (eq. A.3 for the noise rule);
  ``report --json`` the history's last B_simple and interval, S_min and E_min of eq. D.1 over
  its records (``theory.run_integrals``), each fixed batch size's cost and the run's examples
  (the batches its steps took); ``recommend --json`` S/S_min, E/E_min of each candidate, its
  step time from the profile's fit, its steps, examples, time, device-hours and cost, and the
  front's time and cost ratios; ``fit --json`` B_crit of runs drawn to follow eq. 2.11
  exactly; ``explore`` its page written;
* ``refused``: exit 2 with a one-line ``error:`` message and no traceback;
* ``refused-valid``: exit 2 on an input the fuzzer thinks valid (to look at: a false refusal,
  or the fuzzer's notion of valid is too wide);
* ``crash``: an exception out of ``main``, or a traceback on stderr;
* ``bad-exit``: an error message with an exit code other than 2, or exit 0 on an input that is
  clearly invalid (a breakage the fuzzer marks as such);
* ``WRONG-SILENT``: exit 0 with a number off the oracle's by more than 1e-9 relative, or a file
  that was there before (an input, an earlier output without ``--force``) changed or deleted.

Run ``python tests/fuzz_cli.py --seeds 0:300`` (a few seeds a second; ``profile`` seeds take a
few seconds).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import hashlib
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import torch

from noisescale import theory

COMMANDS = ("calc", "recommend", "report", "explore", "fit", "branch", "profile", "sweep")
WEIGHTS = (6, 4, 6, 2, 3, 1, 1, 1)
RTOL = 1e-9
EDGE = ("0", "-1", "nan", "inf", "-inf", "1e308", "1e-320", "", "abc", "1e15", "1e16", "-0")
CLEARLY_BAD = {"-1", "nan", "inf", "-inf", "", "abc", "1e308"}
_FIXTURES: dict[str, str] = {}


# --- the real files the breakages start from ---------------------------------------------------


def fixtures():
    """Build once per process: a tracker's history, a profile, a runs file, a training function."""
    if _FIXTURES:
        return _FIXTURES
    import noisescale

    root = tempfile.mkdtemp(prefix="fuzz_cli_")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).double()
    hist = os.path.join(root, "history.jsonl")
    tracker = noisescale.GradientNoiseTracker(model, "mean", history_path=hist, sync_every=1000)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for n in [8] * 6 + [16] * 6:  # (a batch size that grows: the run's examples are no trapezoid)
        x = torch.randn(n, 4, dtype=torch.float64)
        y = 3 * x[:, :1] + torch.randn(n, 1, dtype=torch.float64)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        tracker.step(loss)
        opt.step()
        opt.zero_grad()
    tracker.remove()
    _FIXTURES["history"] = hist
    _FIXTURES["profile"] = os.path.join(root, "profile.json")
    with open(_FIXTURES["profile"], "w") as f:
        json.dump(make_profile(0.01, 0.002, 0.003, 64), f, indent=2)
    _FIXTURES["runs"] = os.path.join(root, "runs.csv")
    with open(_FIXTURES["runs"], "w") as f:
        f.write(make_runs(100, 64))
    _FIXTURES["train"] = os.path.join(root, "train_fn.py")
    with open(_FIXTURES["train"], "w") as f:
        f.write(TRAIN_FN)
    return _FIXTURES


TRAIN_FN = """
def train(batch_size, learning_rate, reporter, steps=3, checkpoint=None, seed=0, **kw):
    for s in range(1, steps + 1):
        reporter.report(step=s, loss=1.0 / (1 + learning_rate * batch_size * s / 100))
"""


def make_profile(alpha, beta, update, max_batch):
    """A profile in ``noisescale profile``'s format whose points lie on t(b) = α + β·b."""
    sizes = [1, 2, 4, 8]
    points = [
        {
            "batch_size": b,
            "step_time_s": alpha + beta * b,
            "samples_per_s": b / (alpha + beta * b),
            "times_s": [alpha + beta * b],
            "peak_memory_bytes": None,
        }
        for b in sizes
    ]
    return {
        "kind": "noisescale.profile",
        "version": 1,
        "created": "2026-12-07T12:47:36+00:00",
        "device": {"type": "cpu", "torch_version": "2.13.0+cpu", "name": "AMD EPYC",
                   "cpu_count": 2, "torch_threads": 1},
        "model": {"name": "mnist-cnn", "parameters": 3274634, "param_bytes": 13098536,
                  "spec": "mnist-cnn", "options": {}, "example_unit": "examples"},
        "settings": {"warmup": 0, "repeats": 1, "optimizer": "adamw", "seed": 0,
                     "timed_batch_sizes": sizes, "requested_batch_sizes": sizes,
                     "dropped_batch_sizes": []},
        "points": points,
        "fit": {"alpha_s": alpha, "beta_s": beta, "alpha_se_s": None, "beta_se_s": None,
                "n_points": len(sizes), "max_rel_residual": 0.0},
        "max_batch_size": max_batch,
        "max_batch_search": None,
        "optimizer_update_s": update,
        "optimizer_update_times_s": [update],
        "out_of_memory_batch_size": None,
    }  # fmt: skip


def make_runs(s_min, b_crit):
    """Runs whose loss reaches 0.5 at S(B) = S_min·(1 + B_crit/B) steps exactly (eq. 2.11)."""
    lines = ["run,batch_size,learning_rate,step,loss,examples"]
    for b in (16, 32, 64, 128, 256):
        s = round(s_min * (1 + b_crit / b))
        for step in range(0, 2 * s + 1, max(1, s // 10)):
            lines.append(f"b{b},{b},0.1,{step},{1 - step / (2 * s):.17g},{b * step}")
    return "\n".join(lines) + "\n"


# --- argv: valid, then broken ----------------------------------------------------------------


def _batch_text(r):
    return r.choice(["4", "16", "4,16,64", "2:256:x2", "10:100:+30", "1", "1e6", "3.5", "1e15"])


def valid_args(cmd, r):
    """A list of [flag, value] pairs (value None: a switch; flag None: a positional)."""
    if cmd == "calc":
        source = r.choice(["noise", "noise", "kaplan", "history", "temperature"])
        a = []
        if source in ("noise", "temperature"):
            a.append(["--noise-scale", r.choice(["100", "5.5", "1e6", "0.3", "1e12"])])
        elif source == "kaplan":
            a.append(["--kaplan-loss", r.choice(["2.5", "4", "1.2", "0.8"])])
        else:
            a.append(["--history", "history.jsonl"])
        a.append(["--batch-size", _batch_text(r)])
        if source == "temperature":
            a += [["--temperature-from", r.choice(["1", "0.01"])], ["--temperature-to", "0.5"]]
        if r.random() < 0.3:
            a += [["--lr", "0.1"], ["--lr-batch-size", r.choice(["4", "32"])]]
            a.append(["--lr-rule", r.choice(["noise", "linear", "sqrt", "none"])])
            if r.random() < 0.5:
                a.append(["--alpha", r.choice(["1", "0.5", "0.7"])])
        a.append(["--json", None])
        return a
    if cmd == "recommend":
        a = [["--noise-scale", r.choice(["100", "7", "3000"])], ["--profile", "profile.json"]]
        if r.random() < 0.5:
            a.append(["--gpus", r.choice(["1", "1,2", "2,4,8"])])
        if r.random() < 0.6:
            a.append(["--price", r.choice(["2", "0.5"])])
        t = r.random()
        if t < 0.4:
            a.append(["--target-examples", r.choice(["1e6", "5e4"])])
        elif t < 0.7:
            a.append(["--target-steps", r.choice(["1000", "20"])])
        if r.random() < 0.3:
            a.append(["--batch-sizes", r.choice(["8,16,32", "64", "4,128"])])
        if r.random() < 0.2:
            a.append(["--bandwidth", r.choice(["10", "100"])])
        a.append(["--json", None])
        return a
    if cmd == "report":
        a = [[None, "history.jsonl"], ["-o", r.choice(["page.html", "out/page.html"])]]
        if r.random() < 0.3:
            a.append(["--batch-sizes", r.choice(["4:64:x2", "8", "3,9,27"])])
        a.append(["--json", None])
        return a
    if cmd == "explore":
        a = [["--noise-scale", r.choice(["100", "1", "1e9"])], ["-o", "explore_page.html"]]
        if r.random() < 0.5:
            a.append(["--batch-size", r.choice(["1", "64", "1e9"])])
        a.append(["--json", None])
        return a
    if cmd == "fit":
        a = [[None, "runs.csv"], ["--goal", "0.5"], ["--ema", "0"], ["--json", None]]
        if r.random() < 0.3:
            a.append(["-o", "pareto.html"])
        return a
    if cmd == "profile":
        return [
            [None, "mnist-cnn"],
            ["--device", "cpu"],
            ["--no-memory-search", None],
            ["--batch-sizes", "1,2"],
            ["--repeats", "1"],
            ["--warmup", "0"],
            ["--threads", "1"],
            ["-o", "prof_out.json"],
        ]
    if cmd == "sweep":
        return [
            [None, "train_fn.py:train"],
            ["--batch-sizes", "2,4"],
            ["--learning-rates", "0.1"],
            ["--storage", "sqlite:///sweep.db"],
            ["--steps", "3"],
            ["--no-progress", None],
            ["--json", None],
        ]
    # branch: analyse what a study holds (no training function): there is no such database
    return [
        ["--storage", "sqlite:///sweep.db"],
        ["--no-progress", None],
        ["--json", None],
    ]


def _numeric_flags(args):
    return [i for i, (f, v) in enumerate(args) if f and v is not None and _is_number(v)]


def _is_number(text):
    try:
        float(text.split(",")[0].split(":")[0])
    except ValueError:
        return False
    return True


def break_args(cmd, args, r, notes):
    """Apply one breakage to ``args``; say in ``notes`` what and whether it is clearly invalid."""
    kind = r.choice(
        ["edge", "edge", "edge", "drop", "dup", "unknown", "path", "same_out", "other_file"]
    )
    if kind == "edge" and _numeric_flags(args):
        i = r.choice(_numeric_flags(args))
        value = r.choice(EDGE)
        args[i][1] = value
        notes.append(f"edge {args[i][0]}={value!r}")
        if value in CLEARLY_BAD and not (value == "1e308" and "temperature" in args[i][0]):
            notes.append("invalid")
    elif kind == "drop" and args:
        i = r.randrange(len(args))
        notes.append(f"drop {args[i][0] or args[i][1]}")
        del args[i]
    elif kind == "dup" and _numeric_flags(args):
        i = r.choice(_numeric_flags(args))
        args.insert(r.randrange(len(args) + 1), [args[i][0], r.choice(["7", "0.25", "1e3"])])
        notes.append(f"dup {args[i][0]}")  # (the last one counts: the oracle reads the last)
    elif kind == "unknown":
        args.insert(r.randrange(len(args) + 1), [r.choice(["--bogus", "--jsn", "-x"]), None])
        notes += ["unknown flag", "invalid"]
    elif kind == "path":
        paths = [i for i, (f, v) in enumerate(args) if v and ("." in v and not _is_number(v))]
        if paths:
            i = r.choice(paths)
            args[i][1] = r.choice(["missing.jsonl", "adir", "adir/", "", "nodir/x.json"])
            notes += [f"path {args[i][0] or 'positional'}={args[i][1]!r}"]
            if args[i][0] not in ("-o", "--output"):
                notes.append("invalid")
    elif kind == "other_file":  # another command's file where an input goes
        given = [i for i, (f, v) in enumerate(args) if v and v.split("///")[-1] in INPUTS]
        if given:
            i = r.choice(given)
            name = args[i][1].split("///")[-1]
            other = r.choice([x for x in INPUTS if x != name])
            args[i][1] = args[i][1].replace(name, other)
            notes += [f"{args[i][0] or 'positional'} given {other}", "invalid"]
    elif kind == "same_out":
        inputs = [v for f, v in args if v in ("history.jsonl", "profile.json", "runs.csv")]
        outs = [i for i, (f, v) in enumerate(args) if f in ("-o", "--output")]
        if inputs and outs:
            args[outs[0]][1] = inputs[0]
            notes.append("output is the input")
            if r.random() < 0.5:
                args.append(["--force", None])
                notes.append("--force")
    return args


INPUTS = ("history.jsonl", "profile.json", "runs.csv", "train_fn.py", "sweep.db")


def argv_of(cmd, args):
    out = [cmd]
    for flag, value in args:
        if flag is None:
            out.append(value)
        elif value is None:
            out.append(flag)
        else:
            out += [flag, value]
    return out


# --- input files, broken ---------------------------------------------------------------------


def break_history(text, r, notes):
    """One breakage of a history's text; marks 'invalid' where it is clearly not a history."""
    lines = text.splitlines(keepends=True)
    kind = r.choice(
        [
            "cut", "cut_line", "corrupt", "value", "value", "value", "nokey", "header", "crlf",
            "bom", "unicode", "repeat", "empty", "other", "swap", "second_header", "last",
            "last",
        ]
    )  # fmt: skip
    notes.append(f"history {kind}")
    if kind in ("crlf", "bom", "unicode", "repeat", "swap"):  # (a cut may leave no step)
        notes.append("valid")  # (a history the tracker, an editor or a resume can leave)
    if kind in ("cut", "cut_line"):
        if kind == "cut":
            out = text[: r.randrange(len(lines[0]) + 1, len(text))]
        else:
            out = "".join(lines[: r.randrange(2, len(lines) + 1)])
        if out.count("\n") < 3:  # the header and fewer than two whole records: nothing to report
            notes.append("too short")
        return out
    if kind == "corrupt":
        i = r.randrange(1, len(lines) - 1)  # a line other than the last
        j = r.randrange(len(lines[i]) - 1)
        lines[i] = lines[i][:j] + lines[i][j + 1 :]
        notes.append("maybe-invalid")
        return "".join(lines)
    if kind == "last":  # the last record's headline numbers: what calc and report print
        obj = json.loads(lines[-1])
        key = r.choice(["b_simple", "b_simple_low", "b_simple_high", "examples", "b_big"])
        value = r.choice([-3.0, 0.0, 1.0, 50.0, math.nan, None, 1e300])
        impossible = {
            "b_simple_low": value == 50.0 or value == 1e300 or value == -3.0,
            "b_simple_high": value in (-3.0, 0.0, 1.0),
            "examples": value in (-3.0, 0.0, 1.0, 1e300),  # (it counts up from the first step)
            "b_big": value in (-3.0, 50.0, 1e300),  # (the fixture's batches are 8)
        }
        obj[key] = value
        notes.append(f"last record {key}={value!r}")
        if impossible.get(key):
            notes.append("invalid")
        lines[-1] = json.dumps(obj) + "\n"
        return "".join(lines)
    if kind in ("value", "nokey"):
        i = r.randrange(1, len(lines))
        obj = json.loads(lines[i])
        key = r.choice(
            ["b_simple", "b_simple_low", "b_simple_high", "g2", "trace_sigma", "b_big", "step",
             "skipped", "loss", "examples", "g2_ema", "trace_sigma_ema"]
        )  # fmt: skip
        if kind == "nokey":
            obj.pop(key, None)
            notes.append(f"line {i + 1} without {key}")
        else:
            value = r.choice([math.nan, math.inf, -math.inf, -3.0, 0.0, 1e308, "12", None, True,
                              [1], 1e-300, 5, 2**70])  # fmt: skip
            obj[key] = value
            notes.append(f"line {i + 1} {key}={value!r}")
        lines[i] = json.dumps(obj) + "\n"
        return "".join(lines)
    if kind == "header":
        obj = json.loads(lines[0])
        what = r.choice(["kind", "version", "unit", "drop", "old"])
        if what == "old":  # an older history: no running count of examples in its records
            records = [json.loads(line) for line in lines[1:]]
            for rec in records:
                rec.pop("examples", None)
            lines = lines[:1] + [json.dumps(rec) + "\n" for rec in records]
            notes.append("header old: no examples")
            return "".join(lines)
        if what == "drop":
            lines = lines[1:]
        elif what == "kind":
            obj["kind"] = "noisescale.profile"
        elif what == "version":
            obj["version"] = r.choice([0, 2, 99, "1", 1.0, None])
        else:
            obj["unit"] = r.choice(["tokens", "bytes", None])
        if what != "drop":
            lines[0] = json.dumps(obj) + "\n"
        notes.append(f"header {what}")
        if what in ("drop", "kind") or (what == "version" and obj["version"] != 1):
            notes.append("invalid")
        return "".join(lines)
    if kind == "crlf":
        return text.replace("\n", "\r\n")
    if kind == "bom":
        return "\ufeff" + text
    if kind == "unicode":
        obj = json.loads(lines[0])
        obj["note"] = "ünïcødé ✓ \u2028 x"
        lines[0] = json.dumps(obj, ensure_ascii=r.random() < 0.5) + "\n"
        return "".join(lines)
    if kind == "repeat":
        i = r.randrange(1, len(lines))
        return "".join(lines + lines[i:])
    if kind == "empty":
        notes.append("invalid")
        return r.choice(["", "\n", "   \n\n"])
    if kind == "other":
        notes.append("invalid")
        return r.choice([json.dumps(make_profile(0.01, 0.002, 0.003, 64)), make_runs(100, 64)])
    if kind == "swap":
        i = r.randrange(1, len(lines) - 1)
        lines[i], lines[i + 1] = lines[i + 1], lines[i]
        return "".join(lines)
    # a second header in the middle (two runs appended to one file)
    i = r.randrange(2, len(lines))
    notes.append("maybe-invalid")
    return "".join([*lines[:i], lines[0], *lines[i:]])


def break_profile(text, r, notes):
    obj = json.loads(text)
    kind = r.choice(["fit", "fit", "update", "max", "kind", "cut", "points", "empty", "crlf"])
    notes.append(f"profile {kind}")
    if kind == "fit":
        key = r.choice(["alpha_s", "beta_s"])
        value = r.choice([math.nan, math.inf, -0.01, 0.0, 1e308, "0.1", None, 1e-12])
        obj["fit"][key] = value
        notes.append(f"{key}={value!r}")
        if not isinstance(value, float) or not math.isfinite(value) or value < 0 or value > 1e6:
            notes.append("invalid")
    elif kind == "update":
        value = r.choice([math.nan, -1.0, 1.0, 0.0, None, "x"])
        obj["optimizer_update_s"] = value
        notes.append(f"optimizer_update_s={value!r}")
        if value in (-1.0, "x") or (isinstance(value, float) and math.isnan(value)):
            notes.append("invalid")
        # (1.0, more than α: capped at α with a note, as the recommendation says)
    elif kind == "max":
        value = r.choice([0, -4, 1, 3.5, None, 10**20, "64"])
        obj["max_batch_size"] = value
        notes.append(f"max_batch_size={value!r}")
        if value in (0, -4, 3.5, 10**20, "64"):
            notes.append("invalid")
    elif kind == "kind":
        obj["kind"] = "noisescale.history"
        notes.append("invalid")
    elif kind == "cut":
        notes.append("invalid")
        return text[: r.randrange(len(text) - 1)]
    elif kind == "points":
        obj["points"] = []
        notes.append("maybe-invalid")
    elif kind == "empty":
        notes.append("invalid")
        return ""
    else:
        return json.dumps(obj, indent=2).replace("\n", "\r\n")
    return json.dumps(obj, indent=2)


def break_runs(text, r, notes):
    lines = text.splitlines(keepends=True)
    kind = r.choice(["cut", "value", "value", "header", "crlf", "empty", "bom"])
    notes.append(f"runs {kind}")
    if kind == "cut":
        return text[: r.randrange(len(lines[0]), len(text))]
    if kind == "value":
        i = r.randrange(1, len(lines))
        cells = lines[i].rstrip("\n").split(",")
        j = r.randrange(1, len(cells))
        cells[j] = r.choice(["nan", "inf", "-1", "", "x", "1e308", "0"])
        notes.append(f"line {i + 1} column {j + 1}={cells[j]!r}")
        lines[i] = ",".join(cells) + "\n"
        return "".join(lines)
    if kind == "header":
        lines[0] = lines[0].replace("batch_size", "batchsize")
        notes.append("invalid")
        return "".join(lines)
    if kind == "crlf":
        return text.replace("\n", "\r\n")
    if kind == "bom":
        return "\ufeff" + text
    notes.append("invalid")
    return ""


# --- running it ------------------------------------------------------------------------------


def _hashes(root):
    out = {}
    for base, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def run_cli(argv, cwd, subprocess_run=False):
    """``(exit code, stdout, stderr, escaped exception text or None)`` of ``argv`` in ``cwd``."""
    if subprocess_run:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
        proc = subprocess.run(
            [sys.executable, "-m", "noisescale", *argv],
            cwd=cwd,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        return proc.returncode, proc.stdout, proc.stderr, None
    from noisescale.cli import main as cli_main

    out, err, escaped = io.StringIO(), io.StringIO(), None
    here = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli_main(argv)
    except SystemExit as exit_:
        rc = exit_.code
    except BaseException as exc:  # (anything out of main is a crash)
        rc, escaped = None, "".join(traceback.format_exception(exc))[-1500:]
    finally:
        os.chdir(here)
    return rc, out.getvalue(), err.getvalue(), escaped


def check_seed(seed, subprocess_every=10):
    """One seed: draw, break, run, classify (the record's ``modes`` has one entry: the command)."""
    r = random.Random(f"cli-{seed}")
    cmd = r.choices(COMMANDS, WEIGHTS)[0]
    fx = fixtures()
    notes: list[str] = []
    args = valid_args(cmd, r)
    files = {}
    for name, key in (
        ("history.jsonl", "history"),
        ("profile.json", "profile"),
        ("runs.csv", "runs"),
        ("train_fn.py", "train"),
    ):
        with open(fx[key]) as f:
            files[name] = f.read()
    if cmd == "branch":
        notes.append("no such database")
    if r.random() < 0.45:
        args = break_args(cmd, args, r, notes)
    if r.random() < 0.45:
        if cmd == "report" or (cmd == "calc" and _last(args, "--history") == "history.jsonl"):
            files["history.jsonl"] = break_history(files["history.jsonl"], r, notes)
        elif cmd == "recommend":
            files["profile.json"] = break_profile(files["profile.json"], r, notes)
        elif cmd == "fit":
            files["runs.csv"] = break_runs(files["runs.csv"], r, notes)
    earlier = r.random() < 0.2  # an earlier output already there (refused without --force)
    argv = argv_of(cmd, args)
    record = {"seed": seed, "cmd": cmd, "argv": argv, "notes": notes}
    sub = subprocess_every and seed % subprocess_every == 0 and cmd not in ("profile",)
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w", newline="") as f:
                f.write(text)
        os.makedirs(os.path.join(tmp, "adir"))
        os.makedirs(os.path.join(tmp, "out"))
        if earlier:
            os.makedirs(os.path.join(tmp, "page_figures"))
            for name in (
                "page.html",
                "out/page.html",
                "explore_page.html",
                "pareto.html",
                "page_figures/b_simple_vs_step.png",
            ):
                with open(os.path.join(tmp, name), "w") as f:
                    f.write("<p>an earlier page</p>")
            notes.append("earlier outputs")
        before = _hashes(tmp)
        rc, out, err, escaped = run_cli(argv, tmp, sub)
        after = _hashes(tmp)
        res = classify(cmd, args, notes, rc, out, err, escaped, before, after, tmp)
    res["sub"] = bool(sub)
    record["modes"] = {cmd: res}
    return record


def _last(args, flag):
    """The value argparse keeps for ``flag``: the last one given."""
    values = [v for f, v in args if f == flag]
    return values[-1] if values else None


def classify(cmd, args, notes, rc, out, err, escaped, before, after, tmp):
    tail = (err.strip().splitlines() or [""])[-1][:300]
    if escaped is not None:
        return {"cls": "crash", "exc": escaped}
    if "Traceback (most recent call last)" in err:
        return {"cls": "crash", "exc": err[-1500:]}
    touched = _touched(before, after, args, notes)
    if touched:
        return {"cls": "WRONG-SILENT", "exc": f"rc {rc}; files changed: {touched}", "err": tail}
    if rc == 2:
        if "error:" not in err:
            return {"cls": "bad-exit", "exc": f"exit 2 without a message: {err[-300:]!r}"}
        if not _names_a_cause(tail, args):
            return {"cls": "refused-vague", "exc": tail}
        if not notes or set(notes) <= {"valid", *(n for n in notes if n.startswith("history "))}:
            return {"cls": "refused-valid", "exc": tail}
        return {"cls": "refused", "exc": tail}
    if rc != 0:
        return {"cls": "bad-exit", "exc": f"exit {rc}: {tail}"}
    if "invalid" in notes:
        return {"cls": "bad-exit", "exc": f"exit 0 on {notes}", "out": out[:300]}
    if cmd in ORACLES and not any(f == "--json" for f, _ in args):
        return {"cls": "ok", "exc": "text output (not checked)"}
    try:
        problem = ORACLES[cmd](args, out, tmp) if cmd in ORACLES else None
    except Exception as exc:  # (an output the oracle cannot read)
        problem = f"oracle could not read the output: {type(exc).__name__}: {exc}"
    if problem:
        return {"cls": "WRONG-SILENT", "exc": problem[:1500]}
    return {"cls": "ok"}


CAUSE_WORDS = (
    "history", "profile", "runs", "study", "database", "storage", "batch", "noise scale",
    "argument", "file", "director", "unrecognized", "required", "--", "line", "column", "goal",
    "loss", "function", "run ", "step", "json", "csv", "sqlite", "module",
)  # fmt: skip


def _names_a_cause(message, args):
    """Whether a refusal names something the user gave or can act on (a flag, a file, a word of
    the input's kind), not only a library function's internals."""
    low = message.lower().split("error:", 1)[-1]
    given = [f for f, _ in args if f] + [v for _, v in args if v and not _is_number(v)]
    return any(g and g.lower() in low for g in given) or any(w in low for w in CAUSE_WORDS)


def _touched(before, after, args, notes):
    """Files there before that changed or vanished, but for an output replaced under --force."""
    force = any(f == "--force" for f, _ in args)
    outputs = {v for f, v in args if f in ("-o", "--output")}
    inputs = {"history.jsonl", "profile.json", "runs.csv", "train_fn.py"}
    bad = []
    for name, digest in before.items():
        if after.get(name) == digest:
            continue
        if force and name in outputs and name not in inputs:
            continue
        bad.append(name + (" (deleted)" if name not in after else ""))
    return bad


# --- oracles ---------------------------------------------------------------------------------


def _close(got, want):
    if got is None or want is None:
        return got is None and want is None
    if isinstance(want, float) and math.isinf(want):
        return got == want
    return abs(got - want) <= RTOL * max(abs(want), 1e-300)


def history_truth(path):
    """The history read by hand: records after the last repeat of a step, in order."""
    with open(path, encoding="utf-8-sig") as f:
        # (at line feeds only, as load_history: splitlines() breaks at U+2028 in a string too)
        lines = [line.removesuffix("\r") for line in f.read().split("\n")]
    records = []
    for line in lines[1:]:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            break
        if not isinstance(obj, dict) or ("step" in obj and not isinstance(obj["step"], int)):
            continue
        while records and records[-1]["step"] >= obj["step"]:
            records.pop()
        records.append(obj)
    return records


def _num(x):
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _estimated(rec):
    b = rec.get("b_simple")
    return not rec.get("skipped") and _num(b) and b > 0


def oracle_calc(args, out, tmp):
    rows = json.loads(out)
    rows = rows if isinstance(rows, list) else [rows]
    if _last(args, "--history"):
        recs = [x for x in history_truth(os.path.join(tmp, "history.jsonl")) if _estimated(x)]
        if not recs:
            return f"exit 0 with no record having a B_simple: {rows[0]}"
        b = recs[-1]["b_simple"]
        low, high = recs[-1].get("b_simple_low"), recs[-1].get("b_simple_high")
    elif _last(args, "--kaplan-loss"):
        b = 2.0e8 * float(_last(args, "--kaplan-loss")) ** -4.76
        low = high = None
    else:
        b = float(_last(args, "--noise-scale"))
        if _last(args, "--temperature-from"):
            b *= float(_last(args, "--temperature-from")) / float(_last(args, "--temperature-to"))
        low = high = None
    from noisescale.commands.calc import parse_batch_sizes

    sizes = parse_batch_sizes(_last(args, "--batch-size"))
    if len(rows) != len(sizes):
        return f"{len(rows)} rows for {len(sizes)} batch sizes"
    alpha = float(_last(args, "--alpha") or 1)
    rule = _last(args, "--lr-rule") or "noise"
    for row, size in zip(rows, sizes, strict=True):
        if not _close(row["noise_scale"], b):
            return f"noise_scale {row['noise_scale']!r}, the truth {b!r}"
        if not _close(row["batch_size"], size):
            return f"batch_size {row['batch_size']!r} for {size!r}"
        for key, want in (
            ("steps_over_min", theory.steps_over_min(size, b)),
            ("examples_over_min", theory.examples_over_min(size, b)),
            ("lr_over_max", 1 / (1 + b / size)),  # eq. 2.6 (SGD: α = 1 whatever --alpha)
            ("loss_improvement_over_max", 1 / (1 + b / size)),
            ("b_over_b_noise", size / b),
            ("lr", _scaled_lr(args, size, b, alpha, rule)),
        ):
            if want is None:
                continue
            if key in row and not _close(row[key], want):
                return f"batch {size}: {key} {row[key]!r}, eq. 2.11/2.6 gives {want!r}"
        if low is not None and "noise_scale_interval" in row:
            got = row["noise_scale_interval"]
            # (an unknown or negative lower end is shown as 0, an unknown upper one as none)
            want = [low if _num(low) and low > 0 else 0.0, high if _num(high) else None]
            if not (_close(got[0], want[0]) and _close(got[1], want[1])):
                return f"interval {got} but the last record's is {want}"
    return None


def _scaled_lr(args, size, b, alpha, rule):
    """The --lr scaled from --lr-batch-size to ``size`` (eq. A.3 for the noise rule)."""
    if _last(args, "--lr") is None or _last(args, "--lr-batch-size") is None:
        return None
    lr, b0 = float(_last(args, "--lr")), float(_last(args, "--lr-batch-size"))
    return {
        "noise": lr * ((1 + b / b0) / (1 + b / size)) ** alpha,
        "linear": lr * size / b0,
        "sqrt": lr * math.sqrt(size / b0),
        "none": lr,
    }[rule]


def oracle_report(args, out, tmp):
    data = json.loads(out[out.index("{") :])
    recs = history_truth(os.path.join(tmp, "history.jsonl"))
    est = [x for x in recs if _estimated(x)]
    if not est:
        return f"exit 0 with no record having a B_simple: b_simple_last {data.get('b_simple_last')}"
    last = est[-1]
    if not _close(data["b_simple_last"], last["b_simple"]):
        return f"b_simple_last {data['b_simple_last']!r}, the history's {last['b_simple']!r}"
    run = data["run"]
    # the run's examples: the running count's difference, from the tracker's own file where a
    # breakage removed it (an older history without it: the batches seen, not an estimate)
    seen = {x["step"]: x["examples"] for x in history_truth(fixtures()["history"])}
    # (over the records the costs can use, those with a batch size; the others are left out
    # with a warning)
    costed = [x for x in est if _num(x.get("b_big")) and x["b_big"] > 0]
    first, last_step = (costed[0]["step"], costed[-1]["step"]) if costed else (None, None)
    if len(costed) >= 2 and first in seen and last_step in seen:
        want = seen[last_step] - seen[first]
        if all(_num(x.get("examples")) for x in est) and len(est) == len(recs):
            want = costed[-1]["examples"] - costed[0]["examples"]
        if not _close(run["examples"], want):
            return f"run examples {run['examples']!r}, steps {first}-{last_step}'s batches {want!r}"
    steps = [x["step"] for x in est]
    if len(est) >= 2 and all(_num(x.get("b_big")) and x["b_big"] > 0 for x in est):
        want = theory.run_integrals(steps, [x["b_big"] for x in est], [x["b_simple"] for x in est])
        for key in ("s_min", "e_min"):
            if not _close(run[key], getattr(want, key)):
                return f"run {key} {run[key]!r}, eq. D.1 over the records {getattr(want, key)!r}"
    for row in data["fixed_batch_costs"]:
        b = row["batch_size"]
        s_ = run["s_min"] + run["e_min"] / b
        if not (_close(row["steps"], s_) and _close(row["examples"], b * s_)):
            return f"batch {b}: steps {row['steps']!r}, S_min + E_min/B = {s_!r}"
    return None


def oracle_recommend(args, out, tmp):
    data = json.loads(out)
    b_noise = float(_last(args, "--noise-scale"))
    with open(os.path.join(tmp, "profile.json")) as f:
        prof = json.load(f)
    alpha, beta = prof["fit"]["alpha_s"], prof["fit"]["beta_s"]
    update = prof.get("optimizer_update_s") or 0.0
    if not _close(data["b_noise"], b_noise):
        return f"b_noise {data['b_noise']!r} for --noise-scale {b_noise!r}"
    price = _last(args, "--price")
    cands = list(data["pareto_front"]) + [c for c in data["recommended"].values() if c]
    for c in cands:
        b = c["batch_size"]
        for key, want in (
            ("steps_over_min", theory.steps_over_min(b, b_noise)),
            ("examples_over_min", theory.examples_over_min(b, b_noise)),
        ):
            if not _close(c[key], want):
                return f"batch {b}: {key} {c[key]!r}, eq. 2.11 gives {want!r}"
        k, m = c["num_micro_batches"], c["micro_batch_size"]
        if c["devices"] * k * m != b and c.get("equal_micro_batches"):
            return f"batch {b}: {c['devices']} devices × {k} × {m}"
        want_t = k * (alpha - update + beta * m) + update + c["allreduce_s"]
        if not _close(c["step_time_s"], want_t):
            return f"batch {b}: step_time_s {c['step_time_s']!r}, the profile's fit {want_t!r}"
        if data.get("s_min") is not None and not data.get("relative"):
            steps = data["s_min"] * c["steps_over_min"]
            if not (_close(c["steps"], steps) and _close(c["time_s"], steps * c["step_time_s"])):
                return f"batch {b}: steps {c['steps']!r} / time {c['time_s']!r} vs {steps!r}"
            if not _close(c["gpu_hours"], c["time_s"] * c["devices"] / 3600):
                return f"batch {b}: gpu_hours {c['gpu_hours']!r}"
            if price and not _close(c["cost"], c["gpu_hours"] * float(price)):
                return f"batch {b}: cost {c['cost']!r}, hours × price {c['gpu_hours']!r}×{price}"
    front = data["pareto_front"]
    if front:
        fastest = min(c["time_per_s_min_s"] for c in front)
        hours = min(c["time_per_s_min_s"] * c["devices"] for c in front)
        for c in front:
            if not _close(c["time_rel"], c["time_per_s_min_s"] / fastest):
                return f"batch {c['batch_size']}: time_rel {c['time_rel']!r}, the front's ratio"
            if not _close(c["cost_rel"], c["time_per_s_min_s"] * c["devices"] / hours):
                return f"batch {c['batch_size']}: cost_rel {c['cost_rel']!r}, the front's ratio"
            if not _close(c["time_per_s_min_s"], c["steps_over_min"] * c["step_time_s"]):
                return f"batch {c['batch_size']}: time per S_min {c['time_per_s_min_s']!r}"
        rec = data["recommended"]
        if rec.get("fastest") and not _close(rec["fastest"]["time_rel"], 1.0):
            return f"the fastest choice's time_rel is {rec['fastest']['time_rel']!r}"
        if rec.get("cheapest") and not _close(rec["cheapest"]["cost_rel"], 1.0):
            return f"the cheapest choice's cost_rel is {rec['cheapest']['cost_rel']!r}"
    if _last(args, "--target-examples") and not data.get("relative"):
        e_min = float(_last(args, "--target-examples"))
        if not (_close(data["e_min"], e_min) and _close(data["s_min"], e_min / b_noise)):
            return f"e_min {data['e_min']!r}, s_min {data['s_min']!r} for E_min {e_min!r}"
    if _last(args, "--target-steps") and not data.get("relative"):
        s_min = float(_last(args, "--target-steps"))
        if not (_close(data["s_min"], s_min) and _close(data["e_min"], s_min * b_noise)):
            return f"e_min {data['e_min']!r}, s_min {data['s_min']!r} for S_min {s_min!r}"
    return None


def oracle_fit(args, out, tmp):
    data = json.loads(out)
    goal = data["goals"][0]
    got = goal.get("b_crit")
    if got is None:
        got = next((v for k, v in goal.items() if "b_crit" in k and _num(v)), None)
    with open(os.path.join(tmp, "runs.csv")) as f:
        untouched = f.read() == make_runs(100, 64)
    drawn = untouched and float(_last(args, "--goal") or 0) == 0.5 and _last(args, "--ema") == "0"
    if drawn and (got is None or abs(got - 64) > 1e-6 * 64):
        return f"B_crit {got!r} of runs drawn with B_crit 64 exactly: {goal}"
    return None


def oracle_explore(args, out, tmp):
    data = json.loads(out)
    path = os.path.join(tmp, data.get("output") or data.get("path") or "explore_page.html")
    if not os.path.exists(path):
        return f"no page at {path}: {data}"
    return None


ORACLES = {
    "calc": oracle_calc,
    "report": oracle_report,
    "recommend": oracle_recommend,
    "fit": oracle_fit,
    "explore": oracle_explore,
}


# --- the long run ------------------------------------------------------------------------------


def findings(record):
    return [
        (mode, res["cls"], None)
        for mode, res in record["modes"].items()
        if res["cls"] in ("WRONG-SILENT", "crash", "bad-exit", "refused-valid", "refused-vague")
    ]


def describe(record):
    return f"seed {record['seed']}: {' '.join(record['argv'])!s}  [{'; '.join(record['notes'])}]"


def main(argv=None):
    from fuzz_runner import _seeds, print_class_table, run_seeds

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0:200", help="A:B (a range), or seeds A,B,C")
    parser.add_argument("--jsonl", help="append each seed's full record to this file")
    parser.add_argument("--subprocess-every", type=int, default=10, help="0: never")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    table, found, _ = run_seeds(
        _seeds(args.seeds),
        lambda s: check_seed(s, args.subprocess_every),
        args.jsonl,
        args.verbose,
        line=describe,
        find=findings,
    )
    print_class_table(table, [c for c in COMMANDS if c in table], column_width=11)
    print(f"\n{len(_seeds(args.seeds))} seeds in {time.time() - start:.0f} s")
    if not found:
        print("no finding")
        return 0
    print(f"\n{len(found)} findings:")
    for record, mode, cls, _ in found:
        print(f"  {cls} in {mode}: {record['modes'][mode].get('exc')}\n    {describe(record)}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
