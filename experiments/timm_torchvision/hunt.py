"""Models we did not write, from timm and torchvision, against brute force (see README.md).

    python hunt.py                 # every model in models.py
    python hunt.py NAME [NAME...]  # some of them

Appends one JSON record per model to results.jsonl next to this file; table.py makes table.md.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))
import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)
import noisescale  # noqa: E402
from noisescale.per_example import PerExampleNorms  # noqa: E402
from test_subbatch import example_sqnorms, subbatch_truth  # noqa: E402

N = int(os.environ.get("HUNT_N", "4"))
NUM_CLASSES = 5
SEED_FWD = 123


def set_mode(model, mode):
    model.train(mode in ("train", "train_bneval"))
    if mode == "train_bneval":
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.eval()


def first_line(e: BaseException) -> str:
    s = f"{type(e).__name__}: {e}"
    return s.strip().splitlines()[0][:400] if s.strip() else type(e).__name__


def make_losses(model, x, y, input_fn=None):
    fwd = input_fn or (lambda m, x: m(x))

    def per_ex():
        torch.manual_seed(SEED_FWD)
        out = fwd(model, x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return F.cross_entropy(out, y, reduction="none")

    def batch_loss():
        return per_ex().mean()

    def one(i):
        return per_ex()[i]

    return batch_loss, one


def run_exact(model, batch_loss, one):
    res = {}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            torch.manual_seed(1)
            with noisescale.per_example_sqnorms(model, loss_reduction="mean") as pe:
                batch_loss().backward()
            model.zero_grad()
            got = pe.sqnorms
            want = example_sqnorms(model, one, N)
            rel = float(((got - want).abs() / want.abs()).max())
            res["rel"] = rel
            res["status"] = "exact" if rel < 1e-6 else "SILENTLY WRONG"
            if rel >= 1e-6:
                res["got"] = got.tolist()
                res["want"] = want.tolist()
        except Exception as e:
            res["status"] = "error"
            res["msg"] = first_line(e)
            res["tb"] = traceback.format_exc()[-3000:]
    res["warnings"] = sorted({str(x.message).splitlines()[0][:300] for x in w})
    return res


def run_subbatch(model, batch_loss, one, k=2, steps=3):
    res = {"steps": []}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        engine = None
        try:
            engine = PerExampleNorms(model, subbatches=k)
            engine.RECHECK_SUBBATCHES = 1
            for step in range(steps):
                model.zero_grad()
                batch_loss().backward()
                (p,) = engine.collect()
                if p.raw_sqnorms is None:
                    res["steps"].append({"withheld": str(p.withheld)[:300]})
                    continue
                with engine.paused():
                    want = subbatch_truth(model, one, N, p.subbatches)
                rel = float(((p.raw_sqnorms - want).abs() / want.abs()).max())
                st = {"rel": rel, "audited": bool(p.audited)}
                if rel >= 1e-6:
                    st["got"] = p.raw_sqnorms.tolist()
                    st["want"] = want.tolist()
                res["steps"].append(st)
            rels = [s["rel"] for s in res["steps"] if "rel" in s]
            if not rels:
                res["status"] = "withheld"
            else:
                res["rel"] = max(rels)
                res["status"] = "exact" if max(rels) < 1e-6 else "SILENTLY WRONG"
        except Exception as e:
            res["status"] = "error"
            res["msg"] = first_line(e)
            res["tb"] = traceback.format_exc()[-3000:]
        finally:
            if engine is not None:
                try:
                    engine.remove()
                except Exception:
                    pass
            model.zero_grad()
    res["warnings"] = sorted({str(x.message).splitlines()[0][:300] for x in w})
    return res


def run_tracker(build, img, mode, batch=16, steps=6, input_fn=None, in_ch=3):
    res = {}
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    model = build()
    set_mode(model, mode)
    fwd = input_fn or (lambda m, x: m(x))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tracker = None
    s = -1
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            tracker = noisescale.GradientNoiseTracker(model)
            g = torch.Generator().manual_seed(5)
            for s in range(steps):
                x = torch.randn(batch, in_ch, img, img, generator=g)
                y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
                opt.zero_grad()
                out = fwd(model, x)
                if isinstance(out, (tuple, list)):
                    out = out[0]
                loss = F.cross_entropy(out, y, reduction="none").mean()
                loss.backward()
                tracker.step(loss=loss)
                opt.step()
            e = tracker.estimate()
            res["status"] = "ok"
            res["b_simple"] = float(e.b_simple)
        except Exception as e:
            res["status"] = "error"
            res["step"] = s + 1
            res["msg"] = first_line(e)
            res["tb"] = traceback.format_exc()[-3000:]
        finally:
            if tracker is not None:
                try:
                    tracker.remove()
                except Exception:
                    pass
    res["warnings"] = sorted({str(x.message).splitlines()[0][:300] for x in w})
    return res


def check(
    name, build, img=16, mode="eval", tracker=True, subbatch=True, input_fn=None, in_ch=3, note=""
):
    t0 = time.time()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    rec = {"name": name, "mode": mode, "img": img, "note": note}
    try:
        torch.manual_seed(0)
        model = build()
        set_mode(model, mode)
        rec["params"] = sum(p.numel() for p in model.parameters())
        x = torch.randn(N, in_ch, img, img, generator=torch.Generator().manual_seed(2))
        y = torch.arange(N) % NUM_CLASSES
        batch_loss, one = make_losses(model, x, y, input_fn)
        rec["exact"] = run_exact(model, batch_loss, one)
        if subbatch:
            rec["subbatch"] = run_subbatch(model, batch_loss, one)
    except Exception as e:
        rec["build_error"] = first_line(e)
        rec["tb"] = traceback.format_exc()[-3000:]
    finally:
        torch.set_default_dtype(old)
    if tracker and "build_error" not in rec:
        rec["tracker"] = run_tracker(build, img, mode, input_fn=input_fn, in_ch=in_ch)
    rec["secs"] = round(time.time() - t0, 1)
    return rec


def summarize(rec):
    def s(d):
        if d is None:
            return "-"
        out = d["status"]
        if "rel" in d:
            out += f" ({d['rel']:.1e})"
        if "msg" in d:
            out += f" | {d['msg'][:200]}"
        return out

    if "build_error" in rec:
        return f"{rec['name']}: BUILD ERROR {rec['build_error']}"
    return (
        f"{rec['name']} [{rec['mode']}] {rec['secs']}s\n  exact: {s(rec.get('exact'))}\n"
        f"  sub:   {s(rec.get('subbatch'))}\n  track: {s(rec.get('tracker'))}"
    )


if __name__ == "__main__":
    import models as M

    for name in sys.argv[1:] or list(M.MODELS):
        spec = M.MODELS[name]
        rec = check(name, **spec)
        with open(os.path.join(HERE, "results.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(summarize(rec), flush=True)
