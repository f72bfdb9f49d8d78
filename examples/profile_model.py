"""A model for ``noisescale profile``: a two-layer MLP on synthetic batches of MNIST's shape.

Profile it, then price batch sizes for it::

    noisescale profile examples/profile_model.py:build --model-option width=512 -o mlp.json
    noisescale recommend --noise-scale 900 --profile mlp.json --target-examples 5e7

``build`` returns what ``profile`` needs: the model, the loss ``loss_fn(model(inputs), targets)``
and ``make_batch(batch_size, device) -> (inputs, targets)``. Random data of the real shapes is
enough: step time and memory do not depend on the values.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def build(
    width: int = 256, inputs: int = 784, classes: int = 10
) -> tuple[
    nn.Module, Callable[..., torch.Tensor], Callable[..., tuple[torch.Tensor, torch.Tensor]]
]:
    """An MLP inputs → width → classes with cross-entropy loss, and a synthetic batch maker."""
    model = nn.Sequential(nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, classes))

    def make_batch(batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(batch_size, inputs, device=device)
        y = torch.randint(0, classes, (batch_size,), device=device)
        return x, y

    return model, nn.functional.cross_entropy, make_batch
