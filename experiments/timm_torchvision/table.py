import json

recs = {}
order = []
import os

HERE = os.path.dirname(os.path.abspath(__file__))
for l in open(os.path.join(HERE, "results.jsonl")):
    r = json.loads(l)
    key = r["name"]
    if (
        key in ("tv_maxvit_eval",) and key in recs
    ):  # keep the N=4 record; the N=16 one is described in notes
        continue
    if key not in recs:
        order.append(key)
    recs[key] = r


def cell(d):
    if d is None:
        return "not run"
    s = d["status"]
    if s == "error":
        msg = d["msg"].replace("|", "/")
        kind = "refused" if "UnsupportedModuleError" in msg or "NoiseScale" in msg else "ERROR"
        return f"{kind}: {msg[:160]}"
    if "rel" in d:
        return f"{s} ({d['rel']:.1e})"
    return s


print(
    "| library | model (config key) | mode | img | exact mode (max rel err) | sub-batch k=2 (max rel err) | tracker, 6 SGD steps, batch 16, float32 |"
)
print("|---|---|---|---|---|---|---|")
for k in order:
    r = recs[k]
    lib = "timm" if k.startswith("timm") else "torchvision"
    if "build_error" in r:
        print(
            f"| {lib} | {k} | {r['mode']} | {r['img']} | build error (my config): {r['build_error'][:100]} | | |"
        )
        continue
    print(
        f"| {lib} | {k} | {r['mode']} | {r['img']} | {cell(r.get('exact'))} | {cell(r.get('subbatch'))} | {cell(r.get('tracker'))} |"
    )
