"""The data-parallel fuzzer: the tracker under DDP, FSDP2 and hand averaging against brute force.

Each seed draws a model, data and loss from the runner's grammar (tests/fuzz_grammar.py, no
block that mixes the examples, no two-view loss) and random data-parallel options
(:func:`draw_options`): 2 or 3 CPU processes over gloo; DDP (``find_unused_parameters``,
``static_graph``, ``gradient_as_bucket_view``, ``broadcast_buffers``, a tiny or the default
bucket, sometimes ``torch.compile(DDP(model))``), FSDP2 (``fully_shard`` per block or on the root
alone, ``reshard_after_forward``; HSDP on a (W, 1) mesh) or a plain model averaged by hand
(``process_group=``); uneven local batches, each process accumulating its own number of
micro-batches (DDP's ``no_sync()``; FSDP2's ``set_requires_gradient_sync(False)``, as many on
every process), the grammar's frozen parameters,
tied head and penalty, its loss reduction (mean or sum), ``per_example_fraction`` 1.0 or the
default, ``measure_every``, ``sync_every``, the loss passed to ``step()`` or not, and a resume:
the first or the last steps run on another number of processes (one plain process, or 2-3
processes), and the processes of the second phase load the first's tracker ``state_dict()``
(rank 0's, through JSON) and its parameters.

The truth is brute force in this process: each example's gradient by its own backward, float64,
at the parameters an SGD step on the brute-force averaged gradient reaches (the processes'
training is replayed: .grad = Σ c_i g_i with c_i = 1/(W·k_r·n_rj) for a mean loss over the
micro-batch j of process r's k_r, 1/W for a sum). Each step's statistics follow from it:

* b_big = (Σc)²/Σc², |G_big|² = |Σ c_i g_i / Σ c_i|², the examples, the mean of the losses;
* ``per_example`` (fraction 1.0): every example's |g_i|²;
* ``local``: each process's gradient as a small batch (size (Σ_r c)²/Σ_r c²), where W ≥ 2;
* ``microbatch``: each micro-batch of a process that accumulates (the others counted as
  ``lacking``);

and go through :func:`noisescale.state.update` (the estimator) in order, so that every history
record and the final ``estimate()`` are compared with tests/fuzz_tracker.py's
:func:`compare_records` (1e-7 of the step's scale, 1e-5 for B_simple). With the default fraction
(sub-batches) the sub-batch source is not predicted: there the big batch, the examples, the loss
and the ``local`` and ``microbatch`` sources are compared. Steps left unmeasured are predicted
from the options (``measure_every``; the first step of a ``static_graph`` DDP). Every process
must also return the same history and estimate, bit for bit.

Classes: ``exact``; ``exact-withheld`` (exact, the per-example source absent at some step: its
norms withheld there on every process, the other sources kept); ``invalid`` (a two-view loss or
a size-dependent block: not drawn); ``refused`` (a NoiseScaleInputError or
UnsupportedModuleError on some process); ``torch-error`` (an error raised by torch outside
noisescale, or by the same processes without a tracker: a set-up DDP or FSDP2 rejects,
neutral); ``crash`` (an exception with a noisescale frame in its traceback);
``WRONG-SILENT`` / ``wrong-warned`` (a number off, without / with a warning of the run that
says the numbers are not to be trusted); ``RANKS-DIFFER``; ``RECORDS`` (a step recorded that
should not be, or missing); ``hang`` (the processes did not end within the timeout). The
findings are crash, WRONG-SILENT, wrong-warned, RANKS-DIFFER, RECORDS and hang.

Run it from the repository root::

    python tests/fuzz_distributed.py --seeds 0:40

``--seeds 17 -v`` replays one seed and prints its options and the result; ``--override
'{"wrap": "fsdp_blocks"}'`` replays with options changed. Each seed is 4-15 s (one or two
process launches). tests/test_fuzz_models.py runs a few seeds through :func:`check_seed`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import multiprocessing.forkserver
import os
import random
import socket
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import nullcontext, suppress
from datetime import timedelta
from pathlib import Path

import torch

import fuzz_grammar  # the sibling modules: tests/ is on the path as the script's folder
import fuzz_runner
import fuzz_tracker
import noisescale
from noisescale import estimators as est
from noisescale import state as state_mod

LR = 0.05
BETA = 0.9
TIMEOUT_S = 75  # a launch's processes, all together
COLLECTIVE_TIMEOUT_S = 30
FINDINGS = ("crash", "WRONG-SILENT", "wrong-warned", "RANKS-DIFFER", "RECORDS", "hang")
WRAPS = ("ddp", "ddp", "fsdp_blocks", "fsdp_root", "fsdp_hsdp", "manual")


# --- the options ------------------------------------------------------------------------------


def _split(rng, n, parts, least):
    """`n` as `parts` sizes, each at least its entry of `least` (a random composition)."""
    sizes = list(least)
    for _ in range(n - sum(least)):
        sizes[rng.randrange(parts)] += 1
    return sizes


def _layouts(rng, n, world, ks, steps):
    """Per step, per process, its micro-batch sizes: every example once, the processes' local
    batches uneven and changing from step to step, each process's number of micro-batches
    ``ks[r]`` kept (a shorter window is left out, documented)."""
    out = []
    for _ in range(steps):
        local = _split(rng, n, world, ks)
        out.append([_split(rng, local[r], ks[r], [1] * ks[r]) for r in range(world)])
    return out


def draw_options(seed, n, override=None):
    """The seed's data-parallel options (`n`: the grammar's global batch)."""
    rng = random.Random(seed * 7919 + 3)
    world = 3 if rng.random() < 0.2 and n >= 5 else 2
    opts = {
        "world": world,
        "wrap": rng.choice(WRAPS),
        "steps": rng.choice([3, 4]),
        "fraction": rng.choice([1.0, 1.0, None]),
        "measure_every": rng.choice([1, 1, 2]),
        "sync_every": rng.choice([1, 2, 32]),
        "pass_loss": rng.random() < 0.7,
        "microbatch": rng.random() < 0.9,
        "find_unused": rng.random() < 0.3,
        "static_graph": rng.random() < 0.2,
        "bucket_view": rng.random() < 0.3,
        "broadcast_buffers": rng.random() < 0.5,
        "bucket_cap_mb": rng.choice([25.0, 1e-5]),
        "compile": rng.random() < 0.08,
        "reshard": rng.random() < 0.5,
        "resume": None,
    }
    kmax = max(1, min(3, n // world))
    opts["ks"] = [rng.choice(range(1, kmax + 1)) for _ in range(world)]
    if rng.random() < 0.3:
        # the first steps on another number of processes (1: one plain process, the global
        # batch in its micro-batches)
        first = rng.choice([s for s in (1, 2, 3) if s != world and (s == 1 or n >= 2 * s)])
        k1 = [rng.choice(range(1, max(1, min(3, n // first)) + 1)) for _ in range(first)]
        opts["resume"] = {"after": rng.choice([1, 2]), "world": first, "ks": k1}
    if override:
        opts.update(override)
    if opts["wrap"].startswith("fsdp"):
        # FSDP2 gathers the parameters at every forward: the processes run as many passes
        # (unequal windows pair its collectives wrongly and gloo times out, without a tracker too)
        opts["ks"] = [opts["ks"][0]] * opts["world"]
        if opts["resume"] and opts["resume"]["world"] > 1:
            opts["resume"]["ks"] = [opts["resume"]["ks"][0]] * opts["resume"]["world"]
    if opts["compile"]:
        opts["bucket_cap_mb"] = 25.0  # (Dynamo's DDPOptimizer asserts on a tiny first bucket)
    if opts["wrap"] == "ddp" and opts["static_graph"]:
        # no_sync() in a static graph's first iteration: torch's INTERNAL ASSERT, untracked too
        opts["ks"] = [1] * opts["world"]
    lay = random.Random(seed * 31 + 1)
    # the resume's processes run the first steps, or (reversed) the last ones: a checkpoint of
    # the seed's processes resumed on one plain process or on another number of processes
    worlds = [(opts["world"], opts["ks"])]
    after = opts["steps"]
    if opts["resume"]:
        r = opts["resume"]
        r.setdefault("reverse", random.Random(seed * 13 + 5).random() < 0.35)
        worlds.insert(1 if r["reverse"] else 0, (r["world"], r["ks"]))
        after = r["after"]
    phases, start = [], 0
    for (world, ks), stop in zip(worlds, [after, opts["steps"]][-len(worlds) :], strict=True):
        layouts = _layouts(lay, n, world, ks, stop - start)
        phases.append({"first": start + 1, "world": world, "layouts": layouts})
        start = stop
    opts["phases"] = phases
    return opts


def grammar_case(seed, override=None):
    """The grammar's case of `seed` without mixing blocks or two views: (spec, model, loss)."""
    spec, model, _, per_example_loss = fuzz_grammar.make_case(seed, mixing_prob=0.0)
    if hasattr(per_example_loss, "rows"):
        return None
    if fuzz_runner.in_batch_truth(spec, model, per_example_loss, spec["n"]):
        return None  # (a size-dependent block: one example alone runs another model)
    model.__dict__.pop("_aux", None)
    return spec, model, per_example_loss


# --- the processes ----------------------------------------------------------------------------


class _Caller:
    """What the grammar's loss calls as its model: the wrapper's forward, the plain model's
    attributes (its auxiliary output, its uncertainty parameter) and parameters."""

    def __init__(self, run, inner):
        self._run, self._inner = run, inner

    def __call__(self, *args):
        return self._run(*args)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _wrap(model, opts, world):
    """(what the tracker is given, what the loss calls, the model whose parameters train)."""
    from torch.nn.parallel import DistributedDataParallel

    wrap = opts["wrap"] if world > 1 else "plain"
    if wrap == "ddp":
        ddp = DistributedDataParallel(
            model,
            find_unused_parameters=opts["find_unused"],
            static_graph=opts["static_graph"],
            gradient_as_bucket_view=opts["bucket_view"],
            broadcast_buffers=opts["broadcast_buffers"],
            bucket_cap_mb=opts["bucket_cap_mb"],
        )
        if opts["compile"]:
            torch._dynamo.reset()
            compiled = torch.compile(ddp, backend="aot_eager")
            return compiled, _Caller(compiled, model), ddp
        return ddp, _Caller(ddp, model), ddp
    if wrap.startswith("fsdp"):
        from torch.distributed.fsdp import fully_shard

        mesh = None
        if wrap == "fsdp_hsdp":  # (replicate, shard) = (W, 1): every shard held W times
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
        if wrap in ("fsdp_blocks", "fsdp_hsdp"):
            for block in model.blocks:
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block, mesh=mesh, reshard_after_forward=opts["reshard"])
        fully_shard(model, mesh=mesh, reshard_after_forward=opts["reshard"])
    return model, model, model


class _Untracked:
    """The training loop's tracker calls without a tracker (the set-up's own baseline)."""

    @property
    def history(self):
        return []

    def step(self, loss=None):
        pass

    def estimate(self):
        return _NAN

    def state_dict(self):
        return None

    def remove(self):
        pass


class _Nan:
    g2 = trace_sigma = b_simple = low = high = math.nan


_NAN = _Nan()


def _full(p):
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def run_phase(rank, phase, job):
    """One process's steps of `phase`: its history, estimate, warnings, the tracker's state and
    the parameters at the end (or the error)."""
    opts, world = job["opts"], phase["world"]
    out = {}
    with fuzz_runner.float64_default(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            spec, model, per_example_loss = grammar_case(job["seed"])
            if job.get("params") is not None:
                with torch.no_grad():
                    for p, v in zip(model.parameters(), job["params"], strict=True):
                        p.copy_(torch.tensor(v, dtype=p.dtype).reshape(p.shape))
            tracked, caller, trained = _wrap(model, opts, world)
            optimizer = torch.optim.SGD(trained.parameters(), lr=LR)
            kwargs = {
                "beta": BETA,
                "optimizer": optimizer,
                "loss_reduction": spec["reduction"],
                "measure_every": opts["measure_every"],
                "sync_every": opts["sync_every"],
                "microbatch": opts["microbatch"],
                "per_example_fraction": opts["fraction"],
            }
            if opts["wrap"] == "manual" and world > 1:
                kwargs["process_group"] = torch.distributed.group.WORLD
            tracker = _Untracked()
            if not job.get("untracked"):
                tracker = noisescale.GradientNoiseTracker(tracked, **kwargs)
            if job.get("tracker") is not None and not job.get("untracked"):
                tracker.load_state_dict(job["tracker"])
            ddp = opts["wrap"] == "ddp" and world > 1
            fsdp = opts["wrap"].startswith("fsdp") and world > 1
            for layout in phase["layouts"]:
                r = rank or 0
                a = sum(sum(sizes) for sizes in layout[:r])
                k = len(layout[r])
                local_loss = 0.0
                for j, size in enumerate(layout[r]):
                    last = j == k - 1
                    if fsdp:
                        model.set_requires_gradient_sync(last)
                    with trained.no_sync() if ddp and not last else nullcontext():
                        losses = per_example_loss(caller, slice(a, a + size))
                        loss = losses.mean() / k if spec["reduction"] == "mean" else losses.sum()
                        loss.backward()
                    local_loss = local_loss + loss.detach()
                    a += size
                if opts["wrap"] == "manual" and world > 1:
                    for p in model.parameters():
                        if p.grad is not None:
                            torch.distributed.all_reduce(p.grad)
                            p.grad /= world
                tracker.step(loss=local_loss if opts["pass_loss"] else None)
                optimizer.step()
                optimizer.zero_grad()
            e = tracker.estimate()
            out["history"] = tracker.history
            out["estimate"] = [e.g2, e.trace_sigma, e.b_simple, e.low, e.high]
            out["state"] = json.loads(json.dumps(tracker.state_dict()))
            out["params"] = [_full(p).detach().flatten().tolist() for p in model.parameters()]
            tracker.remove()
        except Exception as err:
            tb = traceback.format_exc()
            refusal = isinstance(err, fuzz_runner.REFUSALS)
            inside = any("/noisescale/" in line for line in tb.splitlines() if "File " in line)
            out["cls"] = "refused" if refusal else ("crash" if inside else "torch-error")
            out["exc"] = f"{type(err).__name__}: {str(err)[:400]}"
            out["tb"] = tb[-2500:]
        out["warnings"] = [str(w.message) for w in caught][:6]
    return out


def _worker(rank, world, port, job_path, out_dir):
    torch.set_num_threads(1)
    job = json.loads(Path(job_path).read_text())
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    out = run_phase(rank, job["phase"], job)
    Path(out_dir, f"{rank}.json").write_text(json.dumps(out, default=str))
    with suppress(Exception):
        torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SERVER_STARTED = []


def _context():
    """Processes forked from a server that imported torch, noisescale and this module once (a
    spawned process imports them anew: 2-4 s of each phase's start on a loaded 2-core machine).
    Each process is still a process of its own, on its own gloo group, as under spawn."""
    ctx = multiprocessing.get_context("forkserver")
    if not _SERVER_STARTED:
        # (run as a script, the server imports the script as __main__)
        ctx.set_forkserver_preload([__name__ if __name__ != "__main__" else "__main__"])
        # the server imports with its own sys.path (Python 3.11 does not pass it this one's):
        # this one's, through PYTHONPATH, as the history fuzzer's child gets it
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(sys.path)
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            if old is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = old
        _SERVER_STARTED.append(True)
    return ctx


def launch(job, timeout_s=TIMEOUT_S):
    """`job`'s phase on its number of processes: each process's result, or "hang"."""
    world = job["phase"]["world"]
    if world == 1:
        return [run_phase(None, job["phase"], job)]
    with tempfile.TemporaryDirectory() as tmp:
        job_path = Path(tmp, "job.json")
        job_path.write_text(json.dumps(job))
        ctx = _context()
        args = (world, _free_port(), str(job_path), tmp)
        procs = [ctx.Process(target=_worker, args=(r, *args)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [p.is_alive() for p in procs]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results = []
        for r in range(world):
            path = Path(tmp, f"{r}.json")
            if path.exists():
                results.append(json.loads(path.read_text()))
            else:
                results.append({"cls": "hang" if hung[r] else "died", "exc": f"rank {r}"})
        return results


# --- the truth --------------------------------------------------------------------------------


def _holders(by_rank, world, got):
    """A source's small batches over the processes that held it: all of them, or, where the
    record says ``lacking`` processes had none (documented: the source is kept with the others'
    small batches, still unbiased), the processes of that number whose sums come closest to the
    record's (the truth of which one lacked is not known here; the sums still are)."""
    held = sorted(by_rank)
    lacking = world - len(held)
    if got is not None and got.get("lacking", 0) > lacking:
        size = world - got["lacking"]
        want_total = got["count"] * got["sqnorm_small"]

        def distance(ranks):
            return abs(sum(t for r in ranks for _, _, t in by_rank[r]) - want_total)

        choices = list(itertools.combinations(held, size)) if size > 0 else []
        if choices:
            held = list(min(choices, key=distance))
            lacking = world - size
    items = [item for r in held for item in by_rank[r]]
    return state_mod.SmallBatches(
        sum(c for c, _, _ in items),
        sum(i for _, i, _ in items),
        sum(t for _, _, t in items),
        None,
        lacking,
    )


def truth(seed, spec_n, opts, observed=None, withheld=None):
    """The brute-force records of every measured step, by step, and the estimator's state
    (`observed`: the tracker's records by step, read only for which processes lacked a
    source and the steps whose per-example norms were withheld, appended to `withheld`)."""
    spec, model, per_example_loss = grammar_case(seed)
    n = spec_n
    withheld = [] if withheld is None else withheld
    params = [p for p in model.parameters() if p.requires_grad]
    st = state_mod.init(BETA)
    wanted = {}
    m = opts["measure_every"]
    carry, nothing = [0, 0], state_mod.NOTHING_UNMEASURED
    for phase in opts["phases"]:
        world = phase["world"]
        static = opts["wrap"] == "ddp" and opts["static_graph"] and world > 1
        for t, layout in enumerate(phase["layouts"]):
            step = phase["first"] + t
            grads = fuzz_runner.per_example_grads(model, per_example_loss, n)
            with torch.no_grad():
                losses = per_example_loss(model, slice(0, n)).detach()
            coefs, owner, micro = [], [], []
            for r, sizes in enumerate(layout):
                for j, size in enumerate(sizes):
                    for _ in range(size):
                        mean = spec["reduction"] == "mean"
                        coefs.append(1.0 / (world * len(sizes) * size) if mean else 1.0 / world)
                        owner.append(r)
                        micro.append((r, j))
            norms = fuzz_tracker._Norms(grads, None, [0] * len(params), 0)
            total_c = sum(coefs)
            big, _ = norms.sq({i: c / total_c for i, c in enumerate(coefs)})
            b_big = total_c**2 / sum(c * c for c in coefs)
            # each source's small batches, per process that holds them
            parts = {}
            if opts["fraction"] == 1.0:
                parts["per_example"] = {
                    r: [(1, 1.0, norms.mean([i])[0]) for i in range(n) if owner[i] == r]
                    for r in range(world)
                }
            if world > 1:
                parts["local"] = {}
                for r in range(world):
                    cs = {i: coefs[i] for i in range(n) if owner[i] == r}
                    s = sum(cs.values())
                    tot = norms.sq({i: c / s for i, c in cs.items()})[0]
                    parts["local"][r] = [(1, sum(c * c for c in cs.values()) / s**2, tot)]
            if opts["microbatch"] and any(len(sizes) > 1 for sizes in layout):
                parts["microbatch"] = {
                    r: [
                        (1, 1.0 / size, norms.mean([i for i in range(n) if micro[i] == (r, j)])[0])
                        for j, size in enumerate(layout[r])
                    ]
                    for r in range(world)
                    if len(layout[r]) > 1
                }
            got = (observed or {}).get(step, {}).get("sources", {})
            if step in (observed or {}) and "per_example" in parts and "per_example" not in got:
                # the per-example norms withheld on every process (an audit's finding, the
                # runner's withheld-then-exact): the step's other sources stand
                del parts["per_example"]
                withheld.append(step)
            sources = {
                name: _holders(by_rank, world, got.get(name)) for name, by_rank in parts.items()
            }
            loss = sum(world * c * float(li) for c, li in zip(coefs, losses, strict=True)) / world
            measured = (step - 1) % m == 0 and not (static and t == 0)
            if measured:
                stats = state_mod.StepStats(
                    step,
                    b_big,
                    big,
                    sources,
                    n,
                    loss if opts["pass_loss"] else None,
                    LR,
                    1.0,
                    unmeasured=(carry[0], carry[1], None) if carry[0] else nothing,
                )
                st, want = state_mod.update(st, stats, 0.95, None)
                wanted[step] = want
                carry = [0, 0]
            else:
                carry = [carry[0] + 1, carry[1] + n]
            # the processes' SGD step on the averaged gradient
            with torch.no_grad():
                for ti, p in enumerate(params):
                    p -= LR * sum(c * grads[i][ti] for i, c in enumerate(coefs))
    return wanted, st


def _compare(history, estimate, wanted, st, opts):
    bad = []
    got_steps = [r["step"] for r in history]
    if got_steps != sorted(wanted):
        return [("recorded steps", got_steps, sorted(wanted))], True
    run_scale = 0.0
    predicted = opts["fraction"] == 1.0
    for rec in history:
        want = wanted[rec["step"]]
        if predicted:
            found = fuzz_tracker.compare_records(rec, want, run_scale)
        else:
            sub = {k: v for k, v in rec.items() if k != "sources"}
            sub["sources"] = {
                k: v for k, v in rec["sources"].items() if k not in ("subbatch", "per_example")
            }
            found = [
                b
                for b in fuzz_tracker.compare_records(sub, want, run_scale)
                # (eq. A.2's numbers, and whether the step had any source to give them, are
                # the sub-batch source's too)
                if not b[0].startswith(("g2", "trace_sigma", "b_simple", "skipped"))
            ]
        for name, s in want["sources"].items():
            lacking = s.get("lacking", 0) if isinstance(s, dict) else 0
            got_lacking = rec["sources"].get(name, {}).get("lacking", 0)
            if lacking != got_lacking:
                found.append((f"sources.{name}.lacking", got_lacking, lacking))
        bad += [(f"step {rec['step']} {k}", g, w) for k, g, w in found]
        if not want["skipped"]:
            run_scale = max(run_scale, fuzz_tracker.record_scale(want))
    if predicted and history:
        want_est = est.b_simple_interval(st.noise, 0.95)
        for i, key in enumerate(("g2", "trace_sigma", "b_simple", "low", "high")):
            g, w = estimate[i], getattr(want_est, key)
            rtol = fuzz_tracker.RTOL if i < 2 else fuzz_tracker.RATIO_RTOL
            resolved = min(abs(want_est.g2), abs(want_est.trace_sigma)) > 1e-6 * run_scale
            if i >= 2 and not resolved:
                continue
            if not fuzz_tracker._close(g, w, run_scale if i < 2 else 0.0, rtol):
                bad.append((f"estimate().{key}", g, w))
    return bad, False


# --- one seed ---------------------------------------------------------------------------------


def check_seed(seed, override=None, baseline=True):
    """Run `seed`'s case; returns ``{"seed", "opts", "cls", ...}``. `baseline`: rerun a phase
    that crashed, hung or died without a tracker, to tell the set-up's own errors (the suite's
    seeds skip it: their set-ups were checked when found)."""
    start = time.time()
    record = {"seed": seed}
    try:
        with fuzz_runner.float64_default():
            case = grammar_case(seed)
            if case is not None:  # (the brute force must run on one example: GroupNorm, ...)
                fuzz_runner.per_example_grads(case[1], case[2], case[0]["n"])
    except Exception as err:
        case = None
        record["why"] = f"{type(err).__name__}: {err}"[:300]
    if case is None:
        record["cls"] = "invalid"
        return record
    spec = case[0]
    opts = draw_options(seed, spec["n"], override)
    record["opts"] = {k: v for k, v in opts.items() if k != "phases"}
    record["layouts"] = [p["layouts"] for p in opts["phases"]]
    record["spec"] = {k: spec.get(k) for k in ("stem", "blocks", "pool", "head", "loss")}
    record["spec"].update({k: spec.get(k) for k in ("reduction", "lossform", "penalty", "n")})
    record["spec"]["frozen"] = spec.get("frozen")
    job = {"seed": seed, "opts": opts, "params": None, "tracker": None}
    history, results = [], None
    for phase in opts["phases"]:
        job["phase"] = phase
        results = launch(job)
        failed = [res for res in results if "cls" in res]
        if failed:
            order = ("hang", "crash", "died", "refused", "torch-error")
            # (a process that lost its peer reports the peer's failure: the peer's own first)
            peer = ("Connection closed by peer", "Timed out waiting")
            worst = min(
                failed,
                key=lambda res: (
                    any(p in (res.get("exc") or "") for p in peer),
                    order.index(res["cls"]),
                ),
            )
            if baseline and worst["cls"] in ("hang", "crash", "died"):
                # the same processes without a tracker: an error of theirs is the set-up's
                baseline = launch({**job, "untracked": True})
                broken = [res for res in baseline if "cls" in res]
                if broken:
                    worst = {**worst, "cls": "torch-error", "baseline": broken[0].get("exc")}
            record.update(cls=worst["cls"], exc=worst.get("exc"), tb=worst.get("tb"))
            record["baseline"] = worst.get("baseline")
            record["warnings"] = worst.get("warnings")
            record["t"] = round(time.time() - start, 1)
            return record
        texts = {json.dumps([res["history"], res["estimate"]]) for res in results}
        if len(texts) > 1:
            record["cls"] = "RANKS-DIFFER"
            record["why"] = [res["history"][-1:] for res in results]
            record["t"] = round(time.time() - start, 1)
            return record
        done = {r["step"] for r in results[0]["history"]}
        history = [r for r in history if r["step"] not in done] + results[0]["history"]
        job["params"] = results[0]["params"]
        job["tracker"] = results[0]["state"]
    with fuzz_runner.float64_default():
        withheld = []
        wanted, st = truth(seed, spec["n"], opts, {r["step"]: r for r in history}, withheld)
    bad, records = _compare(history, results[0]["estimate"], wanted, st, opts)
    record["history"] = history
    messages = results[0]["warnings"]
    record["warnings"] = messages
    warned = any(w in m.lower() for m in messages for w in fuzz_runner.WITHHOLD_WORDS)
    if records:
        record["cls"] = "RECORDS"
    elif bad:
        record["cls"] = "wrong-warned" if warned else "WRONG-SILENT"
    else:
        record["cls"] = "exact-withheld" if withheld else "exact"
    record["withheld"] = withheld
    if bad:
        record["bad"] = [(k, _num(g), _num(w)) for k, g, w in bad[:8]]
        record["re"] = max((_rel(g, w) for _, g, w in bad), default=math.inf)
    record["t"] = round(time.time() - start, 1)
    return record


def _num(x):
    return x if isinstance(x, (int, float, str, list, type(None))) else str(x)


def _rel(g, w):
    try:
        g, w = float(g), float(w)
    except (TypeError, ValueError):
        return math.inf
    return abs(g - w) / max(abs(w), 1e-300)


def describe(record):
    o = record.get("opts", {})
    keys = ("world", "wrap", "ks", "fraction", "measure_every", "static_graph", "compile")
    return (
        f"seed {record['seed']}: "
        + ", ".join(f"{k}={o.get(k)}" for k in keys)
        + f", resume={o.get('resume')}, spec={record.get('spec')}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0:20", help="A:B (a range), or seeds A,B,C")
    parser.add_argument("--jsonl", help="append each seed's full record to this file")
    parser.add_argument("--override", help="JSON dict replacing entries of each seed's options")
    parser.add_argument("-v", "--verbose", action="store_true", help="each seed's result")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    override = json.loads(args.override) if args.override else None
    out = open(args.jsonl, "a") if args.jsonl else None  # noqa: SIM115
    table = {"distributed": {}}
    found, start = [], time.time()
    try:
        for seed in fuzz_runner._seeds(args.seeds):
            record = check_seed(seed, override)
            if out:
                out.write(json.dumps(record, default=str) + "\n")
                out.flush()
            row = table["distributed"]
            row[record["cls"]] = row.get(record["cls"], 0) + 1
            if record["cls"] in FINDINGS:
                found.append(record)
            if args.verbose:
                print(describe(record))
                print(f"  {record['cls']} {record.get('t')} s {record.get('exc', '')}")
                for item in record.get("bad", []):
                    print(f"    {item}")
    finally:
        if out:
            out.close()
    fuzz_runner.print_class_table(table, ["distributed"])
    print(f"\n{len(fuzz_runner._seeds(args.seeds))} seeds in {time.time() - start:.0f} s")
    if not found:
        print("no finding")
        return 0
    print(f"\n{len(found)} findings:")
    for record in found:
        print(f"  {record['cls']}: {record.get('re', record.get('exc'))}\n    {describe(record)}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
