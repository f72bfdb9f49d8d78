"""The integrations fuzzer: the Hugging Face Trainer callback, the Lightning callback and
accelerate in a loop of one's own, with random options, against brute force on the batches they
drew.

`draw_options(seed)` draws a tiny model — a token tagger of our own whose forward takes
``**kwargs`` (it divides its summed token loss by ``num_items_in_batch``) or not (each
micro-batch's token mean), a classifier of our own (a mean over examples) or one in the
Trainer's form (its summed loss over ``num_items_in_batch``, ``loss_reduction`` undeclared,
``"sum"`` or ``"num_items_in_batch"``), Hugging Face's GPT-2 (causal LM, its own loss) or BERT's
sequence classifier — with random weights in float64, a
few dozen synthetic examples of random lengths padded by a collator (labels of -100 on the
padding, some examples' tokens partly unlabelled), and the Trainer's options:
``per_device_train_batch_size``, ``gradient_accumulation_steps`` (an epoch's short last window
included), ``label_smoothing_factor``, ``max_grad_norm`` (0, a clip far below |G| so that a
reading after clipping shows, or 1), ``gradient_checkpointing`` (GPT-2), ``optim`` (SGD, AdamW,
Adafactor, RMSprop), the learning-rate scheduler, ``logging_steps``, evaluation every few
steps, ``dataloader_drop_last``, ``average_tokens_across_devices``,
``include_num_input_tokens_seen``, a ``compute_loss`` override (returning the model's loss), a
resume from a checkpoint in the middle of the run, a ``BatchSizeRamp`` through
``gradient_accumulation_steps`` (1 to 2 or 3, two epochs), and the callback's own options
(``per_example_fraction``, ``microbatch``, ``measure_every``, ``beta``).

The truth. A forward pre-hook on the model records every training forward's inputs (with
gradients on), and the parameters at the first forward of each optimizer step (our own
``on_step_end`` closes a step). Each example's gradient is then computed by its own backward in
float64 on a copy of the model at those parameters: x_i, the gradient of its summed unit losses
(its counted tokens' losses, label-smoothed as the Trainer's ``LabelSmoother`` does, or its one
loss), with T_i units. The weight the Trainer gives each example follows from its options
(``num_items_in_batch`` to models that accept loss kwargs: every token alike; otherwise each
micro-batch's mean divided by the window's micro-batches). Against the callback's history:

* ``b_big`` and ``sqnorm_big``: the step's big batch (Σc)²/Σc² and |Σ c_i x_i / Σ c_i|² — or,
  for micro-batch token means whose counts differ (docs/language_models.md), within each
  micro-batch: B/k and Σ_m (b_m/B)·|X̄_m|²;
* ``sources.per_example`` (every example measured: ``per_example_fraction=1.0``) and
  ``sources.microbatch``: count, b_small and sqnorm_small from the examples' and micro-batches'
  mean gradients;
* ``examples``, ``tokens`` (the counted units), ``tokens_seen`` and ``loss`` (the Trainer's: the
  micro-batches' mean, or their sum under ``num_items_in_batch``);
* ``g2`` and ``trace_sigma`` by eq. A.2 from the truth where the step has one source, and
  ``b_simple`` = ``trace_sigma_ema`` / ``g2_ema`` (per token: × T̄);
* a resumed run: its records against brute force on its own batches, and against the
  uninterrupted run's records of the same steps (the estimate continues as if uninterrupted).

Lightning (:func:`draw_lightning`): a classifier trained by ``Trainer.fit`` with
``accumulate_grad_batches`` (an epoch's short last window included), ``gradient_clip_val`` (by
norm or value), manual optimisation (each loss divided by the accumulation or not, stepped every
k batches of the epoch), SGD, Adam or RMSprop with or without a per-step scheduler, a shuffled
loader or not, a second fit resumed from the checkpoint of step 2 (``ckpt_path=``, mid-epoch
or not), and precision ``bf16-mixed`` (crash or refusal only); its batches recorded in
``training_step``, grouped by the optimizer steps taken before them. accelerate
(:func:`draw_accelerate`): the loop of docs/integrations.md (``accelerator.accumulate``,
``tracker.watch_loss`` or not, ``accelerator.backward``, ``tracker.step()`` when
``sync_gradients``, ``accelerator.clip_grad_norm_``) over one or two epochs. Both are checked
as the Trainer's b_big, |G_big|² and sources, each micro-batch's mean weighed 1/k.

Per token (a token loss), the record's norms are |x|²/T̄² and its b's are in tokens (× T̄), T̄
the record's ``tokens_per_example``, itself checked against the run's counted tokens per
example. Classes as tests/fuzz_runner.py's: ``exact``, ``refused``, ``crash``, ``WRONG-SILENT``,
``wrong-warned``, ``withheld-all``; ``exact-part-left-out`` where a step's per-example norms
were partly left out with a warning (an audit that could not follow the forward) and the rest
are exact; ``ok`` for a bf16 Lightning run (crash or refusal only). A wrong number under a
warning of Lightning's assumed divisor is ``wrong-warned``.

Run it long::

    python tests/fuzz_integrations.py --seeds 0:100 --jsonl integ.jsonl

``--parts trainer`` runs one part. ``--seeds 17 -v`` replays one seed,
``--override '{"accum": 2}'`` with options changed (``'{"lightning": {"manual": true}}'``
those of its Lightning run).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import itertools
import json
import math
import os
import random
import sys
import tempfile
import time
import types
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import fuzz_runner
import fuzz_tracker

V, H = 11, 6  # vocabulary (0 pads), hidden size
RTOL = 1e-9  # float64 throughout
RTOL_F32 = 1e-4  # Hugging Face's token losses and its label smoother's sum run in float32
RATIO_RTOL = 1e-5


# --- the options ---------------------------------------------------------------------------------


def draw_options(seed, override=None):
    r = random.Random(f"integ-{seed}")
    opts = {
        "model": r.choice(
            ["tagger_items", "tagger_mean", "classifier", "gpt2", "bert_cls", "classifier_items"]
        ),
        "n_data": r.randint(10, 22),
        "batch": r.choice([1, 2, 3, 4]),
        "accum": r.choice([1, 2, 2, 3]),
        "max_steps": r.choice([3, 4, 5]),
        "smoothing": r.choice([0.0, 0.0, 0.0, 0.1]),
        "clip": r.choice([0.0, 1e-3, 1.0]),
        "grad_ckpt": r.random() < 0.3,
        "optim": r.choice(["sgd", "adamw_torch", "adafactor", "rmsprop"]),
        "scheduler": r.choice(["constant", "linear", "cosine"]),
        "logging_steps": r.choice([1, 2, 3]),
        "eval_steps": r.choice([None, None, 2]),
        "drop_last": r.random() < 0.3,
        "average_tokens": r.random() < 0.3,
        "tokens_seen": r.choice(["no", "no", "all", "non_padding"]),
        "compute_loss": r.random() < 0.2,
        "resume": r.random() < 0.3,
        "fraction": r.choice([1.0, 1.0, 1.0, 0.5, None]),
        "microbatch": r.random() < 0.7,
        "measure_every": r.choice([1, 1, 1, 2]),
        "beta": r.choice([0.99, 0.9, 1.0]),
        "unlabelled": r.random() < 0.3,  # some positions -100 inside the sequences
        "min_len": r.choice([1, 2, 3]),
        "max_len": r.choice([3, 5, 7]),
        "data_seed": r.randint(0, 10**6),
        # a loss of our own over tokens declared (loss_reduction=), as docs/language_models.md
        # asks; left undeclared it is refused
        "declare": r.random() < 0.85,
        # a BatchSizeRamp through gradient_accumulation_steps (from 1; two epochs)
        "ramp": r.random() < 0.25,
        "ramp_to": r.choice([2, 3]),
        # the loss_reduction declared for the classifier in the Trainer's form
        "items_reduction": r.choice([None, "sum", "num_items_in_batch"]),
        # precondition=True (the Trainer's AdamW or RMSprop, from its first step)
        "precondition": r.random() < 0.3,
    }
    opts.update(override or {})
    if opts["model"] != "gpt2":
        opts["grad_ckpt"] = False
    if opts["ramp"]:
        opts.update(accum=1, scheduler="constant", max_steps=-1)
    opts["max_len"] = max(opts["max_len"], opts["min_len"])
    if opts["model"] == "gpt2":
        opts["min_len"] = max(opts["min_len"], 2)  # (a causal LM counts T - 1 tokens)
        opts["max_len"] = max(opts["max_len"], opts["min_len"])
    return opts


# --- the models and data -------------------------------------------------------------------------


class _Tagger(nn.Module):
    """A token tagger: each position's label from its token and the mean of those before it
    (so a sequence's positions are coupled, and its padding never reaches them)."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(problem_type=None)  # (the Trainer reads it)
        self.emb = nn.Embedding(V, H)
        self.mix = nn.Linear(H, H)
        self.head = nn.Linear(H, V)

    def logits(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask[..., None]
        before = h.cumsum(1) / torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
        return self.head(torch.tanh(self.mix(before) + h))


class TaggerItems(_Tagger):
    """Accepts loss kwargs: its summed token loss over ``num_items_in_batch`` when given."""

    def forward(self, input_ids, attention_mask, labels=None, **kwargs):
        logits = self.logits(input_ids, attention_mask)
        items = kwargs.get("num_items_in_batch")
        loss = None
        if labels is not None:
            flat = (logits.flatten(0, 1), labels.flatten())
            if items is None:
                loss = F.cross_entropy(*flat, ignore_index=-100)
            else:
                loss = F.cross_entropy(*flat, ignore_index=-100, reduction="sum") / items
        return {"loss": loss, "logits": logits}


class TaggerMean(_Tagger):
    """No loss kwargs: each micro-batch's token mean (the Trainer divides by the accumulation)."""

    def forward(self, input_ids, attention_mask, labels=None):
        logits = self.logits(input_ids, attention_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return {"loss": loss, "logits": logits}


class ClassifierItems(nn.Module):
    """A classifier of one's own in the Trainer's form: its summed loss over the
    ``num_items_in_batch`` the Trainer passes (the step's labels), its forward taking
    ``**kwargs``."""

    def __init__(self):
        super().__init__()
        self.inner = Classifier()
        self.config = self.inner.config

    def forward(self, input_ids, attention_mask, labels=None, **kwargs):
        out = self.inner(input_ids, attention_mask)
        items = kwargs.get("num_items_in_batch")
        if labels is not None:
            out["loss"] = F.cross_entropy(out["logits"], labels, reduction="sum")
            out["loss"] = out["loss"] / (len(labels) if items is None else items)
        return out


class Classifier(nn.Module):
    """Mean-pooled embeddings, two layers: a mean over the micro-batch's examples."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(problem_type=None)
        self.emb = nn.Embedding(V, H)
        self.net = nn.Sequential(nn.Linear(H, H), nn.Tanh(), nn.Linear(H, 3))

    def forward(self, input_ids, attention_mask, labels=None):
        m = attention_mask[..., None].to(self.emb.weight.dtype)
        pooled = (self.emb(input_ids) * m).sum(1) / m.sum(1)
        logits = self.net(pooled)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def build_model(opts):
    torch.manual_seed(opts["data_seed"] % 1000)
    kind = opts["model"]
    if kind == "tagger_items":
        return TaggerItems().double()
    if kind == "tagger_mean":
        return TaggerMean().double()
    if kind == "classifier":
        return Classifier().double()
    if kind == "classifier_items":
        return ClassifierItems().double()
    import transformers

    transformers.logging.set_verbosity_error()
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=V, n_embd=H + 2, n_layer=1, n_head=2, n_positions=16, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
        )  # fmt: skip
        return transformers.GPT2LMHeadModel(config).double()
    config = transformers.BertConfig(
        vocab_size=V, hidden_size=H + 2, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=12, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config).double()


def _token_model(opts):
    return opts["model"] in ("tagger_items", "tagger_mean", "gpt2")


class Dataset(torch.utils.data.Dataset):
    def __init__(self, opts, n=None, salt=0):
        g = torch.Generator().manual_seed(opts["data_seed"] + salt)
        self.items = []
        for _ in range(n or opts["n_data"]):
            t = int(torch.randint(opts["min_len"], opts["max_len"] + 1, (), generator=g))
            ids = torch.randint(1, V, (t,), generator=g)
            if _token_model(opts):
                labels = ids.clone() if opts["model"] == "gpt2" else torch.randint(0, V, (t,))
                if opts["unlabelled"]:
                    drop = torch.rand(t, generator=g) < 0.3
                    labels = torch.where(drop, torch.full_like(labels, -100), labels)
            else:
                labels = torch.randint(0, 3, (), generator=g)
            self.items.append({"input_ids": ids, "labels": labels})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


LABELS = {}  # input_ids' data pointer -> the labels collated with them (the Trainer may pop them)


def collate(items):
    """Pads ids with 0, the mask with 0 and token labels with -100 to the longest."""
    t = max(len(it["input_ids"]) for it in items)
    ids = torch.zeros(len(items), t, dtype=torch.long)
    mask = torch.zeros(len(items), t, dtype=torch.long)
    tokens = items[0]["labels"].dim() == 1
    labels = (
        torch.full((len(items), t), -100) if tokens else torch.zeros(len(items), dtype=torch.long)
    )
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        ids[i, :n], mask[i, :n] = it["input_ids"], 1
        if tokens:
            labels[i, :n] = it["labels"]
        else:
            labels[i] = it["labels"]
    LABELS[ids.data_ptr()] = labels.clone()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --- brute force ---------------------------------------------------------------------------------


def unit_losses(opts, model, row):
    """Example `row`'s summed unit losses (a 0-d tensor) and its unit count: its counted tokens
    (shifted for GPT-2), or 1 for a classifier; label-smoothed as the Trainer's LabelSmoother."""
    ids, mask, labels = row["input_ids"][None], row["attention_mask"][None], row["labels"][None]
    kind = opts["model"]
    if kind in ("tagger_items", "tagger_mean"):
        logits = model.logits(ids, mask)
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits if kind in (
            "gpt2", "bert_cls") else model(ids, mask)["logits"]  # fmt: skip
    if kind == "gpt2":
        logits, labels = logits[:, :-1], labels[:, 1:]
    logits = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    keep = labels != -100
    logp = F.log_softmax(logits[keep], dim=-1)
    nll = -logp.gather(1, labels[keep][:, None]).squeeze(1)
    eps = opts["smoothing"]
    per = (1 - eps) * nll + eps * (-logp).mean(-1) if eps else nll
    return per.sum(), int(keep.sum())


def _grad(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([
        (g if g is not None else torch.zeros_like(p)).flatten()
        for g, p in zip(grads, params, strict=True)
    ])  # fmt: skip


def step_truth(opts, model, params, micro_batches, pre=None):
    """Per example of the step: (x_i, T_i, micro-batch index, s_i); x_i times the
    preconditioner `pre` (flattened) where given."""
    twin = copy.deepcopy(model)
    twin.load_state_dict(params)
    twin.train()
    twin.zero_grad(set_to_none=True)
    for m in twin.modules():  # (no checkpointing in the truth)
        if hasattr(m, "gradient_checkpointing"):
            m.gradient_checkpointing = False
    out = []
    for j, batch in enumerate(micro_batches):
        for i in range(batch["input_ids"].shape[0]):
            row = {k: batch[k][i] for k in ("input_ids", "attention_mask", "labels")}
            s, t = unit_losses(opts, twin, row)
            x = _grad(twin, s) if t > 0 else None
            if x is not None and pre is not None:
                x = x * pre
            out.append((x, t, j, float(s.detach())))
    dim = next(x.numel() for x, *_ in out if x is not None) if any(
        x is not None for x, *_ in out) else 1  # fmt: skip
    return [(torch.zeros(dim, dtype=torch.float64) if x is None else x, t, j, s)
            for x, t, j, s in out]  # fmt: skip


def _sq(v):
    return float(v.pow(2).sum())


def coefficients(opts, trainer, examples, micro):
    """Each micro-batch's coefficient a_m on its summed unit losses in what the Trainer
    backpropagates (before the accelerator's division, of which there is none here)."""
    k_window = len(micro)
    counts = {}
    for _, t, j, _ in examples:
        counts[j] = counts.get(j, 0) + (t if _token_model(opts) else 1)
    total = sum(counts.values())
    if opts["model"] == "gpt2" and not getattr(trainer, "_loss_shifts_labels", True):
        # the Trainer's num_items_in_batch counts GPT-2's labels unshifted where its config
        # names no loss_type (its loss still shifts them)
        total = sum(int((b["labels"] != -100).sum()) for b in micro)
    accepts = bool(getattr(trainer, "model_accepts_loss_kwargs", False))
    if accepts and (
        opts["model"] in ("tagger_items", "gpt2", "classifier_items") or opts["smoothing"] > 0
    ):
        return {j: 1.0 / max(total, 1) for j in counts}, True  # over num_items_in_batch
    if accepts:  # (BERT's own mean, left undivided by the Trainer)
        return {j: 1.0 / max(c, 1) for j, c in counts.items()}, False
    return {j: 1.0 / (k_window * max(c, 1)) for j, c in counts.items()}, False


def expected(opts, examples, coefs, within, weights=None):
    """The step's raw truth in x-units: b_big (sequences), |G_big|², sources, loss, tokens."""
    token = _token_model(opts)
    per_mb = {}
    for x, t, j, s in examples:
        per_mb.setdefault(j, []).append((x, t, s))
    n = len(examples)
    total_t = sum(t for _, t, _, _ in examples)
    if token and within:
        b_big = n / len(per_mb)
        big = sum(len(mb) / n * _sq(sum(x for x, *_ in mb) / len(mb)) for mb in per_mb.values())
    else:
        # a token loss weighs every token of the step alike here (one divisor, or equal
        # counts); a mean over examples weighs micro-batch m's by a_m
        cs = [1.0 if token else coefs[j] for _, _, j, _ in examples]
        cs = cs if weights is None else weights
        b_big = sum(cs) ** 2 / sum(c * c for c in cs)
        g = sum(c * x for c, (x, *_) in zip(cs, examples, strict=True)) / sum(cs)
        big = _sq(g)
    sources = {}
    if opts["fraction"] == 1.0:
        sources["per_example"] = {
            "count": float(n),
            "b_small": 1.0,
            "sqnorm_small": sum(_sq(x) for x, *_ in examples) / n,
        }
    if opts["microbatch"] and len(per_mb) >= 2 and not (token and within):
        sources["microbatch"] = {
            "count": float(len(per_mb)),
            "b_small": len(per_mb) / sum(1.0 / len(mb) for mb in per_mb.values()),
            "sqnorm_small": sum(_sq(sum(x for x, *_ in mb) / len(mb)) for mb in per_mb.values())
            / len(per_mb),
        }
    # each micro-batch's own examples (a pass whose per-example norms were left out, warned)
    parts = {
        j: {"count": float(len(mb)), "sqnorm_small": sum(_sq(x) for x, *_ in mb) / len(mb)}
        for j, mb in per_mb.items()
    }
    # the loss the Trainer logs: the sum of what it backpropagated
    loss = sum(coefs[j] * sum(s for *_, s in mb) for j, mb in per_mb.items())
    return {"b_big": b_big, "sqnorm_big": big, "sources": sources, "loss": loss,
            "tokens": float(total_t) if token else None, "examples": n, "parts": parts}  # fmt: skip


# --- the run -------------------------------------------------------------------------------------


class _Recorder:
    """Records each training forward's inputs and the parameters at each step's first."""

    def __init__(self, model):
        self.steps, self.current, self.params, self.pre = [], [], None, None
        self.trainer = None  # (set once built: its optimizer's preconditioner is read)
        self.handle = model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        if not (torch.is_grad_enabled() and module.training):
            return
        if not self.current:
            self.params = {k: v.detach().clone() for k, v in module.state_dict().items()}
            self.pre = self._preconditioner(module)
        batch = {k: kwargs[k].detach().clone() for k in ("input_ids", "attention_mask")}
        batch["labels"] = LABELS[kwargs["input_ids"].data_ptr()]
        self.current.append(batch)

    def _preconditioner(self, module):
        """P = 1/(√v̂ + ε) of the Trainer's Adam or RMSprop as the step starts, flattened in
        the order of the trainable parameters (None before its first step)."""
        optimizer = getattr(self.trainer, "optimizer", None)
        optimizer = getattr(optimizer, "optimizer", optimizer)  # (accelerate's wrapper)
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)):
            return None
        params = [p for p in module.parameters() if p.requires_grad]
        pre = fuzz_tracker._preconditioner(optimizer, params)
        return None if pre is None else torch.cat([q.detach().flatten() for q in pre])

    def close_step(self):
        if self.current:
            self.steps.append((self.params, self.current, self.pre))
        self.current = []


def _training_args(opts, out_dir, **extra):
    import transformers

    kw = dict(
        output_dir=out_dir, per_device_train_batch_size=opts["batch"],
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=opts["accum"], max_steps=opts["max_steps"],
        learning_rate=0.05, lr_scheduler_type=opts["scheduler"], optim=opts["optim"],
        weight_decay=0.0, max_grad_norm=opts["clip"], report_to=[], save_strategy="no",
        logging_steps=opts["logging_steps"], use_cpu=True, disable_tqdm=True,
        label_smoothing_factor=opts["smoothing"], gradient_checkpointing=opts["grad_ckpt"],
        dataloader_drop_last=opts["drop_last"],
        average_tokens_across_devices=opts["average_tokens"],
        include_num_input_tokens_seen=opts["tokens_seen"], seed=opts["data_seed"] % 997,
        remove_unused_columns=False, num_train_epochs=2,
    )  # fmt: skip
    if opts["grad_ckpt"]:
        kw["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if opts["eval_steps"]:
        kw.update(eval_strategy="steps", eval_steps=opts["eval_steps"])
    kw.update(extra)
    return transformers.TrainingArguments(**kw)


def _trainer_class(opts):
    """The Trainer, or an override of ``compute_loss`` that returns the Trainer's loss (and,
    for a tagger's declared token loss, counts its tokens: docs/language_models.md)."""
    import transformers

    count = opts["declare"] and opts["model"] in ("tagger_items", "tagger_mean")
    if not (opts["compute_loss"] or count):
        return transformers.Trainer

    class Override(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.get("labels")
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if count and labels is not None and torch.is_grad_enabled():
                (callback,) = [c for c in self.callback_handler.callbacks if hasattr(c, "tracker")]
                callback.tracker.count_tokens(labels)
            return out

    return Override


def _ramp(opts):
    from noisescale.schedule import BatchSizeRamp

    b = opts["batch"]
    return BatchSizeRamp.stepwise(
        [(0, b), (3 * b, opts["ramp_to"] * b)], micro_batch_size=b, lr_rule="linear",
        base_batch_size=b,
    )  # fmt: skip


def _callback(opts):
    from noisescale.integrations.transformers import NoiseScaleCallback

    kw = {"microbatch": opts["microbatch"], "beta": opts["beta"], "sync_every": 1}
    if opts["fraction"] is not None:
        kw["per_example_fraction"] = opts["fraction"]
    if opts["measure_every"] > 1:
        kw["measure_every"] = opts["measure_every"]
    if opts.get("precondition") and opts["optim"] in ("adamw_torch", "rmsprop"):
        kw.update(precondition=True, precondition_from=1)
    if opts["model"] == "classifier_items" and opts["items_reduction"]:
        kw["loss_reduction"] = opts["items_reduction"]
    if opts["declare"] and opts["model"] in ("tagger_items", "tagger_mean"):
        kw["loss_reduction"] = {"tagger_items": "num_items_in_batch"}.get(
            opts["model"], "token_mean"
        )
    return NoiseScaleCallback(_ramp(opts) if opts["ramp"] else None, **kw)


def train(opts, out_dir, resume_from=None, save_steps=None, init=None):
    """One Trainer run; (callback, recorder, trainer, model)."""
    import transformers

    model = build_model(opts)
    if init is not None:
        model.load_state_dict(init)
    recorder = _Recorder(model)

    class Closer(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            recorder.close_step()

    extra = {"save_strategy": "steps", "save_steps": save_steps} if save_steps else {}
    args = _training_args(opts, out_dir, **extra)
    callback = _callback(opts)
    eval_ds = Dataset(opts, n=5, salt=1) if opts["eval_steps"] else None
    trainer = _trainer_class(opts)(
        model=model, args=args, train_dataset=Dataset(opts), eval_dataset=eval_ds,
        data_collator=collate, callbacks=[callback, Closer()],
    )  # fmt: skip
    recorder.trainer = trainer
    trainer.train(resume_from_checkpoint=resume_from)
    recorder.handle.remove()
    return callback, recorder, trainer, model


def _close(got, want, scale, rtol):
    if got is None or want is None:
        return got is None and want is None
    got, want = float(got), float(want)
    if math.isnan(got) or math.isnan(want):
        return math.isnan(got) and math.isnan(want)
    return abs(got - want) <= rtol * max(abs(want), scale, 1e-300)


def check_history(opts, history, recorder, model, trainer, rtol, resumed=False, within=None):
    """[(what, got, want)] for each number off. `resumed`: the run's first steps were another
    run's (T̄ is then compared with the uninterrupted run's, not here). `within`: a list whose
    first element says whether the big batch is taken within the micro-batches (the run's
    choice, made at its first measured step whose micro-batches count different numbers of
    tokens, none of them 0, and kept in its checkpoints); updated as the run makes it."""
    within_state = [False] if within is None else within
    bad, partial = [], []
    token_loss = _token_model(opts)
    records = {r["step"]: r for r in history}
    first = trainer.state.global_step - len(recorder.steps) + 1
    seen_t, seen_n = 0.0, 0
    for index, (params, micro, pre) in enumerate(recorder.steps):
        step = first + index
        token = token_loss
        rec = records.get(step)
        if rec is not None and not rec.get("preconditioned"):
            pre = None
        elif rec is not None and pre is None:
            bad.append((f"step {step} preconditioned", True, "no optimizer state"))
        examples = step_truth(opts, model, params, micro, pre)
        coefs, items_path = coefficients(opts, trainer, examples, micro)
        counts = [sum(t for _, t, j, _ in examples if j == m) for m in range(len(micro))]
        differ = token and not items_path and len(set(counts)) > 1 and min(counts) > 0
        if differ and rec is not None and not within_state[0]:  # (measured: for the rest)
            within_state[:] = [True, step]
        within = within_state[0]
        want = expected(opts, examples, coefs, within)
        rec = records.get(step)
        if token and rec is not None and rec.get("tokens") is None:
            # an undeclared token loss measured over the examples (no -100 anywhere: each
            # micro-batch's rows equally long, or one a micro-batch): example i's loss is its
            # token mean y_i = x_i / T_i, weighed a_m·T_i in the step
            weights = [coefs[j] * t for _, t, j, _ in examples]
            ys = [(x / max(t, 1), 1, j, s) for x, t, j, s in examples]
            reading = {**opts, "model": "classifier"}
            want = {**expected(reading, ys, coefs, within, weights), "loss": want["loss"]}
            token = False
        seen_t += want["tokens"] or 0.0
        seen_n += want["examples"]
        rec = records.get(step)
        if rec is None or rec.get("skipped"):
            continue
        if rtol == RTOL_F32 and abs(want["loss"]) < 1e-4:
            continue  # (a loss of ~0 in float32, seed 405: its gradients are rounding)
        tbar = rec.get("tokens_per_example") or 1.0 if token else 1.0
        scale = max([want["sqnorm_big"], *(s["sqnorm_small"] for s in want["sources"].values())])
        scale = scale / tbar**2

        def check(key, got, w, sc=0.0, tol=rtol, step=step):
            if not _close(got, w, sc, tol):
                bad.append((f"step {step} {key}", got, w))

        check("b_big", rec["b_big"], want["b_big"] * tbar)
        check("sqnorm_big", rec["sqnorm_big"], want["sqnorm_big"] / tbar**2, scale)
        if token:
            check("tokens", rec.get("tokens"), want["tokens"])
        got_sources = rec.get("sources", {})
        if opts["fraction"] != 1.0:
            got_sources = {k: v for k, v in got_sources.items() if k == "microbatch"}
        if sorted(got_sources) != sorted(want["sources"]):
            bad.append((f"step {step} sources", sorted(got_sources), sorted(want["sources"])))
        for name in set(got_sources) & set(want["sources"]):
            g, w = got_sources[name], want["sources"][name]
            if name == "per_example" and g["count"] < w["count"]:
                # some passes' norms left out (with a warning): the others', exactly
                parts = list(want["parts"].values())
                kept = [
                    sum(p["count"] * p["sqnorm_small"] for p in chosen) / g["count"]
                    for r in range(1, len(parts))
                    for chosen in itertools.combinations(parts, r)
                    if sum(p["count"] for p in chosen) == g["count"]
                ]
                if any(_close(g["sqnorm_small"], k / tbar**2, scale, rtol) for k in kept):
                    partial.append(step)
                    continue
            check(f"{name}.count", g["count"], w["count"])
            check(f"{name}.b_small", g["b_small"], w["b_small"] * tbar)
            check(f"{name}.sqnorm_small", g["sqnorm_small"], w["sqnorm_small"] / tbar**2, scale)
        if rec.get("loss") is not None:
            check("loss", rec["loss"], want["loss"], 0.0, max(rtol, 1e-6))
        elif not (opts["smoothing"] > 0):
            bad.append((f"step {step} loss", None, want["loss"]))
        # (eq. A.2 by hand: not where the big batch is taken within the micro-batches, whose
        # examples are paired within each)
        hand = not (token and within) and not any(
            g["count"] < w["count"]
            for name, g in rec.get("sources", {}).items()
            for w in [want["sources"].get(name, g)]
        )
        if hand and len(want["sources"]) == 1 and opts["fraction"] == 1.0 and rec["b_big"] > 0:
            (src,) = want["sources"].values()
            bb, bs = rec["b_big"], src["b_small"] * tbar
            gb, gs = want["sqnorm_big"] / tbar**2, src["sqnorm_small"] / tbar**2
            if bb != bs:
                check("g2", rec["g2"], (bb * gb - bs * gs) / (bb - bs), scale * bb)
                check("trace_sigma", rec["trace_sigma"], (gs - gb) / (1 / bs - 1 / bb), scale * bb)
        if token and not resumed:
            check("tokens_per_example", rec.get("tokens_per_example"), seen_t / seen_n, 0.0, 1e-9)
        g2e, tre = rec.get("g2_ema"), rec.get("trace_sigma_ema")
        if g2e and tre and rec.get("b_simple") is not None and math.isfinite(rec["b_simple"]):
            check("b_simple", rec["b_simple"], tre / g2e, 0.0, RATIO_RTOL)
    if partial:
        bad.append(("partial", partial, None))  # (a marker: not a wrong number)
    return bad


def _classify(bad, caught):
    # (the Trainer's own deprecation notices are not about the numbers)
    caught = [w for w in caught if "deprecated" not in str(w.message)]
    warned, messages = fuzz_runner._warned(caught)
    # (Lightning's manual optimisation: a divisor it cannot tell is assumed, saying so)
    warned = warned or any("is assumed" in m or "are assumed" in m for m in messages)
    left_out = any("left out" in m for m in messages)
    messages = [m[:200] for m in messages]
    partial = [b for b in bad if b[0].endswith("partial")]
    bad = [b for b in bad if not b[0].endswith("partial")]
    if not bad and partial:
        return {"cls": "exact-part-left-out" if left_out else "WRONG-SILENT", "bad": partial}
    if not bad:
        return {"cls": "exact", "warn": messages[:3]}
    return {
        "cls": "wrong-warned" if warned else "WRONG-SILENT",
        "bad": bad[:8],
        "warn": messages[:3],
    }


def run_trainer(opts):
    rtol = RTOL_F32 if opts["model"] == "gpt2" or opts["smoothing"] else RTOL
    res = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                callback, recorder, trainer, model = train(
                    opts, tmp, save_steps=2 if opts["resume"] else None
                )
            history = list(callback.tracker.history)
            within = [False]
            bad = check_history(opts, history, recorder, model, trainer, rtol, within=within)
            if opts["resume"] and trainer.state.global_step > 2:
                init = build_model(opts).state_dict()
                with contextlib.redirect_stdout(io.StringIO()):
                    again, rec2, trainer2, model2 = train(
                        opts, tmp, resume_from=f"{tmp}/checkpoint-2", init=init
                    )
                resumed = list(again.tracker.history)
                first_within = within[0] and within[1] <= 2  # (as of the checkpoint)
                bad += [(f"resumed {w}", g, e) for w, g, e in check_history(
                    opts, resumed, rec2, model2, trainer2, rtol, True, [first_within])]  # fmt: skip
                by_step = {r["step"]: r for r in history}
                # (a run that left a pass out, warned, has other averages than one that did not)
                left_out = any(b[0].endswith("partial") for b in bad) or any(
                    "left out" in str(w.message) for w in caught
                )
                for r in resumed if not left_out else []:
                    w = by_step.get(r["step"])
                    if r["step"] <= 2 or w is None:
                        continue
                    for key in (
                        "b_big",
                        "sqnorm_big",
                        "g2_ema",
                        "trace_sigma_ema",
                        "b_simple",
                        "tokens_per_example",
                        "examples",
                        "tokens_seen",
                    ):
                        if not _close(r.get(key), w.get(key), 0.0, 1e-7):
                            bad.append((f"resumed step {r['step']} {key} vs uninterrupted",
                                        r.get(key), w.get(key)))  # fmt: skip
        except Exception as err:
            res.update(fuzz_runner._exception(err))
            return res
    if not history:
        return {"cls": "withheld-all"}
    res.update(_classify(bad, caught))
    res["steps"] = len(history)
    return res


# --- Lightning ----------------------------------------------------------------------------------


def draw_lightning(seed, override=None):
    r = random.Random(f"integ-lightning-{seed}")
    opts = {
        "model": "classifier",
        "n_data": r.randint(9, 20),
        "batch": r.choice([1, 2, 3, 4]),
        "accum": r.choice([1, 2, 2, 3]),
        "max_steps": r.choice([3, 4, 5]),
        "clip": r.choice([None, 1e-3, 1.0]),
        "clip_algorithm": r.choice(["norm", "value"]),
        "optim": r.choice(["sgd", "adam", "rmsprop"]),
        "manual": r.random() < 0.25,
        # under manual optimisation: each loss divided by the accumulation, or not
        "manual_divide": r.random() < 0.6,
        "precision": r.choice(["64", "64", "64", "64", "bf16-mixed"]),
        "shuffle": r.random() < 0.8,
        "fraction": r.choice([1.0, 1.0, 0.5, None]),
        "microbatch": r.random() < 0.7,
        "measure_every": r.choice([1, 1, 1, 2]),
        "beta": r.choice([0.99, 0.9, 1.0]),
        "smoothing": 0.0,
        "min_len": r.choice([1, 2]),
        "max_len": r.choice([3, 5]),
        "unlabelled": False,
        "data_seed": r.randint(0, 10**6),
        "lr_scheduler": r.random() < 0.3,
        # a second fit resumed from the checkpoint of step 2 (ckpt_path=; mid-epoch or not),
        # its records against brute force on its own batches
        "resume": r.random() < 0.3,
    }
    opts.update(override or {})
    return opts


def _lightning_module(opts, net, recorder):
    import lightning.pytorch as pl

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net
            self.automatic_optimization = not opts["manual"]

        def forward(self, input_ids, attention_mask):
            return self.net(input_ids, attention_mask)["logits"]

        def training_step(self, batch, batch_idx):
            # (the step the micro-batch belongs to: the optimizer steps taken before it)
            recorder.note(batch, self.net, self.trainer.global_step)
            loss = F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]),
                                   batch["labels"])  # fmt: skip
            if self.automatic_optimization:
                return loss
            k = opts["accum"]
            opt = self.optimizers()
            self.manual_backward(loss / k if opts["manual_divide"] else loss)
            if (batch_idx + 1) % k == 0:
                opt.step()
                opt.zero_grad()
            return None

        def configure_optimizers(self):
            kind = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam,
                    "rmsprop": torch.optim.RMSprop}[opts["optim"]]  # fmt: skip
            opt = kind(self.parameters(), lr=0.05)
            if not opts["lr_scheduler"]:
                return opt
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Lit()


class _StepRecorder:
    """Lightning: each training batch, grouped by the optimizer steps taken before it."""

    def __init__(self):
        self.by_step = {}

    def note(self, batch, net, global_step):
        if global_step not in self.by_step:
            params = {k: v.detach().clone() for k, v in net.state_dict().items()}
            self.by_step[global_step] = (params, [])
        self.by_step[global_step][1].append({k: v.detach().clone() for k, v in batch.items()})


def _fit_lightning(opts, out_dir=None, ckpt_path=None):
    """One ``Trainer.fit``; (callback, recorder, the net's initial copy)."""
    import lightning.pytorch as pl

    from noisescale.integrations.lightning import NoiseScaleCallback

    torch.manual_seed(opts["data_seed"] % 1000)
    net = Classifier().double()
    init = copy.deepcopy(net)
    recorder = _StepRecorder()
    module = _lightning_module(opts, net, recorder)
    if opts["precision"] != "64":
        module = module.float()
    loader = torch.utils.data.DataLoader(
        Dataset(opts), batch_size=opts["batch"], shuffle=opts["shuffle"], collate_fn=collate,
        generator=torch.Generator().manual_seed(opts["data_seed"]),
    )  # fmt: skip
    kw = {"microbatch": opts["microbatch"], "beta": opts["beta"], "sync_every": 1}
    if opts["fraction"] is not None:
        kw["per_example_fraction"] = opts["fraction"]
    if opts["measure_every"] > 1:
        kw["measure_every"] = opts["measure_every"]
    callback = NoiseScaleCallback(log_every=0, **kw)
    callbacks = [callback]
    if out_dir is not None:
        callbacks.append(
            pl.callbacks.ModelCheckpoint(
                dirpath=out_dir, filename="{step}", every_n_train_steps=2, save_top_k=-1
            )
        )
    trainer_kw = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=out_dir is not None,
        enable_progress_bar=False, enable_model_summary=False, max_steps=opts["max_steps"],
        precision=opts["precision"],
    )  # fmt: skip
    if not opts["manual"]:
        trainer_kw["accumulate_grad_batches"] = opts["accum"]
        if opts["clip"] is not None:
            trainer_kw["gradient_clip_val"] = opts["clip"]
            trainer_kw["gradient_clip_algorithm"] = opts["clip_algorithm"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        pl.Trainer(callbacks=callbacks, **trainer_kw).fit(module, loader, ckpt_path=ckpt_path)
    return callback, recorder, init


def _check_lightning(opts, history, recorder, init, prefix=""):
    bad = []
    for before in sorted(recorder.by_step):
        params, micro = recorder.by_step[before]
        step = before + 1  # (the optimizer steps before this one, and this one)
        rec = next((r for r in history if r["step"] == step), None)
        if rec is None or rec.get("skipped"):
            continue
        examples = step_truth(opts, init, params, micro)
        k = opts["accum"]
        counts = {}
        for _, _, j, _ in examples:
            counts[j] = counts.get(j, 0) + 1
        coefs = {j: 1.0 / (k * c) for j, c in counts.items()}
        want = expected(opts, examples, coefs, False)
        bad += [(prefix + w, g, e) for w, g, e in _compare(opts, rec, want, step, RTOL)]
    return bad


def run_lightning(opts):
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    res = {}
    with (
        warnings.catch_warnings(record=True) as caught,
        tempfile.TemporaryDirectory() as tmp,
    ):
        warnings.simplefilter("always")
        try:
            resume = opts.get("resume") and opts["precision"] == "64"
            callback, recorder, init = _fit_lightning(opts, tmp if resume else None)
            history = list(callback.tracker.history)
            if opts["precision"] != "64":
                return {"cls": "ok", "steps": len(history)}  # (crash or refusal only)
            bad = _check_lightning(opts, history, recorder, init)
            if resume and os.path.exists(f"{tmp}/step=2.ckpt"):
                again, rec2, init2 = _fit_lightning(opts, None, f"{tmp}/step=2.ckpt")
                bad += _check_lightning(opts, list(again.tracker.history), rec2, init2, "resumed ")
        except Exception as err:
            res.update(fuzz_runner._exception(err))
            return res
    res.update(_classify(bad, caught))
    if not history:
        return {"cls": "withheld-all"}
    res["steps"] = len(history)
    return res


def _compare(opts, rec, want, step, rtol):
    """The record's b_big, |G_big|² and sources (examples) against the step's truth."""
    bad = []
    scale = max([want["sqnorm_big"], *(s["sqnorm_small"] for s in want["sources"].values())])

    def check(key, got, w, sc=0.0):
        if not _close(got, w, sc, rtol):
            bad.append((f"step {step} {key}", got, w))

    check("b_big", rec["b_big"], want["b_big"])
    check("sqnorm_big", rec["sqnorm_big"], want["sqnorm_big"], scale)
    got_sources = rec.get("sources", {})
    if opts["fraction"] != 1.0:
        got_sources = {k: v for k, v in got_sources.items() if k == "microbatch"}
    if sorted(got_sources) != sorted(want["sources"]):
        bad.append((f"step {step} sources", sorted(got_sources), sorted(want["sources"])))
    for name in set(got_sources) & set(want["sources"]):
        g, w = got_sources[name], want["sources"][name]
        check(f"{name}.count", g["count"], w["count"])
        check(f"{name}.b_small", g["b_small"], w["b_small"])
        check(f"{name}.sqnorm_small", g["sqnorm_small"], w["sqnorm_small"], scale)
    return bad


def check_seed(seed, override=None, parts=None):
    """`seed`'s runs in `parts` (default all: ``PARTS``); ``{"seed", "<part>", "<part>_opts"}``
    (the Trainer's options under ``"opts"``), each part's result with its class under "cls"."""
    parts = PARTS if parts is None else parts
    start = time.time()
    record = {"seed": seed, "opts": draw_options(seed, override)}
    runs = {
        "trainer": (lambda o: o, run_trainer),
        "lightning": (lambda o: draw_lightning(seed, (o or {}).get("lightning")), run_lightning),
        "accelerate": (
            lambda o: draw_accelerate(seed, (o or {}).get("accelerate")),
            run_accelerate,
        ),
    }
    for part in parts:
        draw, run = runs[part]
        opts = record["opts"] if part == "trainer" else draw(override)
        if part != "trainer":
            record[f"{part}_opts"] = opts
        torch.manual_seed(seed)
        record[part] = run(opts)
    record["t"] = round(time.time() - start, 2)
    return record


# --- accelerate in a loop of one's own ------------------------------------------------------------


def draw_accelerate(seed, override=None):
    r = random.Random(f"integ-accelerate-{seed}")
    opts = {
        "model": "classifier",
        "n_data": r.randint(9, 20),
        "batch": r.choice([1, 2, 3, 4]),
        "accum": r.choice([1, 2, 2, 3]),
        "epochs": r.choice([1, 2]),
        "clip": r.choice([None, 1e-3, 1.0]),
        "optim": r.choice(["sgd", "adam", "rmsprop"]),
        # each micro-batch's loss watched before accelerator.backward divides it (the docs'
        # recipe); without it a short last window is left out with a warning
        "watch": r.random() < 0.75,
        "fraction": r.choice([1.0, 1.0, 0.5, None]),
        "microbatch": r.random() < 0.7,
        "measure_every": r.choice([1, 1, 1, 2]),
        "beta": r.choice([0.99, 0.9, 1.0]),
        "smoothing": 0.0,
        "min_len": r.choice([1, 2]),
        "max_len": r.choice([3, 5]),
        "unlabelled": False,
        "data_seed": r.randint(0, 10**6),
    }
    opts.update(override or {})
    return opts


def run_accelerate(opts):
    """The loop of docs/integrations.md: ``accelerator.accumulate``, ``watch_loss``,
    ``accelerator.backward``, ``tracker.step()`` when ``sync_gradients``, then the clip."""
    from accelerate import Accelerator

    import noisescale

    torch.manual_seed(opts["data_seed"] % 1000)
    net = Classifier().double()
    init = copy.deepcopy(net)
    kind = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop}
    optimizer = kind[opts["optim"]](net.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(
        Dataset(opts), batch_size=opts["batch"], shuffle=True, collate_fn=collate,
        generator=torch.Generator().manual_seed(opts["data_seed"]),
    )  # fmt: skip
    accelerator = Accelerator(gradient_accumulation_steps=opts["accum"], cpu=True)
    model, optimizer, loader = accelerator.prepare(net, optimizer, loader)
    kw = {"microbatch": opts["microbatch"], "beta": opts["beta"], "sync_every": 1}
    if opts["fraction"] is not None:
        kw["per_example_fraction"] = opts["fraction"]
    if opts["measure_every"] > 1:
        kw["measure_every"] = opts["measure_every"]
    steps, current, params = [], [], None
    res = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            tracker = noisescale.GradientNoiseTracker(model, **kw)
            for _ in range(opts["epochs"]):
                for batch in loader:
                    with accelerator.accumulate(model):
                        if not current:
                            params = {k: v.detach().clone() for k, v in net.state_dict().items()}
                        current.append({k: v.detach().clone() for k, v in batch.items()})
                        out = model(batch["input_ids"], batch["attention_mask"])
                        loss = F.cross_entropy(out["logits"], batch["labels"])
                        if opts["watch"]:
                            tracker.watch_loss(loss)
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            tracker.step(loss=loss)
                            steps.append((params, current))
                            current = []
                            if opts["clip"] is not None:
                                accelerator.clip_grad_norm_(model.parameters(), opts["clip"])
                        optimizer.step()
                        optimizer.zero_grad()
            history = list(tracker.history)
            tracker.remove()
        except Exception as err:
            res.update(fuzz_runner._exception(err))
            return res
        bad = []
        k = opts["accum"]
        for index, (params, micro) in enumerate(steps):
            rec = next((r for r in history if r["step"] == index + 1), None)
            if rec is None or rec.get("skipped"):
                continue
            examples = step_truth(opts, init, params, micro)
            counts = {}
            for _, _, j, _ in examples:
                counts[j] = counts.get(j, 0) + 1
            coefs = {j: 1.0 / (k * c) for j, c in counts.items()}
            bad += _compare(opts, rec, expected(opts, examples, coefs, False), index + 1, RTOL)
    res.update(_classify(bad, caught))
    if not history:
        return {"cls": "withheld-all"}
    res["steps"] = len(history)
    return res


PARTS = ("trainer", "lightning", "accelerate")


def describe(record, part="trainer"):
    if part == "accelerate":
        o = record["accelerate_opts"]
        keys = ("batch", "accum", "n_data", "epochs", "clip", "watch", "fraction", "microbatch",
                "measure_every", "optim")  # fmt: skip
        return f"seed {record['seed']} (accelerate): " + ", ".join(f"{k}={o[k]}" for k in keys)
    if part == "lightning":
        o = record["lightning_opts"]
        keys = ("batch", "accum", "n_data", "clip", "manual", "manual_divide", "precision",
                "fraction", "microbatch", "measure_every", "optim", "lr_scheduler")  # fmt: skip
        return f"seed {record['seed']} (lightning): " + ", ".join(f"{k}={o[k]}" for k in keys)
    o = record["opts"]
    keys = ("model", "batch", "accum", "n_data", "smoothing", "fraction", "measure_every",
            "compute_loss", "resume", "drop_last", "average_tokens", "optim")  # fmt: skip
    return f"seed {record['seed']}: " + ", ".join(f"{k}={o[k]}" for k in keys)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0:50")
    parser.add_argument("--jsonl")
    parser.add_argument("--override")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    override = json.loads(args.override) if args.override else None
    out = open(args.jsonl, "a") if args.jsonl else None  # noqa: SIM115
    table, found, start = {}, [], time.time()
    try:
        for seed in fuzz_runner._seeds(args.seeds):
            record = check_seed(seed, override, tuple(args.parts.split(",")))
            if out:
                out.write(json.dumps(record, default=str) + "\n")
                out.flush()
            results = {part: record[part] for part in PARTS if record.get(part) is not None}
            fuzz_runner.count_classes(table, results)
            found += [
                (record, p) for p, res in results.items() if res["cls"] in fuzz_runner.FINDINGS
            ]
            if args.verbose:
                print(describe(record), f"({record['t']} s)")
            for part in [p for p in PARTS if p in record] if args.verbose else ():
                res = record[part]
                print(f"  {part}: {res['cls']} {res.get('exc', '')}")
                for b in res.get("bad", []):
                    print("   ", b)
                for w in res.get("warn", []):
                    print("    warned:", w)
                if res.get("tb") and res["cls"] == "crash":
                    print(res["tb"])
    finally:
        if out:
            out.close()
    fuzz_runner.print_class_table(table, list(table))
    print(f"\n{len(fuzz_runner._seeds(args.seeds))} seeds in {time.time() - start:.0f} s")
    for record, part in found:
        res = record[part]
        print(f"  {part} {res['cls']}: {describe(record, part)}")
        print(f"    {res.get('bad') or res.get('exc')}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
