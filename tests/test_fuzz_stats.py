"""The statistics fuzzer (tests/fuzz_stats.py) on a few seeds, each with 15 replicates: the
per-step |G|² and tr Σ unbiased against the closed-form truth, the final estimate the EMA of
the records, ``noisescale calc --history`` and an ``AdaptiveBatchSize``'s decisions the paper's
formulas on the tracker's own numbers (coverage needs the long run: ``python tests/fuzz_stats.py
--seeds 0:300``, a few seconds to a minute a seed)."""

import pytest
import torch

import fuzz_stats

# token means over a finite data set (exact source); an adaptive batch with per-group estimates;
# a squared error measured on a weighted subset, with B_noise; unequal micro-batches of a summed
# squared error from the default source
SAMPLE = [7, 12, 106, 159]


@pytest.mark.parametrize("seed", SAMPLE)
def test_the_trackers_statistics_hold_their_truth(seed):
    torch.set_num_threads(1)
    record = fuzz_stats.check_seed(seed, reps=15)
    assert not fuzz_stats.findings(record), (fuzz_stats.describe(record), record["checks"])
    assert record["checks"]["g2"]["cls"] == "ok", record["checks"]
    assert record["checks"]["trace"]["cls"] == "ok", record["checks"]
