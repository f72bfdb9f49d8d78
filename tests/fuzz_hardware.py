"""How the hardware side is measured: the memory search, the accumulation split, step timing and
profiles on disk, against truths written here from docs/hardware.md, never from noisescale's own
functions.

Each seed draws one part (:func:`draw_config`) and runs its checks:

* ``search`` — ``find_max_batch_size`` on a step whose memory need is a hidden function of the
  batch size (fits up to M: M = 1, a power of two, one above or below one, above the limit, none
  fits; a second step that needs more than the first; an out-of-memory error as
  ``torch.OutOfMemoryError``, ``torch.cuda.OutOfMemoryError``, ``MemoryError`` or a RuntimeError in
  a real allocator's words — Linux's and Windows' CPU allocator, CUDA, MPS, cuDNN, cuBLAS; an OOM
  that comes once and not again; a non-memory error above a size, which must propagate). Checks:
  ``search`` (the exact M, ``capped``/``converged`` as documented, every trial's verdict the
  truth's, a lower bound when ``max_trials`` runs out, the refusals), ``freed`` (weakrefs to the
  failed steps' tensors, some in reference cycles, dead after the search), ``state`` (a tiny real
  model trained by ``make_training_step`` — BatchNorm, a non-persistent buffer counted in forward,
  dropout, AdamW or SGD with momentum after a step of training, gradients left by the loop, a
  cache buffer registered as None that a step makes, persistent or not, or one a step resizes —
  bit-identical parameters, buffers, None buffers, optimizer state, ``.grad`` and torch RNG
  after the search), ``errors`` (a non-memory error propagates, the same object), ``whole`` (a
  start, limit or timed size that is not a whole number refused by name before any step);
* ``split`` — ``accumulation_split`` against a brute-force enumeration of the near-equal splits
  into k passes (the fewest passes k₀ whose largest micro-batch fits; the smallest k in
  [k₀, 2k₀) that divides B, else k₀), its sizes, weights (the weighted micro-batch means are the
  batch mean, exactly in fractions), ``equal``, ``str``, ``MaxBatchSize.split``;
* ``timing`` — ``profile_throughput`` and ``time_optimizer_update`` on a step of known cost under
  a fake clock (dyadic seconds: the differences are exact) and a fake CUDA synchronize: the calls
  in their order (warm-up untimed, each repeat between two synchronisations), the times exact,
  ``step_time_s`` the median by hand, the sweep cut at the first out-of-memory size with the
  callback called once, a non-memory error propagating, model/optimizer/RNG restored;
* ``fit`` — ``fit_step_time`` against least squares in exact rational arithmetic (α, β, their
  standard errors, the largest relative residual) on exact α + β·b data and with outliers;
* ``allreduce`` — ``allreduce_time`` and ``INTERCONNECTS`` against the ring formula
  2·(N−1)/N·bytes/bandwidth and docs/hardware.md's table; invalid inputs refused;
* ``json`` — a ``ThroughputProfile`` written and read back field for field, with the memory
  search noisescale profile writes; one field broken (a string, a bool, NaN, a negative, a
  missing key; the search's capped, converged, trials or limit) refused naming it;
* ``cli`` — ``noisescale profile`` on examples/profile_model.py (every 10th seed): the file it
  writes read back and accepted by ``recommend``; onto an existing file refused, the file as it
  was.

Classes per check: ``ok``; ``refused-ok`` (a refusal the inputs call for); ``WRONG`` (a silent
wrong number or state); ``CRASH`` (a raw exception); ``FALSE-REFUSAL``; ``skip``.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import os
import random
import tempfile
import time
import weakref
from fractions import Fraction

import torch
from torch import nn

from noisescale.errors import NoiseScaleInputError

CHECKS = ("search", "freed", "state", "errors", "split", "timing", "update", "fit")
CHECKS += ("allreduce", "json", "cli", "whole")
PARTS = ("search", "search", "search", "split", "timing", "fit", "allreduce", "json")
FINDINGS = ("WRONG", "CRASH", "FALSE-REFUSAL")
FIT_RTOL = 1e-9  # float64 least squares against exact fractions: round-off × the condition number

# Out-of-memory errors in the words their allocators use (torch 2.13; alloc_cpu.cpp's posix and
# Windows branches, the CUDA caching allocator, MPS, cuDNN/cuBLAS workspace failures).
OOM_MAKERS = {
    "torch_oom": lambda b: torch.OutOfMemoryError(
        f"CUDA out of memory. Tried to allocate {b * 2} MiB. GPU 0 has a total capacity of 79.19 "
        "GiB of which 1.12 MiB is free."
    ),
    "cuda_oom": lambda b: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate"),
    "memory_error": lambda b: MemoryError(),
    "cpu_linux": lambda b: RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
        f"memory: you tried to allocate {b * 4096} bytes. Error code 12 (Cannot allocate memory)"
    ),
    "cpu_windows": lambda b: RuntimeError(
        "[enforce fail at alloc_cpu.cpp:116] data. DefaultCPUAllocator: not enough memory: you "
        f"tried to allocate {b * 4096} bytes."
    ),
    "cuda_error": lambda b: RuntimeError(
        "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some "
        "other API call, so the stacktrace below might be incorrect."
    ),
    "mps": lambda b: RuntimeError(
        "MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.20 GB, max "
        "allowed: 18.13 GB). Tried to allocate 256.00 MB on private pool."
    ),
    "cudnn": lambda b: RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    "cublas": lambda b: RuntimeError(
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
    ),
}
NOT_MEMORY = {
    "shapes": lambda b: RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({b}x3 and 5x2)"),
    "illegal": lambda b: RuntimeError("CUDA error: an illegal memory access was encountered"),
    "index": lambda b: IndexError("index out of range in self"),
    "value": lambda b: ValueError(f"Expected input batch_size ({b}) to match target batch_size"),
}


def _logu(rng, lo, hi):
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def draw_config(seed):
    """The seed's part and its drawn configuration (a JSON-able dict)."""
    rng = random.Random(seed)
    cfg = {"part": "cli" if seed % 10 == 7 else rng.choice(PARTS)}
    # the memory search
    k = rng.randint(0, 12)
    cfg["m"] = rng.choice([1, 2**k, 2**k + 1, max(2**k - 1, 1), rng.randint(1, 5000), 0, 2**k * 3])
    cfg["start"] = rng.choice([1, 1, 1, 2, 3, 8, 64, 100])
    cfg["limit"] = rng.choice([None, None, cfg["start"] * rng.choice([1, 4, 16]), 256, 1000])
    cfg["max_trials"] = rng.choice([64, 64, 64, rng.randint(1, 12)])
    cfg["steps_per_trial"] = rng.choice([1, 2, 2, 3])
    # the second step of a trial may need more memory than the first (optimizer state)
    cfg["first_step_m"] = rng.choice([None, None, cfg["m"] + rng.randint(1, 50)])
    cfg["oom"] = rng.choice(sorted(OOM_MAKERS))
    cfg["flaky"] = rng.random() < 0.15  # one OOM at a size that fits, not repeated
    cfg["not_memory"] = rng.choice([None] * 5 + sorted(NOT_MEMORY))
    cfg["cycle"] = rng.random() < 0.5  # the failed step's tensors in a reference cycle
    cfg["model"] = rng.choice(["mlp", "bn", "buffer", "dropout"])
    cfg["optimizer"] = rng.choice(["adamw", "sgd", None])
    cfg["grads_before"] = rng.random() < 0.3
    # the split
    cfg["batch"] = rng.choice([rng.randint(1, 3000), 2 ** rng.randint(0, 14), _prime(rng)])
    cfg["micro"] = rng.choice([1, rng.randint(1, 3000), 2 ** rng.randint(0, 12), cfg["batch"]])
    # timing
    cfg["sizes"] = sorted(
        {rng.choice([1, 2, 3, 4, 8, 16, 33, 64]) for _ in range(rng.randint(1, 6))}
    )
    cfg["warmup"] = rng.choice([0, 1, 2, 3])
    cfg["repeats"] = rng.choice([1, 2, 3, 5, 6])
    cfg["cuda"] = rng.random() < 0.5
    cfg["timing_oom_at"] = rng.choice([None, None, rng.choice(cfg["sizes"])])
    cfg["alpha_ticks"] = rng.randint(1, 10**6)  # in 2**-20 s
    cfg["beta_ticks"] = rng.randint(0, 10**4)
    cfg["jitter"] = rng.choice([0, 0, 100, 10**5])
    # the fit
    cfg["fit_n"] = rng.randint(2, 9)
    cfg["fit_start"] = rng.choice([1, 2, 8, 1000, 10**6])
    cfg["fit_alpha"] = _logu(rng, 1e-5, 10)
    cfg["fit_beta"] = rng.choice([0.0, _logu(rng, 1e-9, 1e-1)])
    cfg["fit_outliers"] = rng.choice([0, 0, 1, 2])
    # the all-reduce
    cfg["ar_devices"] = rng.choice([1, 2, 3, 4, 8, 16, 64, 0, -1])
    cfg["ar_bytes"] = rng.choice([0.0, _logu(rng, 1, 1e11), -5.0, math.inf, math.nan])
    cfg["ar_link"] = rng.choice(["pcie4", "pcie5", "nvlink3", "nvlink4", "bw"])
    cfg["ar_bw"] = rng.choice([_logu(rng, 1e6, 1e12), 0.0, -1.0, math.nan, math.inf])
    cfg["ar_factor"] = rng.choice([2.0, 2.0, 1.0])
    # the JSON file
    cfg["json_break"] = rng.choice([None, None, *BREAKS])
    cfg["seed2"] = rng.randint(0, 2**31)
    # drawn last, so that every earlier draw of a seed is as it was (the regression lists):
    # a buffer a step makes or resizes (a cache), a profile's memory search broken, a batch
    # size that is not a whole number
    cfg["cache"] = rng.choice([None, None, "made", "made_persistent", "resized"])
    cfg["search_break"] = rng.choice([None, None, *SEARCH_BREAKS])
    cfg["not_whole"] = rng.choice([None] * 6 + ["start", "limit", "start_bool", "sizes"])
    cfg["ar_break"] = rng.choice([None] * 4 + ["factor_nan", "factor_neg", "devices_nan"])
    cfg["ar_break"] = cfg["ar_break"] or rng.choice([None] * 6 + ["devices_frac", "factor_0"])
    return cfg


def _prime(rng):
    while True:
        n = rng.randint(2, 5000)
        if all(n % d for d in range(2, math.isqrt(n) + 1)):
            return n


# --- the memory search ---------------------------------------------------------------------------


def truth_fits(cfg, b, step_index):
    """Whether step ``step_index`` (0-based) of a trial at batch ``b`` fits: the hidden memory
    need. The first step fits up to ``first_step_m`` (when drawn), later ones up to ``m``."""
    m = cfg["m"]
    if step_index == 0 and cfg["first_step_m"] is not None:
        return b <= cfg["first_step_m"]
    return b <= m


def truth_max(cfg):
    """The largest batch whose trial (``steps_per_trial`` steps) fits, by the hidden rule."""
    m = cfg["m"]
    if cfg["steps_per_trial"] == 1 and cfg["first_step_m"] is not None:
        m = cfg["first_step_m"]
    return m


class HiddenStep:
    """A training step whose memory need is hidden: raises the drawn OOM above it, keeping
    weakrefs to the tensors it had allocated (some in a reference cycle)."""

    def __init__(self, cfg, inner=None):
        self.cfg, self.inner = cfg, inner
        self.refs, self.calls, self.flaky_done = [], [], False
        self.trial_step = 0
        self.last_b = None

    def __call__(self, b):
        cfg = self.cfg
        if b != self.last_b or self.trial_step >= cfg["steps_per_trial"]:
            self.trial_step = 0
        self.last_b = b
        index = self.trial_step
        self.trial_step += 1
        self.calls.append(b)
        if cfg["not_memory"] and b > max(truth_max(cfg), 1) * 2:
            raise NOT_MEMORY[cfg["not_memory"]](b)
        fits = truth_fits(cfg, b, index)
        if fits and cfg["flaky"] and not self.flaky_done and b > 1:
            self.flaky_done, fits = True, False
        if self.inner is not None:
            self.inner(b, fits)
        if not fits:
            self.trial_step = cfg["steps_per_trial"]  # the trial ends here
            activations = torch.ones(b, 8)
            self.refs.append(weakref.ref(activations))
            if cfg["cycle"]:
                holder = {"t": activations}
                holder["self"] = holder
            raise OOM_MAKERS[cfg["oom"]](b)


def _oracle_search(cfg):
    """The documented search re-implemented: trials and result, from the hidden rule alone
    (without the flaky OOM, which the check treats apart)."""
    m = truth_max(cfg)
    start, limit, max_trials = cfg["start"], cfg["limit"], cfg["max_trials"]
    trials, low, high, b = [], 0, None, start
    while len(trials) < max_trials:
        fits = b <= m
        trials.append((b, fits))
        if fits:
            low = b
        else:
            high = b
        if high is None:
            if limit is not None and b >= limit:
                break
            b = 2 * b if limit is None else min(2 * b, limit)
        elif high - low <= 1:
            break
        else:
            b = (low + high) // 2
    return trials, low, high


def check_search(cfg):
    from noisescale.hardware import find_max_batch_size

    step = HiddenStep(cfg)
    kwargs = dict(
        start=cfg["start"],
        limit=cfg["limit"],
        max_trials=cfg["max_trials"],
        steps_per_trial=cfg["steps_per_trial"],
    )
    out = {}
    if cfg.get("not_whole"):
        out["whole"] = _check_not_whole(cfg, kwargs)
    m = truth_max(cfg)
    raised = None
    try:
        res = find_max_batch_size(step, **kwargs)
    except Exception as err:
        raised, res = err, None
    if raised is not None and not isinstance(raised, NoiseScaleInputError):
        # the propagated error holds the failed step's frames: the check's, not the search's
        raised.__traceback__ = None
    gc.collect()
    alive = sum(r() is not None for r in step.refs)
    out["freed"] = {"cls": "ok"} if not alive else {"cls": "WRONG", "why": f"{alive} alive"}
    # a non-memory error: must propagate, unless the search never reached a size that raises it
    big = [b for b in step.calls if cfg["not_memory"] and b > max(m, 1) * 2]
    if cfg["not_memory"]:
        if big:
            ok = isinstance(raised, type(NOT_MEMORY[cfg["not_memory"]](1))) and not isinstance(
                raised, NoiseScaleInputError
            )
            out["errors"] = {"cls": "ok"} if ok else {"cls": "WRONG", "why": f"got {raised!r}"}
            out["search"] = {"cls": "skip"}
            return out
        out["errors"] = {"cls": "ok"}
    if isinstance(raised, NoiseScaleInputError):
        out["search"] = _search_refusal(cfg, raised, step)
        return out
    if raised is not None:
        out["search"] = {"cls": "CRASH", "exc": f"{type(raised).__name__}: {raised}"[:300]}
        return out
    out["search"] = _search_result(cfg, res, step)
    return out


def _check_not_whole(cfg, kwargs):
    """A batch size that is not a whole number (start 1.5, limit 10.5, start True; timed sizes
    with a 2.5 in them): refused naming it, before any step runs."""
    from noisescale.hardware import find_max_batch_size, profile_throughput

    what = cfg["not_whole"]
    calls = []
    try:
        if what == "sizes":
            profile_throughput(calls.append, [*cfg["sizes"], 2.5], warmup=0, repeats=1)
        else:
            bad = {"start": {"start": cfg["start"] + 0.5}, "start_bool": {"start": True}}
            bad["limit"] = {"limit": (cfg["limit"] or 4 * cfg["start"]) + 0.5}
            find_max_batch_size(calls.append, **(kwargs | bad[what]))
    except NoiseScaleInputError as err:
        field = {"sizes": "batch sizes", "start_bool": "start"}.get(what, what)
        if field not in str(err) or calls:
            return {"cls": "WRONG", "why": f"{what}: {err} after {len(calls)} steps"[:300]}
        return {"cls": "refused-ok", "exc": str(err)[:120]}
    except Exception as err:
        return {"cls": "CRASH", "exc": f"{what}: {type(err).__name__}: {err}"[:300]}
    return {"cls": "WRONG", "why": f"{what}: not a whole number, run as {calls[:6]} without a word"}


def _search_refusal(cfg, err, step):
    m = truth_max(cfg)
    msg = str(err)
    if cfg["flaky"]:
        # a one-off OOM may cut the search short; a refusal is right only if nothing fitted
        return {"cls": "refused-ok", "exc": msg[:200]}
    _, low, high = _oracle_search(cfg)
    if low == 0:
        want = "batch size 1" if high == 1 else "max_trials"
        if want in msg:
            return {"cls": "refused-ok", "exc": msg[:200]}
        return {"cls": "WRONG", "why": f"refusal names the wrong cause: {msg[:200]}"}
    return {"cls": "FALSE-REFUSAL", "exc": msg[:300], "m": m}


def _search_result(cfg, res, step):
    m = truth_max(cfg)
    limit = cfg["limit"]
    got = res.max_batch_size
    tried_fits = {}
    for b, fits in res.trials:
        tried_fits.setdefault(b, fits)
    if cfg["flaky"]:
        # a one-off OOM: the result must still be a size that fitted, and never above M
        if got > m or not tried_fits.get(got, False):
            return {"cls": "WRONG", "why": f"flaky: got {got} > M = {m} or not a fitting size"}
        return {"cls": "ok", "got": got, "m": m}
    _, low, high = _oracle_search(cfg)
    if m == 0:
        return {"cls": "WRONG", "why": f"nothing fits, got {got}"}
    # every trial's verdict is the hidden rule's
    wrong = [(b, f) for b, f in res.trials if f != (b <= m)]
    if wrong:
        return {"cls": "WRONG", "why": f"trials {wrong} misjudged (M = {m})"}
    if limit is not None and m >= limit and res.converged:
        if got != limit or not res.capped:
            return {"cls": "WRONG", "why": f"capped search: got {got} capped={res.capped}"}
        return {"cls": "ok", "got": got}
    if res.converged:
        if got != m or res.capped:
            return {"cls": "WRONG", "why": f"converged at {got}, the truth is {m}"}
        if len(res.trials) > max(cfg["max_trials"], 0):
            return {"cls": "WRONG", "why": f"{len(res.trials)} trials > max_trials"}
        return {"cls": "ok", "got": got}
    # not converged: a lower bound, the largest size tried that fitted, with the trials spent
    fitted = [b for b, f in res.trials if f]
    if len(res.trials) != cfg["max_trials"] or got != max(fitted) or got > m:
        return {"cls": "WRONG", "why": f"unconverged: got {got}, trials {res.trials}, M {m}"}
    if low == m and high is not None and high - low <= 1:
        return {"cls": "WRONG", "why": "bracketed exactly but said unconverged"}
    return {"cls": "ok", "got": got, "lower_bound": True}


# --- the state after the search (a tiny real model) ----------------------------------------------


class _Counted(nn.Module):
    """A linear layer with a non-persistent buffer counting the examples it has seen."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 4)
        self.register_buffer("seen", torch.zeros(()), persistent=False)

    def forward(self, x):
        self.seen += x.shape[0]
        return self.lin(x)


class _Cached(nn.Module):
    """A linear layer with buffers its forward pass makes (registered as None, persistent or not)
    or resizes in place to the batch's size, as real models' caches are."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.lin = nn.Linear(5, 5)
        self.register_buffer("cache", None, persistent=how == "made_persistent")
        self.register_buffer("last", torch.full((1,), 7.0))

    def forward(self, x):
        if self.how == "resized":
            self.last.resize_(x.shape[0]).fill_(x.shape[0])
        else:
            self.cache = x.detach().clone()  # of the batch's size
        return self.lin(x)


def _tiny_model(kind):
    if kind == "bn":
        return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    if kind == "buffer":
        return nn.Sequential(_Counted(), nn.Tanh(), nn.Linear(4, 3))
    if kind == "dropout":
        return nn.Sequential(nn.Linear(5, 7), nn.Dropout(0.3), nn.Linear(7, 3))
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def _snapshot(model, optimizer):
    """Everything the search must leave as it was, copied: parameters, every buffer (persistent
    or not), gradients, optimizer state and hyper-parameters, the torch RNG."""
    snap = {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "none_buffers": sorted(
            f"{m}.{n}"
            for m, mod in model.named_modules()
            for n, b in mod._buffers.items()
            if b is None
        ),
        "grads": {
            n: None if p.grad is None else p.grad.detach().clone()
            for n, p in model.named_parameters()
        },
        "rng": torch.get_rng_state().clone(),
        "training": model.training,
    }
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        snap["opt"] = {
            names[id(p)]: {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in s.items()}
            for p, s in optimizer.state.items()
        }
        snap["groups"] = [
            {k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups
        ]
    return snap


def _same(a, b):
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (
            torch.is_tensor(a)
            and torch.is_tensor(b)
            and a.dtype == b.dtype
            and (a.shape == b.shape and bool(torch.equal(a, b)))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def check_state(cfg):
    """``find_max_batch_size`` with ``make_training_step`` on a tiny real model, the OOM raised
    after the forward pass (BatchNorm statistics, the counted buffer, dropout's RNG changed):
    the model, optimizer, gradients and RNG exactly as before."""
    from noisescale.hardware import find_max_batch_size, make_training_step

    torch.manual_seed(cfg["seed2"] % 1000)
    model = _tiny_model(cfg["model"])
    if cfg.get("cache"):
        model = nn.Sequential(_Cached(cfg["cache"]), model)
    opt = None
    if cfg["optimizer"] == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    elif cfg["optimizer"] == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    rng = torch.Generator().manual_seed(cfg["seed2"])

    rows = 1 if cfg["model"] == "bn" else 0  # BatchNorm trains on two rows or more

    def make_batch(b, device):
        return torch.randn(b + rows, 5), torch.randn(
            b + rows, 3
        )  # the global RNG: the search must restore it

    # one step of training first: optimizer state exists, BatchNorm statistics moved
    x, y = torch.randn(4, 5, generator=rng), torch.randn(4, 3, generator=rng)
    nn.functional.mse_loss(model(x), y).backward()
    if opt is not None:
        opt.step()
    model.zero_grad(set_to_none=True)
    if cfg["grads_before"]:  # the loop is mid-accumulation: gradients are there
        nn.functional.mse_loss(model(x), y).backward()
    if cfg.get("cache") and cfg["seed2"] % 2 == 0:
        model[0].cache = None  # the loop dropped its cache: the search's steps make it again
    oom = {"fits": True}

    def loss_fn(out, target):
        loss = nn.functional.mse_loss(out, target)
        if not oom["fits"]:
            raise OOM_MAKERS[cfg["oom"]](out.shape[0] - rows)  # after the forward, before backward
        return loss

    training = make_training_step(model, loss_fn, make_batch, optimizer=opt)
    scfg = dict(cfg, not_memory=None, flaky=False, m=max(cfg["m"] % 40, 1), first_step_m=None)
    scfg["limit"] = None if cfg["limit"] is None else max(cfg["limit"] % 64, cfg["start"])

    def inner(b, fits):
        oom["fits"] = fits
        training(b)

    step = HiddenStep(scfg, inner)
    before = _snapshot(model, opt)
    try:
        res = find_max_batch_size(
            step,
            start=scfg["start"],
            limit=scfg["limit"],
            steps_per_trial=scfg["steps_per_trial"],
            model=model,
            optimizer=opt,
        )
    except Exception as err:
        return {"cls": "CRASH", "exc": f"{type(err).__name__}: {err}"[:300]}
    after = _snapshot(model, opt)
    bad = [k for k in before if not _same(before[k], after[k])]
    want = min(scfg["m"], scfg["limit"]) if scfg["limit"] is not None else scfg["m"]
    if res.max_batch_size != want:
        bad.append(f"max {res.max_batch_size} != {want}")
    if bad:
        detail = {}
        for k in bad:
            if k in ("buffers", "grads"):
                detail[k] = {
                    n: (before[k][n], after[k].get(n))
                    for n in before[k]
                    if not _same(before[k][n], after[k].get(n))
                }
        return {"cls": "WRONG", "why": f"changed by the search: {bad} {str(detail)[:200]}"}
    return {"cls": "ok"}


# --- the accumulation split ----------------------------------------------------------------------


def truth_split(batch, micro):
    """Brute force: every k from 1 up, its near-equal split (sizes differ by at most one); k₀ the
    fewest passes whose largest fits; the smallest k in [k₀, 2k₀) splitting B equally, else k₀."""
    k0 = next(k for k in range(1, batch + 1) if -(-batch // k) <= micro)
    equal = [k for k in range(k0, 2 * k0) if batch % k == 0 and batch // k <= micro]
    return equal[0] if equal else k0


def check_split(cfg):
    from noisescale.hardware import MaxBatchSize, accumulation_split

    batch, micro = cfg["batch"], cfg["micro"]
    try:
        split = accumulation_split(batch, micro)
        via = MaxBatchSize(micro, 1, None, False, True, ()).split(batch)
    except Exception as err:
        return {"cls": "CRASH", "exc": f"{type(err).__name__}: {err}"[:300]}
    k = truth_split(batch, micro)
    q, r = divmod(batch, k)
    sizes = [q + 1] * r + [q] * (k - r)
    why = []
    if split.num_micro_batches != k or via.num_micro_batches != k:
        why.append(f"k {split.num_micro_batches} (via {via.num_micro_batches}) != {k}")
    if split.sizes() != sizes or sum(split.sizes()) != batch or max(split.sizes()) > micro:
        why.append(f"sizes {split.sizes()[:6]} != {sizes[:6]}")
    if split.micro_batch_size != max(sizes) or split.equal != (r == 0):
        why.append(f"micro {split.micro_batch_size} equal {split.equal}")
    weights = split.loss_weights()
    # the weighted micro-batch means are the batch mean: exact in fractions of the float weights
    values = list(range(batch))
    pos, total = 0, Fraction(0)
    for w, s in zip(weights, sizes, strict=True):
        total += Fraction(w) * Fraction(sum(values[pos : pos + s]), s)
        pos += s
    if abs(float(total) - (batch - 1) / 2) > 1e-12 * batch:  # float64 weights: round-off
        why.append(f"weighted mean {float(total)} != {(batch - 1) / 2}")
    text = f"{q}×{k}" if r == 0 else f"{q + 1}×{r}+{q}×{k - r}"
    if str(split) != text:
        why.append(f"str {split} != {text}")
    return {"cls": "WRONG", "why": "; ".join(why)} if why else {"cls": "ok", "k": k}


# --- timing under a fake clock -------------------------------------------------------------------

TICK = 2.0**-20  # dyadic seconds: differences of clock readings are exact


class FakeClock:
    def __init__(self):
        self.ticks, self.log = 0, []

    def __call__(self):
        self.log.append(("timer",))
        return self.ticks * TICK


@contextlib.contextmanager
def fake_cuda(log, cuda):
    """torch.cuda's synchronize and memory statistics, faked (logged) when ``cuda``."""
    if not cuda:
        yield
        return
    names = ("synchronize", "reset_peak_memory_stats", "max_memory_allocated")
    saved = {n: getattr(torch.cuda, n) for n in names}
    torch.cuda.synchronize = lambda dev=None: log.append(("sync",))
    torch.cuda.reset_peak_memory_stats = lambda dev=None: log.append(("reset",))
    torch.cuda.max_memory_allocated = lambda dev=None: 1234
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.cuda, n, f)


def _cost(cfg, b, i):
    """Ticks of the i-th step at batch b: α + β·b plus a drawn jitter."""
    jitter = (cfg["seed2"] * 7919 + b * 104729 + i * 1299709) % (cfg["jitter"] + 1)
    return cfg["alpha_ticks"] + cfg["beta_ticks"] * b + jitter


def check_timing(cfg):
    from noisescale.hardware import profile_throughput, time_optimizer_update

    clock = FakeClock()
    calls = {}
    oom_at = cfg["timing_oom_at"]

    def step(b):
        i = calls.get(b, 0)
        calls[b] = i + 1
        clock.log.append(("step", b))
        if oom_at is not None and b >= oom_at:
            if cfg["not_memory"]:
                raise NOT_MEMORY[cfg["not_memory"]](b)
            raise OOM_MAKERS[cfg["oom"]](b)
        clock.ticks += _cost(cfg, b, i)

    called = []
    out = {}
    device = "cuda" if cfg["cuda"] else "cpu"
    w, r = cfg["warmup"], cfg["repeats"]
    with fake_cuda(clock.log, cfg["cuda"]):
        try:
            points = profile_throughput(
                step, cfg["sizes"], warmup=w, repeats=r, device=device, timer=clock,
                on_out_of_memory=called.append,
            )  # fmt: skip
        except Exception as err:
            points = None
            want = cfg["not_memory"] and oom_at is not None
            if want and type(err) is type(NOT_MEMORY[cfg["not_memory"]](1)):
                out["timing"] = {"cls": "ok", "propagated": type(err).__name__}
            else:
                out["timing"] = {"cls": "CRASH", "exc": f"{type(err).__name__}: {err}"[:300]}
    if points is not None:
        if cfg["not_memory"] and oom_at is not None:
            out["timing"] = {"cls": "WRONG", "why": f"{cfg['not_memory']} taken as OOM: {called}"}
        else:
            out["timing"] = _timing_truth(cfg, points, clock.log, called)
    # the update alone
    clock2 = FakeClock()
    ups = []

    def update():
        clock2.log.append(("update",))
        clock2.ticks += 1000 + 37 * len(ups)
        ups.append(clock2.ticks)

    def step2(b):
        clock2.log.append(("step", b))

    b0 = cfg["sizes"][0]
    with fake_cuda(clock2.log, cfg["cuda"]):
        try:
            times = time_optimizer_update(
                step2, update, b0, warmup=w, repeats=r, device=device, timer=clock2
            )
        except Exception as err:
            out["update"] = {"cls": "CRASH", "exc": f"{type(err).__name__}: {err}"[:300]}
            return out
    sync = [("sync",)] if cfg["cuda"] else []
    want_log = [("step", b0)] + [("update",)] * w
    for _ in range(r):
        want_log += [*sync, ("timer",), ("update",), *sync, ("timer",)]
    want_times = tuple((1000 + 37 * (w + i)) * TICK for i in range(r))
    if clock2.log != want_log or tuple(times) != want_times:
        out["update"] = {"cls": "WRONG", "why": f"log {clock2.log[:12]} times {times}"}
    else:
        out["update"] = {"cls": "ok"}
    return out


def _timing_truth(cfg, points, log, called):
    w, r, oom_at = cfg["warmup"], cfg["repeats"], cfg["timing_oom_at"]
    sync = [("sync",)] if cfg["cuda"] else []
    want_log, want_points, want_called = [], [], []
    for b in sorted(set(cfg["sizes"])):
        if cfg["cuda"]:
            want_log.append(("reset",))
        if oom_at is not None and b >= oom_at:
            # the first step that runs out ends the sweep: a warm-up step, or the first timed one
            want_log += [("step", b)] if w else [*sync, ("timer",), ("step", b)]
            want_called.append(b)
            break
        want_log += [("step", b)] * w
        times = []
        for i in range(r):
            want_log += [*sync, ("timer",), ("step", b), *sync, ("timer",)]
            times.append(_cost(cfg, b, w + i) * TICK)
        want_points.append((b, tuple(times)))
    why = []
    got_points = [(p.batch_size, tuple(p.times_s)) for p in points]
    if got_points != want_points:
        why.append(f"points {got_points[:3]} != {want_points[:3]}")
    if log != want_log:
        why.append(f"calls {log[:14]} != {want_log[:14]}")
    if called != want_called:
        why.append(f"on_out_of_memory {called} != {want_called}")
    for p in points:
        s = sorted(p.times_s)
        n = len(s)
        median = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
        if p.step_time_s != median or p.samples_per_s != p.batch_size / median:
            why.append(f"median {p.step_time_s} != {median}")
        if p.peak_memory_bytes != (1234 if cfg["cuda"] else None):
            why.append(f"peak {p.peak_memory_bytes}")
    return {"cls": "WRONG", "why": "; ".join(why)[:400]} if why else {"cls": "ok"}


# --- the step-time fit ---------------------------------------------------------------------------


def truth_fit(b, t):
    """Ordinary least squares in exact fractions: α, β, their standard errors (s²·(XᵀX)⁻¹,
    s² = RSS/(n − 2)) and the largest relative residual."""
    bf = [Fraction(x) for x in b]
    tf = [Fraction(x) for x in t]
    n = len(bf)
    mb, mt = sum(bf) / n, sum(tf) / n
    sxx = sum((x - mb) ** 2 for x in bf)
    sxy = sum((x - mb) * (y - mt) for x, y in zip(bf, tf, strict=True))
    beta = sxy / sxx
    alpha = mt - beta * mb
    res = [y - alpha - beta * x for x, y in zip(bf, tf, strict=True)]
    se = (None, None)
    if n > 2:
        s2 = sum(e * e for e in res) / (n - 2)
        se = (math.sqrt(s2 * sum(x * x for x in bf) / (n * sxx)), math.sqrt(s2 / sxx))
    rel = max(abs(e) / y for e, y in zip(res, tf, strict=True))
    return float(alpha), float(beta), se, float(rel), float(max(bf))


def check_fit(cfg):
    from noisescale.hardware import fit_step_time

    rng = random.Random(cfg["seed2"])
    b = [cfg["fit_start"] * 2**i for i in range(cfg["fit_n"])]
    t = [cfg["fit_alpha"] + cfg["fit_beta"] * x for x in b]
    for _ in range(cfg["fit_outliers"]):
        i = rng.randrange(len(t))
        t[i] *= rng.choice([3.0, 0.4, 1.05])
    try:
        fit = fit_step_time(b, t)
    except Exception as err:
        return {"cls": "CRASH", "exc": f"{type(err).__name__}: {err}"[:300]}
    alpha, beta, (ase, bse), rel, bmax = truth_fit(b, t)
    scale = max(abs(t_) for t_ in t)  # the line's size over the timed range
    why = []
    if abs(fit.alpha_s - alpha) > FIT_RTOL * scale:
        why.append(f"α {fit.alpha_s!r} != {alpha!r}")
    # β relative to the line's size; the documented rounding rule may set it to 0
    flat = abs(beta) * bmax <= 1e-9 * abs(alpha) * (1 + 1e-6)
    if abs(fit.beta_s - beta) * bmax > FIT_RTOL * scale and not (flat and fit.beta_s == 0):
        why.append(f"β {fit.beta_s!r} != {beta!r}")
    for name, got, want in (("α SE", fit.alpha_se_s, ase), ("β SE", fit.beta_se_s, bse)):
        if (got is None) != (want is None):
            why.append(f"{name} {got} != {want}")
        elif got is not None:
            unit = scale if name == "α SE" else scale / bmax
            if abs(got - want) > 1e-6 * unit:  # the SE of a line's round-off is ~1e-16·scale
                why.append(f"{name} {got!r} != {want!r}")
    if abs(fit.max_rel_residual - rel) > 1e-7 and not flat:
        why.append(f"residual {fit.max_rel_residual} != {rel}")
    if fit.n_points != len(b):
        why.append(f"n_points {fit.n_points}")
    return {"cls": "WRONG", "why": "; ".join(why)} if why else {"cls": "ok"}


# --- the all-reduce ------------------------------------------------------------------------------

DOC_BANDWIDTHS = {"pcie4": 20e9, "pcie5": 40e9, "nvlink3": 230e9, "nvlink4": 400e9}


def check_allreduce(cfg):
    from noisescale.hardware import INTERCONNECTS, allreduce_time

    if {k: ic.bandwidth_bytes_per_s for k, ic in INTERCONNECTS.items()} != DOC_BANDWIDTHS:
        return {"cls": "WRONG", "why": f"INTERCONNECTS {INTERCONNECTS}"}
    n, nbytes, c = cfg["ar_devices"], cfg["ar_bytes"], cfg["ar_factor"]
    brk = cfg.get("ar_break")
    c = {"factor_nan": math.nan, "factor_neg": -c, "factor_0": 0.0}.get(brk, c)
    n = {"devices_nan": math.nan, "devices_frac": abs(n) + 1.5}.get(brk, n)
    bw = DOC_BANDWIDTHS[cfg["ar_link"]] if cfg["ar_link"] != "bw" else cfg["ar_bw"]
    # an infinite bandwidth is the limit of no all-reduce cost (0 s); NaN is no bandwidth; c = 0
    # (no bus traffic) prices 0 s, a fraction of a device or c < 0 nothing
    valid = n >= 1 and n == math.floor(n) and bw > 0 and math.isfinite(nbytes) and nbytes >= 0
    valid = valid and c >= 0
    try:
        got = allreduce_time(nbytes, n, bw, allreduce_factor=c)
    except NoiseScaleInputError as err:
        if valid:
            return {"cls": "FALSE-REFUSAL", "exc": str(err)}
        return {"cls": "refused-ok", "exc": str(err)[:100]}
    except Exception as err:
        return {"cls": "CRASH", "exc": f"{type(err).__name__}: {err}"[:300]}
    if not valid:
        return {"cls": "WRONG", "why": f"priced N={n} bytes={nbytes} bw={bw}: {got}"}
    want = (
        0.0
        if math.isinf(bw)
        else float(Fraction(c) * Fraction(n - 1, n) * Fraction(nbytes) / Fraction(bw))
    )
    if abs(got - want) > 4e-16 * abs(want):  # three float64 roundings
        return {"cls": "WRONG", "why": f"{got!r} != {want!r}"}
    return {"cls": "ok"}


# --- the profile on disk -------------------------------------------------------------------------

# a profile's memory search (max_batch_search) broken: the words each must be refused with
SEARCH_BREAKS = ("capped_str", "converged_false", "trials_str", "not_object", "limit_frac")
SEARCH_BREAK_FIELD = {
    "capped_str": "max_batch_search.capped",
    "converged_false": "did not converge",
    "trials_str": "max_batch_search.trials",
    "not_object": "max_batch_search",
    "limit_frac": "max_batch_search.limit",
}
BREAKS = (
    "batch_str",
    "batch_frac",
    "time_neg",
    "time_str",
    "alpha_nan",
    "beta_bool",
    "no_fit",
    "param_bytes_neg",
    "update_neg",
    "oom_low",
    "max_batch_zero",
    "peak_str",
    "peak_neg",
    "n_points_zero",
    "residual_nan",
    "version",
)
# the field each break must be refused naming
BREAK_FIELD = {
    "batch_str": "batch_size",
    "batch_frac": "batch_size",
    "time_neg": "step time",
    "time_str": "times_s",
    "alpha_nan": "not finite",
    "beta_bool": "beta_s",
    "no_fit": "fit",
    "param_bytes_neg": "param_bytes",
    "update_neg": "optimizer update",
    "oom_low": "out_of_memory_batch_size",
    "max_batch_zero": "max_batch_size",
    "peak_str": "peak_memory_bytes",
    "peak_neg": "peak_memory_bytes",
    "n_points_zero": "n_points",
    "residual_nan": "max_rel_residual",
    "version": "version",
}


def _profile_dict(cfg):
    """A profile written by the library's to_dict from drawn points (a flat-or-rising line)."""
    from noisescale.hardware import ThroughputPoint, ThroughputProfile

    rng = random.Random(cfg["seed2"])
    sizes = sorted({rng.choice([1, 2, 4, 8, 16, 32, 64, 100]) for _ in range(5)} | {128})
    points = [
        ThroughputPoint(
            b,
            tuple((0.01 + 1e-4 * b) * (1 + 0.001 * rng.random()) for _ in range(rng.randint(1, 4))),
            rng.choice([None, rng.randint(1, 2**34)]),
        )
        for b in sizes
    ]
    update = rng.choice([None, 0.0, 0.002])
    return ThroughputProfile.from_points(
        points,
        device={"type": rng.choice(["cpu", "cuda"]), "name": "fuzz"},
        model={"name": "fuzz", "parameters": 10, "param_bytes": rng.choice([0, 40, 4e9])},
        max_batch_size=rng.choice([None, 128, 200]),
        max_batch_search=None,
        settings={"warmup": 1, "repeats": 3},
        created="2026-12-07T00:00:00+00:00",
        optimizer_update_s=update,
        optimizer_update_times_s=() if update is None else (update,),
        out_of_memory_batch_size=rng.choice([None, 129, 1000]),
    ).to_dict()


def _break(data, name):
    p0 = data["points"][0]
    if name == "batch_str":
        p0["batch_size"] = str(p0["batch_size"])
    elif name == "batch_frac":
        p0["batch_size"] = p0["batch_size"] + 0.5
    elif name == "time_neg":
        p0["times_s"][0] = -p0["times_s"][0]
    elif name == "time_str":
        p0["times_s"][0] = "0.01"
    elif name == "alpha_nan":
        data["fit"]["alpha_s"] = math.nan
    elif name == "beta_bool":
        data["fit"]["beta_s"] = True
    elif name == "no_fit":
        del data["fit"]
    elif name == "param_bytes_neg":
        data["model"]["param_bytes"] = -4
    elif name == "update_neg":
        data["optimizer_update_s"] = -0.001
    elif name == "oom_low":
        data["out_of_memory_batch_size"] = data["points"][-1]["batch_size"]
    elif name == "max_batch_zero":
        data["max_batch_size"] = 0
    elif name == "peak_str":
        p0["peak_memory_bytes"] = "lots"
    elif name == "peak_neg":
        p0["peak_memory_bytes"] = -1
    elif name == "n_points_zero":
        data["fit"]["n_points"] = 0
    elif name == "residual_nan":
        data["fit"]["max_rel_residual"] = math.nan
    elif name == "version":
        data["version"] = 2


def _search_dict(m):
    """``MaxBatchSize.state_dict()`` of a search from 1 with no limit on a limit M, by the
    documented search (:func:`_oracle_search`)."""
    search = {"m": m, "start": 1, "limit": None, "max_trials": 64, "steps_per_trial": 1}
    trials, low, _ = _oracle_search(search | {"first_step_m": None})
    return {
        "max_batch_size": low,
        "start": 1,
        "limit": None,
        "capped": False,
        "converged": True,
        "trials": [[b, fits] for b, fits in trials],
    }


def _break_search(data, name):
    search = data["max_batch_search"]
    if name == "capped_str":
        search["capped"] = "false"
    elif name == "converged_false":
        search["converged"] = False
    elif name == "trials_str":
        search["trials"][0][1] = "true"
    elif name == "not_object":
        data["max_batch_search"] = [search["max_batch_size"]]
    elif name == "limit_frac":
        search["limit"] = search["max_batch_size"] + 0.5


def check_json(cfg):
    from noisescale.hardware import ThroughputProfile

    try:
        data = _profile_dict(cfg)
    except Exception as err:
        return {"cls": "CRASH", "exc": f"generating: {type(err).__name__}: {err}"[:300]}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "p.json")
        name = cfg["json_break"]
        if name:
            _break(data, name)
        elif data["max_batch_size"] is not None:
            # the search noisescale profile writes (the documented search on a limit M), and
            # one of its fields broken
            data["max_batch_search"] = _search_dict(data["max_batch_size"])
            name = cfg.get("search_break")
            if name:
                _break_search(data, name)
        with open(path, "w") as f:
            json.dump(data, f)
        try:
            back = ThroughputProfile.load(path)
        except NoiseScaleInputError as err:
            if not name:
                return {"cls": "FALSE-REFUSAL", "exc": str(err)[:300]}
            if (BREAK_FIELD | SEARCH_BREAK_FIELD)[name] not in str(err):
                return {"cls": "WRONG", "why": f"{name}: refused without naming it: {err}"[:300]}
            return {"cls": "refused-ok", "exc": str(err)[:120]}
        except Exception as err:
            return {"cls": "CRASH", "exc": f"{type(err).__name__}: {err}"[:300]}
    if name:
        return {"cls": "WRONG", "why": f"{name}: read without a word"}
    again = back.to_dict()
    if json.dumps(again, sort_keys=True) != json.dumps(data, sort_keys=True):
        diff = [k for k in data if data[k] != again.get(k)]
        return {"cls": "WRONG", "why": f"round trip changed {diff}"}
    return {"cls": "ok"}


# --- noisescale profile --------------------------------------------------------------------------


def _cli(argv):
    from noisescale.cli import main as cli_main

    out, err = io.StringIO(), io.StringIO()
    exc = None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli_main(argv)
    except SystemExit as e:
        rc = e.code
    except Exception as e:
        rc, exc = None, e
    return rc, out.getvalue(), err.getvalue(), exc


def check_cli(cfg):
    from noisescale.hardware import ThroughputProfile

    here = os.path.dirname(os.path.abspath(__file__))
    spec = os.path.join(here, "..", "examples", "profile_model.py") + ":build"
    rng = random.Random(cfg["seed2"])
    width = rng.randint(4, 64)
    limit = rng.choice([2, 4, 8, 16])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "p.json")
        argv = ["profile", spec, "--model-option", f"width={width}", "--device", "cpu"]
        argv += ["--repeats", "3", "--warmup", "1", "--max-batch-limit", str(limit)]
        argv += ["--threads", "1", "--optimizer", rng.choice(["adamw", "sgd", "none"])]
        rc, _, stderr, exc = _cli([*argv, "-o", path])
        if exc is not None or rc != 0:
            cls = "CRASH" if exc is not None or "Traceback" in stderr else "FALSE-REFUSAL"
            return {"cls": cls, "exc": f"{exc} {stderr}"[-300:]}
        with open(path) as f:
            text = f.read()
        data = json.loads(text)
        want = [2**i for i in range(limit.bit_length())]
        search = data.get("max_batch_search") or {}
        why = []
        if [p["batch_size"] for p in data["points"]] != want:
            why.append(f"timed {[p['batch_size'] for p in data['points']]} != {want}")
        if data["max_batch_size"] != limit or not search.get("capped"):
            why.append(f"search {search}")
        if any(len(p["times_s"]) != 3 for p in data["points"]):
            why.append("repeats")
        try:
            ThroughputProfile.load(path)
        except NoiseScaleInputError as err:
            if "falls with the batch size" not in str(err):
                why.append(f"its own file refused: {err}")
        else:
            rc, _, stderr, exc = _cli(["recommend", "--noise-scale", "50", "--profile", path])
            if rc != 0:
                why.append(f"recommend refused it: {stderr[-200:]} {exc}")
        # never overwrites: a second profile onto the same file is refused, the file unchanged
        rc, _, stderr, exc = _cli([*argv, "-o", path])
        with open(path) as f:
            if f.read() != text:
                why.append("overwrote the measured file")
        if rc == 0 or exc is not None:
            why.append(f"second run onto the file: rc {rc} {exc}")
    return {"cls": "WRONG", "why": "; ".join(why)[:400]} if why else {"cls": "ok"}


# --- the loop ------------------------------------------------------------------------------------


def check_seed(seed, override=None, only=None):
    """The seed's part's checks; ``only="state"`` (or ``"search"``) runs that half of a search
    seed alone (the regression lists)."""
    cfg = draw_config(seed)
    if override:
        cfg.update(override)
    t0 = time.time()
    part = cfg["part"]
    checks = {}
    if part == "search":
        if only != "state":
            checks |= check_search(cfg)
        if only in (None, "state"):
            checks["state"] = check_state(cfg)
    elif part == "split":
        checks["split"] = check_split(cfg)
    elif part == "timing":
        checks |= check_timing(cfg)
    elif part == "fit":
        checks["fit"] = check_fit(cfg)
    elif part == "allreduce":
        checks["allreduce"] = check_allreduce(cfg)
    elif part == "json":
        checks["json"] = check_json(cfg)
    elif part == "cli":
        checks["cli"] = check_cli(cfg)
    return {"seed": seed, "cfg": cfg, "checks": checks, "time": round(time.time() - t0, 3)}


def findings(record):
    return [(name, res) for name, res in record["checks"].items() if res["cls"] in FINDINGS]


def describe(record):
    cfg = record["cfg"]
    keys = {
        "search": ("m", "start", "limit", "max_trials", "steps_per_trial", "first_step_m", "oom"),
        "split": ("batch", "micro"),
        "timing": ("sizes", "warmup", "repeats", "cuda", "timing_oom_at", "oom"),
        "fit": ("fit_n", "fit_start", "fit_alpha", "fit_beta", "fit_outliers"),
        "allreduce": ("ar_devices", "ar_bytes", "ar_link", "ar_bw", "ar_factor", "ar_break"),
        "json": ("json_break", "search_break"),
        "cli": (),
    }[cfg["part"]]
    if cfg["part"] == "search":
        keys += ("flaky", "not_memory", "model", "optimizer", "grads_before", "cache")
        keys += ("not_whole",)
    return f"seed {record['seed']} {cfg['part']}: " + " ".join(f"{k}={cfg[k]}" for k in keys)


def main(argv=None):
    from fuzz_runner import check_parser, run_checks

    args = check_parser(__doc__, "0:300").parse_args(argv)
    torch.set_num_threads(1)
    return run_checks(args, check_seed, findings, describe, CHECKS, column_width=11, limit=300)


if __name__ == "__main__":
    raise SystemExit(main())
