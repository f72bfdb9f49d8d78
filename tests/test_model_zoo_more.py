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
from noisescale.errors import NoiseScaleInputError, UnsupportedModuleError
from noisescale.per_example import PerExampleNorms
from test_model_zoo import RTOL, N, V, _ids, _losses, _mask, _train, assert_exact
from test_subbatch import assert_subbatches_exact, example_sqnorms

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


@pytest.mark.parametrize("family", ["wav2vec2", "data2vec-audio", "hubert"])
def test_specaugment_s_learned_mask_vector_in_training_is_exact(family):
    """wav2vec2-style models in training mask random spans of frames with a learned vector —
    SpecAugment, on by default (mask_time_prob=0.05): ``hidden_states[mask_time_indices] =
    self.masked_spec_embed``, a shared parameter written by a per-example boolean mask. It had
    no rule: the first step was withheld for the torch.func fallback, and every step after was
    refused naming another output of the model (a hunt, 2026-12-05; the zoo ran these models
    with mask_time_prob=0). Measured as where(mask, vector, hidden) now: each example's
    gradient of the vector is its masked frames' rows — exact against brute force with the
    same masks (numpy draws them: reseeded for every forward), per example and by sub-batch,
    and the tracker measures the model's own CTC loss."""
    import numpy as np

    torch.manual_seed(0)
    config = _wav2vec2(feat_extract_norm="group")
    config.mask_time_prob, config.mask_time_length = 0.5, 2
    if family == "data2vec-audio":
        config = transformers.Data2VecAudioConfig(**config.to_dict())
        model = transformers.Data2VecAudioForCTC(config)
    elif family == "hubert":
        config = transformers.HubertConfig(**config.to_dict())
        model = transformers.HubertForCTC(config)
    else:
        model = transformers.Wav2Vec2ForCTC(config)
    model.train()
    x = torch.randn(N, 200, generator=torch.Generator().manual_seed(2))
    y = torch.randint(1, V, (N, 3), generator=torch.Generator().manual_seed(3))

    def per_example():
        np.random.seed(0)  # (the same masks in every forward)
        logp = model(input_values=x).logits.log_softmax(-1).transpose(0, 1)
        frames, targets = torch.full((N,), logp.shape[0]), torch.full((N,), 3)
        return F.ctc_loss(logp, y, frames, targets, reduction="none", zero_infinity=True)

    per_example().sum().backward()
    vector = next(p for name, p in model.named_parameters() if "masked_spec_embed" in name)
    assert vector.grad is not None and float(vector.grad.abs().sum()) > 0  # (frames masked)
    model.zero_grad()
    assert_exact(model, lambda: per_example().mean(), lambda i: per_example()[i])
    np.random.seed(1)
    batch = {"input_values": x, "labels": y}
    history, said = _train(model, lambda: model(**batch).loss, 3)
    assert len(history) == 3 and not [s for s in said if "noisescale" in s]


def test_encodec_s_weight_normed_transposed_convolutions_are_exact():
    """Encodec (its default norm_type='weight_norm'): the decoder's upsampling layers are
    weight-normed ConvTranspose1d, whose parametrized weight meets the batch in
    F.conv_transpose1d — withheld for the fallback, then refused every step naming the
    parametrization's input, which it has none of (a hunt, 2026-12-05). Measured as the
    convolution it is the adjoint of: exact per example and by sub-batch, through the
    encoder's convolutions, its time-major LSTM and the quantizer's straight-through."""
    from test_subbatch import assert_exact_both_modes

    torch.manual_seed(0)
    model = transformers.EncodecModel(transformers.EncodecConfig(
        audio_channels=1, hidden_size=8, num_filters=4, num_residual_layers=1,
        upsampling_ratios=[2, 2], codebook_size=16, codebook_dim=8, num_lstm_layers=1,
        kernel_size=3, last_kernel_size=3, residual_kernel_size=3, target_bandwidths=[1.5],
        sampling_rate=100, norm_type="weight_norm", use_causal_conv=True,
    ))  # fmt: skip
    x = torch.randn(N, 1, 64, generator=torch.Generator().manual_seed(2))
    assert_exact_both_modes(
        model, lambda: model(input_values=x).audio_values.pow(2).flatten(1).sum(1), N, k=2
    )


@pytest.mark.parametrize("subbatches", [0, 2])
def test_mobilebert_s_bias_read_through_its_never_called_decoder_is_exact(subbatches):
    """MobileBERT's MLM head registers its bias on two modules (``self.bias`` and
    ``self.decoder.bias``, one Parameter) and reads it in its own forward through the decoder,
    which it never calls. Every step was refused naming other causes (a hunt, 2026-12-05);
    the read through the second registration is learned on the first step like any direct
    use, and the steps after are exact against brute force."""
    from test_subbatch import subbatch_truth

    torch.manual_seed(0)
    model = transformers.MobileBertForMaskedLM(transformers.MobileBertConfig(
        vocab_size=V, hidden_size=32, embedding_size=16, intra_bottleneck_size=16,
        true_hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        num_feedforward_networks=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=16,
    ))  # fmt: skip
    ids = _ids()

    def losses():
        logits = model(input_ids=ids).logits
        return (
            F.cross_entropy(logits.reshape(-1, V), ids.reshape(-1), reduction="none")
            .view(N, -1)
            .sum(1)
        )

    engine = PerExampleNorms(model, subbatches=subbatches)
    engine.RECHECK_SUBBATCHES = 1
    try:
        for step in range(3):
            model.zero_grad()
            losses().mean().backward()
            (p,) = engine.collect()
            if step == 0:
                assert p.raw_sqnorms is None and "used outside the layers" in p.withheld
                continue
            with engine.paused():
                if p.subbatches is None:
                    params = [q for q in model.parameters() if q.requires_grad]
                    want = torch.stack([
                        sum(g.pow(2).sum() for g in torch.autograd.grad(losses()[i], params))
                        for i in range(N)
                    ]) / N**2  # fmt: skip
                else:
                    want = subbatch_truth(model, lambda i: losses()[i], N, p.subbatches)
            torch.testing.assert_close(p.raw_sqnorms, want, rtol=RTOL, atol=0)
    finally:
        engine.remove()


def test_experts_called_on_routed_tokens_are_refused_at_once_naming_them():
    """JetMoE's experts (a module with its own weights, called on the tokens routed to it) use
    their weights in operations with no per-example rule: the first step was withheld "for
    the torch.func fallback from the next step on", and every step after was refused naming
    the module's input — a promise not kept (a hunt, 2026-12-05). The fallback runs a module
    per example along dim 0, which such a module's input does not have: refused on the first
    step, naming that."""
    torch.manual_seed(0)
    model = transformers.JetMoeForCausalLM(transformers.JetMoeConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8,
        intermediate_size=32, max_position_embeddings=16, num_local_experts=4,
        num_experts_per_tok=2,
    ))  # fmt: skip
    ids = _ids()
    engine = PerExampleNorms(model)
    try:
        with pytest.raises(
            UnsupportedModuleError,
            match=r"JetMoeParallelExperts.*called with no input whose dim 0 has the batch's 4",
        ):
            F.cross_entropy(
                model(input_ids=ids).logits.reshape(-1, V), ids.reshape(-1), reduction="sum"
            ).backward()
            engine.collect()
    finally:
        engine.remove()


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


# -- the third ring (a helper's sweep of 2026-12-05: ≈ 35 more families, no wrong number) -------
#
# What it found, each fixed here: a rule-less module that returns a ModelOutput was never hooked
# (the fallback differentiated nothing, the audit took its parameters for direct uses, and
# the scope's exit then left the engine's alias in the model: ViTMAE's decoder.mask_token,
# Funnel's attention); the fallback's size coincidence named no cause; a step of two
# micro-batches refused on the step the engine learns on (Mamba2); an MoE's router logits
# called without labels blamed on an auxiliary loss the model never added.


def _vitmae() -> nn.Module:
    torch.manual_seed(0)
    model = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(
        image_size=8, patch_size=2, num_channels=3, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, decoder_hidden_size=16,
        decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=32,
        mask_ratio=0.5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ))  # fmt: skip
    return model.train()


def _steps_against_brute_force(model, batch, one, n, steps, passes=1, micro=None):
    """``steps`` SGD steps under the exact engine, ``passes`` micro-batches each (``micro[j]``:
    the j-th one's (batch loss, one example's loss)); each pass's norms (None: withheld)
    against brute force, and the relative error, per step."""
    engine = PerExampleNorms(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    params = [p for p in model.parameters() if p.requires_grad]
    micro = micro or [(batch, one)]
    out = []
    for _ in range(steps):
        opt.zero_grad()
        for b, _o in micro[:passes]:
            (b() / passes).backward()
        got = engine.collect()
        errors = []
        with engine.paused():
            for p, (_b, o) in zip(got, micro, strict=False):
                if p.raw_sqnorms is None:
                    errors.append(None)
                    continue
                want = torch.stack([
                    sum(g.pow(2).sum() for g in torch.autograd.grad(o(i), params, allow_unused=True)
                        if g is not None)
                    for i in range(n)
                ])  # fmt: skip
                # (each pass's loss was divided by the passes: its norms are of that loss)
                have = p.raw_sqnorms * (n * passes) ** 2
                errors.append(float(((have - want).abs() / want).max()))
        out.append(errors)
        opt.step()
    engine.remove()
    return out


def test_a_rule_less_module_returning_a_model_output_is_measured_by_the_fallback():
    """ViTMAE's decoder appends ``mask_token.repeat(N, …)`` with ``cat`` (no rule: the
    fallback) and returns a ``ViTMAEDecoderOutput``. The fallback now differentiates the
    output's first tensor (the logits); before, the output was never hooked, the audit took
    the mask token for a direct use of the whole model, and from step 3 every step was
    refused as "added after the tracker was created" — the decoder's exit having left the
    engine's alias in its ``_parameters``, where it stayed after ``remove()`` (a new
    optimizer then failed: "can't optimize a non-leaf Tensor"). Exact from step 2, the model
    unaltered; since 2026-12-06 from step 1 (the token's repeat over examples and positions is
    met as an expansion, the fallback not needed)."""
    model = _vitmae()
    x = torch.randn(N, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    noise = torch.rand(N, 16, generator=torch.Generator().manual_seed(5))
    token = model.decoder.mask_token

    def batch():
        return model(pixel_values=x, noise=noise).loss

    def one(i):
        return model(pixel_values=x[i : i + 1], noise=noise[i : i + 1]).loss

    errors = _steps_against_brute_force(model, batch, one, N, steps=5)
    assert all(e[0] is not None and e[0] < RTOL for e in errors), errors
    assert model.decoder._parameters["mask_token"] is token
    torch.optim.SGD(model.parameters(), lr=0.1)  # (every parameter a leaf again)


def _funnel(n: int):
    torch.manual_seed(0)
    model = transformers.FunnelForSequenceClassification(transformers.FunnelConfig(
        vocab_size=V, block_sizes=[1, 1], d_model=16, n_head=2, d_head=8, d_inner=32,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, num_labels=3,
    )).train()  # fmt: skip
    ids = torch.randint(0, V, (n, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(n, 8, dtype=torch.long)
    mask[1, -2:] = 0
    y = torch.arange(n) % 3

    def batch():
        return model(input_ids=ids, attention_mask=mask, labels=y).loss

    def one(i):
        s = slice(i, i + 1)
        return model(input_ids=ids[s], attention_mask=mask[s], labels=y[s]).loss

    return model, batch, one


@pytest.mark.parametrize("n", [3, 4])
def test_funnel_attention_is_exact_from_the_first_step(n):
    """Funnel's attention combines ``r_kernel``, ``seg_embed`` and its biases with the queries
    in ``einsum``. Until 2026-12-06 those einsums had no rule: the torch.func fallback re-ran
    the attention per example from step 2, and at N = 4 — the second block's pooled positions
    have 4 rows with 8 tokens — it split them as if they were the examples, refused. The
    einsums of a per-example operand led by the examples with a shared one are met as
    expansions now (a hunt's Wav2Vec2-BERT): exact from the first step at either size."""
    model, batch, one = _funnel(n)
    errors = _steps_against_brute_force(model, batch, one, n, steps=4)
    assert all(e[0] is not None and e[0] < RTOL for e in errors), errors


def test_accumulation_on_the_step_the_engine_learns_on():
    """Mamba2 uses its ``conv1d``'s weight and bias directly in the forward, which the engine
    learns on step 1 (left out) and follows from step 2. With two micro-batches a step, the
    second micro-batch of step 1 ran before that and was refused ("received gradients but
    noisescale saw no use of them"); it is now left out with the first, and every micro-batch
    of the later steps is exact."""
    torch.manual_seed(0)
    model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        vocab_size=V, hidden_size=16, num_hidden_layers=2, state_size=8, expand=2, head_dim=8,
        num_heads=4, n_groups=1, conv_kernel=4, chunk_size=4, use_cache=False,
    )).train()  # fmt: skip
    micro = [_losses(model, "lm", seed=s) for s in (0, 1)]
    errors = _steps_against_brute_force(model, *micro[0], N, steps=4, passes=2, micro=micro)
    assert errors[0] == [None, None]
    assert all(e is not None and e < RTOL for step in errors[1:] for e in step), errors
    history, said = _train(
        model, micro[0][0], 3, passes=lambda step: 2, micro_batches=[b for b, _ in micro]
    )
    assert len(history) == 3
    assert [r["skipped"] for r in history] == [False, False, False]
    assert any("an earlier micro-batch of this step taught the engine" in s for s in said)


def test_router_logits_returned_without_labels_name_the_setting_not_an_auxiliary_loss():
    """Qwen3-MoE with ``output_router_logits=True`` called without ``labels=``: the model adds
    no auxiliary loss, but returns its routers' logits, one row per token of the batch — the
    router's weight used directly on the flattened tokens, ``F.linear(h.reshape(-1, D), W)``.
    Refused until 2026-12-06 (naming them and ``output_router_logits=False``; before, blaming
    the auxiliary loss "given labels"): that product is now measured on the rows unflattened,
    where their history proves them each example's in turn, so the model is exact as it is,
    as with only the logits returned."""
    torch.manual_seed(0)
    n = 3  # (not the 4 experts)
    lm = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16, head_dim=8,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
        output_router_logits=True, router_aux_loss_coef=0.01, experts_implementation="batched_mm",
    )).train()  # fmt: skip
    ids = _ids(n=n)

    def loss(model, s, wrapped):
        out = model(input_ids=ids[s])
        logits = out if wrapped else out.logits
        k = logits.shape[0]
        flat = F.cross_entropy(
            logits[:, :-1].reshape(-1, V), ids[s][:, 1:].reshape(-1), reduction="none"
        )
        return flat.view(k, -1).mean(1)

    params = [p for p in lm.parameters() if p.requires_grad]
    want = torch.stack([
        sum(g.pow(2).sum() for g in torch.autograd.grad(
            loss(lm, slice(i, i + 1), False)[0], params, allow_unused=True)
            if g is not None)
        for i in range(n)
    ])  # fmt: skip
    with noisescale.per_example_sqnorms(lm) as pe:
        loss(lm, slice(None), False).mean().backward()
    assert float(((pe.sqnorms - want).abs() / want).max()) < 1e-6

    class LogitsOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, x):
            return self.lm(input_ids=x).logits

    lm.zero_grad()
    wrapped = LogitsOnly()
    params = [p for p in lm.parameters() if p.requires_grad]
    want = torch.stack([
        sum(g.pow(2).sum() for g in torch.autograd.grad(
            loss(wrapped.lm, slice(i, i + 1), False)[0], params, allow_unused=True)
            if g is not None)
        for i in range(n)
    ])  # fmt: skip
    with noisescale.per_example_sqnorms(wrapped) as pe:
        F.cross_entropy(
            wrapped(ids)[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none"
        ).view(n, -1).mean(1).mean().backward()
    # (the router's softmax and the loss run in float32 inside the model: 1e-6 relative)
    assert float(((pe.sqnorms - want).abs() / want).max()) < 1e-6


@pytest.mark.parametrize("n", [2, 3])
def test_the_routers_loss_added_by_hand_is_named_at_as_many_experts_as_examples(n):
    """Mixtral's routers' load-balancing loss added to a loss written by hand, ``ce +
    0.5 * out.aux_loss``: it combines the examples, refused. With as many experts as examples
    (E = N = 3) the router logits [N·T, E] have the batch's size outside dim 0, and until
    2026-12-07 the refusal named only that shape (a hunt) — at N = 2 the routers' loss; it
    leads with the routers' loss at every N now."""
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=V, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        num_local_experts=3, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=0.5, experts_implementation="batched_mm",
    )).eval()  # fmt: skip
    ids = _ids(n=n)
    with pytest.raises(UnsupportedModuleError) as err:
        with noisescale.per_example_sqnorms(model):
            out = model(input_ids=ids)
            ce = F.cross_entropy(out.logits[:, :-1].transpose(1, 2), ids[:, 1:])
            (ce + 0.5 * out.aux_loss).backward()
    said = str(err.value)
    assert said.startswith("This model returns its routers' logits"), said
    assert "output_router_logits=True, router_aux_loss_coef=0.5" in said, said


@pytest.mark.parametrize("n", [3, 4])
def test_recurrent_gemma_s_gates_are_refused_with_both_possible_causes(n):
    """RecurrentGemma's RG-LRU computes its gates from activations moved to [heads, N·T,
    width] for a ``baddbmm`` and back: their rows are the examples', reached in a layout the
    engine does not follow, and the scan multiplies them with a zero initial state (no
    history). The refusal advised only "a batch size other than N" — refused alike at every
    N; it now names both possibilities, and a rule or per_example=False for this one."""
    torch.manual_seed(0)
    model = transformers.RecurrentGemmaForCausalLM(transformers.RecurrentGemmaConfig(
        num_hidden_layers=2, vocab_size=V, hidden_size=16, intermediate_size=32,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, lru_width=16,
        attention_window_size=4, conv1d_width=4, block_types=["recurrent", "attention"],
        partial_rotary_factor=0.5, pad_token_id=0, use_cache=False,
    )).train()  # fmt: skip
    ids, mask = _ids(n=n), _mask(n)
    with pytest.raises(
        UnsupportedModuleError,
        match=rf"batch's size \({n}\).*If it is such a table, use a batch size other than {n}.*"
        r"If its rows are the examples'.*register a rule for the module that computes it",
    ):
        with noisescale.per_example_sqnorms(model) as _:
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()


def _moe_refusal(model) -> str:
    ids, mask = _ids(), _mask()
    with pytest.raises(UnsupportedModuleError) as info:
        with noisescale.per_example_sqnorms(model) as _:
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    return str(info.value)


def test_moe_refusals_do_not_advise_a_setting_that_would_change_nothing():
    """GPT-OSS already on ``experts_implementation="batched_mm"`` is refused for its expert
    biases (gathered per token, added in place: no per-example rule); the refusal advised
    'batched_mm', already set. DBRX's experts are a loop written by hand that ignores the
    setting; its refusal advised it too. Each now says what holds."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
    )  # fmt: skip
    gpt_oss = transformers.GptOssForCausalLM(transformers.GptOssConfig(
        **common, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], experts_implementation="batched_mm",
    )).train()  # fmt: skip
    text = _moe_refusal(gpt_oss)
    assert "bias" in text and "already runs transformers' batched expert product" in text, text
    assert "experts_implementation='batched_mm' is followed" not in text
    dbrx = transformers.DbrxForCausalLM(transformers.DbrxConfig(
        vocab_size=V, d_model=16, n_heads=2, n_layers=2, max_seq_len=16,
        attn_config=dict(kv_n_heads=1, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2),
        resid_pdrop=0.0, emb_pdrop=0.0,
    )).train()  # fmt: skip
    text = _moe_refusal(dbrx)
    assert "is written by hand" in text and "would not change them" in text, text
    assert "'batched_mm' is followed" not in text and "build it with" not in text


@pytest.mark.parametrize("n", [4, 3])
def test_transformers_default_grouped_experts_are_exact_with_as_many_experts_as_examples(n):
    """transformers' default expert kernel (``experts_implementation="grouped_mm"``, one grouped
    product per layer over the tokens routed to each expert, float32) is measured like any
    shared computation whose rows are the examples' tokens. Its offsets [E] have one entry per
    expert; with as many experts as examples (N = E = 4) they were taken for the examples' and
    the step refused as '_grouped_mm' with no per-example rule — an earlier helper's sweep ran
    at N = E and this test asserted that refusal, while the same model was exact at the other
    N it tried (a hunt of 2026-12-05: OLMoE and six more MoE families refused at N = E). Exact
    at N = E and N = 3, one-shot and in the tracker (Qwen2-MoE, with padding). (Still refused:
    routed tokens that number exactly N — one-token sequences, top-1 — taken for the
    examples' rows, sorted by expert.)"""
    torch.manual_seed(0)
    model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=16,
    )).float().train()  # fmt: skip
    if model.config._experts_implementation != "grouped_mm":
        pytest.skip("this transformers' default expert kernel is not grouped_mm")
    ids, mask = _ids(n=n), _mask(n=n)

    def losses():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        per_token = F.cross_entropy(
            logits.reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none"
        ).view(n, -1)
        return (per_token * mask[:, 1:]).sum(1)

    with noisescale.per_example_sqnorms(model, loss_reduction="sum") as pe:
        losses().sum().backward()
    params = [p for p in model.parameters() if p.requires_grad]
    want = torch.stack([
        sum(g.pow(2).sum() for g in torch.autograd.grad(losses()[i], params) if g is not None)
        for i in range(n)
    ])  # fmt: skip
    torch.testing.assert_close(pe.sqnorms, want, rtol=1e-5, atol=0)
    # the tracker (its default source: sub-batches) measures its steps, refusing none
    model.zero_grad()
    tracker = noisescale.GradientNoiseTracker(model)
    try:
        for _ in range(3):
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
            tracker.step()
            model.zero_grad()
        assert len(tracker.history) == 3
    finally:
        tracker.remove()


def test_grouped_experts_with_a_lora_and_as_many_experts_as_examples_are_exact():
    """Qwen3-MoE on transformers' default ``grouped_mm`` experts (float32) with peft's LoRA on
    q_proj and on the stacked experts' gate_up_proj: the down_proj product then runs on token
    rows built from the adapters (shared) with the frozen grouped weight [E, d, o], whose dim 0
    has the batch's size at N = E = 4 — taken for the examples' and every step refused as
    '_grouped_mm' with no per-example rule until 2026-12-06 (a hunt; exact at N = 3 and 8). A
    frozen grouped weight holds no example: its adapters learned at the first pass (read from
    the experts' parametrization), the engine's passes then equal brute force, per example and
    by 2 sub-batches."""
    peft = pytest.importorskip("peft")
    from test_subbatch import subbatch_truth

    torch.manual_seed(0)
    base = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        max_position_embeddings=16, num_experts=N, num_experts_per_tok=2,
        experts_implementation="grouped_mm",
    )).float()  # fmt: skip
    config = peft.LoraConfig(
        r=2, target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj"]
    )
    model = peft.get_peft_model(base, config).train()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))  # (LoRA's B starts at 0)
    ids = _ids()

    def losses() -> torch.Tensor:
        logits = model(input_ids=ids).logits[:, :-1]
        per_token = F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none")
        return per_token.view(N, -1).mean(1)

    params = [p for p in model.parameters() if p.requires_grad]
    truth = torch.stack([
        sum(g.pow(2).sum() for g in torch.autograd.grad(losses()[i], params) if g is not None)
        for i in range(N)
    ])  # fmt: skip
    for subbatches in (0, 2):
        engine = PerExampleNorms(model, subbatches=subbatches)
        engine.RECHECK_SUBBATCHES = 1
        measured = 0
        try:
            for step in range(3):
                model.zero_grad()
                losses().mean().backward()
                (p,) = engine.collect()
                if p.raw_sqnorms is None:
                    assert step == 0, p.withheld
                    continue
                if subbatches:
                    with engine.paused():
                        want = subbatch_truth(model, lambda i: losses()[i], N, p.subbatches)
                else:
                    want = truth / N**2
                torch.testing.assert_close(p.raw_sqnorms, want, rtol=1e-5, atol=0)
                measured += 1
        finally:
            engine.remove()
        assert measured == 2


@pytest.mark.parametrize("problem", ["multi_label_classification", "regression"])
def test_a_model_s_own_loss_from_floating_point_labels_is_a_mean_over_examples(problem):
    """BERT classifying with several labels at once (BCEWithLogitsLoss over [N, C] float
    labels) or regressing C targets (MSELoss): a mean over every element of equal-sized
    per-example terms, so each example weighs 1/N. The tracker refused it, reading the float
    labels as tokens and telling the user to declare loss_reduction='token_mean' — which then
    counted each example's non-zero labels as its tokens and weighed examples by how many
    labels they score (ViLT's answer scores, helper-found). Now measured as the mean it is,
    exact against brute force, and 'token_mean' with such labels refused, naming 'mean'."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3, problem_type=problem,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ))  # fmt: skip
    ids, mask = _ids(), _mask()
    labels = (torch.rand(N, 3) > 0.5).double() if problem != "regression" else torch.randn(N, 3)
    labels[0] = torch.tensor([1.0, 0.0, 0.0]) if problem != "regression" else labels[0]

    def batch():
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    def one(i):
        s = slice(i, i + 1)
        return model(input_ids=ids[s], attention_mask=mask[s], labels=labels[s]).loss

    assert_exact(model, batch, one)
    history, warned = _train(model, batch, 3)
    assert not any(r["skipped"] for r in history[1:]), history
    assert not [w for w in warned if "noisescale" in w and "step 1" not in w], warned
    tracker = noisescale.GradientNoiseTracker(model, "token_mean")
    with pytest.raises(NoiseScaleInputError, match=r"floating-point labels=.*reduction='mean'"):
        batch()
    tracker.remove()


def test_longformer_s_sequence_first_layers_are_refused_naming_the_layout():
    """Longformer (and LED, XLNet) transposes its hidden states to sequence-first inside its
    attention: the query projection runs on [T, N, D]. Refused — noisescale needs the examples
    along dim 0 — but the message guessed 'if the examples were flattened together with
    another dimension' (T = 2N) or cited packed RNN cells; it now names the layout."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LongformerForMaskedLM(transformers.LongformerConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attention_window=[4, 4], pad_token_id=1,
    )).train()  # fmt: skip
    ids = _ids()
    with pytest.raises(UnsupportedModuleError, match=r"sequence-first \(time-major\) activation"):
        with noisescale.per_example_sqnorms(model) as _:
            model(input_ids=ids, labels=ids).loss.backward()


def test_a_model_s_own_loss_from_float_labels_not_known_to_be_a_mean_is_refused():
    """GLPN's depth loss (SiLog: a square root of means over every valid pixel of the batch)
    couples the examples and weighs them by their valid pixels. Taking every float-label loss
    for a mean over examples (tried this session) measured it 9–35% off without a word (a
    review); the one-shot measurement with all pixels valid was up to 5.8% off before that.
    Only transformers' classifiers with a multi-label or regression problem type are known to
    be means; any other float-label loss is refused in both modes, naming the fix."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GLPNForDepthEstimation(transformers.GLPNConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
        patch_sizes=[3, 3], strides=[2, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
        decoder_hidden_size=8, max_depth=10, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, drop_path_rate=0.0,
    )).train()  # fmt: skip
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # (frozen: refused in training mode otherwise)
            module.eval()
            module.requires_grad_(False)
    pixels = torch.randn(N, 3, 16, 16)
    labels = torch.rand(N, 32, 32) * 5 + 0.5  # (every pixel valid)
    # (since 2026-12-05 the loss computed in the forward is followed, and its coupling is
    # named first: the square root of the batch's means)
    match = (
        r"floating-point labels=.*cannot tell how that loss weighs the examples"
        r"|the loss combines the examples.*inside the model's own forward code"
    )
    with pytest.raises(NoiseScaleInputError, match=match):
        with noisescale.per_example_sqnorms(model) as _:
            model(pixel_values=pixels, labels=labels).loss.backward()
    model.zero_grad()
    tracker = noisescale.GradientNoiseTracker(model)
    try:
        model(pixel_values=pixels, labels=labels).loss.backward()
        with pytest.raises(NoiseScaleInputError, match=match):
            tracker.step()
    finally:
        tracker.remove()


def test_an_audio_frame_classifier_s_own_loss_from_one_hot_labels_is_exact():
    """Wav2Vec2's frame classifier takes one-hot float labels [N, T, C] and averages the
    cross-entropy over every frame: a mean over the examples (T frames each). Its problem_type
    is never set, so narrowing float labels to classifiers with one refused it (a review);
    known frame classifiers and ViLT's and VisualBERT's question answering are means."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForAudioFrameClassification(transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2, num_labels=3, hidden_dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0,
        mask_time_prob=0.0, do_stable_layer_norm=True, feat_extract_norm="layer",
    )).train()  # fmt: skip
    x = torch.randn(N, 400)
    with torch.no_grad():
        frames = model(input_values=x).logits.shape[1]
    labels = F.one_hot(torch.randint(0, 3, (N, frames)), 3).to(x.dtype)

    def batch():
        return model(input_values=x, labels=labels).loss

    def one(i):
        return model(input_values=x[i : i + 1], labels=labels[i : i + 1]).loss

    assert_exact(model, batch, one, subbatches=False)


class _VQ(nn.Module):
    """A VQ-VAE's quantizer with the codebook and commitment losses and the straight-through
    estimator; the codebook looked up by the latents' nearest code, as VQ-VAE code writes it."""

    def __init__(self, how: str, codes: int = 5, d: int = 6):
        super().__init__()
        self.how, self.d = how, d
        self.enc, self.dec = nn.Linear(4, d), nn.Linear(d, 4)
        self.codebook = nn.Parameter(torch.randn(codes, d))
        self.emb = nn.Embedding(codes, d)

    def forward(self, x):
        z = self.enc(x)  # [N, T, D]
        table = self.emb.weight if "module" in self.how else self.codebook
        idx = torch.cdist(z.reshape(-1, self.d), table).argmin(-1)  # [N·T]
        if self.how.endswith("kept"):  # the fix the refusal names
            idx = idx.view(z.shape[:-1])
        if self.how.startswith("index"):
            q = self.codebook[idx]
        elif self.how.startswith("F.embedding"):
            q = F.embedding(idx, self.codebook)
        else:
            q = self.emb(idx)
        q = q.view_as(z)
        commit = 0.25 * (q.detach() - z).pow(2).mean((1, 2)) + (q - z.detach()).pow(2).mean((1, 2))
        return self.dec(z + (q - z).detach()), commit


@pytest.mark.parametrize("how", ["index", "F.embedding", "module"])
def test_a_codebook_looked_up_by_flattened_indices_is_refused_naming_the_lookup_and_the_fix(how):
    """codebook[cdist(z.reshape(-1, D), codebook).argmin(-1)].view_as(z): the indices carry no
    history, so which example each looked-up row belongs to is not known — refused (with M = 5
    codes ≠ N), the message leading with that lookup and the fix (until 2026-12-06 it led with
    a table whose size equals the batch's by coincidence, a hunt); the fix, the indices viewed
    [N, T] before the lookup, is exact against brute force (one-shot and sub-batches)."""
    n = 3
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 4, 4, generator=g), torch.randn(n, 4, 4, generator=g)

    def losses(model):
        out, commit = model(x)
        return (out - y).pow(2).mean((1, 2)) + commit

    torch.manual_seed(0)
    model = _VQ(how)
    with pytest.raises(UnsupportedModuleError) as refused:
        with noisescale.per_example_sqnorms(model, loss_reduction="mean"):
            losses(model).mean().backward()
    message = str(refused.value)
    assert message.startswith("rows of ['"), message
    assert "looked up by integer indices of 12 = 3 × 4 rows" in message, message
    assert "a codebook looked up by flattened indices" in message, message
    assert "idx.view(z.shape[:-1])" in message, message
    torch.manual_seed(0)
    model = _VQ(how + " kept")
    model.zero_grad()
    with noisescale.per_example_sqnorms(model, loss_reduction="mean") as pe:
        losses(model).mean().backward()
    model.zero_grad()
    want = example_sqnorms(model, lambda i: losses(model)[i], n)
    torch.testing.assert_close(pe.sqnorms, want, rtol=1e-9, atol=0)
    assert_subbatches_exact(model, lambda: losses(model).mean(), lambda i: losses(model)[i], n, k=2)
