"""The sweep fuzzer (tests/fuzz_sweep.py) on a few small seeds: ``noisescale sweep`` workers
(processes) on one SQLite study, then a resume, against each trial's known curve, every grid
point complete once, and ``noisescale fit`` on the stored trials equal to the fit of the true
curves (the long run, with kills, raises, NaN, locks, changed grids and PostgreSQL: ``python
tests/fuzz_sweep.py --seeds 0:40 [--postgres]``, 20-50 s a seed)."""

import pytest

import fuzz_sweep

# two workers on three points, no event
SAMPLE = [(31, None)]

# What it found (notes/s51; fail until the fixes land, as FOUND_BY_THE_FUZZER's): the finished
# study opened read-only (SQLite's mode=ro URI): `noisescale sweep` exits 1 with Optuna's
# StorageInternalError traceback from WorkQueue.__init__'s create_study ('invalid data in the
# commit, e.g. exceeding max length'), and `noisescale fit` refuses 'no such database ... no
# file' for a file that exists (storage.sqlite_file reads the URI's 'file:' as the path).
# Also found, too slow for the suite (each waits out the workers' time limits, ~2 min): seed 51,
# a worker killed after its claim and before its first heartbeat leaves the point RUNNING with no
# heartbeat row, which Optuna's fail_stale_trials never takes for dead: every later worker waits
# for it for ever (`python tests/fuzz_sweep.py --seeds 51 -v`). And by chance, not pinned (a race):
# `fit` while the workers write leaves out, unnamed, the points that complete between its read of
# the COMPLETE trials and its read of the unfinished points (seeds 38 and 68 once each).
FOUND_BY_THE_SWEEP_FUZZER = [(31, {"readonly": True})]


@pytest.mark.parametrize(("seed", "override"), SAMPLE, ids=[str(s) for s, _ in SAMPLE])
def test_sweep_workers_store_every_point_once_with_its_curve(seed, override):
    record = fuzz_sweep.check_seed(seed, override)
    assert not fuzz_sweep.findings(record), (fuzz_sweep.describe(record), record["checks"])
    for name in ("exit", "grid", "curves", "once", "summary", "fit"):
        assert record["checks"][name]["cls"] == "ok", record["checks"]


@pytest.mark.parametrize(
    ("seed", "override"),
    FOUND_BY_THE_SWEEP_FUZZER,
    ids=[str(s) for s, _ in FOUND_BY_THE_SWEEP_FUZZER],
)
def test_what_the_sweep_fuzzer_found_is_right_or_refused(seed, override):
    record = fuzz_sweep.check_seed(seed, override)
    assert not fuzz_sweep.findings(record), (fuzz_sweep.describe(record), record["checks"])
