"""Tests of ``noisescale profile``: the profile JSON it writes, the model contract, its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from noisescale.cli import main

TINY_MODULE = '''
import torch
from torch import nn


class Net(nn.Module):
    """An MLP whose backward "runs out of memory" (real CUDA OOM type) above `threshold`."""

    def __init__(self, hidden, threshold):
        super().__init__()
        self.threshold = threshold
        self.fc1 = nn.Linear(6, hidden)
        self.fc2 = nn.Linear(hidden, 2)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if x.shape[0] > self.threshold:
            h.register_hook(self._oom)
        return self.fc2(h)

    def _oom(self, grad):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")


def build(hidden=4, threshold=10**9):
    def make_batch(batch_size, device):
        return torch.randn(batch_size, 6, device=device), torch.randint(0, 2, (batch_size,))

    return Net(hidden, threshold), nn.functional.cross_entropy, make_batch


def not_a_triple():
    return 42


def wrong_batch():
    model, loss_fn, _ = build()
    return model, loss_fn, lambda batch_size, device: (torch.randn(batch_size, 5), None)
'''


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "ns_tiny_model.py").write_text(TINY_MODULE)
    (tmp_path / "ns_broken_model.py").write_text("raise RuntimeError('broken on import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return "ns_tiny_model"


FAST = ["--device", "cpu", "--warmup", "1", "--repeats", "2", "--threads", "1"]


def test_profile_writes_versioned_json(tiny_module: str, tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    code = main(
        [
            "profile",
            f"{tiny_module}:build",
            "--batch-sizes",
            "1,2,4",
            "--max-batch-limit",
            "16",
            *FAST,
            "--model-option",
            "hidden=8",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    data = json.loads(out.read_text())
    assert (data["kind"], data["version"]) == ("noisescale.profile", 1)
    assert [p["batch_size"] for p in data["points"]] == [1, 2, 4]
    assert all(len(p["times_s"]) == 2 for p in data["points"])
    point = data["points"][2]
    assert point["samples_per_s"] == pytest.approx(4 / point["step_time_s"])
    assert set(data["fit"]) >= {"alpha_s", "beta_s", "alpha_se_s", "beta_se_s"}
    # No simulated limit below 16: the search stops at the limit and says so.
    assert data["max_batch_size"] == 16 and data["max_batch_search"]["capped"] is True
    # 6·8 + 8 + 8·2 + 2 float32 parameters.
    assert data["model"]["parameters"] == 74 and data["model"]["param_bytes"] == 74 * 4
    assert data["model"]["options"] == {"hidden": 8}
    assert data["device"]["type"] == "cpu" and data["settings"]["optimizer"] == "adamw"
    # The AdamW update, timed alone (a step pays it once however many micro-batches).
    assert len(data["optimizer_update_times_s"]) == 2
    assert data["optimizer_update_s"] == pytest.approx(
        sorted(data["optimizer_update_times_s"])[0] / 2
        + sorted(data["optimizer_update_times_s"])[1] / 2
    )
    assert data["optimizer_update_s"] > 0


def test_profile_without_optimizer_records_no_update(
    tiny_module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["profile", f"{tiny_module}:build", "--batch-sizes", "1,2", "--no-memory-search"]
    assert main([*args, "--optimizer", "none", "--json", *FAST]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["optimizer_update_s"] == 0.0 and data["optimizer_update_times_s"] == []


def test_profile_finds_simulated_memory_limit(
    tiny_module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["profile", f"{tiny_module}:build", "--model-option", "threshold=6", "--json", *FAST]
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["max_batch_size"] == 6 and data["max_batch_search"]["converged"] is True
    # Default timed sizes: powers of two up to the largest that fits.
    assert [p["batch_size"] for p in data["points"]] == [1, 2, 4]


def test_profile_text_output(tiny_module: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["profile", f"{tiny_module}:build", "--batch-sizes", "2,8", "--no-memory-search", *FAST]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "fit: t(b) = α + β·b" in out and "not searched" in out


def test_profile_builtin_models(tmp_path: Path) -> None:
    out = tmp_path / "cnn.json"
    args = ["--batch-sizes", "1,2", "--no-memory-search", "--warmup", "0", "--repeats", "1"]
    assert main(["profile", "mnist-cnn", *args, "--threads", "1", "-o", str(out)]) == 0
    assert json.loads(out.read_text())["model"]["parameters"] == 3274634
    options = ["n_layer=1", "d_model=32", "n_head=2", "block_size=8", "vocab_size=64"]
    gpt = ["profile", "gpt-small", *args, "--threads", "1", "-o", str(out), "--force"]
    for option in options:
        gpt += ["--model-option", option]
    assert main(gpt) == 0
    model = json.loads(out.read_text())["model"]
    assert model["example_unit"] == "sequences" and model["tokens_per_example"] == 8


@pytest.mark.parametrize(
    ("spec", "extra", "message"),
    [
        ("nope", [], "unknown model 'nope'"),
        ("ns_no_such_module_xyz:build", [], "cannot import module"),
        ("ns_broken_model:build", [], "broken on import"),
        ("ns_tiny_model:missing", [], "has no function 'missing'"),
        ("ns_tiny_model:not_a_triple", [], "must return (model"),
        ("ns_tiny_model:build", ["--model-option", "depth=3"], "bad model options"),
        ("ns_tiny_model:build", ["--model-option", "novalue"], "KEY=VALUE"),
        # the builder's own error for a bad value, and a batch the model does not take
        (
            "ns_tiny_model:build",
            ["--model-option", "hidden=-5", *FAST],
            "failed to build the model with options {'hidden': -5}: RuntimeError",
        ),
        ("ns_tiny_model:wrong_batch", FAST, "a training step at batch size 1 failed: RuntimeError"),
        ("gpt-small", ["--model-option", "n_layers=3"], "gpt-small"),
        ("ns_tiny_model:build", ["--device", "tpu"], "device"),
        ("ns_tiny_model:build", ["--repeats", "0"], "--repeats"),
    ],
)
def test_profile_errors_exit_2(
    tiny_module: str,
    capsys: pytest.CaptureFixture[str],
    spec: str,
    extra: list[str],
    message: str,
) -> None:
    assert main(["profile", spec, "--no-memory-search", *extra]) == 2
    err = capsys.readouterr().err
    assert "noisescale profile: error:" in err and message in err


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_profile_cuda_unavailable_exit_2(
    tiny_module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["profile", f"{tiny_module}:build", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_profile_bad_batch_sizes_is_usage_error(
    tiny_module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["profile", f"{tiny_module}:build", "--batch-sizes", "2,x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: noisescale profile")
    assert "argument --batch-sizes: expected a number, got 'x'" in err


def test_profile_needs_two_sizes_that_fit(
    tiny_module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["profile", f"{tiny_module}:build", "--model-option", "threshold=1"]
    code = main([*args, "--batch-sizes", "1,2,4", "--no-memory-search", *FAST])
    assert code == 2
    err = capsys.readouterr().err
    assert "batch size 2 ran out of memory while timing" in err
    assert (
        "needs two batch sizes, but batch size 2 ran out of memory (only batch size 1 was timed)"
        in err
    )


def test_an_out_of_memory_while_timing_is_recorded_and_respected(
    tiny_module: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "p.json"
    args = ["profile", f"{tiny_module}:build", "--model-option", "threshold=6"]
    code = main([*args, "--no-memory-search", "--batch-sizes", "2,4,8,16", *FAST, "-o", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    assert "batch size 8 ran out of memory while timing" in captured.err
    assert "not timed: 8, 16" in captured.err
    assert "largest batch in memory: below 8" in captured.out
    data = json.loads(out.read_text())
    assert [p["batch_size"] for p in data["points"]] == [2, 4]
    assert data["settings"]["timed_batch_sizes"] == [2, 4]
    assert data["settings"]["dropped_batch_sizes"] == [8, 16]
    assert data["out_of_memory_batch_size"] == 8 and data["max_batch_size"] is None
    # recommend splits every batch into micro-batches of at most 4 (timed, fits), never 8. (The
    # fit is set to a clean line: real timings of so tiny a model are noise.)
    data["fit"] |= {"alpha_s": 0.01, "beta_s": 0.001}
    out.write_text(json.dumps(data))
    assert main(["recommend", "--noise-scale", "50", "--profile", str(out), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert max(c["micro_batch_size"] for c in rec["candidates"]) == 4
    assert (
        main(["recommend", "--noise-scale", "50", "--profile", str(out), "--max-micro-batch", "8"])
        == 2
    )
    assert "ran out of memory" in capsys.readouterr().err


def test_profile_output_is_checked_before_measuring(
    tiny_module: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import noisescale.hardware

    def must_not_measure(*args: object, **kwargs: object) -> None:
        raise AssertionError("measured before checking -o")

    # The command imports it from noisescale.hardware, which loads it lazily: patch it there
    # (raising=False: it may not be loaded yet), so that undoing the patch removes it again.
    monkeypatch.setattr(noisescale.hardware, "profile_throughput", must_not_measure, raising=False)
    args = ["profile", f"{tiny_module}:build", "--no-memory-search", *FAST]
    cases = [
        (str(tmp_path / "missing" / "p.json"), "does not exist; create it first"),
        (str(tmp_path), "is a directory"),
        (str(tmp_path / "p.txt"), "must end in .json"),
    ]
    existing = tmp_path / "old.json"
    existing.write_text("measured earlier")
    cases.append((str(existing), "already exists; pass --force"))
    for output, message in cases:
        assert main([*args, "-o", output]) == 2
        assert message in capsys.readouterr().err
    assert existing.read_text() == "measured earlier"


@pytest.mark.parametrize("json_output", [False, True])
def test_timings_that_fall_with_the_batch_size_are_kept_and_warned_about(
    tiny_module: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    json_output: bool,
) -> None:
    """(A fuzzer, 2026-12-07.) Timings that fall with the batch size (20, 19, 18 ms at b = 1, 2,
    4: β = −1 ms/example) are written as measured, with the warning that recommend refuses them;
    --json printed no warning."""
    import noisescale.hardware
    from noisescale.hardware import ThroughputPoint

    def falling(step: object, batch_sizes: list[int], **kwargs: object) -> list[ThroughputPoint]:
        return [ThroughputPoint(b, (0.02 - 0.001 * i,) * 2) for i, b in enumerate(batch_sizes)]

    monkeypatch.setattr(noisescale.hardware, "profile_throughput", falling, raising=False)
    out = tmp_path / "p.json"
    args = ["profile", f"{tiny_module}:build", "--no-memory-search", "--batch-sizes", "1,2,4"]
    extra = ["--json"] if json_output else []
    assert main([*args, *FAST, "-o", str(out), *extra]) == 0
    err = capsys.readouterr().err
    assert "warning: the profile's step time falls with the batch size" in err
    assert "re-profile with more --repeats" in err and "`noisescale recommend` refuses it" in err
    assert [p["step_time_s"] for p in json.loads(out.read_text())["points"]] == pytest.approx(
        [0.02, 0.019, 0.018], rel=1e-15
    )
    assert main(["recommend", "--noise-scale", "10", "--profile", str(out)]) == 2
    assert "falls with the batch size" in capsys.readouterr().err


def test_profile_that_cannot_be_written_is_kept_elsewhere(
    tiny_module: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from noisescale.commands import _args

    monkeypatch.chdir(tmp_path)

    def disk_full(path: object, data: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_args, "write_atomic", disk_full)
    out = tmp_path / "p.json"
    args = ["profile", f"{tiny_module}:build", "--no-memory-search", *FAST, "-o", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot write the measured profile to" in err and "No space left on device" in err
    (rescued,) = tmp_path.glob("noisescale-p-*.json")
    assert f"saved to {rescued} instead" in err
    assert json.loads(rescued.read_text())["kind"] == "noisescale.profile"


def test_a_file_written_while_measuring_is_not_replaced_without_force(
    tiny_module: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from noisescale.commands import profile as profile_command

    out = tmp_path / "p.json"
    real_format = profile_command.format_profile

    def another_job_writes_it(profile: object) -> str:  # runs after measuring, before writing
        out.write_text("measured by another job")
        return real_format(profile)

    monkeypatch.setattr(profile_command, "format_profile", another_job_writes_it)
    args = ["profile", f"{tiny_module}:build", "--no-memory-search", *FAST, "-o", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert out.read_text() == "measured by another job"
    assert "it was created while this command ran, and is not replaced without --force" in err
    (rescued,) = tmp_path.glob("noisescale-p-*.json")
    assert f"saved to {rescued} instead" in err
    assert json.loads(rescued.read_text())["kind"] == "noisescale.profile"
    assert not list(tmp_path.glob(".p.json.*.tmp"))
    # With --force the other file is replaced, as asked.
    rescued.unlink()
    assert main([*args, "--force"]) == 0
    assert json.loads(out.read_text())["kind"] == "noisescale.profile"


def test_profile_of_a_model_without_parameters_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ns_empty_model.py").write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.ReLU(), torch.nn.functional.mse_loss, "
        "lambda b, d: (torch.zeros(b, 2), torch.zeros(b, 2))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["profile", "ns_empty_model:build", "--no-memory-search"]) == 2
    assert "has no trainable parameters" in capsys.readouterr().err


@pytest.mark.parametrize("hard_links", [True, False])
def test_write_without_replace_never_overwrites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hard_links: bool
) -> None:
    import errno
    import os

    from noisescale.commands._args import write_atomic

    if not hard_links:  # e.g. some network or FAT file systems: O_EXCL creation instead

        def no_link(src: object, dst: object) -> None:
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_link)
    new = tmp_path / "new.json"
    write_atomic(new, "first", replace=False)
    assert new.read_text() == "first"
    with pytest.raises(FileExistsError):
        write_atomic(new, "second", replace=False)
    assert new.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.json"]  # no temporary file left


def test_an_update_that_runs_out_of_memory_alone_is_left_unknown(
    tiny_module: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import noisescale.hardware

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")

    monkeypatch.setattr(noisescale.hardware, "time_optimizer_update", out_of_memory, raising=False)
    args = ["profile", f"{tiny_module}:build", "--batch-sizes", "1,2", "--no-memory-search"]
    assert main([*args, "--json", *FAST]) == 0
    captured = capsys.readouterr()
    assert "the optimizer update ran out of memory when timed alone" in captured.err
    data = json.loads(captured.out)
    assert data["optimizer_update_s"] is None and data["optimizer_update_times_s"] == []
