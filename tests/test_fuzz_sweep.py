"""The sweep fuzzer (tests/fuzz_sweep.py) on a small seed: ``noisescale sweep`` workers
(processes) on one SQLite study, then a resume, against each trial's known curve, every grid
point complete once, and ``noisescale fit`` on the stored trials equal to the fit of the true
curves (the long run, with kills, raises, NaN, locks, changed grids and PostgreSQL: ``make
fuzz-sweep SEEDS=0:40 [PG=1]``, 20-50 s a seed)."""

import pytest

import fuzz_sweep

# Two workers on three points, no event; then the finished study opened read-only (SQLite's
# mode=ro URI), which the fuzzer found (notes/s51): `noisescale sweep` exited 1 with Optuna's
# StorageInternalError traceback from WorkQueue.__init__'s create_study, and `noisescale fit`
# refused 'no such database ... no file' for a file that exists (storage.sqlite_file read the
# URI's 'file:' as part of the path). Now fit reads it and sweep refuses it (exit 2, named).
# One seed for both (the sample alone repeated the same workers: ~14 s a run).
# Also found, too slow for the suite (each waited out the workers' time limits, ~2 min), fixed
# with tests of their own: seeds 51, 64, 79, a worker killed after its claim and before its
# first heartbeat left the point RUNNING with no heartbeat row, which Optuna's
# fail_stale_trials never takes for dead (test_sweep_workers.py::
# test_a_worker_dead_before_its_first_heartbeat_is_released); and by chance (a race), seeds 38
# and 68: `fit` while the workers write left out, unnamed, the points that completed between
# two reads of the trials
# (test_sweep_cli.py::test_fit_while_a_point_completes_reads_it_or_names_it).
CASES = [(31, {"readonly": True})]


@pytest.mark.parametrize(("seed", "override"), CASES, ids=[str(s) for s, _ in CASES])
def test_sweep_workers_store_every_point_once_with_its_curve(seed, override):
    record = fuzz_sweep.check_seed(seed, override)
    assert not fuzz_sweep.findings(record), (fuzz_sweep.describe(record), record["checks"])
    for name in ("exit", "grid", "curves", "once", "summary", "fit"):
        assert record["checks"][name]["cls"] == "ok", record["checks"]
    # fit on the read-only study gives the true curves' numbers; sweep refuses it (exit 2)
    assert record["checks"]["readonly"] == {"cls": "refused", "sweep_rc": 2}, record["checks"]
