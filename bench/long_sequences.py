"""The default tracker's cost at the sizes models are trained at, not the toy sizes of
``overhead.py`` and ``steady.py``: language models on 1,024-token sequences, a ViT on 224×224
images (196 patches).

The other scripts' workloads are 2 layers of width 128 on 64-token sequences or 32×32 images,
where the hooks' fixed cost per layer and the sub-batch products' partial gradients (which grow
with the weights, not with the tokens) weigh most. Here each workload keeps 2 layers (a step on
this CPU must take seconds, not minutes) but takes a realistic width and length. The plain step
and the default tracker train copies of one model (same initial weights and batches, SGD) in
one process, alternating step by step (the order flipping every step); reported: the median
process CPU time of the steps that are not audited (audits: steps 1, 2, 4, …, 32; each replays
the backward) from step 17 on, and the ratio.

    python bench/long_sequences.py                        # gpt2, llama, vit; 40 steps each
    python bench/long_sequences.py --workload gpt2 --steps 60

Results: ``<out>/long-sequences-cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead as ob

import noisescale

WORKLOADS = ("gpt2", "llama", "vit")
FROM = 17


def audited(step: int) -> bool:
    """The engine's audit schedule (steps count from 1): 1, 2, 4, …, 1024, then every 1024th."""
    return (step & (step - 1) == 0 and step <= 1024) or step % 1024 == 0


def build(name: str) -> tuple[nn.Module, str, Any]:
    """The model, its description, and a function drawing one batch (inputs, labels)."""
    import transformers

    if name in ("gpt2", "llama"):
        d, length, batch, vocab = 512, 1024, 4, 8192
        if name == "gpt2":
            cfg = transformers.GPT2Config(
                n_layer=2, n_embd=d, n_head=d // 64, n_positions=length, vocab_size=vocab,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            )  # fmt: skip
            model: nn.Module = transformers.GPT2LMHeadModel(cfg)
            what = "transformers GPT2LMHeadModel 2×512 (Conv1D, tied head)"
        else:
            cfg = transformers.LlamaConfig(
                num_hidden_layers=2, hidden_size=d, num_attention_heads=d // 64,
                num_key_value_heads=d // 128, intermediate_size=1408,
                max_position_embeddings=length, vocab_size=vocab,
            )  # fmt: skip
            model = transformers.LlamaForCausalLM(cfg)
            what = "transformers LlamaForCausalLM 2×512 (RMSNorm, GQA)"

        def draw(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            ids = torch.randint(0, vocab, (batch, length), generator=gen)
            return ids, ids

        return (
            ob.HFLogits(model),
            f"{what}, T={length}, batch {batch}, vocab {vocab}, fp32",
            draw,
        )
    cfg = transformers.ViTConfig(
        image_size=224, patch_size=16, num_channels=3, hidden_size=384, num_hidden_layers=2,
        num_attention_heads=6, intermediate_size=1536, num_labels=100,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip

    def draw_images(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.randn(16, 3, 224, 224, generator=gen)
        return images, torch.randint(0, 100, (16,), generator=gen)

    return (
        ob.HFLogits(transformers.ViTForImageClassification(cfg)),
        "transformers ViTForImageClassification 2×384, 224×224, patch 16 (196 patches + class "
        "token), batch 16, fp32",
        draw_images,
    )


def loss_of(name: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if name == "vit":
        return ob.image_loss(out, y).mean()
    return ob.sequence_loss(out, y).mean()


def run(name: str, steps: int) -> dict[str, Any]:
    models, what, draw = {}, "", None
    for mode in ("plain", "default"):
        torch.manual_seed(0)
        models[mode], what, draw = build(name)
    tracker = noisescale.GradientNoiseTracker(models["default"])
    opts = {m: torch.optim.SGD(models[m].parameters(), lr=1e-4) for m in models}
    gen = torch.Generator().manual_seed(1)
    batches = [draw(gen) for _ in range(4)]
    times: dict[str, list[tuple[int, float]]] = {m: [] for m in models}
    for i in range(steps):
        x, y = batches[i % len(batches)]
        for mode in ("plain", "default") if i % 2 == 0 else ("default", "plain"):
            model, opt = models[mode], opts[mode]
            c0 = time.process_time()
            opt.zero_grad()
            loss_of(name, model(x), y).backward()
            if mode == "default":
                tracker.step()
            opt.step()
            times[mode].append((i + 1, time.process_time() - c0))
        if (i + 1) % 10 == 0:
            print(f"   {name}: step {i + 1}/{steps}", flush=True)
    tracker.remove()
    med = {
        m: statistics.median(t for s, t in v if s >= FROM and not audited(s))
        for m, v in times.items()
    }
    return {
        "workload": name,
        "what": what,
        "steps": steps,
        "plain_s": med["plain"],
        "default_s": med["default"],
        "ratio": med["default"] / med["plain"],
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# long_sequences.py — {result['device']}, {result['date']}",
        "",
        "| workload | plain s/step | default s/step | default / plain |",
        "|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['what']} | {r['plain_s']:.2f} | {r['default_s']:.2f} | **{r['ratio']:.2f}×** |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="all", help=f"'all' or a comma list of {WORKLOADS}")
    parser.add_argument("--steps", type=int, default=40, help="steps per mode (at least 20)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    names = WORKLOADS if args.workload == "all" else tuple(args.workload.split(","))
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workload {unknown[0]!r}; choose from {', '.join(WORKLOADS)}")
    if args.steps < 20:
        raise SystemExit(f"--steps must be at least 20 (steps from {FROM} count), got {args.steps}")
    result = ob.result_header("long_sequences", torch.device("cpu"))
    result["rows"] = [run(n, args.steps) for n in names]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "long-sequences-cpu.json").write_text(json.dumps(result, indent=2))
    (out / "long-sequences-cpu.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
