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
``--more`` draws from a second set of 44 families instead (:data:`MORE_FAMILIES`; the first
set's seeds keep their cases): GPT-J, GPTBigCode, GPT-Neo (a global and a local layer), CodeGen,
Phi-3, StableLM, OLMo, OLMo2, Cohere, Gemma 2 and 3 (soft-capping, a sliding window of 3),
Granite (its multipliers), Qwen3; the mixtures of experts Mixtral, Qwen2-MoE, OLMoE and
GraniteMoE (2-4 experts, each token routed to 1 or 2 of them, by ``batched_mm``, or by
transformers' eager loop, documented as refused; the
routers' load-balancing loss added to the model's own loss, ``output_router_logits=True``, in
30%: it couples the examples, a refusal); Mamba, Mamba2, FalconMamba, RWKV; XLM-RoBERTa,
MobileBERT (an embedding size of 6, or 8 as the hidden size: its LM head's dense weight is then
[0, V]), Funnel, MPNet, Longformer (a window of 4: a length not its multiple is padded inside),
BigBird; Pegasus, mBART, Marian, mT5, UMT5, LongT5 (local attention), LED, ProphetNet; images
(``pixel_values`` [N, 3, 8, 8], classified: ViT, DeiT, BEiT, Swin, ConvNeXt, ConvNeXt v2,
SegFormer) and sounds (``input_values`` [N, 4T + 8] with an attention mask over the samples,
classified: Wav2Vec2, HuBERT). A refusal whose cause is an exception inside one of noisescale's
rules (``ZeroDivisionError in noisescale's rule``) is counted a crash: its message names a cause
that is not the case's.
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
    python tests/fuzz_hf.py --more --seeds 0:300 --jsonl hf_more.jsonl

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
# The second set (``--more``): more families, drawn by `draw_spec(seed, more=True)` (the first
# set's seeds keep their cases). An entry may name the classes' prefix when it is not the
# config's (Gemma 3's text model) and its decoder's layer-count key (one decoder layer).
_LLAMA_LIKE = {**_COMMON, "num_key_value_heads": 1}
_SEQ2SEQ_COMMON = {
    "vocab_size": V,
    "d_model": H,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 12,
    "decoder_ffn_dim": 12,
    "max_position_embeddings": 24,
}
_T5_COMMON = {
    "vocab_size": V,
    "d_model": H,
    "d_kv": 4,
    "d_ff": 12,
    "num_heads": 2,
    "decoder_start_token_id": 0,
}
_MOE = ("ForCausalLM",)
_SSM = {"vocab_size": V, "hidden_size": H, "state_size": 4, "expand": 2, "conv_kernel": 3}
_VISION = {
    "hidden_size": H,
    "num_attention_heads": 2,
    "intermediate_size": 12,
    "patch_size": 4,
    "image_size": 8,
    "num_channels": 3,
}
_AUDIO = {
    "hidden_size": H,
    "num_attention_heads": 2,
    "intermediate_size": 12,
    "conv_dim": (8, 8),
    "conv_stride": (2, 2),
    "conv_kernel": (3, 3),
    "num_conv_pos_embeddings": 4,
    "num_conv_pos_embedding_groups": 2,
    "vocab_size": V,
    "mask_time_prob": 0.0,
    "classifier_proj_size": H,
    "feat_extract_norm": "layer",
}
_IMAGE = ("ForImageClassification",)
MORE_FAMILIES = {
    "gptj": ("GPTJConfig", {"vocab_size": V, "n_embd": H, "n_head": 2, "n_positions": 24,
                            "rotary_dim": 2}, "n_layer",
             ("ForCausalLM", "ForSequenceClassification", "ForQuestionAnswering")),
    "gpt_bigcode": ("GPTBigCodeConfig", {"vocab_size": V, "n_embd": H, "n_head": 2,
                                         "n_positions": 24}, "n_layer",
                    ("ForCausalLM", "ForSequenceClassification", "ForTokenClassification")),
    "gpt_neo": ("GPTNeoConfig", {"vocab_size": V, "hidden_size": H, "num_heads": 2,
                                 "max_position_embeddings": 24, "window_size": 3},
                "num_layers", ("ForCausalLM", "ForSequenceClassification",
                               "ForTokenClassification", "ForQuestionAnswering")),
    "codegen": ("CodeGenConfig", {"vocab_size": V, "n_embd": H, "n_head": 2, "n_positions": 24,
                                  "n_ctx": 24, "rotary_dim": 2}, "n_layer", ("ForCausalLM",)),
    "phi3": ("Phi3Config", _LLAMA_LIKE, "num_hidden_layers",
             ("ForCausalLM", "ForSequenceClassification", "ForTokenClassification")),
    "stablelm": ("StableLmConfig", _LLAMA_LIKE, "num_hidden_layers",
                 ("ForCausalLM", "ForSequenceClassification", "ForTokenClassification")),
    "olmo": ("OlmoConfig", _LLAMA_LIKE, "num_hidden_layers", ("ForCausalLM",)),
    "olmo2": ("Olmo2Config", _LLAMA_LIKE, "num_hidden_layers", ("ForCausalLM",)),
    "cohere": ("CohereConfig", _LLAMA_LIKE, "num_hidden_layers", ("ForCausalLM",)),
    "gemma2": ("Gemma2Config", {**_LLAMA_LIKE, "head_dim": 4, "sliding_window": 3,
                                "final_logit_softcapping": 2.0, "attn_logit_softcapping": 3.0},
               "num_hidden_layers",
               ("ForCausalLM", "ForSequenceClassification", "ForTokenClassification")),
    "gemma3": ("Gemma3TextConfig", {**_LLAMA_LIKE, "head_dim": 4, "sliding_window": 3,
                                    "final_logit_softcapping": 2.0,
                                    "attn_logit_softcapping": 3.0},
               "num_hidden_layers", ("ForCausalLM", "ForSequenceClassification"), "Gemma3"),
    "granite": ("GraniteConfig", {**_LLAMA_LIKE, "embedding_multiplier": 2.0,
                                  "logits_scaling": 3.0, "residual_multiplier": 0.5,
                                  "attention_multiplier": 0.7},
                "num_hidden_layers", ("ForCausalLM",)),
    "qwen3": ("Qwen3Config", {**_LLAMA_LIKE, "head_dim": 4}, "num_hidden_layers",
              ("ForCausalLM", "ForSequenceClassification", "ForTokenClassification",
               "ForQuestionAnswering")),
    "mixtral": ("MixtralConfig", {**_LLAMA_LIKE, "num_local_experts": 3,
                                  "num_experts_per_tok": 2}, "num_hidden_layers",
                ("ForCausalLM", "ForSequenceClassification")),
    "qwen2_moe": ("Qwen2MoeConfig", {**_LLAMA_LIKE, "num_experts": 3, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 6,
                                     "shared_expert_intermediate_size": 6},
                  "num_hidden_layers", _MOE),
    "olmoe": ("OlmoeConfig", {**_LLAMA_LIKE, "num_experts": 3, "num_experts_per_tok": 2},
              "num_hidden_layers", _MOE),
    "granitemoe": ("GraniteMoeConfig", {**_LLAMA_LIKE, "num_local_experts": 3,
                                        "num_experts_per_tok": 2}, "num_hidden_layers", _MOE),
    "mamba": ("MambaConfig", {**_SSM, "time_step_rank": 2}, "num_hidden_layers",
              ("ForCausalLM",)),
    "mamba2": ("Mamba2Config", {**_SSM, "num_heads": 4, "head_dim": 4, "n_groups": 1,
                                "chunk_size": 4}, "num_hidden_layers", ("ForCausalLM",)),
    "falcon_mamba": ("FalconMambaConfig", {**_SSM, "time_step_rank": 2}, "num_hidden_layers",
                     ("ForCausalLM",)),
    "rwkv": ("RwkvConfig", {"vocab_size": V, "hidden_size": H, "attention_hidden_size": H,
                            "intermediate_size": 12, "context_length": 24},
             "num_hidden_layers", ("ForCausalLM",)),
    "xlm_roberta": ("XLMRobertaConfig", {**_COMMON, "max_position_embeddings": 30},
                    "num_hidden_layers", ("ForMaskedLM", "ForCausalLM",
                                          "ForSequenceClassification", "ForTokenClassification",
                                          "ForQuestionAnswering")),
    "mobilebert": ("MobileBertConfig", {**_COMMON,
                                        "intra_bottleneck_size": 8, "true_hidden_size": 8,
                                        "num_feedforward_networks": 1},
                   "num_hidden_layers",
                   ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification")),
    "funnel": ("FunnelConfig", {"vocab_size": V, "d_model": H, "n_head": 2, "d_head": 4,
                                "d_inner": 12, "num_decoder_layers": 1}, "block_sizes",
               ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification")),
    "mpnet": ("MPNetConfig", {**_COMMON, "max_position_embeddings": 30}, "num_hidden_layers",
              ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification",
               "ForQuestionAnswering")),
    "longformer": ("LongformerConfig", {**_COMMON, "max_position_embeddings": 40,
                                        "attention_window": 4}, "num_hidden_layers",
                   ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification")),
    "big_bird": ("BigBirdConfig", {**_COMMON, "max_position_embeddings": 30,
                                   "attention_type": "original_full"}, "num_hidden_layers",
                 ("ForMaskedLM", "ForCausalLM", "ForSequenceClassification",
                  "ForTokenClassification")),
    "pegasus": ("PegasusConfig", _SEQ2SEQ_COMMON, "encoder_layers",
                ("ForConditionalGeneration", "ForCausalLM"), None, "decoder_layers"),
    "mbart": ("MBartConfig", _SEQ2SEQ_COMMON, "encoder_layers",
              ("ForConditionalGeneration", "ForCausalLM"), None, "decoder_layers"),
    "marian": ("MarianConfig", {**_SEQ2SEQ_COMMON, "decoder_start_token_id": 0},
               "encoder_layers", ("MTModel", "ForCausalLM"), None, "decoder_layers"),
    "mt5": ("MT5Config", _T5_COMMON, "num_layers",
            ("ForConditionalGeneration", "ForTokenClassification"), None, "num_decoder_layers"),
    "umt5": ("UMT5Config", _T5_COMMON, "num_layers",
             ("ForConditionalGeneration", "ForTokenClassification"), None,
             "num_decoder_layers"),
    "longt5": ("LongT5Config", {**_T5_COMMON, "local_radius": 2,
                                "encoder_attention_type": "local"}, "num_layers",
               ("ForConditionalGeneration",), None, "num_decoder_layers"),
    "led": ("LEDConfig", {**_SEQ2SEQ_COMMON, "max_encoder_position_embeddings": 24,
                          "max_decoder_position_embeddings": 24, "attention_window": 4},
            "encoder_layers", ("ForConditionalGeneration",), None, "decoder_layers"),
    "prophetnet": ("ProphetNetConfig", {"vocab_size": V, "hidden_size": H,
                                        "num_encoder_attention_heads": 2,
                                        "num_decoder_attention_heads": 2, "encoder_ffn_dim": 12,
                                        "decoder_ffn_dim": 12, "max_position_embeddings": 24,
                                        "ngram": 2, "num_buckets": 4,
                                        "relative_max_distance": 8,
                                        "decoder_start_token_id": 0},
                   "num_encoder_layers", ("ForConditionalGeneration", "ForCausalLM"), None,
                   "num_decoder_layers"),
    # images (pixel_values [N, 3, 8, 8]) and sounds (input_values [N, 4T + 8], padded by an
    # attention mask over the samples), classified
    "vit": ("ViTConfig", _VISION, "num_hidden_layers", _IMAGE),
    "deit": ("DeiTConfig", _VISION, "num_hidden_layers", _IMAGE),
    "beit": ("BeitConfig", {**_VISION, "use_relative_position_bias": True,
                            "use_mean_pooling": True}, "num_hidden_layers", _IMAGE),
    "swin": ("SwinConfig", {"image_size": 8, "num_channels": 3, "embed_dim": H, "num_heads": [2],
                            "window_size": 2, "patch_size": 2, "mlp_ratio": 1.5}, "depths",
             _IMAGE),
    "convnext": ("ConvNextConfig", {"image_size": 8, "num_channels": 3, "hidden_sizes": [H, 12],
                                    "num_stages": 2, "patch_size": 2}, "depths", _IMAGE),
    "convnextv2": ("ConvNextV2Config", {"image_size": 8, "num_channels": 3,
                                        "hidden_sizes": [H, 12], "num_stages": 2,
                                        "patch_size": 2}, "depths", _IMAGE),
    "segformer": ("SegformerConfig", {"num_encoder_blocks": 1, "sr_ratios": [1],
                                      "hidden_sizes": [H], "patch_sizes": [3], "strides": [2],
                                      "num_attention_heads": [2], "mlp_ratios": [2],
                                      "decoder_hidden_size": H, "num_channels": 3}, "depths",
                  _IMAGE),
    "wav2vec2": ("Wav2Vec2Config", _AUDIO, "num_hidden_layers", ("ForSequenceClassification",)),
    "hubert": ("HubertConfig", _AUDIO, "num_hidden_layers", ("ForSequenceClassification",)),
}  # fmt: skip
_MOE_FAMILIES = ("mixtral", "qwen2_moe", "olmoe", "granitemoe")
_IMAGES = ("vit", "deit", "beit", "swin", "convnext", "convnextv2", "segformer")
_SOUNDS = ("wav2vec2", "hubert")
# LoRA's targets where peft has no default for the family
_MORE_LORA_TARGETS = {
    "mamba": ["in_proj", "x_proj"], "mamba2": ["in_proj"],
    "falcon_mamba": ["in_proj", "x_proj"], "rwkv": ["key", "receptance"],
    "cohere": ["q_proj", "v_proj"], "olmo2": ["q_proj", "v_proj"], "granite": ["q_proj", "v_proj"],
    "olmoe": ["q_proj", "v_proj"], "granitemoe": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"], "pegasus": ["q_proj", "v_proj"],
    "qwen2_moe": ["q_proj", "v_proj"], "marian": ["q_proj", "v_proj"],
    "mbart": ["q_proj", "v_proj"],
    "mobilebert": ["query", "value"], "funnel": ["q_head", "v_head"], "mpnet": ["q", "v"],
    "longformer": ["query", "value"], "big_bird": ["query", "value"],
    "prophetnet": ["query_proj", "value_proj"], "led": ["q_proj", "v_proj"],
    "gpt_bigcode": ["c_attn"], "codegen": ["qkv_proj"], "phi3": ["qkv_proj"],
    "stablelm": ["q_proj", "v_proj"], "olmo": ["q_proj", "v_proj"],
    "umt5": ["q", "v"], "longt5": ["q", "v"], "mt5": ["q", "v"],
    "vit": ["query", "value"], "deit": ["query", "value"], "beit": ["query", "value"],
    "swin": ["q_proj", "v_proj"], "segformer": ["q_proj", "v_proj"], "convnext": ["pwconv1"],
    "convnextv2": ["pwconv1"], "wav2vec2": ["q_proj", "v_proj"], "hubert": ["q_proj", "v_proj"],
}  # fmt: skip
# the config keys of dropout probabilities, set to 0 (the truth needs the same masks)
_DROPOUTS = (
    "hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop",
    "attn_pdrop", "dropout", "attention_dropout", "activation_dropout", "hidden_dropout",
    "seq_classif_dropout", "qa_dropout", "classifier_dropout", "dropout_rate", "attn_dropout",
    "embedding_dropout", "mlp_dropout", "classifier_dropout_prob", "emb_pdrop",
    "summary_first_dropout", "layerdrop", "encoder_layerdrop", "decoder_layerdrop",
    "embed_dropout", "resid_dropout", "router_jitter_noise", "activation_dropout",
    "drop_path_rate",  # (stochastic depth in training: Swin, BEiT, SegFormer)
)  # fmt: skip
_TOKEN_HEADS = ("LMHeadModel", "ForCausalLM", "ForMaskedLM", "ForTokenClassification")
_CAUSAL = ("LMHeadModel", "ForCausalLM")
_SEQ2SEQ = ("ForConditionalGeneration", "MTModel")  # (MTModel: MarianMTModel)


def _family(spec):
    """``(config class, kwargs, layer-count key, heads, class prefix, decoder layer key)``."""
    entry = {**FAMILIES, **MORE_FAMILIES}[spec["family"]]
    entry = (*entry, None, None)[:6]
    if spec["family"] in ("t5", "bart"):
        entry = (*entry[:5], "num_decoder_layers" if spec["family"] == "t5" else "decoder_layers")
    return entry


def _kind(head):
    if head in _CAUSAL:
        return "causal"
    if head in ("ForMaskedLM", "ForTokenClassification", *_SEQ2SEQ):
        return "tokens"
    return {"ForSequenceClassification": "seq", "ForImageClassification": "seq",
            "ForQuestionAnswering": "qa"}[head]  # fmt: skip


def draw_spec(seed, more=False):
    """The options of `seed`'s case (no model built); `more`: a family of the second set."""
    r = random.Random(seed)
    families = MORE_FAMILIES if more else FAMILIES
    family = r.choice(sorted(families))
    head = r.choice(families[family][3])
    t = r.choice([1, 2, 3, 4, 5, 6])
    n = r.choice([1, 2, 3, t, H])
    if r.random() < 0.15:
        t = n if n > 1 else t
    spec = {
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
    if more:  # (drawn after the first set's options: these do not move them)
        spec["experts"] = r.choice(["batched_mm", "batched_mm", "eager"])
        # the routers' load-balancing loss added to the model's own loss: couples the examples
        spec["router_logits"] = family in _MOE_FAMILIES and r.random() < 0.3
        # MobileBERT's embedding size: as the hidden size, its LM head's dense weight is [0, V]
        spec["emb_size"] = r.choice([6, 6, H])
        # a mixture's experts and the experts each token is routed to (as many experts as
        # examples, one token routed to one expert: the routed rows may number N)
        spec["n_experts"], spec["top_k"] = r.choice([2, 3, 4]), r.choice([1, 2])
        spec["more"] = True
    return spec


def build_model(spec):
    import transformers

    transformers.logging.set_verbosity_error()
    cfg_name, kwargs, layers_key, _, prefix, decoder_key = _family(spec)
    kwargs = {**kwargs, layers_key: spec["layers"], "pad_token_id": 0}
    if layers_key == "depths":  # (Swin, ConvNeXt, SegFormer: a list, a stage's depth)
        kwargs["depths"] = [spec["layers"]] * len(kwargs.get("hidden_sizes", [H]))
    if decoder_key:
        kwargs[decoder_key] = 1
    if spec["family"] == "rwkv":  # (its initialisation divides by the layers less one)
        spec["layers"] = kwargs[layers_key] = 2
    if spec["family"] == "funnel":  # (one block of one layer, or two: a pooling between)
        kwargs["block_sizes"] = [1] * spec["layers"]
    if spec["family"] == "gpt_neo":  # (a global layer, then a local one)
        kwargs["attention_types"] = [[["global", "local"][: spec["layers"]], 1]]
    if spec["family"] == "led":
        kwargs["attention_window"] = [4] * spec["layers"]
    if spec["family"] == "mobilebert":
        kwargs["embedding_size"] = spec["emb_size"]
    if spec["family"] in _MOE_FAMILIES:
        kwargs["output_router_logits"] = spec["router_logits"]
        many = "num_local_experts" if "num_local_experts" in kwargs else "num_experts"
        kwargs[many], kwargs["num_experts_per_tok"] = spec["n_experts"], spec["top_k"]
    kwargs["num_labels"] = 2 if spec["head"] == "ForQuestionAnswering" else spec["classes"]
    kwargs["tie_word_embeddings"] = spec["tie"]
    config = getattr(transformers, cfg_name)(**kwargs)
    for key in _DROPOUTS:
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)
    config._attn_implementation = spec["attn"]
    if spec.get("more"):  # (grouped_mm, the default, has no float64 kernel)
        config._experts_implementation = spec["experts"]
    if spec["head"] in _CAUSAL and hasattr(config, "is_decoder"):
        config.is_decoder = True
    base = prefix or cfg_name[: -len("Config")]
    cls = getattr(transformers, base + spec["head"])
    try:
        model = cls(config).to(torch.float64)
    except ValueError as err:
        if "scaled_dot_product_attention" not in str(err) and "sdpa" not in str(err).lower():
            raise
        spec["attn"] = config._attn_implementation = "eager"  # (no sdpa for this class)
        model = cls(config).to(torch.float64)
    for m in model.modules():  # (a classifier's dropout may default to 0.1 whatever the config)
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.eval()
    if spec["grad_ckpt"] and not model.supports_gradient_checkpointing:
        spec["grad_ckpt"] = False  # (Funnel, MPNet)
    if spec["grad_ckpt"]:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": spec["grad_ckpt"] == "reentrant"}
        )
        model.train()  # (checkpointing runs in train mode only; every dropout is 0)
    if spec["frozen"] == "emb" and spec["family"] in _SOUNDS:
        model.freeze_feature_encoder()
    elif spec["frozen"] == "emb" and spec["family"] in _IMAGES:
        base = model.base_model  # (the patch embedding; SegFormer's first stage's)
        emb = getattr(base, "embeddings", None) or base.stages[0].patch_embeddings
        emb.requires_grad_(False)
    elif spec["frozen"] == "emb":
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
        targets.update(_MORE_LORA_TARGETS)
        lora = peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=targets.get(spec["family"]),
            init_lora_weights=False, lora_dropout=0.0,
        )  # fmt: skip
        model = peft.get_peft_model(model, lora)
    return model


def _forward_kwargs(model):
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(target.forward).parameters)


def make_case(seed, override=None, more=False):
    """``(spec, model, inputs, per_example_loss)``; see the module's docstring. `inputs` holds
    the batch's tensors; ``per_example_loss.contributions`` (the model's own loss) gives each
    example's part of the batch's loss, ``per_example_loss.own`` each example's own loss."""
    spec = draw_spec(seed, more)
    if override:
        spec.update(override)
    if spec["family"] in (*_IMAGES, *_SOUNDS):
        spec["embeds"] = "ids"  # (no token ids, no table)
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
    if spec["family"] in _IMAGES:
        inputs = {"pixel_values": torch.randn(n, 3, 8, 8, generator=g)}
        spec["padding"] = "none"
    elif spec["family"] in _SOUNDS:  # (4 samples a position, 8 more: 2 frames or more)
        samples = torch.arange(4 * t + 8)[None]
        have = (4 * lengths + 8)[:, None]
        keep = samples >= 4 * t + 8 - have if left else samples < have
        wave = torch.randn(n, 4 * t + 8, generator=g)
        inputs = {"input_values": torch.where(keep, wave, 0.0), "attention_mask": keep.long()}
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
    if kind == "tokens" and spec["head"] in _SEQ2SEQ:
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
            if spec["head"] in _SEQ2SEQ:
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
    if spec["family"] == "prophetnet":  # (its loss, over its n-gram streams, matches neither)
        spec["shift"] = "tokens"  # (each stream's targets the labels as given)
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
        fuzz_runner._note_exception(res, err)
        warned = False
    res["cls"] = fuzz_runner._classify_steps(res, warned)
    return res


def check_seed(seed, modes=fuzz_runner.MODES, override=None, more=False):
    """`seed`'s case in `modes` (as :func:`fuzz_runner.check_seed`, same record); `more`: a
    family of the second set (:data:`MORE_FAMILIES`)."""
    record = {"seed": seed}
    start = time.time()
    with (
        fuzz_runner.float64_default(),
        contextlib.redirect_stdout(io.StringIO()),
        _truth_by_backward(),
    ):
        try:
            spec, model, _, pel = make_case(seed, override, more)
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
        loss = _loss_of(spec, pel, model, n)
        if not loss.requires_grad:  # (reentrant checkpoints, frozen)
            record["gen_error"] = "the loss does not require grad"
            return record
        params = [p for p in model.parameters() if p.requires_grad]
        if not all(bool(g.isfinite().all()) for g in _backward_grads(loss, params)):
            # (the batch's own gradient NaN where each example's alone is not: Gemma 3 with an
            # example of one token and nothing to predict, seed 816 of --more)
            record["gen_error"] = "truth: the batch's gradient is not finite"
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
                record["modes"][mode] = _internal_error(runs[mode]())
    record["t"] = round(time.time() - start, 2)
    return record


def check_seed_more(seed, modes=fuzz_runner.MODES, override=None):
    """:func:`check_seed` on the second set of families (``--more``)."""
    return check_seed(seed, modes, override, more=True)


def _internal_error(res):
    """A refusal whose cause is an exception inside one of noisescale's own rules (``'aten.view'
    (ZeroDivisionError in noisescale's rule)``) is a crash under a refusal's name: its message
    names a cause (the loss combining the examples) that is not the case's."""
    if res.get("cls") == "refused" and "in noisescale's rule)" in res.get("exc", ""):
        return {**res, "cls": "crash"}
    return res


def describe(record):
    spec = record.get("spec", {})
    keys = (
        "family", "head", "lossform", "reduction", "n", "t", "tie", "attn", "padding", "ignore",
        "position_ids", "embeds", "grad_ckpt", "frozen", "experts", "router_logits", "n_experts",
        "top_k",
    )  # fmt: skip
    return f"seed {record['seed']}: " + ", ".join(f"{k}={spec.get(k)}" for k in keys if k in spec)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0:100", help="A:B (a range), or seeds A,B,C")
    parser.add_argument("--jsonl", help="append each seed's full record to this file")
    parser.add_argument("--modes", default=",".join(fuzz_runner.MODES))
    parser.add_argument("--tracker-every", type=int, default=5, help="trackers on every k-th seed")
    parser.add_argument("--override", help="JSON dict replacing entries of each seed's spec")
    parser.add_argument("-v", "--verbose", action="store_true", help="each mode's result")
    parser.add_argument("--more", action="store_true", help="the second set of families")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="transformers")
    modes = tuple(args.modes.split(","))
    override = json.loads(args.override) if args.override else None
    start = time.time()

    def check(seed):
        seed_modes = modes
        if seed % args.tracker_every:
            seed_modes = tuple(m for m in modes if m not in fuzz_runner.TRACKER_MODES)
        return check_seed(seed, seed_modes, override, args.more)

    table, found, invalid = fuzz_runner.run_seeds(
        fuzz_runner._seeds(args.seeds),
        check,
        args.jsonl,
        args.verbose,
        line=lambda record: f"{describe(record)} {record.get('t')}",
    )
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
