"""A branch training function for ``noisescale branch``, with a known answer (no training).

The branches follow the paper's model exactly (McCandlish et al. 2018, App. D.1): a step at
batch size B makes B/(B + B_noise) full-batch steps of progress, with a noise scale that grows
from 16 examples at the start to 36 after 2,000 examples of the main run (batch 8), 71 after
8,000 and 100 after 16,000 (:class:`noisescale.branch.SyntheticBranchModel`). So the local
critical batch size that ``noisescale branch`` measures has a closed form to check it against,
and the command runs in seconds::

    noisescale branch examples/branch_train.py:train --checkpoints 0,2000,8000 \\
        --batch-sizes 8,16,32,64,128 --base-batch-size 8 --lr 0.1 --lr-rule linear \\
        --budget 1024 --repeats 2 --tolerance 0.5 --study demo -o branch.html

A real branch function loads the main run's checkpoint taken after ``checkpoint`` examples,
sets the learning rate, trains ``budget`` examples in the data order ``seed`` and reports the
loss as it goes (see :mod:`noisescale.branch.runner`); ``experiments/branch/run.py`` has two,
on Fashion-MNIST and on a character-level language model.
"""

from __future__ import annotations

from typing import Any

from noisescale.branch import SyntheticBranchModel
from noisescale.sweep.synthetic import SyntheticModel

MODEL = SyntheticBranchModel(
    SyntheticModel(b_noise_start=16.0, b_noise_slope=0.35, loss_start=2.0, s_scale=200.0),
    base_batch_size=8,
    clock_noise=0.03,  # each data order helps or hurts a little: the intervals are not empty
)


def train(
    batch_size: int,
    learning_rate: float,
    reporter: Any,
    *,
    checkpoint: float,
    budget: float,
    seed: int,
) -> None:
    """One branch: ⌈budget/batch_size⌉ steps from the checkpoint, the loss reported each step."""
    MODEL.train(
        batch_size=batch_size,
        learning_rate=learning_rate,
        reporter=reporter,
        checkpoint=checkpoint,
        budget=budget,
        seed=seed,
    )


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    for c in (0, 2000, 8000, 16000):
        print(f"checkpoint {c}: B_noise = {MODEL.b_noise_at(c):.1f} examples")
