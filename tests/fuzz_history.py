"""A run's records on disk through its real life: the fuzzer of ``history_path``.

Each seed draws one run (:func:`draw_life`): a small MLP trained by SGD or Adam on data fixed by
the step number, measured by ``GradientNoiseTracker`` with random options (the source — the
default sub-batches, every example, a fraction —, ``measure_every``, ``sync_every``, gradient
accumulation, a GradScaler whose step is skipped once, a NaN-loss batch abandoned with
``discard()``), its history streamed to one ``history_path`` (sometimes in a directory that does
not exist yet). Its life:

* the run trains to a random step c, saves a checkpoint there (model, optimizer and
  ``tracker.state_dict()``, through JSON or ``torch.save``), trains on to a step k > c and is
  killed there: in a subprocess that SIGKILLs itself, or in this process by dropping the tracker
  (its unsynced steps are not written, as documented). Sometimes the file is then cut at a random
  byte written after the checkpoint (a kill while writing; a cut at a line's end is a clean one);
* a new process (a new model and tracker) resumes from the checkpoint (``load_state_dict``) and
  trains steps c+1..N again on the same path;
* or (a fifth of the seeds) the same life under the Trainer's ``NoiseScaleCallback(history_path=)``:
  a checkpoint every c steps, the job ended at k, its file cut as drawn, and
  ``train(resume_from_checkpoint="checkpoint-c")`` on the same path;
* the last job may also ``write_history`` onto its own path, or the run may follow the README's
  loop (no ``history_path``, each job ending in ``tracker.write_history(path)``);
* intruders, each of which must be refused with the file left byte-identical (its SHA-256) and
  a message naming the cause: a second tracker on the path that was not resumed, one of another
  run (another ``loss_reduction`` or ``beta``), one created while the first was live, a new
  tracker after ``remove()``; and (a fifth of the seeds) a run whose ``history_path`` lies under
  a file, which must be refused naming it (``unwritable``).

The truth is the same run uninterrupted, on a history of its own: the final file, read by
``noisescale.load_history`` (a step that comes again replaces the records from that step on),
must hold exactly its steps, each record equal to the uninterrupted run's (1e-9 relative; the
estimates continue as if uninterrupted, per the docs), and ``noisescale report --json`` and
``calc --history --json`` must say of it what they say of the uninterrupted run's file.

Classes: ``exact``; ``LOST`` (a measured record gone, duplicated or overwritten: the steps read
are not the run's); ``WRONG-SILENT`` (a record's number off, no warning); ``FALSE-REFUSAL`` (a
history the run wrote as documented refused by a reader or by the resumed tracker);
``NOT-REFUSED`` (an intruder that should be refused wrote, or changed the file);
``wrong-cause`` (a refusal whose message does not name its cause); ``crash`` (a raw exception
from inside noisescale).

    python tests/fuzz_history.py --seeds 0:40 [-v] [--jsonl out.jsonl]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

import noisescale
from noisescale.errors import NoiseScaleInputError, UnsupportedModuleError

RTOL = 1e-9
REFUSALS = (NoiseScaleInputError, UnsupportedModuleError)
FINDINGS = ("LOST", "WRONG-SILENT", "FALSE-REFUSAL", "NOT-REFUSED", "wrong-cause", "crash")
CHECKS = ("life", "readers", "intruders", "unwritable")
# the words a refusal of an intruder must use (its cause)
CAUSE_WORDS = {
    "fresh": ("not resumed", "already holds"),
    "other": ("another run",),
    "live": ("not resumed", "already holds"),
    "removed": ("not resumed", "already holds"),
}


# --- the run ----------------------------------------------------------------------------------


def draw_life(seed):
    """The run's options and its life for `seed`."""
    r = random.Random(f"history-{seed}")
    steps = r.randint(5, 8)
    life = {
        "source": r.choice(["subbatch", "subbatch", "exact", "fraction"]),
        "measure_every": r.choice([1, 1, 2, 3]),
        "sync_every": r.choice([1, 1, 2, 32]),
        "accum": r.choice([1, 1, 2]),
        "optimizer": r.choice(["sgd", "adam"]),
        "beta": r.choice([1.0, 0.9]),
        "reduction": r.choice(["mean", "mean", "sum"]),
        "scaler_skip": r.choice([None, None, r.randint(1, steps)]),
        "nan_batch": r.choice([None, None, r.randint(2, steps)]),
        "steps": steps,
        "checkpoint": r.randint(1, steps - 2),
        "missing_dir": r.random() < 0.3,
        "via": r.choice(["json", "torch"]),
        "kill": r.choice(["sigkill", "drop", "drop"]),
        "cut": r.choice([None, None, "mid", "line"]),
        "cut_at": r.random(),
        "intruders": r.sample(["fresh", "other", "live", "removed"], r.randint(0, 2)),
        "other": r.choice(["sum", "beta"]),
    }
    life["killed_at"] = r.randint(life["checkpoint"] + 1, steps)
    # drawn after the first version's options, which keep their seeds' values
    # how the records reach the file: streamed (history_path), streamed and then written whole by
    # the last job (write_history to the same path), or the README's loop — no history_path, each
    # job's last line write_history(path), the first job ending cleanly at killed_at
    life["save"] = r.choice(["stream", "stream", "stream", "stream+write", "write"])
    if r.random() < 0.15:
        life["checkpoint"] = 0  # a checkpoint before the first step (nothing written yet)
    if life["save"] == "write":
        life["cut"] = None
    # the Adam-preconditioned noise scale (plain for its first precondition_from steps)
    life["precondition"] = r.choice([None, None, 1, 3]) if life["optimizer"] == "adam" else None
    if life["scaler_skip"] is not None:
        life["optimizer"] = "sgd"  # (the scaler's skipped step: its optimizer must be the scaler's)
        life["precondition"] = None
    # the Trainer's callback (history_path=, train(resume_from_checkpoint=...)) instead of a loop
    life["trainer"] = r.random() < 0.2
    if life["trainer"]:
        life["checkpoint"] = max(life["checkpoint"], 1)  # (save_steps: every c steps)
        life.update(save="stream", kill="drop", intruders=[], accum=min(life["accum"], 2))
    # a second history_path whose parent is a file (no file can be written there): refused, at
    # construction or at the first write, naming the path — not a raw OSError mid-training
    life["under_a_file"] = r.random() < 0.2
    return life


# --- the Trainer's callback ---------------------------------------------------------------------


class _HFData(torch.utils.data.Dataset):
    def __len__(self):
        return 96

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"x": torch.randn(5, generator=g), "labels": torch.randn(2, generator=g)}


class _HFModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _model()

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


def _trainer_job(life, path, out, until, resume=None):
    """One Trainer job on `path` (checkpoints every ``checkpoint`` steps into `out`), trained to
    step `until` of a run of ``steps`` (the schedule of the whole run), from `resume`."""
    import transformers

    from noisescale.integrations.transformers import NoiseScaleCallback

    transformers.logging.set_verbosity_error()
    kw = _tracker_kwargs(life)
    kw.pop("loss_reduction")
    callback = NoiseScaleCallback(history_path=str(path), **kw)
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=6, max_steps=until,
        gradient_accumulation_steps=life["accum"], learning_rate=0.05, weight_decay=0.0,
        lr_scheduler_type="constant", optim="sgd", max_grad_norm=1e9, report_to=[],
        save_strategy="steps", save_steps=life["checkpoint"], logging_steps=1000, use_cpu=True,
        train_sampling_strategy="sequential", disable_tqdm=True, save_only_model=False,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=_HFModel(), args=args, train_dataset=_HFData(), callbacks=[callback]
    )
    with contextlib.redirect_stdout(io.StringIO()):  # (the Trainer prints its logs)
        trainer.train(resume_from_checkpoint=resume)


def _trainer_life(life, path, ref_path, folder):
    """The uninterrupted run on `ref_path`; the run on `path` to ``killed_at`` (then killed):
    the checkpoint it resumes from, ``checkpoint-<checkpoint>``."""
    _trainer_job(life, ref_path, folder / "ref", life["steps"])
    _trainer_job(life, path, folder / "run", life["killed_at"])
    ck = folder / "run" / f"checkpoint-{life['checkpoint']}"
    return ck


def _batch(step, micro, life):
    g = torch.Generator().manual_seed(1000 * step + micro)
    x, y = torch.randn(6, 5, generator=g), torch.randn(6, 2, generator=g)
    if life["nan_batch"] == step and micro == 0:
        x[0, 0] = math.nan
    if life.get("scaler_skip") == step and micro == 0:
        # (an overflow in the data, not in the loss's graph: a loss that changes its operations
        # is audited, and a resumed tracker audits from its first step — a warned difference)
        x[1, 1] = math.inf
    return x, y


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def _tracker_kwargs(life):
    kw = {
        "loss_reduction": life["reduction"],
        "beta": life["beta"],
        "measure_every": life["measure_every"],
        "sync_every": life["sync_every"],
    }
    if life["source"] == "exact":
        kw["per_example_fraction"] = 1.0
    elif life["source"] == "fraction":
        kw["per_example_fraction"] = 0.5
    else:
        kw["subbatches"] = 2
    return kw


class Run:
    """One process's run: model, optimizer, scaler and tracker, steps numbered from 1."""

    def __init__(self, life, path, resume=None):
        self.life = life
        self.model = _model()
        params = list(self.model.parameters())
        if life["optimizer"] == "adam":
            self.opt = torch.optim.Adam(params, lr=0.01)
        else:
            self.opt = torch.optim.SGD(params, lr=0.05)
        self.scaler = None
        if life["scaler_skip"] is not None:
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
        kw = _tracker_kwargs(life)
        if self.scaler is not None:
            kw["scaler"] = self.scaler
        if life.get("precondition") is not None:
            kw.update(precondition=self.opt, precondition_from=life["precondition"])
        self.path = path
        streamed = path if life.get("save", "stream") != "write" else None
        self.tracker = noisescale.GradientNoiseTracker(self.model, history_path=streamed, **kw)
        self.step_no = 0
        if resume is not None:
            self.model.load_state_dict(resume["model"])
            self.opt.load_state_dict(resume["optimizer"])
            if self.scaler is not None:
                self.scaler.load_state_dict(resume["scaler"])
            self.tracker.load_state_dict(resume["tracker"])
            self.step_no = resume["step"]

    def train(self, until):
        loss_fn = torch.nn.functional.mse_loss
        while self.step_no < until:
            self.step_no += 1
            step = self.step_no
            self.opt.zero_grad()
            total, bad = 0.0, False
            for micro in range(self.life["accum"]):
                x, y = _batch(step, micro, self.life)
                loss = loss_fn(self.model(x), y, reduction=self.life["reduction"])
                if self.life["reduction"] == "mean":
                    loss = loss / self.life["accum"]
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
                bad = bad or not torch.isfinite(loss)
                total += float(loss)
            if bad and self.scaler is None:  # a bad batch: abandoned (the docs' loop)
                self.tracker.discard()
                self.opt.zero_grad()
                continue
            self.tracker.step(loss=total)
            if self.scaler is not None:
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                self.opt.step()

    def end(self, last):
        """The job's end: ``remove()``; the last job of ``stream+write`` and every job of
        ``write`` then writes the whole history to the path (``write_history``)."""
        self.tracker.remove()
        save = self.life.get("save", "stream")
        if save == "write" or (save == "stream+write" and last):
            self.tracker.write_history(self.path)

    def checkpoint(self, via, folder):
        """The checkpoint as a resumed process reads it back."""
        ck = {
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": copy.deepcopy(self.opt.state_dict()),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step_no,
        }
        state = self.tracker.state_dict()
        if via == "json":
            ck["tracker"] = json.loads(json.dumps(state))
            torch.save({k: v for k, v in ck.items() if k != "tracker"}, folder / "ck.pt")
            (folder / "tracker.json").write_text(json.dumps(ck["tracker"]))
        else:
            ck["tracker"] = state
            torch.save(ck, folder / "ck.pt")
        return load_checkpoint(folder)


def load_checkpoint(folder):
    ck = torch.load(folder / "ck.pt", weights_only=False)
    if (folder / "tracker.json").exists():
        ck["tracker"] = json.loads((folder / "tracker.json").read_text())
    return ck


def _sha(path):
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None


# --- the killed process -----------------------------------------------------------------------


def child(arg):
    """The killed run in a process of its own: train to the checkpoint, save it, train on to
    ``killed_at``, then SIGKILL itself (nothing after it runs)."""
    torch.set_num_threads(1)
    spec = json.loads(arg)
    life, path, folder = spec["life"], spec["path"], Path(spec["folder"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = Run(life, path)
        run.train(life["checkpoint"])
        run.checkpoint(life["via"], folder)
        size = os.path.getsize(path) if os.path.exists(path) else 0
        (folder / "size_at_checkpoint").write_text(str(size))
        run.train(life["killed_at"])
    os.kill(os.getpid(), signal.SIGKILL)


def _killed_run(life, path, folder):
    if life["kill"] == "sigkill" and life.get("save") != "write":
        spec = json.dumps({"life": life, "path": str(path), "folder": str(folder)})
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        proc = subprocess.run(
            [sys.executable, __file__, "--child", spec],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != -signal.SIGKILL:
            raise RuntimeError(f"the child ended with {proc.returncode}: {proc.stderr[-2000:]}")
        return load_checkpoint(folder), int((folder / "size_at_checkpoint").read_text())
    run = Run(life, path)
    run.train(life["checkpoint"])
    ck = run.checkpoint(life["via"], folder)
    size = os.path.getsize(path) if path.exists() else 0
    run.train(life["killed_at"])
    if life.get("save") == "write":  # (the README's loop: the first job ends, writing its file)
        run.end(last=False)
        return ck, size
    run.tracker.engine.discard()  # (the process dies: nothing more of it runs)
    del run
    return ck, size


# --- the checks -------------------------------------------------------------------------------


def _exception(err):
    tb = traceback.extract_tb(err.__traceback__)
    inside = any("noisescale" in f.filename and "tests" not in f.filename for f in tb[-1:])
    return f"{type(err).__name__}: {err}"[:400], inside


def _records(path):
    """The file's records after load_history's rule (a step that comes again replaces the
    records from that step on), by step; also the raw complete lines."""
    if not Path(path).exists():
        return []
    lines = Path(path).read_text().splitlines()
    kept = []
    for line in lines[1:]:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        while kept and kept[-1]["step"] >= obj["step"]:
            kept.pop()
        kept.append(obj)
    return kept


def _same(a, b):
    """Where two records differ (key, a, b), numbers at RTOL."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += [(f"{k}.{kk}", xx, yy) for kk, xx, yy in _same(x, y)]
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (xx, yy) in enumerate(zip(x, y, strict=True)):
                out += [(f"{k}[{i}]{kk}", p, q) for kk, p, q in _same({"": xx}, {"": yy})]
        elif isinstance(x, int | float) and isinstance(y, int | float) and x is not True:
            if not math.isclose(x, y, rel_tol=RTOL, abs_tol=1e-300):
                out.append((k, x, y))
        elif x != y:
            out.append((k, x, y))
    return out


def _cli(argv):
    from noisescale.cli import main as cli_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rc = cli_main(argv)
    return rc, out.getvalue(), err.getvalue()


def _comparable(out):
    """A CLI's JSON output without what names the file (its path, the report's output) and the
    warnings a resumed file rightly adds (a step that comes again, an unfinished line)."""
    try:
        obj = json.loads(out)
    except json.JSONDecodeError:
        return out
    for key in ("history", "output", "figures_dir"):
        obj.pop(key, None)
    if isinstance(obj.get("warnings"), list):
        obj["warnings"] = [
            w for w in obj["warnings"] if "comes again" not in w and "unfinished" not in w
        ]
    return obj


@contextlib.contextmanager
def _no_figures():
    """report without drawing its PNG figures (matplotlib: 3-8 s a report on a loaded 2-core
    machine), for the uninterrupted run's file: the comparison reads report's JSON, which
    summary_dict makes from the same data whether the figures are drawn or not."""
    from noisescale.report import figures

    draw_all = figures.draw_all
    figures.draw_all = lambda data: dict.fromkeys(figures.FIGURE_NAMES, b"")
    try:
        yield
    finally:
        figures.draw_all = draw_all


def _readers(path, ref_path):
    """What load_history, report --json and calc --history make of the file, against the
    uninterrupted run's file."""
    res = {"cls": "exact"}
    try:
        h, ref = noisescale.load_history(path), noisescale.load_history(ref_path)
    except REFUSALS as err:
        res.update(cls="FALSE-REFUSAL", exc=_exception(err)[0], where="load_history")
        return res
    except Exception as err:
        res.update(cls="crash", exc=_exception(err)[0], where="load_history")
        return res
    if h.step.tolist() != ref.step.tolist():
        res.update(cls="LOST", bad=[("steps", h.step.tolist(), ref.step.tolist())])
        return res
    for argv in (["report", "{}", "--json"], ["calc", "--history", "{}", "--batch-size", "12"]):
        got = _cli([a.replace("{}", str(path)) for a in argv] + ["--json"] * (argv[0] == "calc"))
        with _no_figures():  # (the oracle's figures: never compared; the file's are drawn)
            want = _cli(
                [a.replace("{}", str(ref_path)) for a in argv] + ["--json"] * (argv[0] == "calc")
            )
        got_out, want_out = _comparable(got[1]), _comparable(want[1])
        if got[0] != want[0] or got_out != want_out:
            cls = "FALSE-REFUSAL" if got[0] != 0 and want[0] == 0 else "WRONG-SILENT"
            if "Traceback" in got[2]:
                cls = "crash"
            res.update(cls=cls, where=argv[0], exc=(got[2] or got[1])[-400:])
            return res
    return res


def _intruder(kind, life, path, ref_run_kw):
    """An intruder on `path`: must be refused, the file unchanged, the message naming why."""
    before = _sha(path)
    kw = dict(ref_run_kw)
    if kind == "other":
        if life["other"] == "sum":
            kw["loss_reduction"] = "sum" if life["reduction"] == "mean" else "mean"
        else:
            kw["beta"] = 0.5
    res = {"cls": "exact", "kind": kind}
    model = _model()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tr = noisescale.GradientNoiseTracker(model, history_path=path, **kw)
            x, y = _batch(1, 0, {"nan_batch": None})
            loss = torch.nn.functional.mse_loss(model(x), y, reduction=kw["loss_reduction"])
            loss.backward()
            tr.step(loss=float(loss))
            tr.remove()
    except REFUSALS as err:
        msg = str(err)
        if _sha(path) != before:
            res.update(cls="NOT-REFUSED", why="refused, but the file changed", exc=msg[:300])
        elif not any(w in msg for w in CAUSE_WORDS[kind]) or "not changed" not in msg:
            res.update(cls="wrong-cause", exc=msg[:300])
        return res
    except Exception as err:
        res.update(cls="crash", exc=_exception(err)[0])
        return res
    res.update(cls="NOT-REFUSED", why="the intruder wrote", changed=_sha(path) != before)
    return res


def check_seed(seed, override=None):
    torch.set_num_threads(1)
    life = draw_life(seed)
    life.update(override or {})
    record = {"seed": seed, "life": life, "checks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sub = folder / "missing" / "deeper" if life["missing_dir"] else folder
        path, ref_path = sub / "history.jsonl", folder / "ref.jsonl"
        checks = record["checks"]
        if life.get("trainer"):
            return _check_trainer(record, life, path, ref_path, folder)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = Run(life, ref_path)
                ref.train(life["steps"])
                ref.end(last=True)
        except REFUSALS as err:
            record["gen_error"] = _exception(err)[0]
            return record
        # the life: killed, (cut), resumed
        life_res = checks["life"] = {"cls": "exact"}
        live = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if "live" in life["intruders"]:  # created before the run's first write
                    live = noisescale.GradientNoiseTracker(
                        _model(), history_path=path, **_tracker_kwargs(life)
                    )
                ck, size = _killed_run(life, path, folder)
                killed = path.read_bytes() if path.exists() else b""
                if life["cut"] and len(killed) > size:
                    if life["cut"] == "line":
                        ends = [i + 1 for i in range(size, len(killed)) if killed[i] == 10]
                        at = ends[int(life["cut_at"] * len(ends))] if ends else size
                    else:
                        at = size + 1 + int(life["cut_at"] * (len(killed) - size - 1))
                    path.write_bytes(killed[:at])
                life_res["file_at_kill"] = [
                    size,
                    len(killed),
                    len(path.read_bytes()) if path.exists() else 0,
                ]
                resumed = Run(life, path, resume=ck)
                resumed.train(life["steps"])
                resumed.end(last=True)
        except REFUSALS as err:
            life_res.update(cls="FALSE-REFUSAL", exc=_exception(err)[0])
        except Exception as err:
            msg, inside = _exception(err)
            life_res.update(cls="crash" if inside else "crash-harness", exc=msg)
        _compare_life(checks, life_res, path, ref_path)
        # the intruders
        intr = {"cls": "exact", "each": []}
        for kind in life["intruders"]:
            if not path.exists():
                continue
            if kind == "live" and live is not None:
                before = _sha(path)
                try:
                    x, y = _batch(1, 0, {"nan_batch": None})
                    loss = torch.nn.functional.mse_loss(
                        live.model(x), y, reduction=life["reduction"]
                    )
                    loss.backward()
                    live.step(loss=float(loss))
                    live.sync()
                    res = {"cls": "NOT-REFUSED", "kind": kind, "changed": _sha(path) != before}
                except REFUSALS as err:
                    res = {"cls": "exact", "kind": kind}
                    if _sha(path) != before:
                        res["cls"] = "NOT-REFUSED"
                    elif not any(w in str(err) for w in CAUSE_WORDS[kind]):
                        res.update(cls="wrong-cause", exc=str(err)[:300])
                except Exception as err:
                    res = {"cls": "crash", "kind": kind, "exc": _exception(err)[0]}
            else:
                res = _intruder(kind, life, path, _tracker_kwargs(life))
            intr["each"].append(res)
            if res["cls"] != "exact":
                intr["cls"] = res["cls"]
        if life["intruders"]:
            checks["intruders"] = intr
        if life.get("under_a_file"):
            checks["unwritable"] = _under_a_file(life, folder)
    return record


def _under_a_file(life, folder):
    """A run whose ``history_path`` lies under a file: must be refused with the library's error
    naming the path (a raw OSError from inside noisescale is a crash)."""
    (folder / "a_file").write_text("x")
    path, run = folder / "a_file" / "history.jsonl", None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = Run({**life, "save": "stream"}, path)
            run.train(life["steps"])
            run.tracker.remove()
    except REFUSALS as err:
        ok = "a_file" in str(err)
        return {"cls": "exact" if ok else "wrong-cause", "exc": str(err)[:300]}
    except Exception as err:
        at = run.step_no if run is not None else 0
        return {"cls": "crash", "exc": _exception(err)[0], "at_step": at}
    return {"cls": "NOT-REFUSED", "why": "the run ended without an error, nothing written"}


def _cut(life, path, size):
    """Cut the file at a random byte written after `size` (a kill while writing), as drawn."""
    killed = path.read_bytes() if path.exists() else b""
    if life["cut"] and len(killed) > size:
        if life["cut"] == "line":
            ends = [i + 1 for i in range(size, len(killed)) if killed[i] == 10]
            at = ends[int(life["cut_at"] * len(ends))] if ends else size
        else:
            at = size + 1 + int(life["cut_at"] * (len(killed) - size - 1))
        path.write_bytes(killed[:at])
    return [size, len(killed), len(path.read_bytes()) if path.exists() else 0]


def _compare_life(checks, life_res, path, ref_path):
    if life_res["cls"] != "exact":
        return
    got, want = _records(path), _records(ref_path)
    if [r["step"] for r in got] != [r["step"] for r in want]:
        life_res.update(
            cls="LOST", bad=[("steps", [r["step"] for r in got], [r["step"] for r in want])]
        )
    else:
        bad = [(g["step"], *d) for g, w in zip(got, want, strict=True) for d in _same(g, w)]
        if bad:
            life_res.update(cls="WRONG-SILENT", bad=bad[:6])
    readers = checks["readers"] = _readers(path, ref_path)
    if life_res["cls"] == "LOST" and readers["cls"] == "WRONG-SILENT":
        # (a reader's summary of a file that lost a record differs by that record — the
        # precondition switch's steps read from 2 for 1 —: the loss, not another finding)
        readers["cls"] = "LOST"


def _check_trainer(record, life, path, ref_path, folder):
    checks = record["checks"]
    life_res = checks["life"] = {"cls": "exact"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ck = _trainer_life(life, path, ref_path, folder)
            # the records the checkpoint holds: those of its step (the callback's state is saved
            # after the step's sync, on_save)
            size = 0
            if path.exists():
                lines = path.read_bytes().split(b"\n")
                size = sum(
                    len(line) + 1
                    for line in lines
                    if line
                    and (b'"kind"' in line or json.loads(line)["step"] <= life["checkpoint"])
                )
            life_res["file_at_kill"] = _cut(life, path, size)
            _trainer_job(life, path, folder / "run", life["steps"], resume=str(ck))
    except REFUSALS as err:
        life_res.update(cls="FALSE-REFUSAL", exc=_exception(err)[0])
    except Exception as err:
        life_res.update(cls="crash", exc=_exception(err)[0])
    _compare_life(checks, life_res, path, ref_path)
    return record


def findings(record):
    return [(name, res) for name, res in record.get("checks", {}).items() if res["cls"] in FINDINGS]


def describe(record):
    life = record["life"]
    keys = ("source", "measure_every", "sync_every", "accum", "checkpoint", "killed_at", "steps")
    more = ("kill", "cut", "via", "scaler_skip", "nan_batch", "intruders")
    return f"seed {record['seed']}: " + ", ".join(f"{k}={life[k]}" for k in keys + more)


def main(argv=None):
    from fuzz_runner import _seeds, print_class_table, run_check_seeds

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0:20", help="A:B (a range), or seeds A,B,C")
    parser.add_argument("--jsonl", help="append each seed's full record to this file")
    parser.add_argument("--override", help="JSON dict replacing entries of each seed's life")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true", help="each check's result")
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return 1
    torch.set_num_threads(1)
    override = json.loads(args.override) if args.override else None
    start = time.time()
    table, found, invalid = run_check_seeds(
        _seeds(args.seeds),
        lambda seed: check_seed(seed, override),
        findings, args.jsonl, args.verbose, describe,
    )  # fmt: skip
    print_class_table(table, [c for c in CHECKS if c in table])
    print(f"\n{len(_seeds(args.seeds))} seeds in {time.time() - start:.0f} s")
    for seed, why in invalid:
        print(f"seed {seed}: invalid: {why}")
    if not found:
        print("no finding")
        return 0
    for record, name, res in found:
        print(f"{describe(record)}\n  {name}: {res['cls']} {str(res)[:400]}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
