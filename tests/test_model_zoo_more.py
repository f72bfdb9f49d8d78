"""More families we did not write, called the way their users call them, against brute force.

A helper's sweep of 2026-12-04 (≈ 33 `transformers` families, 47 configurations, float64, tiny
random configs; every one exact, refused with its cause, or — ModernBERT's
``sparse_prediction=True`` — silently wrong, now refused: test_never_silently_wrong) found these
exact per example and by sub-batch; they are kept here, one test each, as the zoo's second
ring: encoders with their own heads (ModernBERT with local/global attention, DistilBERT,
RoBERTa, ELECTRA, MPNet's relative buckets), decoders with multi-query, parallel or fused
projections (Mistral's sliding window, Phi, Phi3, Falcon in both layouts, GPTBigCode,
Starcoder2, OLMo2, StableLM, Cohere, Granite's multipliers, RWKV's recurrence), sequence to
sequence (Pegasus, Marian), vision (DeiT's two tokens, BEiT's relative position bias and layer
scale, SegFormer's convolutions), sequence classification by pooling and by the last token,
ELECTRA's discriminator, speech (Wav2Vec2's convolutional front end with GroupNorm and a
weight-normed positional convolution under CTC, Whisper). Families that stay refused, with the
cause the message names: Longformer, LED and XLNet (attention run time-major inside), Perceiver
(a bias added to logits flattened with positions), MobileViT and LeViT (BatchNorm in training
mode). Same harness and tolerance as test_model_zoo.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import noisescale
from test_model_zoo import RTOL, N, V, _ids, _losses, _mask, _train, assert_exact
from test_subbatch import assert_subbatches_exact

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("float64_default")

# Configurations that two entries share, each with its own head (or layout)


def _modernbert(**kw):
    return transformers.ModernBertConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, global_attn_every_n_layers=2,
        local_attention=4, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
        sep_token_id=2, mask_token_id=3, **kw,
    )  # fmt: skip


def _mistral(**kw):
    return transformers.MistralConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16, **kw,
    )  # fmt: skip


def _electra():
    return transformers.ElectraConfig(
        vocab_size=V, embedding_size=8, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, max_position_embeddings=16,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip


def _deit():
    return transformers.DeiTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip


def _wav2vec2(**layout):
    return transformers.Wav2Vec2Config(
        vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3),
        num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, hidden_dropout=0.0,
        activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0,
        layerdrop=0.0, mask_time_prob=0.0, ctc_loss_reduction="mean", pad_token_id=0, **layout,
    )  # fmt: skip


MORE = {
    # its own local/global attention (sliding window 4 on every other layer), no unpadding on
    # the eager/sdpa path
    "modernbert": (lambda: transformers.ModernBertForMaskedLM(_modernbert()), "lm"),
    # a masked LM head with its own vocab transform/projector; loss computed by the model
    # (token_mean in the tracker)
    "distilbert": (lambda: transformers.DistilBertForMaskedLM(transformers.DistilBertConfig(
        vocab_size=V, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=16,
        dropout=0.0, attention_dropout=0.0, qa_dropout=0.0, seq_classif_dropout=0.0,
    )), "lm"),
    # positions from the mask's cumulative sum offset by padding_idx
    "roberta": (lambda: transformers.RobertaForMaskedLM(transformers.RobertaConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, pad_token_id=1,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )), "lm"),
    # an embedding projection (embedding_size 8 -> hidden 16) and a generator head
    "electra": (lambda: transformers.ElectraForMaskedLM(_electra()), "lm"),
    # relative-position buckets [T, T] looked up into a bias shared by the batch
    "mpnet": (lambda: transformers.MPNetForMaskedLM(transformers.MPNetConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, pad_token_id=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )), "lm"),
    # sliding-window attention (window 4 < T), grouped-query attention
    "mistral": (lambda: transformers.MistralForCausalLM(_mistral(sliding_window=4)), "lm"),
    # partial rotary, parallel attention/MLP, a biased LM head
    "phi": (lambda: transformers.PhiForCausalLM(transformers.PhiConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, partial_rotary_factor=0.5,
        resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
    )), "lm"),
    # fused qkv and gate_up projections
    "phi3": (lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
    )), "lm"),
    # multi-query, parallel attention, fused qkv (the 7B layout)
    "falcon": (lambda: transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        hidden_dropout=0.0, attention_dropout=0.0, new_decoder_architecture=False,
        multi_query=True, parallel_attn=True, alibi=False, bias=False,
    )), "lm"),
    # the new decoder architecture (40B/180B): grouped kv heads, two LayerNorms in parallel
    "falcon-new": (lambda: transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_kv_heads=2, hidden_dropout=0.0, attention_dropout=0.0, new_decoder_architecture=True,
    )), "lm"),
    # multi-query attention: one key/value head in a fused c_attn
    "gpt-bigcode": (lambda: transformers.GPTBigCodeForCausalLM(transformers.GPTBigCodeConfig(
        vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2, multi_query=True,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )), "lm"),
    # biased projections, LayerNorm, sliding window
    "starcoder2": (lambda: transformers.Starcoder2ForCausalLM(transformers.Starcoder2Config(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        residual_dropout=0.0, embedding_dropout=0.0, attention_dropout=0.0, sliding_window=4,
    )), "lm"),
    # RMSNorm on q and k over all heads, post-norm blocks
    "olmo2": (lambda: transformers.Olmo2ForCausalLM(transformers.Olmo2Config(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, pad_token_id=0,
    )), "lm"),
    # per-head q/k LayerNorm (a LayerNorm per head), partial rotary, qkv bias
    "stablelm": (lambda: transformers.StableLmForCausalLM(transformers.StableLmConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        partial_rotary_factor=0.5, qk_layernorm=True, use_qkv_bias=True,
        hidden_dropout=0.0, attention_dropout=0.0,
    )), "lm"),
    # its own LayerNorm without bias, per-head q/k norm, parallel block, logit scale
    "cohere": (lambda: transformers.CohereForCausalLM(transformers.CohereConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        pad_token_id=0, use_qk_norm=True,
    )), "lm"),
    # embedding/residual/attention multipliers and logits scaling
    "granite": (lambda: transformers.GraniteForCausalLM(transformers.GraniteConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3,
        logits_scaling=4.0,
    )), "lm"),
    # the reference PyTorch WKV recurrence (no CUDA kernel): time-mix/decay parameters used directly
    "rwkv": (lambda: transformers.RwkvForCausalLM(transformers.RwkvConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=2, attention_hidden_size=16,
        intermediate_size=32, context_length=16,
    )), "lm"),
    # sinusoidal positions, pre-norm encoder-decoder; loss computed by the model
    "pegasus": (lambda: transformers.PegasusForConditionalGeneration(transformers.PegasusConfig(
        vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_position_embeddings=16, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=0, decoder_start_token_id=0,
    )), "lm"),
    # sinusoidal positions, a tied final_logits_bias buffer; loss computed by the model
    "marian": (lambda: transformers.MarianMTModel(transformers.MarianConfig(
        vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_position_embeddings=16, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=0, decoder_start_token_id=0,
    )), "lm"),
    # a class and a distillation token expanded over the batch
    "deit-cls": (lambda: transformers.DeiTForImageClassification(_deit()), ("images", 8)),
    # a relative position bias table indexed by a [T*T] buffer, layer scale, mean pooling
    "beit": (lambda: transformers.BeitForImageClassification(transformers.BeitConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0,
        use_relative_position_bias=True, use_mean_pooling=True, layer_scale_init_value=0.1,
    )), ("images", 8)),
    # overlapping patch embeddings (conv), spatial-reduction attention (a conv on
    # keys/values), Mix-FFN depthwise conv
    "segformer": (lambda: transformers.SegformerForImageClassification(transformers.SegformerConfig(
        num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
        hidden_sizes=[8, 16], patch_sizes=[3, 3], strides=[2, 2], num_attention_heads=[1, 2],
        mlp_ratios=[2, 2], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        classifier_dropout_prob=0.0, drop_path_rate=0.0, num_labels=3, decoder_hidden_size=16,
    )), ("images", 16)),
    # mean pooling over the attention mask
    "modernbert-cls": (lambda: transformers.ModernBertForSequenceClassification(
        _modernbert(num_labels=3, classifier_pooling="mean")), "cls"),
    # the last non-padding token pooled by indexing [arange(N), last] (pad_token_id 0, right
    # padding)
    "mistral-cls": (lambda: transformers.MistralForSequenceClassification(
        _mistral(pad_token_id=0, num_labels=3)), "cls-pad"),
    # replaced-token detection: a BCE over tokens, computed by the model
    "electra-disc": (lambda: transformers.ElectraForPreTraining(_electra()), "rtd"),
    # with teacher: the mean of the class and distillation heads' logits, cross-entropy
    # outside the model
    "deit": (lambda: transformers.DeiTForImageClassificationWithTeacher(_deit()),
             ("images-logits", 8)),
    # conv feature extractor with GroupNorm, weight-normed grouped positional conv, CTC (mean)
    "wav2vec2": (lambda: transformers.Wav2Vec2ForCTC(_wav2vec2(feat_extract_norm="group")),
                 ("ctc", 200)),
    # the stable-layer-norm layout (LayerNorm extractor) with an attention mask: the padded
    # frames of feature_projection's Linear output zeroed in place (refused as "no use of its
    # parameters" until 2026-12-04)
    "wav2vec2-padded": (lambda: transformers.Wav2Vec2ForCTC(
        _wav2vec2(feat_extract_norm="layer", do_stable_layer_norm=True)), ("ctc-mask", 200)),
    # two conv1d over mel frames, sinusoidal encoder positions, decoder with cross attention
    "whisper": (lambda: transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
        vocab_size=V, num_mel_bins=8, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_source_positions=8, max_target_positions=16, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0, decoder_start_token_id=1,
        bos_token_id=1, eos_token_id=2, suppress_tokens=None, begin_suppress_tokens=None,
    )), ("whisper", 8, 16)),
}  # fmt: skip


def _losses_more(model: nn.Module, inputs, n: int = N) -> tuple:
    """(batch loss: the mean of the n examples' own losses, loss of example i) for the kinds of
    MORE; "lm" and ("images", size) go to test_model_zoo's _losses."""
    model.train()
    if inputs == "lm" or inputs[0] == "images":
        return _losses(model, inputs, n)
    if inputs in ("cls", "cls-pad"):  # 3 classes; cls-pad: right padding with pad_token_id 0
        ids, mask, y = _ids(n=n), _mask(n), torch.arange(n) % 3
        if inputs == "cls-pad":
            ids = ids.clamp(min=1).masked_fill(mask == 0, 0)

        def call(s):
            return model(input_ids=ids[s], attention_mask=mask[s], labels=y[s]).loss
    # ELECTRA's discriminator: BCE over every token (no padding: equal counts)
    elif inputs == "rtd":
        ids, y = _ids(n=n), _ids(seed=5, n=n) % 2

        def call(s):
            return model(input_ids=ids[s], labels=y[s]).loss
    elif inputs[0] == "images-logits":  # DeiT with teacher: no labels= (it has no loss)
        size = inputs[1]
        x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(2))
        y = torch.arange(n) % 3

        def call(s):
            return F.cross_entropy(model(pixel_values=x[s]).logits, y[s])
    # raw audio of L samples, 3 target tokens each, ctc_loss_reduction="mean"
    elif inputs[0] in ("ctc", "ctc-mask"):
        x = torch.randn(n, inputs[1], generator=torch.Generator().manual_seed(2))
        y = torch.randint(1, V, (n, 3), generator=torch.Generator().manual_seed(3))
        # ctc-mask: example 1's last 60 samples are padding (the model zeroes their frames)
        m = torch.ones(n, inputs[1], dtype=torch.long)
        m[1, -60:] = 0
        masked = {"attention_mask": m} if inputs[0] == "ctc-mask" else {}

        def call(s):
            mask = {k: v[s] for k, v in masked.items()}
            return model(input_values=x[s], labels=y[s], **mask).loss
    elif inputs[0] == "whisper":  # log-mel features [n, mels, frames], 5 decoder labels each
        mel, frames = inputs[1], inputs[2]
        x = torch.randn(n, mel, frames, generator=torch.Generator().manual_seed(2))
        y = torch.randint(3, V, (n, 5), generator=torch.Generator().manual_seed(3))

        def call(s):
            return model(input_features=x[s], labels=y[s]).loss
    else:
        raise ValueError(inputs)
    return (lambda: call(slice(None))), (lambda i: call(slice(i, i + 1)))


@pytest.mark.parametrize("name", list(MORE))
def test_more_families_called_normally(name):
    build, inputs = MORE[name]
    torch.manual_seed(0)
    model = build()
    assert_exact(model, *_losses_more(model, inputs))


@pytest.mark.parametrize("path", ["chosen", "products"])
def test_a_layer_scale_in_a_layer_transformers_recomputes(path, monkeypatch):
    """BEiT's layer scale is a parameter multiplied in, in the layer whose ``forward``
    ``gradient_checkpointing_enable()`` recomputes — inside the module call, without the module
    hooks that hand the forward its alias, so the recomputed forward saved other tensors and
    torch raised ``CheckpointError`` (found by the helper's sweep, 2026-12-04). The layer's
    checkpoint function now mirrors the alias in the recomputation: per-example norms,
    sub-batch norms and three tracker steps exact, no warning; a deep copy of the model gets
    transformers' own function back, and so does the model once the tracker is removed."""
    import copy

    from noisescale.per_example import subbatch

    if path == "products":
        monkeypatch.setattr(subbatch, "uses_products", lambda *a: True)
    build, inputs = MORE["beit"]
    torch.manual_seed(0)
    model = build()
    model.gradient_checkpointing_enable()
    layer = model.beit.layers[0]
    own = layer._gradient_checkpointing_func
    assert_exact(model, *_losses(model, inputs), subbatches=False)
    batch, one = _losses(model, inputs, n=10)
    assert_subbatches_exact(model, batch, one, 10, k=4, steps=3, rtol=RTOL)
    history, said = _train(model, batch, 3)
    assert not [s for s in said if "noisescale" in s]
    assert all(not r["skipped"] for r in history)
    assert layer._gradient_checkpointing_func is own  # (every tracker removed)
    model.zero_grad()
    tracker = noisescale.GradientNoiseTracker(model)
    batch().backward()
    tracker.step()
    twin = copy.deepcopy(model)
    assert type(twin.beit.layers[0]._gradient_checkpointing_func) is type(own)
    twin(pixel_values=torch.randn(2, 3, 8, 8)).logits.sum().backward()
    tracker.remove()
    assert layer._gradient_checkpointing_func is own
