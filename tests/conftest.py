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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
