"""Built-in reference models: the paper's MNIST CNN and a small GPT-style language model.

The demo, the benchmarks and ``noisescale profile`` share these definitions so that a number
measured in one place means the same model everywhere. Each model comes with a loss function and a
synthetic batch maker (``make_batch(batch_size, device) -> (inputs, targets)``): hardware profiles
need the shapes of real batches, not their contents.

- :class:`PaperCNN` is the MNIST/SVHN network of McCandlish et al. 2018, App. A.4.1: two
  convolution + max-pool layers (32 and 64 filters of 5×5), a 1024-unit dense layer and dropout
  0.4 before the 10-way output, on 28×28 single-channel images.
- :class:`GPT` is a nanoGPT-style causal transformer (pre-LayerNorm blocks, causal self-attention,
  4× MLP), configured by :class:`GPTConfig`. Its defaults are small enough to profile on a CPU; the
  benchmark configuration is :meth:`GPTConfig.benchmark` (6 layers, d_model 512, 8 heads, T = 256,
  vocabulary 8192). Every weight lives in an ``nn.Linear``, ``nn.Embedding`` or ``nn.LayerNorm``,
  the layer families whose per-example gradient norms noisescale computes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from noisescale.errors import NoiseScaleInputError

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MakeBatch = Callable[[int, torch.device], Batch]


class PaperCNN(nn.Module):
    """The paper's MNIST CNN (App. A.4.1): conv 5×5×32 → pool → conv 5×5×64 → pool → 1024 → 10.

    Convolutions use "same" padding, as in the TensorFlow MNIST tutorial network the paper
    describes, so the feature maps are 28→14→7 and the dense layer sees 7·7·64 = 3136 inputs.

    Args:
        num_classes: Output classes (10 for MNIST).
        in_channels: Image channels (1 for MNIST, 3 for SVHN-style inputs).
        image_size: Side of the square input image; must be divisible by 4.
        dropout: Dropout rate before the output layer (0.4 in the paper).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        dropout: float = 0.4,
    ) -> None:
        super().__init__()
        if image_size % 4 != 0:
            raise NoiseScaleInputError(f"image_size must be divisible by 4, got {image_size}")
        self.image_size = image_size
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.fc1 = nn.Linear(64 * (image_size // 4) ** 2, 1024)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(self.dropout(x))


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a :class:`GPT` model.

    The defaults are a CPU-sized model (2 layers, d_model 128). Batch sizes of this model count
    sequences of ``block_size`` tokens.

    Attributes:
        vocab_size: Number of token ids.
        block_size: Sequence length T (tokens per example).
        n_layer: Transformer blocks.
        n_head: Attention heads; must divide ``d_model``.
        d_model: Residual stream width.
        dropout: Dropout rate on embeddings, attention output and MLP output.
        bias: Whether Linear and LayerNorm layers carry a bias.
        tie_embeddings: Share the token embedding with the output head. Off by default: a tied
            weight needs the cross term in per-example gradient norms.
    """

    vocab_size: int = 8192
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = False

    @classmethod
    def benchmark(cls, **overrides: Any) -> GPTConfig:
        """The benchmark model: 6 layers, d_model 512, 8 heads, T = 256, vocabulary 8192."""
        fields: dict[str, Any] = {
            "vocab_size": 8192,
            "block_size": 256,
            "n_layer": 6,
            "n_head": 8,
            "d_model": 512,
        }
        fields.update(overrides)
        return cls(**fields)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused QKV projection."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        # (B, T, D) → (B, heads, T, D/heads)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(b, t, d)
        return F.dropout(self.proj(y), self.dropout, self.training)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.fc = nn.Linear(config.d_model, 4 * config.d_model, bias=config.bias)
        self.fc_proj = nn.Linear(4 * config.d_model, config.d_model, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        h = self.fc_proj(F.gelu(self.fc(self.ln_2(x))))
        return x + F.dropout(h, self.dropout, self.training)


class GPT(nn.Module):
    """nanoGPT-style causal language model; ``forward(idx)`` returns logits of shape (B, T, V).

    Args:
        config: Model shape; see :class:`GPTConfig`.
    """

    def __init__(self, config: GPTConfig | None = None) -> None:
        super().__init__()
        config = config or GPTConfig()
        if config.d_model % config.n_head != 0:
            raise NoiseScaleInputError(
                f"n_head ({config.n_head}) must divide d_model ({config.d_model})"
            )
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.block_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init keeps the residual stream's variance independent of depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "fc_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.config.block_size:
            raise NoiseScaleInputError(
                f"sequence length {t} exceeds block_size {self.config.block_size}"
            )
        # positions per example (batch-first), so per-example norms see the table's uses
        pos = torch.arange(t, device=idx.device).expand(idx.shape[0], t)
        x = F.dropout(self.wte(idx) + self.wpe(pos), self.config.dropout, self.training)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over all B·T positions of a (B, T, V) logits tensor."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def mnist_cnn(*, num_classes: int = 10, dropout: float = 0.4) -> tuple[PaperCNN, LossFn, MakeBatch]:
    """The paper's MNIST CNN with cross-entropy loss and random 1×28×28 images as batches."""
    model = PaperCNN(num_classes=num_classes, dropout=dropout)

    def make_batch(batch_size: int, device: torch.device) -> Batch:
        x = torch.randn(batch_size, 1, 28, 28, device=device)
        y = torch.randint(0, num_classes, (batch_size,), device=device)
        return x, y

    return model, F.cross_entropy, make_batch


def gpt_small(**config: Any) -> tuple[GPT, LossFn, MakeBatch]:
    """A :class:`GPT` (keyword arguments are :class:`GPTConfig` fields) with random token batches.

    One example is one sequence of ``block_size`` tokens; targets are the inputs shifted by one.
    """
    try:
        cfg = GPTConfig(**config)
    except TypeError as err:
        raise NoiseScaleInputError(f"gpt-small: {err}") from None
    model = GPT(cfg)

    def make_batch(batch_size: int, device: torch.device) -> Batch:
        tokens = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size + 1), device=device)
        return tokens[:, :-1], tokens[:, 1:]

    return model, lm_loss, make_batch


REFERENCE_MODELS: dict[str, Callable[..., tuple[nn.Module, LossFn, MakeBatch]]] = {
    "mnist-cnn": mnist_cnn,
    "gpt-small": gpt_small,
}
"""Built-in model builders by name: each returns ``(model, loss_fn, make_batch)``."""
