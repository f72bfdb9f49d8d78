"""The random model grammar of the differential fuzzer (tests/fuzz_runner.py).

`make_case(seed)` draws one small model, its data and its loss from a seed: a stem (Embedding,
EmbeddingBag with or without offsets, Linear, Conv2d or none), one to four blocks from 75
kinds (Linear layers in many layouts, norms, convolutions, attention, recurrent layers, gating,
residuals, positions, weights shared or reused, batch-dim re-layouts, and on about 8% of seeds
one block that mixes the examples), a pool, a head (Linear or tied to the embedding) and a loss
(CE in four forms, MSE mean or sum, an optional L2 penalty or auxiliary head, frozen
parameters) written in one of four forms: plain, split forward (the batch through the model in
two forwards, one backward), two views, or learnable uncertainty weighting. Everything is
float64: call it, and run the model, with float64 as torch's default dtype (the runner does).

It returns `(spec, model, x, per_example_loss)`. `per_example_loss(model, idx)` is the vector of
the examples' losses for `x[idx]`, so the training loss is its mean or sum (`spec["reduction"]`)
and the brute-force truth is one backward of `per_example_loss(model, slice(i, i + 1))` per
example. For two views, where the engine counts each view's loss as a row of its own,
`per_example_loss.rows = (2N, row_loss)` gives each row's loss.

This is grammar v3 of the first fuzzing session (2026-12, notes/s47): the seeds its report cites
(20205, 61042, 62724, ...) draw the same cases here, so keep every draw from the random
generators in its place when editing; add new kinds at the end of a list only if changing the
meaning of old seeds is acceptable (it is not for tests/test_fuzz_models.py's seeds).
`override` (a dict) replaces entries of the spec before the model is built, to replay a seed
with one thing changed.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn


class HandRMS(nn.Module):
    """An RMSNorm written by hand (the engine sees its parameter used directly, not a layer)."""

    def __init__(self, d):
        super().__init__()
        self.g = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, h):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * self.g


class Block(nn.Module):
    """One op of the grammar on h: [N, T, D] -> [N, T', D]."""

    def __init__(self, kind, d, t, rng, ctx):
        super().__init__()
        self.kind = kind
        self.d = d
        r = rng
        if kind == "linear":
            self.m = nn.Linear(d, d, bias=r.random() < 0.7)
            self.act = r.choice(["tanh", "gelu", "none", "relu"])
        elif kind == "linear_flat":  # applied on [N*T, D]
            self.m = nn.Linear(d, d, bias=r.random() < 0.5)
        elif kind == "linear_T":  # mixes positions: transpose, Linear(T,T)
            self.m = nn.Linear(t, t, bias=r.random() < 0.5)
        elif kind == "layernorm":
            self.m = nn.LayerNorm(d, elementwise_affine=True, bias=r.random() < 0.7)
        elif kind == "rmsnorm":
            self.m = nn.RMSNorm(d)
        elif kind == "handrms":
            self.m = HandRMS(d)
        elif kind == "groupnorm":
            g = r.choice([g for g in (1, 2, d) if d % g == 0])
            self.m = nn.GroupNorm(g, d)
        elif kind == "conv1d":
            groups = r.choice([g for g in (1, 2) if d % g == 0])
            k = r.choice([1, 2, 3])
            dil = r.choice([1, 2]) if k > 1 else 1
            mode = r.choice(["zeros", "reflect", "replicate", "circular"])
            pad = "same"
            if mode == "reflect" and dil * (k - 1) // 2 + 1 > t - 1:
                mode = "zeros"
            if mode == "circular" and dil * (k - 1) > t:
                mode = "zeros"
            self.m = nn.Conv1d(
                d,
                d,
                k,
                padding=pad,
                dilation=dil,
                groups=groups,
                padding_mode=mode,
                bias=r.random() < 0.7,
            )
        elif kind == "mha":
            heads = r.choice([h for h in (1, 2) if d % h == 0])
            self.m = nn.MultiheadAttention(d, heads, batch_first=True, bias=r.random() < 0.7)
            self.causal = r.random() < 0.4
        elif kind in ("gru", "lstm"):
            cls = nn.GRU if kind == "gru" else nn.LSTM
            self.bidir = r.random() < 0.3
            self.m = cls(
                d,
                d // 2 if self.bidir else d,
                batch_first=True,
                bidirectional=self.bidir,
                num_layers=r.choice([1, 1, 2]),
                bias=r.random() < 0.8,
            )
        elif kind in ("gru_tm", "lstm_tm"):  # time-major
            cls = nn.GRU if kind == "gru_tm" else nn.LSTM
            self.m = cls(d, d, batch_first=False)
        elif kind == "rnncell":
            self.m = nn.GRUCell(d, d)
        elif kind == "gate":
            self.a = nn.Linear(d, d)
            self.b = nn.Linear(d, d, bias=False)
        elif kind == "layerscale":
            self.g = nn.Parameter(0.5 + 0.1 * torch.randn(d))
        elif kind == "postable":
            self.p = nn.Parameter(0.3 * torch.randn(1, t, d))
        elif kind == "clstoken":
            self.c = nn.Parameter(0.3 * torch.randn(1, 1, d))
        elif kind == "handattn":
            self.q = nn.Linear(d, d)
            self.k = nn.Linear(d, d, bias=False)
            self.v = nn.Linear(d, d)
        elif kind == "residual":
            inner = r.choice(["linear", "gate", "mha", "layernorm", "handattn", "conv1d"])
            self.inner = Block(inner, d, t, r, ctx)
        elif kind == "share_prev":  # reuse an earlier linear (weight sharing across depth)
            self.ref = [ctx["linears"][-1]] if ctx["linears"] else None
        elif kind == "weight_reuse":  # x @ lin.weight.T next to the module call
            self.m = nn.Linear(d, d)
        elif kind == "cat_split":
            self.m1 = nn.Linear(d, d // 2 if d % 2 == 0 else d)
            self.m2 = nn.Linear(d, d - (d // 2 if d % 2 == 0 else d) or d)
            self.split = True
        elif kind == "chunk":
            self.m = nn.Linear(d, 2 * d)
        elif kind == "masked":
            self.m = nn.Linear(d, d)
        elif kind == "einsum_param":  # a bare parameter matrix used through einsum
            self.w = nn.Parameter(0.3 * torch.randn(d, d))
        elif kind == "bilinear":
            self.m = nn.Bilinear(d, d, d)
        elif kind == "prelu":
            self.m = nn.PReLU(d)
        elif kind == "ln_then_lin_shared_in":  # two linears reading the same input
            self.a = nn.Linear(d, d)
            self.b = nn.Linear(d, d)
        elif kind == "dropout_eval":
            self.m = nn.Dropout(0.5)
        elif kind == "permute_flat":  # [N,T,D] -> [N, T*D] linear -> back
            self.m = nn.Linear(t * d, t * d, bias=r.random() < 0.5)
        elif kind == "slice":
            pass
        elif kind in ("bn_eval", "bn_train"):
            self.m = nn.BatchNorm1d(d)
        elif kind in (
            "batchmean",
            "roll",
            "inbatch_attn",
            "sortbatch",
            "linear_tm",
            "regroup",
            "scramble",
            "unsqueeze_lin",
        ):
            self.m = nn.Linear(d, d)
        elif kind == "lin_4d":
            self.m = nn.Linear(d // 2, d // 2)
        elif kind == "convT":
            self.m = nn.ConvTranspose1d(d, d, 2, bias=r.random() < 0.7)
        elif kind == "conv_stride":
            self.m = nn.Conv1d(d, d, 2, stride=2, padding=1)
        elif kind == "temperature":
            self.s = nn.Parameter(torch.tensor(1.3))
        elif kind == "inplace":
            self.m = nn.Linear(d, d)
            self.act = nn.ReLU(inplace=True)
        elif kind == "two_calls":
            self.m = nn.Linear(d, d)
        elif kind == "param_two_modules":
            self.a = nn.Linear(d, d)
            self.b = nn.Linear(d, d)
            self.b.weight = self.a.weight
        elif kind in ("gather", "where"):
            self.m = nn.Linear(d, d)
        elif kind == "flinear":
            self.w = nn.Parameter(0.3 * torch.randn(d, d))
            self.b = nn.Parameter(0.1 * torch.randn(d))
        elif kind == "prompt":
            self.p = nn.Parameter(0.3 * torch.randn(1, 2, d))
            self.m = nn.Linear(d, d)
        elif kind == "param_lin_bias":
            self.p = nn.Parameter(0.3 * torch.randn(d))
            self.m = nn.Linear(d, d)
        elif kind == "lora":
            self.m = nn.Linear(d, d)
            self.A = nn.Linear(d, 2, bias=False)
            self.B = nn.Linear(2, d, bias=False)
        elif kind in ("repeat_batch", "repeat_interleave", "expand_views"):
            self.m = nn.Linear(d, d)
        elif kind == "ln_noaffine_lin":
            self.ln = nn.LayerNorm(d, elementwise_affine=False)
            self.m = nn.Linear(d, d)
        elif kind == "emb_pos":
            self.e = nn.Embedding(8, d)
        elif kind == "conv2d_inner":
            self.m = nn.Conv2d(
                1, 1, 3, padding=1, padding_mode=r.choice(["zeros", "circular", "replicate"])
            )
        elif kind == "instnorm":
            self.m = nn.InstanceNorm1d(d, affine=True)
        elif kind == "double_pass_same_mod":
            self.m = nn.Linear(d, d)
        elif kind == "packed_gru":
            self.m = nn.GRU(d, d, batch_first=True)
        elif kind == "packed_lstm":
            self.m = nn.LSTM(d, d, batch_first=True)
        elif kind == "ln2d":
            self.m = nn.LayerNorm([t, d])
        elif kind == "lstm_proj":
            self.m = nn.LSTM(d, d, batch_first=True, proj_size=d // 2)
            self.o = nn.Linear(d // 2, d)
        elif kind == "sdpa":
            self.qkv = nn.Linear(d, 3 * d)
            self.causal = r.random() < 0.5
        elif kind == "tel":
            self.m = nn.TransformerEncoderLayer(
                d,
                r.choice([1, 2]),
                dim_feedforward=8,
                dropout=0.1,
                batch_first=True,
                norm_first=r.random() < 0.5,
            )
        elif kind == "param_slice":
            self.W = nn.Parameter(0.3 * torch.randn(2 * d, d))
        elif kind == "bmm_expand":
            self.W = nn.Parameter(0.3 * torch.randn(d, d))
        elif kind == "ckpt":
            self.m = nn.Linear(d, d)
            self.ln = nn.LayerNorm(d)
        elif kind == "unfold_lin":
            self.m = nn.Linear(2 * d, d)
        elif kind == "mha_kpm":
            self.m = nn.MultiheadAttention(d, 1, batch_first=True)
        elif kind == "cross_attn_param":  # learned queries attend to the sequence
            self.q = nn.Parameter(0.3 * torch.randn(1, 2, d))
            self.m = nn.MultiheadAttention(d, 1, batch_first=True)
        else:
            raise ValueError(kind)
        if hasattr(self, "m") and isinstance(self.m, nn.Linear):
            ctx["linears"].append(self.m)

    def forward(self, h):
        k = self.kind
        N, T, D = h.shape
        if k == "linear":
            y = self.m(h)
            return {"tanh": torch.tanh, "gelu": F.gelu, "none": lambda z: z, "relu": F.relu}[
                self.act
            ](y)
        if k == "linear_flat":
            return torch.tanh(self.m(h.reshape(N * T, D))).reshape(N, T, D)
        if k == "linear_T":
            if self.m.in_features != T:
                return h
            return self.m(h.transpose(1, 2)).transpose(1, 2)
        if k in ("layernorm", "rmsnorm", "handrms"):
            return self.m(h)
        if k == "groupnorm":
            return self.m(h.transpose(1, 2)).transpose(1, 2)
        if k == "conv1d":
            return torch.tanh(self.m(h.transpose(1, 2)).transpose(1, 2))
        if k == "mha":
            mask = None
            if self.causal:
                mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
            return self.m(h, h, h, attn_mask=mask, need_weights=False)[0]
        if k in ("gru", "lstm"):
            return self.m(h)[0]
        if k in ("gru_tm", "lstm_tm"):
            return self.m(h.transpose(0, 1))[0].transpose(0, 1)
        if k == "rnncell":
            s = torch.zeros(N, D)
            outs = []
            for t in range(T):
                s = self.m(h[:, t], s)
                outs.append(s)
            return torch.stack(outs, 1)
        if k == "gate":
            return self.a(h) * torch.sigmoid(self.b(h))
        if k == "layerscale":
            return h * self.g
        if k == "postable":
            if self.p.shape[1] != T:
                return h + self.p[:, :1]
            return h + self.p
        if k == "clstoken":
            return torch.cat([self.c.expand(N, -1, -1), h], 1)
        if k == "handattn":
            q, kk, v = self.q(h), self.k(h), self.v(h)
            a = torch.softmax(q @ kk.transpose(1, 2) / D**0.5, -1)
            return a @ v
        if k == "residual":
            return h + self.inner(h)
        if k == "share_prev":
            if self.ref is None:
                return h
            return torch.tanh(self.ref[0](h))
        if k == "weight_reuse":
            return self.m(h) + torch.tanh(h @ self.m.weight.T)
        if k == "cat_split":
            return torch.cat([self.m1(h), self.m2(h)], -1)[..., :D]
        if k == "chunk":
            a, b = self.m(h).chunk(2, -1)
            return a * torch.sigmoid(b)
        if k == "masked":
            y = self.m(h)
            return y.masked_fill(h > 0.5, 0.0)
        if k == "einsum_param":
            return torch.einsum("ntd,ed->nte", h, self.w)
        if k == "bilinear":
            return torch.tanh(self.m(h, h))
        if k == "prelu":
            return self.m(h.transpose(1, 2)).transpose(1, 2)
        if k == "ln_then_lin_shared_in":
            return self.a(h) + torch.tanh(self.b(h))
        if k == "dropout_eval":
            return self.m(h)
        if k == "permute_flat":
            if self.m.in_features != T * D:
                return h
            return torch.tanh(self.m(h.flatten(1))).unflatten(1, (T, D))
        if k == "slice":
            return h[:, 1:] if T > 2 else h
        if k in ("bn_eval", "bn_train"):
            return self.m(h.transpose(1, 2)).transpose(1, 2)
        if k == "batchmean":
            y = self.m(h)
            return y - y.mean(0, keepdim=True)
        if k == "roll":
            y = self.m(h)
            return y + 0.5 * y.roll(1, 0)
        if k == "inbatch_attn":
            y = self.m(h).flatten(1)
            a = torch.softmax(y @ y.T, -1)
            return (a @ y).view(N, T, D)
        if k == "sortbatch":
            y = self.m(h)
            order = y[:, 0, 0].argsort()
            return y[order]
        if k == "linear_tm":
            return torch.tanh(self.m(h.transpose(0, 1))).transpose(0, 1)
        if k == "regroup":
            if N % 2:
                return h
            return torch.tanh(self.m(h.reshape(N // 2, 2 * T, D))).reshape(N, T, D)
        if k == "scramble":
            return (
                torch.tanh(self.m(h.transpose(0, 1).reshape(N, T, D)))
                .reshape(T, N, D)
                .transpose(0, 1)
            )
        if k == "unsqueeze_lin":
            return torch.tanh(self.m(h.unsqueeze(0)))[0]
        if k == "lin_4d":
            if D % 2:
                return h
            return self.m(h.view(N, T, 2, D // 2)).view(N, T, D)
        if k == "convT":
            return torch.tanh(self.m(h.transpose(1, 2))[..., :T].transpose(1, 2))
        if k == "conv_stride":
            return torch.tanh(self.m(h.transpose(1, 2)).transpose(1, 2))
        if k == "temperature":
            return h * self.s
        if k == "inplace":
            y = self.m(h)
            y.mul_(0.7)
            return self.act(y) + 0.1 * h
        if k == "two_calls":
            if T < 2:
                return self.m(h)
            return torch.cat([self.m(h[:, :1]), torch.tanh(self.m(h[:, 1:]))], 1)
        if k == "param_two_modules":
            return self.a(h) + torch.tanh(self.b(h))
        if k == "gather":
            idx = h[..., 0].argsort(1).unsqueeze(-1).expand(N, T, D)
            return self.m(h.gather(1, idx))
        if k == "where":
            return torch.where(h > 0, self.m(h), h)
        if k == "flinear":
            return torch.tanh(F.linear(h, self.w, self.b))
        if k == "prompt":
            pr = self.m(self.p)
            return torch.cat([pr.expand(N, -1, -1), h], 1)[:, :T] + h
        if k == "param_lin_bias":
            return h + self.m(self.p)
        if k == "lora":
            return self.m(h) + self.B(self.A(h))
        if k == "repeat_batch":
            y = torch.tanh(self.m(h.repeat(2, 1, 1)))
            return y[:N] + 0.5 * y[N:] * h
        if k == "repeat_interleave":
            y = torch.tanh(self.m(h.repeat_interleave(2, 0))).view(N, 2, T, D)
            return y[:, 0] * y[:, 1] + y[:, 0]
        if k == "expand_views":
            v = torch.stack([h, h.flip(1)], 1).reshape(N * 2, T, D)
            return torch.tanh(self.m(v)).view(N, 2, T, D).sum(1)
        if k == "ln_noaffine_lin":
            return self.m(self.ln(h))
        if k == "emb_pos":
            pos = torch.arange(T).clamp(max=7)
            return h + self.e(pos)
        if k == "conv2d_inner":
            return self.m(h.unsqueeze(1)).squeeze(1)
        if k == "instnorm":
            return self.m(h.transpose(1, 2)).transpose(1, 2)
        if k == "double_pass_same_mod":
            return self.m(torch.tanh(self.m(h)))
        if k in ("packed_gru", "packed_lstm"):
            lengths = (1 + (h[:, :, 0].detach().abs() * 7).long() % T)[:, 0]
            pk = nn.utils.rnn.pack_padded_sequence(
                h, lengths, batch_first=True, enforce_sorted=False
            )
            o, _ = self.m(pk)
            o, _ = nn.utils.rnn.pad_packed_sequence(o, batch_first=True, total_length=T)
            return o
        if k == "ln2d":
            if self.m.normalized_shape[0] != T:
                return h
            return self.m(h)
        if k == "lstm_proj":
            return self.o(self.m(h)[0])
        if k == "sdpa":
            q, kk, v = self.qkv(h).chunk(3, -1)
            return F.scaled_dot_product_attention(q, kk, v, is_causal=self.causal)
        if k == "tel":
            return self.m(h)
        if k == "param_slice":
            return torch.tanh(F.linear(h, self.W[:D]))
        if k == "bmm_expand":
            return torch.bmm(h, self.W.expand(N, D, D))
        if k == "ckpt":
            from torch.utils.checkpoint import checkpoint

            return checkpoint(lambda z: self.ln(torch.tanh(self.m(z))), h, use_reentrant=False)
        if k == "unfold_lin":
            if T < 2:
                return h
            u = h.unfold(1, 2, 1)  # [N, T-1, D, 2]
            y = self.m(u.flatten(2))
            return torch.cat([y, y[:, -1:]], 1)
        if k == "mha_kpm":
            kpm = h[..., 0] > 0.8
            kpm[:, 0] = False
            return self.m(h, h, h, key_padding_mask=kpm, need_weights=False)[0] + h
        if k == "cross_attn_param":
            q = self.q.expand(N, -1, -1)
            o = self.m(q, h, h, need_weights=False)[0]
            return torch.cat([o, h], 1)[:, :T]
        raise ValueError(k)


# fmt: off
PER_EXAMPLE_KINDS = [
    "linear", "linear", "linear_flat", "linear_T", "layernorm", "rmsnorm", "handrms", "groupnorm",
    "conv1d", "conv1d", "mha", "gru", "lstm", "gru_tm", "lstm_tm", "rnncell", "gate", "layerscale",
    "postable", "clstoken", "handattn", "residual", "residual", "share_prev", "weight_reuse",
    "cat_split", "chunk", "masked", "einsum_param", "bilinear", "prelu", "ln_then_lin_shared_in",
    "dropout_eval", "permute_flat", "slice", "bn_eval",
]
# fmt: on
# fmt: off
NEW_KINDS = [
    "packed_gru", "packed_lstm", "ln2d", "lstm_proj", "sdpa", "tel", "param_slice", "bmm_expand",
    "ckpt", "unfold_lin", "packed_gru", "packed_lstm", "ln2d", "lstm_proj", "sdpa", "tel",
    "param_slice", "bmm_expand", "ckpt", "unfold_lin", "mha_kpm", "cross_attn_param", "mha_kpm",
    "cross_attn_param", "linear_tm", "regroup", "scramble", "unsqueeze_lin", "lin_4d", "convT",
    "conv_stride", "temperature", "inplace", "two_calls", "param_two_modules", "gather", "where",
    "flinear", "prompt", "param_lin_bias", "lora", "repeat_batch", "repeat_interleave",
    "expand_views", "ln_noaffine_lin", "emb_pos", "conv2d_inner", "instnorm",
    "double_pass_same_mod",
]
# fmt: on
MIXING_KINDS = ["bn_train", "batchmean", "roll", "inbatch_attn", "sortbatch"]


class Model(nn.Module):
    """Stem, blocks, pool and head, as `spec` says; `rng` draws the details of each layer."""

    def __init__(self, spec, rng):
        super().__init__()
        r = rng
        self.spec = spec
        d = spec["d"]
        ctx = {"linears": []}
        st = spec["stem"]
        if st == "emb":
            self.emb = nn.Embedding(spec["vocab"], d, padding_idx=spec["padding_idx"])
        elif st == "embbag":
            self.emb = nn.EmbeddingBag(spec["vocab"], d, mode=r.choice(["mean", "sum", "max"]))
        elif st == "emb_freq":
            self.emb = nn.Embedding(spec["vocab"], d, scale_grad_by_freq=True)
        elif st == "embbag_off":
            self.emb = nn.EmbeddingBag(spec["vocab"], d, mode=r.choice(["mean", "sum"]))
            self.psw = r.random() < 0.5 and self.emb.mode == "sum"
        elif st == "emb2":
            self.emb = nn.Embedding(spec["vocab"], d)
        elif st in ("linear", "noncontig"):
            self.stem = nn.Linear(spec["din"], d, bias=r.random() < 0.7)
        elif st == "conv2d":
            c = spec["cin"]
            groups = r.choice([1, c]) if d % c == 0 else 1
            self.stem = nn.Conv2d(
                c,
                d,
                r.choice([1, 2, 3]),
                stride=r.choice([1, 2]),
                padding=r.choice([0, 1]),
                padding_mode=r.choice(["zeros", "reflect", "replicate", "circular"]),
                groups=groups,
                bias=r.random() < 0.7,
            )
        # stem "none": the data is already [N, T, D]
        # trace the number of positions
        self.blocks = nn.ModuleList()
        tcur = spec["t_after_stem"]
        for kind in spec["blocks"]:
            b = Block(kind, d, tcur, r, ctx)
            self.blocks.append(b)
            if kind == "clstoken":
                tcur += 1
            if kind == "slice" and tcur > 2:
                tcur -= 1
            if kind == "conv_stride":
                tcur = tcur // 2 + 1
        self.pool = spec["pool"]
        if spec.get("aux"):
            self.auxhead = nn.Linear(d, 1)
        self.head_kind = spec["head"]
        if spec["head"] == "tied" and st == "emb":
            pass
        else:
            self.head = nn.Linear(d, spec["classes"], bias=r.random() < 0.7)

    def features(self, x):
        st = self.spec["stem"]
        if st == "emb":
            h = self.emb(x)
        elif st == "embbag":
            h = self.emb(x).unsqueeze(1)
        elif st == "emb_freq":
            h = self.emb(x)
        elif st == "embbag_off":
            n_, t_ = x.shape
            offs = torch.arange(n_) * t_
            w = (x.flatten().double() + 1) / 5 if self.psw else None
            h = self.emb(x.flatten(), offs, per_sample_weights=w).unsqueeze(1)
        elif st == "noncontig":
            h = self.stem(x.transpose(0, 1).contiguous().transpose(0, 1))
        elif st == "emb2":
            h = self.emb(x) + 0.5 * self.emb(x.flip(1))
        elif st == "linear":
            h = self.stem(x)
        elif st == "conv2d":
            h = self.stem(x).flatten(2).transpose(1, 2)
        else:
            h = x
        for b in self.blocks:
            h = b(h)
        return h

    def forward(self, x):
        h = self.features(x)
        if self.spec.get("aux"):
            self._aux = self.auxhead(h.mean(1))
        if self.pool == "tokens":
            pass
        elif self.pool == "mean":
            h = h.mean(1)
        elif self.pool == "sum":
            h = h.sum(1)
        elif self.pool == "max":
            h = h.max(1).values
        elif self.pool == "first":
            h = h[:, 0]
        elif self.pool == "last":
            h = h[:, -1]
        if self.head_kind == "tied" and self.spec["stem"] == "emb":
            return F.linear(h, self.emb.weight)
        return self.head(h)


def make_case(seed, mixing_prob=0.08, override=None):
    """The case of `seed`: (spec, model, x, per_example_loss); see the module's docstring."""
    r = random.Random(seed)
    torch.manual_seed(seed)
    n = r.choice([4, 5, 6])
    d = r.choice([4, 6, 8])
    t = r.choice([2, 3, 4, 5])
    if r.random() < 0.15:
        t = n  # sequence length equal to batch size
    if r.random() < 0.1 and n in (4, 6):
        d = n
    stem = r.choice(
        [
            "emb",
            "linear",
            "linear",
            "conv2d",
            "none",
            "embbag",
            "emb2",
            "emb_freq",
            "embbag_off",
            "embbag_off",
            "noncontig",
        ]
    )
    spec = {"d": d, "t": t, "stem": stem, "n": n}
    if stem == "noncontig":
        spec["din"] = r.choice([3, 5])
        x = torch.randn(n, t, spec["din"])
        spec["t_after_stem"] = t
    elif stem in ("embbag", "emb2", "emb_freq", "embbag_off"):
        spec["vocab"] = r.choice([5, 7, 9])
        spec["padding_idx"] = None
        x = torch.randint(0, spec["vocab"], (n, t))
        spec["t_after_stem"] = 1 if stem in ("embbag", "embbag_off") else t
    elif stem == "emb":
        spec["vocab"] = r.choice([5, 7, 9])
        spec["padding_idx"] = r.choice([None, 0])
        x = torch.randint(0, spec["vocab"], (n, t))
        spec["t_after_stem"] = t
    elif stem == "linear":
        spec["din"] = r.choice([3, 5])
        x = torch.randn(n, t, spec["din"])
        spec["t_after_stem"] = t
    elif stem == "conv2d":
        spec["cin"] = r.choice([1, 2])
        x = torch.randn(n, spec["cin"], 3, 3)
        spec["t_after_stem"] = None
    else:
        x = torch.randn(n, t, d)
        spec["t_after_stem"] = t
    nblocks = r.choice([1, 2, 2, 3, 3, 4])
    kinds = []
    mixing = r.random() < mixing_prob
    for _ in range(nblocks):
        kinds.append(r.choice(NEW_KINDS) if r.random() < 0.5 else r.choice(PER_EXAMPLE_KINDS))
    if mixing:
        kinds.insert(r.randrange(len(kinds) + 1), r.choice(MIXING_KINDS))
    spec["blocks"] = kinds
    spec["pool"] = r.choice(["tokens", "mean", "sum", "max", "first", "last"])
    spec["head"] = r.choice(["linear", "linear", "tied"])
    spec["classes"] = r.choice([2, 3])
    if spec["head"] == "tied" and stem == "emb":
        spec["classes"] = spec["vocab"]
    spec["loss"] = r.choice(["ce", "ce_ls", "mse", "ce_ignore", "weighted_ce", "mse_sum"])
    spec["penalty"] = r.random() < 0.06
    spec["aux"] = r.random() < 0.2
    spec["tm_out"] = r.random() < 0.15
    spec["lossform"] = r.choice(["plain"] * 6 + ["split_forward", "two_views", "uncertainty"])
    spec["frozen"] = r.random() < 0.15
    spec["reduction"] = r.choice(["mean", "mean", "sum"])
    spec["mixing"] = mixing
    if override:
        spec.update(override)
    # model must be constructed after knowing t_after_stem for conv
    if stem == "conv2d":
        tmp_rng_state = torch.get_rng_state()
        stemtmp = Model({**spec, "blocks": [], "t_after_stem": 1}, random.Random(seed + 5))
        with torch.no_grad():
            spec["t_after_stem"] = stemtmp.features(x).shape[1]
        torch.set_rng_state(tmp_rng_state)
    model = Model(spec, random.Random(seed + 5))
    model.eval()
    if spec["lossform"] == "uncertainty":
        model.log_var = nn.Parameter(torch.tensor(0.2))
    if spec["frozen"]:
        ps = list(model.parameters())
        for p in r.sample(ps, max(1, len(ps) // 3)):
            p.requires_grad_(False)
    if "bn_train" in kinds:
        for b in model.blocks:
            if b.kind == "bn_train":
                b.train()
    for b in model.blocks:
        if b.kind == "bn_eval":
            b.m.running_mean.normal_()
            b.m.running_var.uniform_(0.5, 2)
    with torch.no_grad():
        out = model(x)
    # labels
    C = out.shape[-1]
    tokens = out.dim() == 3
    shape = out.shape[:-1]
    y = torch.randint(0, C, shape)
    target = torch.randn(out.shape)
    ex_w = torch.rand(n) + 0.5
    if spec["loss"] == "ce_ignore":
        if tokens:
            y[0, 0] = -100
            y[1:, -1][torch.rand(n - 1) < 0.5] = -100
        else:
            spec["loss"] = "ce"
    ls = 0.1 if spec["loss"] == "ce_ls" else 0.0
    lossk = spec["loss"]
    pen = spec["penalty"]
    pen_param = None
    if pen:
        pen_param = r.choice([p for p in model.parameters()])
    # The penalised parameter is found again by its position, so that the loss also works on a
    # deep copy of the model (the runner's SGD modes train copies).
    pen_idx = (
        None
        if pen_param is None
        else next(i for i, p in enumerate(model.parameters()) if p is pen_param)
    )

    lossform = spec["lossform"]

    def per_example_loss(model, idx):
        if lossform == "split_forward":
            if isinstance(idx, slice) and idx.stop - idx.start > 2:
                k = idx.start + 2
                return torch.cat(
                    [
                        per_example_loss0(model, slice(idx.start, k)),
                        per_example_loss0(model, slice(k, idx.stop)),
                    ]
                )
            return per_example_loss0(model, idx)
        if lossform == "two_views":
            return per_example_loss0(model, idx) + 0.5 * per_example_loss0(model, idx, view=True)
        if lossform == "uncertainty":
            loss = per_example_loss0(model, idx)
            return loss * torch.exp(-model.log_var) + model.log_var
        return per_example_loss0(model, idx)

    def per_example_loss0(model, idx, view=False):
        xi = x[idx]
        if view:
            xi = xi.flip(1) if xi.dtype == torch.long else xi * 0.5
        o = model(xi)
        if spec["tm_out"] and o.dim() == 3:
            o = o.transpose(0, 1).contiguous().transpose(0, 1)
        yi, ti, wi = y[idx], target[idx], ex_w[idx]
        if lossk in ("ce", "ce_ls", "weighted_ce", "ce_ignore"):
            if tokens:
                loss = F.cross_entropy(o.transpose(1, 2), yi, reduction="none", label_smoothing=ls)
                if lossk == "ce_ignore":
                    valid = (yi != -100).to(loss.dtype)
                    loss = (loss * valid).sum(1) / valid.sum(1).clamp(min=1)
                else:
                    loss = loss.mean(1)
            else:
                loss = F.cross_entropy(o, yi, reduction="none", label_smoothing=ls)
            if lossk == "weighted_ce":
                loss = loss * wi
        elif lossk == "mse":
            loss = (o - ti).pow(2).flatten(1).mean(1)
        else:
            loss = (o - ti).pow(2).flatten(1).sum(1)
        if spec["aux"]:
            loss = loss + 0.3 * model._aux.pow(2).sum(1)
        if pen:
            pp = list(model.parameters())[pen_idx]
            loss = loss + 0.01 * pp.pow(2).sum()
        return loss

    if lossform == "two_views":

        def row_loss(model, j):
            if j < n:
                return per_example_loss0(model, slice(j, j + 1))
            return 0.5 * per_example_loss0(model, slice(j - n, j - n + 1), view=True)

        per_example_loss.rows = (2 * n, row_loss)
    return spec, model, x, per_example_loss
