import os

import pytest
import torch

# Two cores: keep torch from oversubscribing them when pytest runs (each of pytest-xdist's
# workers gets its share of them).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture
def float64_default():
    """Run a test with float64 as torch's default dtype, restoring the previous one after."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# The files that take longest, given out first. test_fuzz_models.py (352 fuzzer seeds) first as the
# largest; then the files of a few long tests, by their per-file sums of `pytest --durations=0` on
# 2026-12-07 (17 files, two workers, a host at load 12): test_examples 194 s, test_demo 169,
# test_sweep_workers 159, test_sweep_cli 117, test_fuzz_sweep 72, test_fuzz_stats 52,
# test_diffusers 34, test_reproduction_smoke 29, test_distributed_scale 23. `make test` runs
# pytest-xdist's loadfile with --no-loadscope-reorder: the workers take the files in the order
# collected, one at a time as each gets free. By default xdist hands out the files with the most
# tests first, so these files of a few long tests (sweeps, runs in subprocesses, replicates) went
# last, and one worker ran the last of them alone while the others had nothing left. Here they go
# first and the many short files fill in around them.
LONG_FILES = [
    "test_fuzz_models.py",
    "test_examples.py",
    "test_demo.py",
    "test_sweep_workers.py",
    "test_sweep_cli.py",
    "test_fuzz_sweep.py",
    "test_fuzz_stats.py",
    "test_diffusers.py",
    "test_reproduction_smoke.py",
    "test_distributed_scale.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    count: dict[str, int] = {}
    for item in items:
        count[item.path.name] = count.get(item.path.name, 0) + 1
    # long files first, the rest by their number of tests (xdist's own order); stable, so each
    # file's tests keep their order
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), -count[item.path.name]))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def gc_frozen():
    """The objects alive when a file's tests start (torch's, transformers', the test modules'
    own: ~500,000) moved out of the garbage collector's sight for that file, then back.

    transformers' Trainer ends every ``train()`` with a full ``gc.collect()`` (accelerate's
    ``free_memory``), which walked all of them each time: 0.2-0.6 s a run, for nothing that was
    ever garbage. Whatever a test creates is still collected as before."""
    import gc

    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def postgres_server():
    """A throw-away PostgreSQL server on 127.0.0.1 (tests/postgres_server.py); skipped, with the
    reason, where it cannot start."""
    import postgres_server as pg

    try:
        server = pg.start()
    except pg.Unavailable as err:
        pytest.skip(f"no PostgreSQL server for the tests: {err}")
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server):
    """The URL of a new, empty database on the test server (password included)."""
    return postgres_server.create_database()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # Skips of whole families (no browser, no PostgreSQL, no GPU) must not pass unnoticed in a
    # green run: list them under a banner of their own, with their reasons and counts.
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    if not reasons:
        return
    terminalreporter.write_sep("=", "NOT TESTED ON THIS MACHINE", yellow=True, bold=True)
    for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{count:4d} test(s) skipped: {reason}", yellow=True)
