"""Several engine passes at the batch sizes given (audited and unaudited steps) against brute force:
python varbatch.py tv_maxvit_eval 8,8,8,16,16,16
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))
sys.path.insert(0, HERE)
import torch
import torch.nn.functional as F

torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)
import models as M

from noisescale.per_example import PerExampleNorms
from test_subbatch import subbatch_truth

name = sys.argv[1]
sizes = [int(s) for s in sys.argv[2].split(",")]
k = int(sys.argv[3]) if len(sys.argv) > 3 else 0
spec = M.MODELS[name]
torch.manual_seed(0)
model = spec["build"]()
from hunt import set_mode

set_mode(model, spec.get("mode", "eval"))
img = spec.get("img", 16)
eng = PerExampleNorms(model, subbatches=k)
for step, n in enumerate(sizes, 1):
    x = torch.randn(n, 3, img, img, generator=torch.Generator().manual_seed(step))
    y = torch.arange(n) % 5

    def per():
        torch.manual_seed(7)
        return F.cross_entropy(model(x), y, reduction="none")

    model.zero_grad()
    try:
        per().mean().backward()
        (p,) = eng.collect()
    except Exception as e:
        print(step, n, "ERR", str(e)[:300])
        break
    if p.raw_sqnorms is None:
        print(step, n, "withheld", p.withheld)
        continue
    with eng.paused():
        if k:
            if p.raw_sqnorms is None:
                print(step, n, "withheld", p.withheld)
                continue
            want = subbatch_truth(model, lambda i: per()[i], n, p.subbatches)
            got = p.raw_sqnorms
        else:
            ps = [q for q in model.parameters() if q.requires_grad]
            want = torch.stack(
                [
                    sum(
                        g.pow(2).sum()
                        for g in torch.autograd.grad(per()[i], ps, allow_unused=True)
                        if g is not None
                    )
                    for i in range(n)
                ]
            )
            got = p.raw_sqnorms * n * n
    rel = float(((got - want).abs() / want).max())
    print(
        step,
        n,
        "audited" if p.audited else "unaudited",
        f"rel={rel:.2e}",
        "WRONG" if rel > 1e-6 else "",
    )
