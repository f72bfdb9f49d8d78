"""`noisescale demo` end to end on a few steps (the full run is `make demo`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_demo_short_run(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "noisescale",
            "demo",
            "--epochs",
            "0.2",
            "--batch-size",
            "32",
            "--no-progress",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = (out / "history.jsonl").read_text().splitlines()
    header, records = json.loads(lines[0]), [json.loads(x) for x in lines[1:]]
    assert header["kind"] == "noisescale.history"
    assert len(records) == 5000 * 0.2 // 32
    assert records[-1]["examples"] == 32 * len(records)
    assert records[-1]["b_simple"] > 0
    assert records[-1]["b_simple_low"] <= records[-1]["b_simple"] <= records[-1]["b_simple_high"]
    assert (out / "b_simple.png").stat().st_size > 10_000
    assert "B_simple =" in proc.stdout and str(out / "history.jsonl") in proc.stdout


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--batch-size", "1", "--batch-size must be at least 2"),
        ("--per-example-fraction", "0", "--per-example-fraction must be in (0, 1]"),
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
