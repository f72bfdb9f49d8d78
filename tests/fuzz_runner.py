"""The differential fuzzer: noisescale's per-example and sub-batch norms against brute force.

Each seed draws a random model, data and loss (tests/fuzz_grammar.py). The truth is brute force:
one autograd backward per example (per row, for two views), in float64. The fuzzer then measures
the same case in each mode and compares at a relative tolerance of 1e-7:

* ``one_shot``: ``noisescale.per_example_sqnorms`` around one backward;
* ``engine``: ``PerExampleNorms`` in exact mode, 3 steps, its ``raw_sqnorms`` (× N² for a mean
  loss) and its ``grad_sqnorm``;
* ``sub_chosen``, ``sub_products``: sub-batch mode (``subbatches=2``, re-checked every step),
  with each layer's way as the engine chooses it, and with the products way forced everywhere
  (as the tests' ``products`` fixture does), against the sums of each sub-batch's examples;
* ``sgd_exact``, ``sgd_sub``: exact and sub-batch mode for 4 SGD steps on a copy of the model,
  brute force recomputed at every step (catches what holds at step 1 and not after);
* ``subset``: ``per_example_fraction=0.5``; ``accum``: two micro-batches, two backwards;
* ``tracker_exact``, ``tracker_default``: ``GradientNoiseTracker`` with
  ``per_example_fraction=1.0`` and with its defaults, 3 steps: a crash-or-refusal check only;
* ``tracker_numbers`` (run only when named, ``--modes tracker_numbers``; tests/fuzz_tracker.py):
  the tracker's numbers — every history record, ``estimate()`` and ``estimate_groups()`` —
  against the estimator on a brute-force history, over 4-5 optimizer steps with options drawn
  from the seed (source, accumulation, groups, precondition, tokens, measure_every, a resume, ...).

Each mode ends in one class: ``exact``; ``withheld-then-exact`` (the first step withheld with a
reason, the rest exact); ``refused`` (``UnsupportedModuleError`` or ``NoiseScaleInputError``, the
library's first rule working); ``WRONG-SILENT`` (a number off by more than 1e-7 and no warning
about it); ``wrong-warned`` (off, and some warning of the run matched words such as
"withheld" or "mix" — loosely: not necessarily about that number); ``SHAPE`` (a result of the
wrong length); ``crash`` (any other exception from
inside noisescale: a raw torch error, an AssertionError, a KeyError); and a few neutral ones
(``withheld-all``, ``exact-then-refused``, ``exact-rows`` for the two-view one-shot API's
2N rows, each exact as a row of a mean over 2N, ``ok`` for a tracker that ran). WRONG-SILENT,
wrong-warned, SHAPE and crash are the findings.

Run it long from the repository root (``make fuzz`` does this)::

    python tests/fuzz_runner.py --seeds 0:500 --jsonl fuzz.jsonl

It prints a table of the classes per mode and every seed with a finding, with its mode and
relative error, and exits 1 if there is any. ``--seeds 61042 -v`` replays one seed and
prints each mode's result; ``--override '{"lossform": "plain"}'`` replays with the spec changed.
The trackers run on every 5th seed (``--tracker-every``). One torch thread; about 0.3-1 s a seed.
tests/test_fuzz_models.py runs a fixed list of seeds through :func:`check_seed` in the suite.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
import traceback
import warnings

import torch

import fuzz_grammar  # the sibling module: tests/ is on the path as the script's folder
import fuzz_tracker
import noisescale
from noisescale.errors import NoiseScaleInputError, UnsupportedModuleError
from noisescale.per_example import PerExampleNorms
from noisescale.per_example import subbatch as subbatch_mod

RTOL = 1e-7
REFUSALS = (UnsupportedModuleError, NoiseScaleInputError)
# A warning with one of these words says the numbers are not to be trusted: a wrong number
# under it is "wrong-warned", not silent.
WITHHOLD_WORDS = (
    "withheld", "withhold", "left out", "leaves out", "not attribut", "cannot be attributed",
    "refus", "unsupported", "mix", "excluded",
)  # fmt: skip
MODES = (
    "one_shot", "engine", "sub_chosen", "sub_products", "sgd_sub", "sgd_exact", "subset",
    "accum", "tracker_exact", "tracker_default",
)  # fmt: skip
TRACKER_MODES = ("tracker_exact", "tracker_default")
# The tracker's numbers against brute force (tests/fuzz_tracker.py): run only when asked
# (``--modes tracker_numbers``), every seed
NUMBER_MODES = ("tracker_numbers",)
ALL_MODES = MODES + NUMBER_MODES
# Modes that need one loss row per example: not run on two-view losses (2N rows).
PER_EXAMPLE_ONLY = ("sgd_sub", "sgd_exact", "subset", "accum", "tracker_numbers")
# a wrong number, warned of or not (the warning words are matched loosely: any warning of the
# run), a result of the wrong length, a raw error from inside noisescale
FINDINGS = ("WRONG-SILENT", "wrong-warned", "crash", "SHAPE")


@contextlib.contextmanager
def float64_default():
    """The grammar builds and runs everything in float64: torch's default dtype, restored after."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# --- the truths -------------------------------------------------------------------------------


def _grads_of(loss, params):
    grads = torch.autograd.grad(loss.sum(), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


# blocks whose computation depends on the batch's size (``regroup`` pairs the examples' rows,
# [N, T, D] -> [N/2, 2T, D], and is skipped at an odd N): one example alone runs another model,
# so their truth is each example's loss differentiated within the batch — valid where no block
# mixes the examples (seed 2052 read 1.55 "off" against the one-example forward, and exact
# against this, 2026-12-07)
_SIZE_DEPENDENT = ("regroup",)


def in_batch_truth(spec, model=None, per_example_loss=None, n=None):
    """Whether ``spec``'s truth is taken within the batch: a block of :data:`_SIZE_DEPENDENT`,
    or one that mixes the examples (``fuzz_grammar.MIXING_KINDS``) where no example's loss sends
    a gradient through it in the batch's forward (given ``model``; :func:`_mixing_couples`).
    That mix is then a statistic of the batch that no gradient goes through — a constant, which
    weighs the examples' terms and couples none of their gradients (docs/per_example.md) —,
    while a forward alone runs another model: seed 1089, a batch mean upstream of a packed GRU
    whose lengths come from detached features, every example's last position padding in the
    batch, read 0.63 "off" against the one-example forwards and exact against this (2026-12-07).
    A mix a gradient goes through keeps the one-example truth: per-example gradients are not
    defined there, and a number measured as if the examples were apart must read wrong."""
    if spec.get("mixing"):
        return model is not None and not _mixing_couples(model, per_example_loss, n)
    return any(b in _SIZE_DEPENDENT for b in spec.get("blocks", ()))


def _mixing_couples(model, per_example_loss, n):
    """Whether some example's loss, in the batch's forward, has a gradient other than zero at the
    output of a block that mixes the examples (each example's loss checked alone: their sum's
    gradient could cancel)."""
    outputs = []
    handles = [
        block.register_forward_hook(lambda module, args, out: outputs.append(out))
        for block in getattr(model, "blocks", ())
        if block.kind in fuzz_grammar.MIXING_KINDS
    ]
    try:
        losses = per_example_loss(model, slice(0, n))
    finally:
        for handle in handles:
            handle.remove()
    outputs = [out for out in outputs if out.requires_grad]
    if not outputs or not losses.requires_grad:
        return False
    for i in range(n):
        grads = torch.autograd.grad(losses[i], outputs, retain_graph=True, allow_unused=True)
        if any(g is not None and bool(g.ne(0).any()) for g in grads):
            return True
    return False


def per_example_grads(model, per_example_loss, n, in_batch=False):
    """Each example's gradient, one backward per example: the brute-force truth (``in_batch``:
    each example's loss in the batch's forward, differentiated alone)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if in_batch:
        losses, out = per_example_loss(model, slice(0, n)), []
        for i in range(n):
            grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
            out.append(
                [
                    torch.zeros_like(p) if g is None else g
                    for g, p in zip(grads, params, strict=True)
                ]
            )
        return out
    return [_grads_of(per_example_loss(model, slice(i, i + 1)), params) for i in range(n)]


def row_grads(model, per_example_loss):
    """Each row's gradient for a two-view loss, where each view's loss is a row of its own."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows, row_loss = per_example_loss.rows
    return [_grads_of(row_loss(model, j), params) for j in range(rows)]


def truth_sq(grads):
    return torch.stack([sum(g.pow(2).sum() for g in gs) for gs in grads])


def _groups(subbatches, off=0):
    """The examples of each sub-batch, in the order the engine reports them."""
    if hasattr(subbatches, "parts"):
        out = []
        for part in subbatches.parts:
            if isinstance(part, int):
                out += [[off + i] for i in range(part)]
                off += part
            else:
                out += _groups(part, off)
                off += sum(part.sizes)
        return out
    index = subbatches.index.view(subbatches.k, subbatches.n).tolist()
    return [[off + i for i in index[j][:size]] for j, size in enumerate(subbatches.sizes)]


def subbatch_truth(grads, subbatches, scale):
    """The squared norm of each sub-batch's summed gradient; None if it names unknown rows."""
    out = []
    for members in _groups(subbatches):
        if max(members) >= len(grads):
            return None
        total = 0.0
        for t in range(len(grads[0])):
            total = total + (sum(grads[i][t] for i in members) * scale).pow(2).sum()
        out.append(total)
    return torch.stack(out)


def relerr(got, want):
    """Largest absolute difference over the largest true value (inf if the shapes differ)."""
    got = got.detach().to(torch.float64).flatten()
    want = want.detach().to(torch.float64).flatten()
    if got.shape != want.shape:
        return float("inf")
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-300))


def loss_of(spec, per_example_loss, model, n):
    losses = per_example_loss(model, slice(0, n))
    return losses.mean() if spec["reduction"] == "mean" else losses.sum()


# --- the modes --------------------------------------------------------------------------------


def _exception(err):
    """A refusal (the library's first rule at work) or a crash (a raw error from inside it)."""
    cls = "refused" if isinstance(err, REFUSALS) else "crash"
    out = {"cls": cls, "exc": f"{type(err).__name__}: {str(err)[:300]}"}
    if cls == "crash":
        out["tb"] = traceback.format_exc()[-1500:]
    return out


def _note_exception(res, err):
    """A step loop's result given the error that ended it (:func:`_exception`): its text, its
    class as ``exc_cls`` and a crash's traceback."""
    exc = _exception(err)
    res["exc"], res["exc_cls"] = exc["exc"], exc["cls"]
    if "tb" in exc:
        res["tb"] = exc["tb"]


def _warned(caught):
    messages = [str(w.message) for w in caught]
    return any(word in m.lower() for m in messages for word in WITHHOLD_WORDS), messages


def run_one_shot(spec, model, per_example_loss, grads, n):
    model.zero_grad()
    want = truth_sq(grads)
    if len(grads) != n and spec["reduction"] == "mean":
        # Two views: the one-shot API counts each view's loss as a row, as documented, and
        # scales a mean loss as a mean over the 2N rows; 4× each row's norm for a mean over N.
        want = want * (len(grads) / n) ** 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with noisescale.per_example_sqnorms(model, loss_reduction=spec["reduction"]) as pe:
                loss_of(spec, per_example_loss, model, n).backward()
            got = pe.sqnorms
        except Exception as err:
            return _exception(err)
    warned, messages = _warned(caught)
    if got is None:
        return {"cls": "none", "warn": messages[:3]}
    if got.numel() != want.numel():
        return {"cls": "SHAPE", "len": got.numel(), "n": want.numel()}
    re = relerr(got, want)
    if re < RTOL:
        return {"cls": "exact" if len(grads) == n else "exact-rows", "re": re}
    return {
        "cls": "wrong-warned" if warned else "WRONG-SILENT",
        "re": re,
        "got": got.tolist(),
        "want": want.tolist(),
        "warn": messages[:3],
    }


def _sgd_step(model):
    """A normalised SGD step (stays small whatever the gradient's size)."""
    with torch.no_grad():
        norm = sum(float(q.grad.pow(2).sum()) for q in model.parameters() if q.grad is not None)
        for q in model.parameters():
            if q.grad is not None:
                q -= 0.2 * q.grad / (1.0 + norm**0.5)


def _engine_step(pass_, grads, scale, subbatches):
    """One collected pass against the truth."""
    if pass_.raw_sqnorms is None:
        return {
            "cls": "withheld" if pass_.withheld else "none",
            "why": (pass_.withheld or "")[:200],
        }
    if subbatches:
        want = subbatch_truth(grads, pass_.subbatches, scale)
        expected = len(pass_.subbatches.sizes)
    else:
        want = truth_sq(grads) * scale**2
        expected = len(grads)
    if want is None or pass_.raw_sqnorms.numel() != expected:
        return {"cls": "SHAPE", "len": pass_.raw_sqnorms.numel()}
    if pass_.rows is not None:
        return {"cls": "rows"}
    re = relerr(pass_.raw_sqnorms, want)
    step = {"cls": "exact" if re < RTOL else "WRONG", "re": re}
    if pass_.grad_sqnorm is not None:
        whole = sum((sum(g[t] for g in grads) * scale).pow(2).sum() for t in range(len(grads[0])))
        step["gre"] = relerr(pass_.grad_sqnorm.reshape(1), whole.reshape(1))
        if step["gre"] > RTOL:
            step["cls"] = "WRONG"
            step["re"] = max(re, step["gre"])
    if step["cls"] == "WRONG":
        step["got"] = pass_.raw_sqnorms.tolist()
        step["want"] = want.tolist()
    return step


def _classify_steps(res, warned):
    kinds = [s["cls"] for s in res["steps"]]
    wrong = [s["re"] for s in res["steps"] if s["cls"] == "WRONG"]
    if wrong:
        res["re"] = max(wrong)
        return "wrong-warned" if warned else "WRONG-SILENT"
    if res.get("exc_cls") == "crash":
        return "crash"
    if res.get("exc_cls") == "refused":
        return "refused" if all(k == "withheld" for k in kinds) else "exact-then-refused"
    if kinds and all(k == "exact" for k in kinds):
        return "exact"
    if kinds and kinds[0] == "withheld" and all(k == "exact" for k in kinds[1:]):
        return "withheld-then-exact"
    if kinds and all(k == "withheld" for k in kinds):
        return "withheld-all"
    return "other:" + ",".join(kinds)


def run_engine(spec, model, per_example_loss, grads, n, subbatches, steps=3, products=None):
    """``PerExampleNorms`` for `steps` steps on a fixed model and batch; `products` forces the
    sub-batch products way on (True) or off (False) for every layer."""
    return _run_engine(spec, model, per_example_loss, grads, n, subbatches, steps, products)


def run_sgd(spec, model, per_example_loss, grads, n, subbatches, steps=4):
    """``PerExampleNorms`` for `steps` SGD steps on a copy of the model, the truth recomputed
    (with the engine paused) after each update."""
    model.__dict__.pop("_aux", None)  # the auxiliary head's last output: not deep-copyable
    model = copy.deepcopy(model)
    return _run_engine(spec, model, per_example_loss, grads, n, subbatches, steps, None, sgd=True)


def _run_engine(spec, model, per_example_loss, grads, n, subbatches, steps, products, sgd=False):
    scale = (1.0 / n) if spec["reduction"] == "mean" else 1.0
    res = {"steps": []}
    warned = False
    original = subbatch_mod.uses_products
    if products is not None:
        subbatch_mod.uses_products = lambda *args: products
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine = PerExampleNorms(model, subbatches=subbatches)
            if subbatches:
                engine.RECHECK_SUBBATCHES = 1
            try:
                for step in range(steps):
                    if sgd and step > 0:
                        _sgd_step(model)
                        with engine.paused():
                            in_batch = in_batch_truth(spec, model, per_example_loss, n)
                            grads = per_example_grads(model, per_example_loss, n, in_batch)
                    model.zero_grad()
                    loss_of(spec, per_example_loss, model, n).backward()
                    passes = engine.collect()
                    if len(passes) != 1:
                        res["steps"].append({"cls": "npasses", "n": len(passes)})
                        continue
                    res["steps"].append(_engine_step(passes[0], grads, scale, subbatches))
            finally:
                engine.remove()
        warned, messages = _warned(caught)
        res["warn"] = messages[:4]
    except Exception as err:
        _note_exception(res, err)
    finally:
        subbatch_mod.uses_products = original
    res["cls"] = _classify_steps(res, warned)
    return res


def run_extra(spec, model, per_example_loss, grads, n, mode, steps=3):
    """Mode ``subset`` (``per_example_fraction=0.5``) or ``accum`` (two micro-batches, two
    backwards in one step), each pass's rows against the truth."""
    scale = (1.0 / n) if spec["reduction"] == "mean" else 1.0
    want_all = truth_sq(grads) * scale**2
    res = {"steps": []}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fraction = 0.5 if mode == "subset" else 1.0
            engine = PerExampleNorms(model, per_example_fraction=fraction)
            try:
                for _ in range(steps):
                    model.zero_grad()
                    if mode == "accum":
                        half = n // 2
                        for a, b in ((0, half), (half, n)):
                            (per_example_loss(model, slice(a, b)).sum() * scale).backward()
                    else:
                        loss_of(spec, per_example_loss, model, n).backward()
                    cls, off = "exact", 0
                    for pass_ in engine.collect():
                        if pass_.raw_sqnorms is None:
                            cls = "withheld" if pass_.withheld else "skipped"
                        elif pass_.rows is not None and pass_.row_weights is None:
                            # A pass merged from several forwards (split forward) keeps the
                            # drawn rows but not their importance weights, which its numbers
                            # carry: no truth to compare with (seen 2026-12-07).
                            cls = "rows-without-weights"
                        else:
                            if pass_.rows is not None:
                                want = want_all[off + pass_.rows] * pass_.row_weights
                            else:
                                want = want_all[off : off + pass_.batch_size]
                            re = relerr(pass_.raw_sqnorms, want)
                            if re > RTOL:
                                cls = "WRONG"
                                res["re"] = max(res.get("re", 0.0), re)
                                res.setdefault("bad", []).append(
                                    {"got": pass_.raw_sqnorms.tolist(), "want": want.tolist()}
                                )
                        off += pass_.batch_size
                    res["steps"].append({"cls": cls})
            finally:
                engine.remove()
        res["warn"] = [str(w.message)[:150] for w in caught][:3]
    except Exception as err:
        _note_exception(res, err)
    kinds = [s["cls"] for s in res["steps"]]
    if "WRONG" in kinds:
        res["cls"] = "WRONG-SILENT"
    elif "exc_cls" in res:
        res["cls"] = res["exc_cls"]
    else:
        res["cls"] = ",".join(sorted(set(kinds)))
    return res


def run_tracker(spec, model, per_example_loss, n, fraction, steps=3):
    """``GradientNoiseTracker`` for `steps` steps: it must run or refuse, never crash."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kwargs = {"loss_reduction": spec["reduction"]}
            if fraction is not None:
                kwargs["per_example_fraction"] = fraction
            tracker = noisescale.GradientNoiseTracker(model, **kwargs)
            try:
                for _ in range(steps):
                    model.zero_grad()
                    loss_of(spec, per_example_loss, model, n).backward()
                    tracker.step()
                estimate = tracker.estimate()
            finally:
                tracker.remove()
        return {
            "cls": "ok",
            "est": repr(estimate)[:300],
            "warn": [str(w.message)[:150] for w in caught][:3],
        }
    except Exception as err:
        return _exception(err)


# --- one seed ---------------------------------------------------------------------------------


def check_seed(seed, modes=MODES, override=None):
    """Run `seed`'s case in `modes`; returns ``{"seed", "spec", "modes": {mode: result}}``.

    Each result has its class under ``"cls"`` and, when wrong, its relative error under
    ``"re"``. A case the grammar made invalid (the brute force itself fails: a GroupNorm over
    one element, ...) has ``"gen_error"`` instead of ``"modes"``. Modes that need one loss row
    per example are left out on two-view losses.
    """
    record = {"seed": seed}
    start = time.time()
    with float64_default():
        try:
            spec, model, _, per_example_loss = fuzz_grammar.make_case(seed, override=override)
        except Exception as err:
            record["gen_error"] = f"{type(err).__name__}: {err}"[:300]
            return record
        record["spec"] = dict(spec)
        n = spec["n"]
        two_views = hasattr(per_example_loss, "rows")
        try:
            if two_views:
                grads, in_batch = row_grads(model, per_example_loss), False
            else:
                in_batch = in_batch_truth(spec, model, per_example_loss, n)
                grads = per_example_grads(model, per_example_loss, n, in_batch)
        except Exception as err:
            record["gen_error"] = f"truth: {type(err).__name__}: {err}"[:300]
            return record
        model.zero_grad()
        runs = {
            "one_shot": lambda: run_one_shot(spec, model, per_example_loss, grads, n),
            "engine": lambda: run_engine(spec, model, per_example_loss, grads, n, 0),
            "sub_chosen": lambda: run_engine(spec, model, per_example_loss, grads, n, 2),
            "sub_products": lambda: run_engine(
                spec, model, per_example_loss, grads, n, 2, products=True
            ),
            "sgd_sub": lambda: run_sgd(spec, model, per_example_loss, grads, n, 2),
            "sgd_exact": lambda: run_sgd(spec, model, per_example_loss, grads, n, 0),
            "subset": lambda: run_extra(spec, model, per_example_loss, grads, n, "subset"),
            "accum": lambda: run_extra(spec, model, per_example_loss, grads, n, "accum"),
            "tracker_exact": lambda: run_tracker(spec, model, per_example_loss, n, 1.0),
            "tracker_default": lambda: run_tracker(spec, model, per_example_loss, n, None),
            "tracker_numbers": lambda: fuzz_tracker.run_tracker_numbers(
                spec, model, per_example_loss, n, seed, in_batch
            ),
        }
        record["modes"] = {}
        for mode in ALL_MODES:  # in this order whatever the caller's order
            if mode in modes and not (two_views and mode in PER_EXAMPLE_ONLY):
                if mode == "accum" and in_batch:
                    continue  # (micro-batches of another size run another model)
                record["modes"][mode] = runs[mode]()
    record["t"] = round(time.time() - start, 2)
    return record


def findings(record):
    """``[(mode, class, relative error)]`` for each mode of a record that returned a wrong number
    (warned of or not), a result of the wrong length, or crashed."""
    return [
        (mode, res["cls"], res.get("re"))
        for mode, res in record.get("modes", {}).items()
        if res["cls"] in (*FINDINGS, "STRUCTURE")
        or (res["cls"].startswith("other:") and "SHAPE" in res["cls"])
    ]


def describe(record):
    """One line: the seed's case, for a failure message or the long run's list."""
    spec = record.get("spec", {})
    keys = ("stem", "blocks", "pool", "head", "loss", "reduction", "lossform", "penalty", "n")
    return f"seed {record['seed']}: " + ", ".join(f"{k}={spec.get(k)}" for k in keys)


# --- the long run -----------------------------------------------------------------------------


def _seeds(text):
    """``0:500`` (a range), ``61042`` or ``20205,62724``."""
    if ":" in text:
        lo, hi = text.split(":")
        return range(int(lo), int(hi))
    return [int(s) for s in text.split(",")]


def run_seeds(seeds, check, jsonl=None, verbose=False, line=None, find=None, say_invalid=True):
    """The fuzzers' loop: ``check(seed)`` for each seed, each record appended to ``jsonl``;
    returns the class table (:func:`count_classes`), the findings ``(record, mode, cls, re)``
    (``find``, :func:`findings` by default) and the invalid cases ``(seed, why)``. ``verbose``
    prints each record's ``line`` (:func:`describe` by default) and its modes, and (with
    ``say_invalid``) each invalid case."""
    line, find = line or describe, find or findings
    out = open(jsonl, "a") if jsonl else None  # noqa: SIM115
    table: dict[str, dict[str, int]] = {}
    found, invalid = [], []
    try:
        for seed in seeds:
            record = check(seed)
            if out:
                out.write(json.dumps(record, default=str) + "\n")
                out.flush()
            if "gen_error" in record:
                invalid.append((seed, record["gen_error"]))
                if verbose and say_invalid:
                    print(f"seed {seed}: invalid: {record['gen_error']}")
                continue
            count_classes(table, record["modes"])
            found.extend((record, mode, cls, re) for mode, cls, re in find(record))
            if verbose:
                print(line(record))
                print_mode_lines(record["modes"])
    finally:
        if out:
            out.close()
    return table, found, invalid


def run_check_seeds(seeds, check, find, jsonl=None, verbose=False, line=None, width=10, limit=300):
    """:func:`run_seeds` for the fuzzers whose records hold ``"checks"`` (fuzz_fit, fuzz_history,
    fuzz_sweep, fuzz_bnoise, fuzz_decisions): ``check(seed)`` for each seed, each record appended
    to ``jsonl``; returns the class table, the findings ``(record, name, result)`` from
    ``find(record)``'s ``(name, result)`` and the invalid cases ``(seed, why)``. ``verbose``
    prints each record's ``line`` (its ``describe`` by default) and each check's class and the
    rest of its result (``limit`` characters; None: all)."""
    out = open(jsonl, "a") if jsonl else None  # noqa: SIM115
    table: dict[str, dict[str, int]] = {}
    found, invalid = [], []
    try:
        for seed in seeds:
            record = check(seed)
            if out:
                out.write(json.dumps(record, default=str) + "\n")
                out.flush()
            if "gen_error" in record:
                invalid.append((seed, record["gen_error"]))
                continue
            count_classes(table, record["checks"])
            found += [(record, name, res) for name, res in find(record)]
            if verbose:
                print(line(record), flush=True)
                for name, res in record["checks"].items():
                    rest = {k: v for k, v in res.items() if k != "cls"}
                    print(f"  {name:{width}s} {res['cls']:14s} {str(rest)[:limit]}", flush=True)
    finally:
        if out:
            out.close()
    return table, found, invalid


def count_classes(table, results):
    """Add each result's class to ``table`` (mode -> class -> count): ``results`` maps a mode,
    variant or part to its result dict."""
    for mode, res in results.items():
        row = table.setdefault(mode, {})
        row[res["cls"]] = row.get(res["cls"], 0) + 1


def print_mode_lines(results):
    """Each mode's class, relative error and exception, one line a mode (``-v``)."""
    for mode, res in results.items():
        print(f"  {mode:16s} {res['cls']:20s} {res.get('re', '')} {res.get('exc', '')}")


def print_class_table(table, columns, column_width=16):
    """One row per class, one column per mode (or variant): how many seeds ended in each
    (the fuzzers' summary: this one's, tests/fuzz_hf.py's and tests/fuzz_events.py's)."""
    classes = sorted({c for row in table.values() for c in row})
    width = max([len("class"), *map(len, classes)])
    print(f"\n{'class':{width}s}" + "".join(f"{col:>{column_width}s}" for col in columns))
    for c in classes:
        counts = "".join(f"{table[col].get(c, 0):{column_width}d}" for col in columns)
        print(f"{c:{width}s}" + counts)


def check_parser(doc, seeds):
    """The command line the check fuzzers share (``--seeds``, ``--jsonl``, ``--override``, ``-v``;
    each adds its own options): ``doc`` their module docstring, ``seeds`` the default range."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--seeds", default=seeds, help="A:B (a range), or seeds A,B,C")
    parser.add_argument("--jsonl", help="append each seed's full record to this file")
    parser.add_argument("--override", help="JSON dict replacing entries of each seed's config")
    parser.add_argument("-v", "--verbose", action="store_true", help="each check's result")
    return parser


def print_findings(found, describe, limit=400):
    """:func:`run_check_seeds`' findings, each check's class and result (``limit`` characters)
    above its seed's line; the exit code: 0 without a finding, else 1."""
    if not found:
        print("no finding")
        return 0
    print(f"\n{len(found)} findings:")
    for record, name, res in found:
        print(f"  {res['cls']} in {name}: {str(res)[:limit]}\n    {describe(record)}")
    return 1


def print_found(found, invalid, describe, seconds):
    """:func:`run_check_seeds`' findings and invalid draws counted, each finding under its
    seed's line; the exit code: 0 without a finding, else 1."""
    print(f"\n{len(found)} finding(s) in {seconds:.0f} s; {len(invalid)} invalid draws")
    for record, name, res in found:
        print(f"  {describe(record)}\n    {name}: {res}")
    return 1 if found else 0


def run_checks(args, check, find, describe, checks, column_width, limit=None):
    """The body the check fuzzers' mains share (fuzz_branch, fuzz_branch_options, fuzz_combine,
    fuzz_decisions, fuzz_hardware): ``check(seed, override)`` over ``--seeds`` (``-v``: each
    record's ``describe`` line with its seconds, each result ``limit`` characters), the class
    table of ``checks`` (those that ran), the findings by :func:`print_found`; the exit code."""
    override = json.loads(args.override) if args.override else None
    start = time.time()
    table, found, invalid = run_check_seeds(
        _seeds(args.seeds),
        lambda seed: check(seed, override),
        find, args.jsonl, args.verbose,
        lambda record: f"{describe(record)} ({record['time']} s)", limit=limit,
    )  # fmt: skip
    print_class_table(table, [c for c in checks if c in table], column_width=column_width)
    return print_found(found, invalid, describe, time.time() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0:300", help="A:B (a range), or seeds A,B,C")
    parser.add_argument("--jsonl", help="append each seed's full record to this file")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    parser.add_argument("--tracker-every", type=int, default=5, help="trackers on every k-th seed")
    parser.add_argument("--override", help="JSON dict replacing entries of each seed's spec")
    parser.add_argument("-v", "--verbose", action="store_true", help="each mode's result")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    modes = tuple(args.modes.split(","))
    unknown = set(modes) - set(ALL_MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; the modes are {', '.join(ALL_MODES)}")
    override = json.loads(args.override) if args.override else None
    start = time.time()

    def check(seed):
        seed_modes = modes
        if seed % args.tracker_every:
            seed_modes = tuple(m for m in modes if m not in TRACKER_MODES)
        return check_seed(seed, seed_modes, override)

    table, found, invalid = run_seeds(
        _seeds(args.seeds), check, args.jsonl, args.verbose, say_invalid=False
    )
    seconds = time.time() - start
    print_class_table(table, [mode for mode in ALL_MODES if mode in table])
    count = len(_seeds(args.seeds))
    print(f"\n{count} seeds in {seconds:.0f} s; {len(invalid)} cases the grammar made invalid")
    if not found:
        print("no finding (a wrong number, a result of the wrong length, a crash)")
        return 0
    print(f"\n{len(found)} findings:")
    for record, mode, cls, re in found:
        error = f"relative error {re:.3g}" if re is not None else record["modes"][mode]["exc"]
        print(f"  {cls} in {mode}: {error}\n    {describe(record)}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
