"""The fuzzer's second grammar: real ``transformers`` models with random options.

`make_case(seed)` builds one model from its own ``transformers`` class (random weights, a tiny
config: hidden size 8, two heads, one or two layers, a vocabulary of 13, no downloads) and draws
its options: the family (GPT-2, BERT, RoBERTa, Llama, Mistral, Qwen2, Gemma, Phi, DistilBERT,
ALBERT, Electra, GPT-NeoX, OPT, Falcon, MPT, BLOOM, DeBERTa-v2, ModernBERT, T5, BART), the head
(causal LM, masked LM, sequence or token classification, question answering, encoder-decoder
generation), tied word embeddings, the attention implementation (eager or sdpa), padding with
random lengths (none, right, left), labels of -100, ``position_ids`` given or not, ``inputs_embeds``
instead of ids (looked up in the model's own table by the loss code, or a fixed random tensor),
gradient checkpointing (train mode, dropout 0, reentrant or not), frozen parts (the input
embeddings, all but the head, or peft LoRA on the family's attention projections), the batch
size N in {1, 2, 3, T, 8 (the hidden size)} and the length T in {1, N, 2..6}, and the loss: the
model's own ``out.loss`` (``labels=``, a mean over the batch's counted tokens; backpropagated as
it is or as a one-element stack summed, ``torch.stack([out.loss]).sum()``, as a list of task
losses is) or one written by hand from the logits (each example's own token mean, then the mean
or sum over the examples). Whether a causal LM shifts its labels inside (``loss_function``) or
reads them as given (BART's) is found from its loss.
Everything is float64 (the runner sets torch's default dtype; Hugging Face's token losses cast
the logits to float32, so the model's own loss is compared at 1e-4, not 1e-7).

The cases run through tests/fuzz_runner.py's modes (:func:`check_seed`):

* a loss by hand: every mode of the runner, against one backward per example (each example's
  own loss on a forward of that example alone);
* the model's own loss: ``one_shot`` against each example's own loss (the model called on that
  example alone with its labels: its own token mean, 0 for an example with nothing counted), as
  README's "Lower level" says of a loss through ``loss_function``, whatever ``loss_reduction``
  says (drawn); ``engine``, ``sub_chosen``, ``sub_products``, ``sgd_exact``, ``subset`` against
  each example's part of the backpropagated loss, its summed counted terms over the batch's
  count (``raw_sqnorms``: the gradient of the backpropagated loss restricted to the example);
  ``accum`` (two micro-batches, each its own token mean divided by 2, or divided by the whole
  batch's count given as ``num_items_in_batch``, drawn, where the model passes it on) against
  each example's part of its micro-batch's loss; the trackers for crashes.

A refusal is the first rule at work; a number off is the finding.

Run it long::

    python tests/fuzz_hf.py --seeds 0:200 --jsonl hf.jsonl

``--seeds 17 -v`` replays one seed, ``--override '{"grad_ckpt": false}'`` with the spec changed.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import random
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import fuzz_runner
import noisescale
from noisescale.per_example import PerExampleNorms

RTOL_MODEL_LOSS = 1e-4  # Hugging Face's token losses run in float32
RTOL_HAND = 1e-5  # (Llama-like RMSNorms, Gemma's, compute in float32 whatever the input)
V, H = 13, 8  # vocabulary (id 0 is the padding), hidden size

_COMMON = {"vocab_size": V, "hidden_size": H, "num_attention_heads": 2, "intermediate_size": 12}
_COMMON["max_position_embeddings"] = 24
# family: (config class, config kwargs, layer-count key, the heads it is fuzzed with)
FAMILIES = {
    "gpt2": ("GPT2Config", {"vocab_size": V, "n_embd": H, "n_head": 2, "n_positions": 24},
             "n_layer", ("LMHeadModel", "ForSequenceClassification", "ForTokenClassification",
                         "ForQuestionAnswering")),
    "bert": ("BertConfig", _COMMON, "num_hidden_layers",
             ("ForMaskedLM", "LMHeadModel", "ForSequenceClassification", "ForTokenClassification")),
    "roberta": ("RobertaConfig", {**_COMMON, "max_position_embeddings": 30}, "num_hidden_layers",
                ("ForMaskedLM", "ForCausalLM", "ForSequenceClassification",
                 "ForTokenClassification")),
    "llama": ("LlamaConfig", {**_COMMON, "num_key_value_heads": 1}, "num_hidden_layers",
              ("ForCausalLM", "ForSequenceClassification", "ForTokenClassification",
               "ForQuestionAnswering")),
    "mistral": ("MistralConfig", {**_COMMON, "num_key_value_heads": 1}, "num_hidden_layers",
                ("ForCausalLM", "ForSequenceClassification", "ForTokenClassification")),
    "qwen2": ("Qwen2Config", {**_COMMON, "num_key_value_heads": 1}, "num_hidden_layers",
              ("ForCausalLM", "ForSequenceClassification", "ForQuestionAnswering")),
    "gemma": ("GemmaConfig", {**_COMMON, "num_key_value_heads": 1, "head_dim": 4},
              "num_hidden_layers", ("ForCausalLM", "ForSequenceClassification",
                                    "ForTokenClassification")),
    "phi": ("PhiConfig", _COMMON, "num_hidden_layers",
            ("ForCausalLM", "ForSequenceClassification", "ForTokenClassification")),
    "distilbert": ("DistilBertConfig", {"vocab_size": V, "dim": H, "n_heads": 2,
                                        "hidden_dim": 12, "max_position_embeddings": 24},
                   "n_layers", ("ForMaskedLM", "ForSequenceClassification",
                                "ForTokenClassification")),
    "albert": ("AlbertConfig", {**_COMMON, "embedding_size": 6}, "num_hidden_layers",
               ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification")),
    "electra": ("ElectraConfig", {**_COMMON, "embedding_size": 6}, "num_hidden_layers",
                ("ForMaskedLM", "ForCausalLM", "ForSequenceClassification",
                 "ForTokenClassification")),
    "gpt_neox": ("GPTNeoXConfig", _COMMON, "num_hidden_layers",
                 ("ForCausalLM", "ForSequenceClassification", "ForTokenClassification",
                  "ForQuestionAnswering")),
    "opt": ("OPTConfig", {"vocab_size": V, "hidden_size": H, "num_attention_heads": 2,
                          "ffn_dim": 12, "max_position_embeddings": 24,
                          "word_embed_proj_dim": H},
            "num_hidden_layers", ("ForCausalLM", "ForSequenceClassification",
                                  "ForQuestionAnswering")),
    "falcon": ("FalconConfig", {"vocab_size": V, "hidden_size": H, "num_attention_heads": 2},
               "num_hidden_layers", ("ForCausalLM", "ForSequenceClassification",
                                     "ForTokenClassification")),
    "mpt": ("MptConfig", {"vocab_size": V, "d_model": H, "n_heads": 2, "max_seq_len": 24},
            "n_layers", ("ForCausalLM", "ForSequenceClassification", "ForTokenClassification")),
    "bloom": ("BloomConfig", {"vocab_size": V, "hidden_size": H, "n_head": 2}, "n_layer",
              ("ForCausalLM", "ForSequenceClassification", "ForTokenClassification")),
    "deberta_v2": ("DebertaV2Config", _COMMON, "num_hidden_layers",
                   ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification")),
    "modernbert": ("ModernBertConfig", {**_COMMON, "global_attn_every_n_layers": 1,
                                        "local_attention": 4, "sep_token_id": 2,
                                        "cls_token_id": 1, "bos_token_id": 1,
                                        "eos_token_id": 2},
                   "num_hidden_layers", ("ForMaskedLM", "ForSequenceClassification",
                                         "ForTokenClassification")),
    "t5": ("T5Config", {"vocab_size": V, "d_model": H, "d_kv": 4, "d_ff": 12, "num_heads": 2,
                        "decoder_start_token_id": 0},
           "num_layers", ("ForConditionalGeneration", "ForTokenClassification")),
    "bart": ("BartConfig", {"vocab_size": V, "d_model": H, "encoder_attention_heads": 2,
                            "decoder_attention_heads": 2, "encoder_ffn_dim": 12,
                            "decoder_ffn_dim": 12, "max_position_embeddings": 24},
             "encoder_layers", ("ForConditionalGeneration", "ForCausalLM")),
}  # fmt: skip
# the config keys of dropout probabilities, set to 0 (the truth needs the same masks)
_DROPOUTS = (
    "hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop",
    "attn_pdrop", "dropout", "attention_dropout", "activation_dropout", "hidden_dropout",
    "seq_classif_dropout", "qa_dropout", "classifier_dropout", "dropout_rate", "attn_dropout",
    "embedding_dropout", "mlp_dropout", "classifier_dropout_prob", "emb_pdrop",
    "summary_first_dropout", "layerdrop", "encoder_layerdrop", "decoder_layerdrop",
)  # fmt: skip
_TOKEN_HEADS = ("LMHeadModel", "ForCausalLM", "ForMaskedLM", "ForTokenClassification")
_CAUSAL = ("LMHeadModel", "ForCausalLM")


def _kind(head):
    if head in _CAUSAL:
        return "causal"
    if head in ("ForMaskedLM", "ForTokenClassification", "ForConditionalGeneration"):
        return "tokens"
    return {"ForSequenceClassification": "seq", "ForQuestionAnswering": "qa"}[head]


def draw_spec(seed):
    """The options of `seed`'s case (no model built)."""
    r = random.Random(seed)
    family = r.choice(sorted(FAMILIES))
    head = r.choice(FAMILIES[family][3])
    t = r.choice([1, 2, 3, 4, 5, 6])
    n = r.choice([1, 2, 3, t, H])
    if r.random() < 0.15:
        t = n if n > 1 else t
    return {
        "family": family,
        "head": head,
        "n": n,
        "t": t,
        "layers": r.choice([1, 2]),
        "tie": r.random() < 0.5,
        "attn": r.choice(["eager", "sdpa"]),
        "padding": r.choice(["none", "right", "left"]),
        "ignore": r.random() < 0.4,  # labels of -100 beside the padding's
        "position_ids": r.random() < 0.3,
        "embeds": r.choice(["ids"] * 4 + ["table", "random"]),
        "grad_ckpt": r.choice([False, False, "reentrant", "non-reentrant"]),
        "frozen": r.choice(["none"] * 4 + ["emb", "head_only", "lora"]),
        "lossform": r.choice(["model", "hand"]),
        "reduction": r.choice(["mean", "mean", "sum"]),
        "classes": r.choice([2, 3]),
        # the loss backpropagated as it is, or as a one-element sum (a list of task losses
        # stacked and summed: torch.stack([out.loss]).sum()), times a task weight of 0.5 or not
        "wrap": r.choice(["none", "none", "stack_sum", "scaled", "stack_scaled"]),
        # the model's own loss given the Trainer's num_items_in_batch (the whole batch's count:
        # each micro-batch of accumulation divided by it, not by its own count)
        "nib": r.random() < 0.3,
    }


def build_model(spec):
    import transformers

    transformers.logging.set_verbosity_error()
    cfg_name, kwargs, layers_key, _ = FAMILIES[spec["family"]]
    kwargs = {**kwargs, layers_key: spec["layers"], "pad_token_id": 0}
    if spec["family"] in ("t5", "bart"):
        kwargs["num_decoder_layers" if spec["family"] == "t5" else "decoder_layers"] = 1
    kwargs["num_labels"] = 2 if spec["head"] == "ForQuestionAnswering" else spec["classes"]
    kwargs["tie_word_embeddings"] = spec["tie"]
    config = getattr(transformers, cfg_name)(**kwargs)
    for key in _DROPOUTS:
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)
    config._attn_implementation = spec["attn"]
    if spec["head"] in _CAUSAL and hasattr(config, "is_decoder"):
        config.is_decoder = True
    base = cfg_name[: -len("Config")]
    try:
        model = getattr(transformers, base + spec["head"])(config).to(torch.float64)
    except ValueError as err:
        if "scaled_dot_product_attention" not in str(err):
            raise
        spec["attn"] = config._attn_implementation = "eager"  # (no sdpa for this class)
        model = getattr(transformers, base + spec["head"])(config).to(torch.float64)
    for m in model.modules():  # (a classifier's dropout may default to 0.1 whatever the config)
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.eval()
    if spec["grad_ckpt"]:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": spec["grad_ckpt"] == "reentrant"}
        )
        model.train()  # (checkpointing runs in train mode only; every dropout is 0)
    if spec["frozen"] == "emb":
        model.get_input_embeddings().weight.requires_grad_(False)
    elif spec["frozen"] == "head_only":
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        keep = set()
        if out is not None:
            keep |= {id(p) for p in out.parameters()}
        for name, m in model.named_modules():
            if name.split(".")[-1] in ("score", "classifier", "qa_outputs", "lm_head", "head"):
                keep |= {id(p) for p in m.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    elif spec["frozen"] == "lora":
        import peft

        targets = {"distilbert": ["q_lin", "v_lin"], "albert": ["query", "value"]}
        targets["modernbert"] = ["Wqkv"]
        lora = peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=targets.get(spec["family"]),
            init_lora_weights=False, lora_dropout=0.0,
        )  # fmt: skip
        model = peft.get_peft_model(model, lora)
    return model


def _forward_kwargs(model):
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(target.forward).parameters)


def make_case(seed, override=None):
    """``(spec, model, inputs, per_example_loss)``; see the module's docstring. `inputs` holds
    the batch's tensors; ``per_example_loss.contributions`` (the model's own loss) gives each
    example's part of the batch's loss, ``per_example_loss.own`` each example's own loss."""
    spec = draw_spec(seed)
    if override:
        spec.update(override)
    kind = _kind(spec["head"])
    if kind == "causal" and spec["lossform"] == "model" and spec["t"] == 1:
        spec["t"] = 2  # (nothing to predict: the model's loss is nan)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = build_model(spec)
    n, t = spec["n"], spec["t"]
    ids = torch.randint(3, V, (n, t), generator=g)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    if spec["padding"] == "none":
        lengths = torch.full((n,), t)
    pos = torch.arange(t)[None]
    left = spec["padding"] == "left"
    mask = pos >= (t - lengths)[:, None] if left else pos < lengths[:, None]
    ids = torch.where(mask, ids, 0)
    names = _forward_kwargs(model)
    inputs = {"input_ids": ids, "attention_mask": mask.long()}
    if spec["position_ids"] and "position_ids" in names:
        inputs["position_ids"] = (mask.long().cumsum(1) - 1).clamp(min=0)
    else:
        spec["position_ids"] = False
    if spec["embeds"] == "random":
        inputs["inputs_embeds"] = torch.randn(n, t, model.get_input_embeddings().weight.shape[1])
    # labels
    if kind in ("causal", "tokens"):
        high = V if spec["head"] != "ForTokenClassification" else spec["classes"]
        labels = torch.randint(0, high, (n, t), generator=g)
        labels[~mask] = -100
        if spec["ignore"]:
            labels[torch.rand(n, t, generator=g) < 0.3] = -100
    elif kind == "seq":
        labels = torch.randint(0, spec["classes"], (n,), generator=g)
        if spec["ignore"] and n > 1:
            labels[torch.rand(n, generator=g) < 0.4] = -100
    else:  # qa: positions inside each example's tokens
        lo = torch.where(mask, pos, t).min(1).values
        span = lengths.clamp(min=1)
        a = lo + (torch.rand(n, generator=g) * span).long()
        b = lo + (torch.rand(n, generator=g) * span).long()
        labels = torch.stack([torch.minimum(a, b), torch.maximum(a, b)], 1)
    if kind == "tokens" and spec["head"] == "ForConditionalGeneration":
        inputs["decoder_input_ids"] = torch.randint(3, V, (n, t), generator=g)
    inputs["labels"] = labels

    def call(model, idx, with_labels, nib=None):
        kw = {k: v[idx] for k, v in inputs.items() if k != "labels"}
        if nib is not None:
            kw["num_items_in_batch"] = torch.tensor(nib)
        if spec["embeds"] == "table":
            ids_ = kw.pop("input_ids")
            kw["inputs_embeds"] = model.get_input_embeddings()(ids_)
        elif "inputs_embeds" in kw:
            kw.pop("input_ids")
        if with_labels:
            if kind == "qa":
                kw["start_positions"], kw["end_positions"] = labels[idx, 0], labels[idx, 1]
            else:
                kw["labels"] = labels[idx]
            if spec["head"] == "ForConditionalGeneration":
                kw.pop("decoder_input_ids")  # (the model shifts its labels)
        return model(**kw)

    if kind == "causal":
        kind = _shifts(spec, call, model, labels, n)
    counts = _counts(kind, labels)
    spec["counts"] = counts.tolist()
    if spec["lossform"] == "model" and counts.sum() == 0:
        raise ValueError("nothing counted: the model's own loss is nan")
    total = float(counts.sum())
    if spec["nib"] and (spec["lossform"] != "model" or "kwargs" not in _forward_kwargs(model)):
        spec["nib"] = False
    if spec["nib"]:  # does the model divide by it? (a micro-batch's loss tells)
        with torch.no_grad():
            first = slice(0, max(1, n // 2))
            if float(counts[first].sum()) > 0:
                a, b = call(model, first, True, total).loss, call(model, first, True).loss
                spec["nib"] = "honoured" if abs(float(a - b)) > 1e-6 * abs(float(b)) else "ignored"
            else:
                spec["nib"] = "ignored"
    nib = total if spec["nib"] else None

    factor = 0.5 if "scaled" in spec["wrap"] else 1.0  # (a task's weight)

    def hand_losses(model, idx):
        out = call(model, idx, False)
        y = labels[idx]
        if kind == "qa":
            s = F.cross_entropy(out.start_logits, y[:, 0], reduction="none")
            return (s + F.cross_entropy(out.end_logits, y[:, 1], reduction="none")) / 2
        logits = out.logits
        if kind == "seq":
            return F.cross_entropy(logits, y.clamp(min=0), reduction="none") * (y != -100)
        if kind == "causal":
            logits, y = logits[:, :-1], y[:, 1:]
        terms = F.cross_entropy(logits.transpose(1, 2), y.clamp(min=0), reduction="none")
        keep = (y != -100).to(terms.dtype)
        return (terms * keep).sum(1) / keep.sum(1).clamp(min=1)

    def own_loss(model, i):
        """Example i's own loss: the model called on it alone with its labels."""
        if counts[i] == 0:
            return None
        return call(model, slice(i, i + 1), True).loss * factor

    def per_example_loss(model, idx):
        if spec["lossform"] == "hand":
            return hand_losses(model, idx) * factor
        if idx == slice(0, n):  # the batch: the model's own loss, as the loss
            return call(model, idx, True, nib).loss * factor
        (i,) = range(n)[idx]  # one example: its part of the batch's loss
        own = own_loss(model, i)
        if own is None:
            return torch.zeros(1, requires_grad=True) * 0
        return (own * (counts[i] / counts.sum())).reshape(1)

    per_example_loss.own = own_loss
    per_example_loss.micro_batch = lambda model, idx: call(model, idx, True, nib).loss * factor
    per_example_loss.counts = counts
    return spec, model, inputs, per_example_loss


def _shifts(spec, call, model, labels, n):
    """``"causal"`` if the model's own loss predicts each token from those before it (labels shifted
    inside, as ``loss_function`` does), ``"tokens"`` if it reads its labels as given (BART's causal
    LM): found from the model's loss against both, on the whole batch."""
    with torch.no_grad():
        out = call(model, slice(0, n), True)
        logits = out.logits.to(torch.float64)
        means = {}
        for name, lg, y in (("causal", logits[:, :-1], labels[:, 1:]), ("tokens", logits, labels)):
            keep = y != -100
            means[name] = F.cross_entropy(lg[keep], y[keep]) if keep.any() else None
    close = [k for k, v in means.items() if v is not None and abs(float(v - out.loss)) < 1e-4]
    spec["shift"] = close[0] if len(close) == 1 else "causal"
    return spec["shift"]


def _counts(kind, labels):
    if kind == "causal":
        return (labels[:, 1:] != -100).sum(1).double()
    if kind == "tokens":
        return (labels != -100).sum(1).double()
    if kind == "seq":
        return (labels != -100).double()
    return torch.ones(len(labels), dtype=torch.float64)


# --- the runner -------------------------------------------------------------------------------


def _backward_grads(loss, params):
    """The parameters' gradients by ``backward()``, not ``autograd.grad``: a reentrant
    checkpoint runs its own backward inside, which accumulates into ``.grad`` and returns
    nothing to ``autograd.grad`` (or refuses it)."""
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        if loss.requires_grad:
            loss.sum().backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g


def _loss_of(spec, per_example_loss, model, n):
    """The runner's training loss; the model's own loss (0-d) is backpropagated as it is."""
    loss = per_example_loss(model, slice(0, n))
    if loss.dim() > 0:
        loss = loss.mean() if spec["reduction"] == "mean" else loss.sum()
    return torch.stack([loss]).sum() if spec.get("wrap", "").startswith("stack") else loss


@contextlib.contextmanager
def _truth_by_backward():
    """The runner's brute force (``fuzz_runner._grads_of``) by :func:`_backward_grads`, and its
    loss by :func:`_loss_of`."""
    old = fuzz_runner._grads_of, fuzz_runner.loss_of
    fuzz_runner._grads_of, fuzz_runner.loss_of = _backward_grads, _loss_of
    try:
        yield
    finally:
        fuzz_runner._grads_of, fuzz_runner.loss_of = old


def _grads(model, loss_of_i, n):
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(n):
        loss = loss_of_i(i)
        if loss is None:
            out.append([torch.zeros_like(p) for p in params])
            continue
        out.append(_backward_grads(loss, params))
    return out


def run_one_shot_own(spec, model, per_example_loss, n, reduction):
    """The model's own loss in ``per_example_sqnorms``: each example's own loss's norm."""
    want = fuzz_runner.truth_sq(_grads(model, lambda i: per_example_loss.own(model, i), n))
    model.zero_grad()
    if not bool(want.isfinite().all()):
        return {"cls": "no-truth"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with noisescale.per_example_sqnorms(model, loss_reduction=reduction) as pe:
                per_example_loss(model, slice(0, n)).backward()
            got = pe.sqnorms
        except Exception as err:
            return fuzz_runner._exception(err)
    warned, messages = fuzz_runner._warned(caught)
    if got is None:
        return {"cls": "none", "warn": messages[:3]}
    if got.numel() != n:
        return {"cls": "SHAPE", "len": got.numel(), "n": n}
    re = fuzz_runner.relerr(got, want)
    if re < RTOL_MODEL_LOSS:
        return {"cls": "exact", "re": re}
    return {
        "cls": "wrong-warned" if warned else "WRONG-SILENT",
        "re": re,
        "got": got.tolist(),
        "want": want.tolist(),
        "warn": messages[:3],
    }


@contextlib.contextmanager
def _tolerance(rtol):
    old = fuzz_runner.RTOL
    fuzz_runner.RTOL = rtol
    try:
        yield
    finally:
        fuzz_runner.RTOL = old


MODEL_LOSS_MODES = (
    "one_shot", "engine", "sub_chosen", "sub_products", "sgd_exact", "subset", "accum",
    "tracker_exact", "tracker_default",
)  # fmt: skip


def run_accum_model(spec, model, per_example_loss, n, steps=2):
    """The model's own loss over two micro-batches, each divided by 2 (a plain loop): each
    pass's ``raw_sqnorms`` against its examples' parts of its own loss, a token mean over the
    micro-batch's counted tokens (each example's own loss × c_i / C_mb / 2); given the whole
    batch's count as ``num_items_in_batch`` (the Trainer), not divided, × c_i / C."""
    own = fuzz_runner.truth_sq(_grads(model, lambda i: per_example_loss.own(model, i), n))
    counts = per_example_loss.counts
    halves = [(0, n // 2), (n // 2, n)]
    if any(float(counts[a:b].sum()) == 0 for a, b in halves):
        return {"cls": "skipped"}  # (a micro-batch counting nothing: its loss is nan)
    divide = 1.0 if spec["nib"] == "honoured" else 2.0
    whole = [counts.sum() if spec["nib"] == "honoured" else counts[a:b].sum() for a, b in halves]
    parts = zip(halves, whole, strict=True)
    want = torch.cat([own[a:b] * (counts[a:b] / c / divide) ** 2 for (a, b), c in parts])
    res = {"steps": []}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine = PerExampleNorms(model)
            try:
                for _ in range(steps):
                    model.zero_grad()
                    for a, b in halves:
                        (per_example_loss.micro_batch(model, slice(a, b)) / divide).backward()
                    got = [p.raw_sqnorms for p in engine.collect()]
                    if any(g is None for g in got) or len(got) != 2:
                        res["steps"].append({"cls": "withheld"})
                        continue
                    re = fuzz_runner.relerr(torch.cat(got), want)
                    step = {"cls": "exact" if re < RTOL_MODEL_LOSS else "WRONG", "re": re}
                    if step["cls"] == "WRONG":
                        step["got"], step["want"] = torch.cat(got).tolist(), want.tolist()
                    res["steps"].append(step)
            finally:
                engine.remove()
        warned, messages = fuzz_runner._warned(caught)
        res["warn"] = messages[:3]
    except Exception as err:
        exc = fuzz_runner._exception(err)
        res["exc"], res["exc_cls"] = exc["exc"], exc["cls"]
        if "tb" in exc:
            res["tb"] = exc["tb"]
        warned = False
    res["cls"] = fuzz_runner._classify_steps(res, warned)
    return res


def check_seed(seed, modes=fuzz_runner.MODES, override=None):
    """`seed`'s case in `modes` (as :func:`fuzz_runner.check_seed`, same record)."""
    record = {"seed": seed}
    start = time.time()
    with (
        fuzz_runner.float64_default(),
        contextlib.redirect_stdout(io.StringIO()),
        _truth_by_backward(),
    ):
        try:
            spec, model, _, pel = make_case(seed, override)
        except Exception as err:
            record["gen_error"] = f"{type(err).__name__}: {err}"[:300]
            return record
        record["spec"] = dict(spec)
        n = spec["n"]
        model_loss = spec["lossform"] == "model"
        run_spec = {**spec, "reduction": "sum"} if model_loss else spec
        try:
            grads = fuzz_runner.per_example_grads(model, pel, n)
        except Exception as err:
            record["gen_error"] = f"truth: {type(err).__name__}: {err}"[:300]
            return record
        if not all(bool(g.isfinite().all()) for gs in grads for g in gs):
            record["gen_error"] = "truth: not finite (a row attending to nothing)"
            return record
        if not _loss_of(spec, pel, model, n).requires_grad:  # (reentrant checkpoints, frozen)
            record["gen_error"] = "the loss does not require grad"
            return record
        model.zero_grad()
        runs = {
            "one_shot": lambda: fuzz_runner.run_one_shot(run_spec, model, pel, grads, n),
            "engine": lambda: fuzz_runner.run_engine(run_spec, model, pel, grads, n, 0),
            "sub_chosen": lambda: fuzz_runner.run_engine(run_spec, model, pel, grads, n, 2),
            "sub_products": lambda: fuzz_runner.run_engine(
                run_spec, model, pel, grads, n, 2, products=True
            ),
            "sgd_sub": lambda: fuzz_runner.run_sgd(run_spec, model, pel, grads, n, 2),
            "sgd_exact": lambda: fuzz_runner.run_sgd(run_spec, model, pel, grads, n, 0),
            "subset": lambda: fuzz_runner.run_extra(run_spec, model, pel, grads, n, "subset"),
            "accum": lambda: fuzz_runner.run_extra(run_spec, model, pel, grads, n, "accum"),
            # (the model's own loss is one row: its mean is the loss, under either reduction)
            "tracker_exact": lambda: fuzz_runner.run_tracker(spec, model, pel, n, 1.0),
            "tracker_default": lambda: fuzz_runner.run_tracker(spec, model, pel, n, None),
        }
        if model_loss:
            runs["one_shot"] = lambda: run_one_shot_own(spec, model, pel, n, spec["reduction"])
            runs["accum"] = lambda: run_accum_model(spec, model, pel, n)
        record["modes"] = {}
        with _tolerance(RTOL_MODEL_LOSS if model_loss else RTOL_HAND):
            for mode in fuzz_runner.MODES:
                if mode not in modes or (model_loss and mode not in MODEL_LOSS_MODES):
                    continue
                if mode in ("sub_chosen", "sub_products", "sgd_sub", "accum") and n < 2:
                    continue
                model.zero_grad()
                record["modes"][mode] = runs[mode]()
    record["t"] = round(time.time() - start, 2)
    return record


def describe(record):
    spec = record.get("spec", {})
    keys = (
        "family", "head", "lossform", "reduction", "n", "t", "tie", "attn", "padding", "ignore",
        "position_ids", "embeds", "grad_ckpt", "frozen",
    )  # fmt: skip
    return f"seed {record['seed']}: " + ", ".join(f"{k}={spec.get(k)}" for k in keys)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0:100", help="A:B (a range), or seeds A,B,C")
    parser.add_argument("--jsonl", help="append each seed's full record to this file")
    parser.add_argument("--modes", default=",".join(fuzz_runner.MODES))
    parser.add_argument("--tracker-every", type=int, default=5, help="trackers on every k-th seed")
    parser.add_argument("--override", help="JSON dict replacing entries of each seed's spec")
    parser.add_argument("-v", "--verbose", action="store_true", help="each mode's result")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="transformers")
    modes = tuple(args.modes.split(","))
    override = json.loads(args.override) if args.override else None
    out = open(args.jsonl, "a") if args.jsonl else None  # noqa: SIM115
    table: dict[str, dict[str, int]] = {}
    found, invalid, start = [], [], time.time()
    try:
        for seed in fuzz_runner._seeds(args.seeds):
            seed_modes = modes
            if seed % args.tracker_every:
                seed_modes = tuple(m for m in modes if m not in fuzz_runner.TRACKER_MODES)
            record = check_seed(seed, seed_modes, override)
            if out:
                out.write(json.dumps(record, default=str) + "\n")
                out.flush()
            if "gen_error" in record:
                invalid.append((seed, record["gen_error"]))
                if args.verbose:
                    print(f"seed {seed}: invalid: {record['gen_error']}")
                continue
            fuzz_runner.count_classes(table, record["modes"])
            for mode, cls, re in fuzz_runner.findings(record):
                found.append((record, mode, cls, re))
            if args.verbose:
                print(describe(record), record.get("t"))
                fuzz_runner.print_mode_lines(record["modes"])
    finally:
        if out:
            out.close()
    fuzz_runner.print_class_table(table, [mode for mode in fuzz_runner.MODES if mode in table])
    count = len(fuzz_runner._seeds(args.seeds))
    print(f"\n{count} seeds in {time.time() - start:.0f} s; {len(invalid)} invalid")
    for seed, why in invalid[:10]:
        print(f"  invalid {seed}: {why[:150]}")
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
