"""Tests of ``noisescale sweep`` (grid runs stored in an Optuna study) and ``fit`` on a study.

The training function is a few lines of NumPy that follow the App. D.1 model of
noisescale.sweep.synthetic, so the fitted B_crit has a closed-form answer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from noisescale.cli import main
from noisescale.errors import NoiseScaleInputError
from noisescale.sweep.study import read_study_runs, run_sweep
from noisescale.sweep.synthetic import SyntheticModel

MODEL = SyntheticModel(b_noise_start=20.0, b_noise_slope=1.0, loss_start=1.0, s_scale=50.0)
REPO = Path(__file__).resolve().parents[1]

TRAIN = textwrap.dedent(
    """
    import os
    import signal

    from noisescale.sweep.synthetic import SyntheticModel

    MODEL = SyntheticModel(b_noise_start=20.0, b_noise_slope=1.0, loss_start=1.0, s_scale=50.0)
    SLOWDOWN = {0.1: 1.0, 0.3: 1.5}


    def train(batch_size, learning_rate, reporter, steps=400):
        calls = os.environ.get("SWEEP_CALLS")
        n = 0
        if calls:
            with open(calls, "a") as f:
                f.write(f"{batch_size},{learning_rate}\\n")
            with open(calls) as f:
                n = len(f.readlines())
        for step in range(1, steps + 1):
            s = MODEL.progress(step / SLOWDOWN.get(learning_rate, 1.0), batch_size)
            loss = float(MODEL.metric(s))
            reporter.report(step, loss, b_simple=float(MODEL.b_noise(s)), error=loss / 2)
            if n == int(os.environ.get("SWEEP_INTERRUPT_AT", -1)) and step == 50:
                raise KeyboardInterrupt
            if n == int(os.environ.get("SWEEP_CRASH_AT", -1)) and step == 50:
                raise RuntimeError("boom")
            if n == int(os.environ.get("SWEEP_KILL_AT", -1)) and step == 450:
                os.kill(os.getpid(), signal.SIGKILL)


    def silent(batch_size, learning_rate, reporter):
        return None

    def silent_at_8(batch_size, learning_rate, reporter):
        if batch_size == 8:
            return None
        reporter.report(1, 1.0, examples=batch_size)
    """
)

BATCH_SIZES = "8,32,128,512"
LEARNING_RATES = "0.1,0.3"
GRID = [(b, lr) for b in (8, 32, 128, 512) for lr in (0.1, 0.3)]


@pytest.fixture
def train_file(tmp_path: Path) -> Path:
    path = tmp_path / "train_fn.py"
    path.write_text(TRAIN)
    return path


def _sweep(train_file: Path, storage: str, *extra: str, function: str = "train") -> int:
    return main(
        [
            "sweep",
            f"{train_file}:{function}",
            "--batch-sizes",
            BATCH_SIZES,
            "--learning-rates",
            LEARNING_RATES,
            "--storage",
            storage,
            "--study",
            "t",
            "--no-progress",
            *extra,
        ]
    )


def _trials(storage: str, study: str = "t") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=storage).get_trials()


def _calls(path: Path) -> list[tuple[int, float]]:
    if not path.exists():
        return []
    return [(int(b), float(lr)) for b, lr in (line.split(",") for line in path.read_text().split())]


def test_sweep_stores_every_run_and_fit_reads_the_study(
    train_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    assert _sweep(train_file, storage) == 0
    out = capsys.readouterr()
    assert "8 run(s) now, 0 already done, 0 failed" in out.out
    assert "Trial" not in out.err  # Optuna's INFO logs are silenced without --verbose
    trials = _trials(storage)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 8
    assert [(t.params["batch_size"], t.params["learning_rate"]) for t in trials] == GRID
    first = trials[0]
    # The trial's value is the final loss; its curve is complete.
    s_end = MODEL.progress(400, 8)
    assert first.value == pytest.approx(float(MODEL.metric(s_end)))
    (run,) = [r for r in read_study_runs(storage, "t") if r.name == f"trial {first.number}"]
    assert list(run.step) == list(range(1, 401))
    assert run.b_simple is not None and run.b_simple[-1] == pytest.approx(MODEL.b_noise(s_end))

    assert main(["fit", storage, "--study", "t", "--goal", "0.5", "--ema", "0", "--json"]) == 0
    (goal,) = json.loads(capsys.readouterr().out)["goals"]
    assert goal["b_crit"] == pytest.approx(MODEL.b_crit(0.5), rel=5e-3)
    assert {p["learning_rate"] for p in goal["points"]} == {0.1}
    # D.1 average of B_simple over every step up to the goal (a sum for the integral: ≤ 2%).
    assert goal["b_simple"] == pytest.approx(MODEL.b_crit(0.5), rel=0.02)
    # A reported extra is a metric too; an SQLite file path works without the URL prefix.
    assert (
        main(["fit", str(tmp_path / "s.db"), "--metric", "error", "--goal", "0.25", "--ema", "0"])
        == 0
    )
    assert f"B_crit = {MODEL.b_crit(0.5):.3g}" in capsys.readouterr().out


def test_interrupted_sweep_resumes_without_rerunning_finished_runs(
    train_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("SWEEP_CALLS", str(calls))
    monkeypatch.setenv("SWEEP_INTERRUPT_AT", "3")
    assert _sweep(train_file, storage) == 130  # Ctrl-C on the third run
    assert _calls(calls) == GRID[:3]
    trials = _trials(storage)
    # The grid was enqueued first: the points not reached still wait for a worker.
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] + [
        TrialState.WAITING
    ] * 5
    interrupted = trials[2]
    assert interrupted.user_attrs["records"] == 50
    assert "KeyboardInterrupt" in interrupted.user_attrs["error"]
    assert len(interrupted.user_attrs["curve_00000"]["step"]) == 50  # kept, not lost

    monkeypatch.delenv("SWEEP_INTERRUPT_AT")
    calls.unlink()
    assert _sweep(train_file, storage) == 0
    assert _calls(calls) == GRID[2:]  # the first two were not rerun; the interrupted one was
    states = [t.state for t in _trials(storage)]
    assert states.count(TrialState.COMPLETE) == len(GRID)
    assert states.count(TrialState.FAIL) == 1

    calls.unlink()
    assert _sweep(train_file, storage) == 0
    assert _calls(calls) == []  # nothing left to do


def test_crash_is_recorded_and_rerun(
    train_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("SWEEP_CALLS", str(calls))
    monkeypatch.setenv("SWEEP_CRASH_AT", "2")
    assert _sweep(train_file, storage) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: boom" in err and "run the same command again" in err
    states = [t.state for t in _trials(storage)]
    assert states[:2] == [TrialState.COMPLETE, TrialState.FAIL]
    assert states[2:] == [TrialState.WAITING] * (len(GRID) - 2)

    # With --keep-going the crash of one run does not stop the others.
    monkeypatch.setenv("SWEEP_CRASH_AT", "4")  # counts on from the two calls above
    assert _sweep(train_file, storage, "--keep-going", "--json") == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["failed"] == 1 and summary["skipped"] == 1 and summary["ran"] == 6
    assert [r["state"] for r in summary["runs"]].count("failed") == 1
    monkeypatch.delenv("SWEEP_CRASH_AT")
    assert _sweep(train_file, storage) == 0
    assert _calls(calls)[-1] == GRID[2]  # the run that failed with --keep-going


def test_killed_process_keeps_the_flushed_curve_and_reruns_the_point(
    train_file: Path, tmp_path: Path
) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    env = {**os.environ, "SWEEP_KILL_AT": "1", "SWEEP_CALLS": str(tmp_path / "calls.txt")}
    args = ["sweep", f"{train_file}:train", "--batch-sizes", "8", "--learning-rates", "0.1"]
    args += ["--storage", storage, "--study", "t", "--steps", "500", "--no-progress"]
    # Heartbeats every second; a run silent for 2 s counts as dead (the defaults are 10 s, 30 s).
    args += ["--heartbeat", "1", "--grace", "2"]
    proc = subprocess.run(
        [sys.executable, "-m", "noisescale", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (killed,) = _trials(storage)
    assert killed.state == TrialState.RUNNING
    # Killed at step 450: the two full chunks of 200 reports were already written.
    chunks = sorted(k for k in killed.user_attrs if k.startswith("curve_"))
    assert sum(len(killed.user_attrs[k]["step"]) for k in chunks) == 400

    # The next worker waits until the killed one's heartbeat is 2 s old, then reruns its point.
    assert main(args) == 0
    killed_then, rerun = _trials(storage)
    assert killed_then.state == TrialState.FAIL
    assert rerun.state == TrialState.COMPLETE and rerun.user_attrs["records"] == 500
    assert rerun.user_attrs["retry_history"] == [killed_then.number]


def test_default_storage_is_sweep_db_in_the_cwd(
    train_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["sweep", f"{train_file}:train", "--batch-sizes", "16", "--learning-rates", "0.1"]
    assert main([*args, "--steps", "20"]) == 0
    assert (tmp_path / "sweep.db").is_file()
    assert len(_trials("sqlite:///sweep.db", "noisescale-sweep")) == 1
    # A different --steps is a different grid point.
    assert main([*args, "--steps", "30"]) == 0
    assert len(_trials("sqlite:///sweep.db", "noisescale-sweep")) == 2


def test_progress_bar_and_module_import(
    train_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["sweep", "train_fn:train", "--batch-sizes", "16,32", "--learning-rates", "0.1"]
    assert main([*args, "--steps", "10"]) == 0
    assert "2/2" in capsys.readouterr().err  # tqdm's bar


def test_reporter_flushes_in_chunks(tmp_path: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{tmp_path / 's.db'}"

    def train(batch_size: int, learning_rate: float, reporter: object) -> None:
        for step in range(1, 8):
            reporter.report(step, 1.0 / step, examples=batch_size * step)  # type: ignore[attr-defined]

    run_sweep(train, [4], [0.1], storage=storage, study_name="c", flush_every=3, progress=False)
    (trial,) = _trials(storage, "c")
    assert sorted(k for k in trial.user_attrs if k.startswith("curve_")) == [
        "curve_00000",
        "curve_00001",
        "curve_00002",
    ]
    (run,) = read_study_runs(storage, "c")
    assert list(run.step) == list(range(1, 8)) and list(run.examples) == [4.0 * s for s in run.step]


def test_diverged_run_is_complete_with_infinite_value(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"

    def train(batch_size: int, learning_rate: float, reporter: object) -> None:
        reporter.report(1, 1.0)  # type: ignore[attr-defined]
        reporter.report(2, float("nan"))  # type: ignore[attr-defined]

    summary = run_sweep(train, [4], [0.1], storage=storage, study_name="d", progress=False)
    assert summary.ran == 1
    (trial,) = _trials(storage, "d")
    assert trial.state == TrialState.COMPLETE and trial.value == float("inf")
    (run,) = read_study_runs(storage, "d")
    assert run.diverged_at_step == 2.0 and list(run.step) == [1.0]


def test_bad_input_exits_2(
    train_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    silent = ["sweep", f"{train_file}:silent", "--batch-sizes", "8", "--learning-rates", "0.1"]
    cases = [
        (["sweep", "no_colon", "--batch-sizes", "8", "--learning-rates", "0.1"], "MODULE:FUNCTION"),
        (
            ["sweep", f"{train_file}:nope", "--batch-sizes", "8", "--learning-rates", "0.1"],
            "has no function 'nope'",
        ),
        (
            ["sweep", "no_such_module_xyz:f", "--batch-sizes", "8", "--learning-rates", "0.1"],
            "cannot import",
        ),
        (
            ["sweep", f"{train_file}:train", "--batch-sizes", "8,x", "--learning-rates", "0.1"],
            "argument --batch-sizes: expected a number, got 'x'",
        ),
        (
            ["sweep", f"{train_file}:train", "--batch-sizes", "8", "--learning-rates", "-1"],
            "argument --learning-rates: must be a finite positive number, got '-1'",
        ),
        (
            [*silent, "--storage", storage],
            "without calling reporter.report",
        ),
    ]
    for args, message in cases:
        assert main([*args, "--no-progress"]) == 2, args
        err = capsys.readouterr().err
        assert "noisescale sweep: error:" in err and message in err, err


def test_keep_going_goes_on_past_a_run_that_reported_nothing(
    train_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    args = ["sweep", f"{train_file}:silent_at_8", "--batch-sizes", "8,16,32"]
    args += ["--learning-rates", "0.1", "--storage", storage, "--study", "t", "--no-progress"]
    assert main([*args, "--keep-going", "--json"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["failed"] == 1 and summary["ran"] == 2
    assert [r["state"] for r in summary["runs"]].count("failed") == 1
    assert [t.state for t in _trials(storage)].count(TrialState.COMPLETE) == 2


def test_fit_names_the_grid_points_it_leaves_out(
    train_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A failed point is left out of the fit (its curve ends early): said, not silent."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    monkeypatch.setenv("SWEEP_CALLS", str(tmp_path / "calls.txt"))
    monkeypatch.setenv("SWEEP_CRASH_AT", "2")  # the second run: batch 8, lr 0.3
    assert _sweep(train_file, storage, "--keep-going") == 1
    capsys.readouterr()
    fit = ["fit", storage, "--study", "t", "--goal", "0.5", "--ema", "0"]
    assert main(fit) == 0
    assert (
        "warning: 1 grid point(s) have no finished run and are left out: batch_size=8, "
        "learning_rate=0.3 (failed)" in capsys.readouterr().err
    )
    assert main([*fit, "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["unfinished_points"] == ["batch_size=8, learning_rate=0.3 (failed)"]
    monkeypatch.delenv("SWEEP_CRASH_AT")
    assert _sweep(train_file, storage) == 0  # the failed point reruns and finishes
    capsys.readouterr()
    assert main(fit) == 0
    assert "left out" not in capsys.readouterr().err


def test_fit_while_a_point_completes_reads_it_or_names_it(
    train_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A point that completes while fit reads (workers writing) is either fitted or named as
    left out, never neither: fit takes the runs and the unfinished points from one read of the
    trials. Here the failed point is rerun to completion right after fit's first read."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    monkeypatch.setenv("SWEEP_CALLS", str(tmp_path / "calls.txt"))
    monkeypatch.setenv("SWEEP_CRASH_AT", "2")  # the second run: batch 8, lr 0.3
    assert _sweep(train_file, storage, "--keep-going") == 1
    monkeypatch.delenv("SWEEP_CRASH_AT")
    read = optuna.study.Study.get_trials
    fired: list[bool] = []

    def read_then_a_worker_completes(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        trials = read(self, *args, **kwargs)
        if not fired:
            fired.append(True)
            assert _sweep(train_file, storage) == 0  # the failed point reruns and finishes
        return trials

    monkeypatch.setattr(optuna.study.Study, "get_trials", read_then_a_worker_completes)
    capsys.readouterr()
    assert main(["fit", storage, "--study", "t", "--goal", "0.5", "--ema", "0", "--json"]) == 0
    assert fired
    out, err = capsys.readouterr()
    payload = json.loads(out[out.index('{\n  "kind": "noisescale.fit"') :])
    assert payload["runs"] == len(GRID) - 1
    assert payload["unfinished_points"] == ["batch_size=8, learning_rate=0.3 (failed)"]
    assert "1 grid point(s) have no finished run and are left out" in err


def test_fit_on_a_study_errors(
    train_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    for study in ("a", "b"):
        args = ["sweep", f"{train_file}:train", "--batch-sizes", "8", "--learning-rates", "0.1"]
        assert main([*args, "--storage", storage, "--study", study, "--steps", "5"]) == 0
    capsys.readouterr()
    assert main(["fit", storage]) == 2
    assert "holds 2 studies (a, b); name one or more with --study" in capsys.readouterr().err
    assert main(["fit", storage, "--study", "zzz"]) == 2
    assert "no study 'zzz'" in capsys.readouterr().err
    assert main(["fit", storage, "--study", "a"]) == 2
    assert "needs at least 3" in capsys.readouterr().err
    with pytest.raises(NoiseScaleInputError, match="no finished run"):
        optuna.create_study(storage=storage, study_name="empty")
        read_study_runs(storage, "empty")


def test_fit_reads_a_read_only_storage(
    train_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SQLite's read-only URI form (a study on a read-only share): fit reads the file the URI
    names (not 'file:...' taken literally as a path) and gives the writable URL's numbers."""
    db = tmp_path / "s.db"
    assert _sweep(train_file, f"sqlite:///{db}") == 0
    fit = ["--study", "t", "--goal", "0.5", "--ema", "0", "--json"]
    capsys.readouterr()
    assert main(["fit", f"sqlite:///{db}", *fit]) == 0
    writable = json.loads(capsys.readouterr().out)
    # uri in every spelling SQLAlchemy takes for true (it opens the file read-only for each)
    for uri in ("true", "True", "1", "YES"):
        assert main(["fit", f"sqlite:///file:{db}?mode=ro&uri={uri}", *fit]) == 0, uri
        fitted = json.loads(capsys.readouterr().out)
        assert fitted["goals"] == writable["goals"] and fitted["runs"] == len(GRID)


def test_fit_refuses_uri_options_without_file_prefix(
    train_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """mode=ro&uri=true on a plain path: SQLAlchemy would hand SQLite the name 's.db?mode=ro'
    as a file to create. fit never creates a file: it refuses naming the form to write."""
    db = tmp_path / "s.db"
    assert _sweep(train_file, f"sqlite:///{db}") == 0
    capsys.readouterr()
    url = f"sqlite:///{db}?mode=ro&uri=true"
    assert main(["fit", url, "--study", "t", "--goal", "0.5", "--ema", "0"]) == 2
    err = capsys.readouterr().err
    assert f"Write sqlite:///file:{db}?mode=ro&uri=true" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.db", "train_fn.py"]


def test_sweep_refuses_a_read_only_storage(
    train_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """sweep must write (claims, heartbeats, curves): on a read-only storage it refuses naming
    the cause, exit 2 and no traceback, and leaves the study as it was (here the grid is done)."""
    db = tmp_path / "s.db"
    assert _sweep(train_file, f"sqlite:///{db}") == 0
    read_only = f"sqlite:///file:{db}?mode=ro&uri=true"
    before = db.read_bytes()
    capsys.readouterr()
    assert _sweep(train_file, read_only) == 2
    err = capsys.readouterr().err
    assert f"storage {read_only} is read-only" in err and "drop mode=ro" in err
    assert "Traceback" not in err and db.read_bytes() == before


def test_sweep_refuses_a_server_it_may_not_write(
    train_file: Path, postgres_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A PostgreSQL role with SELECT only, and one whose transactions are read-only: exit 2
    with the server's words and a fix for a server (not SQLite's mode=ro), no traceback."""
    import psycopg2

    import postgres_server as pg

    url = postgres_server.create_database()
    assert _sweep(train_file, url, "--steps", "5") == 0
    database = url.rsplit("/", 1)[1]
    conn = psycopg2.connect(
        host="127.0.0.1",
        port=postgres_server.port,
        user=pg.USER,
        password=pg.PASSWORD,
        dbname=database,
    )
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE ROLE r_{database} LOGIN PASSWORD 'rpw'")
        cur.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO r_{database}")
        cur.execute(f"CREATE ROLE w_{database} LOGIN PASSWORD 'wpw'")
        cur.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO w_{database}")
        cur.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO w_{database}")
        cur.execute(f"ALTER ROLE w_{database} SET default_transaction_read_only = on")
    conn.close()
    host = f"127.0.0.1:{postgres_server.port}/{database}"
    for role, cause in (("r", "permission denied for table"), ("w", "read-only transaction")):
        shown = f"postgresql+psycopg2://{role}_{database}:***@{host}"
        for steps in ("5", "6"):  # the grid done, and a grid to enqueue
            capsys.readouterr()
            assert _sweep(train_file, shown.replace("***", f"{role}pw"), "--steps", steps) == 2
            err = capsys.readouterr().err
            assert f"storage {shown} does not let this worker write" in err, err
            assert cause in err and "not read-only" in err and "mode=ro" not in err
            assert "Traceback" not in err and f"{role}pw" not in err


def test_only_the_driver_s_error_marks_a_storage_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read-only refusal reads the driver's error, not SQLAlchemy's text that quotes the
    statement's parameters: a locked database while creating study 'readonly-ablation' is not
    called read-only. And SQLite that cannot open its journal (a read-only directory) while
    enqueueing is refused like a read-only file, not a traceback."""
    import sqlite3

    import sqlalchemy.exc

    from noisescale.sweep.queue import WorkQueue, WorkUnit

    def failing(driver_text: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> None:
            statement = "INSERT INTO studies (study_name) VALUES (?)"
            orig = sqlite3.OperationalError(driver_text)
            wrapped = sqlalchemy.exc.OperationalError(statement, ("readonly-ablation",), orig)
            raise optuna.exceptions.StorageInternalError("commit failed") from wrapped

        return fail

    storage = f"sqlite:///{tmp_path / 's.db'}"
    with monkeypatch.context() as patch:
        patch.setattr(optuna, "create_study", failing("database is locked"))
        with pytest.raises(optuna.exceptions.StorageInternalError):
            WorkQueue(storage, "readonly-ablation")
    queue = WorkQueue(storage, "readonly-ablation")
    monkeypatch.setattr(queue.study, "add_trial", failing("unable to open database file"))
    with pytest.raises(NoiseScaleInputError, match="is read-only \\(unable to open database"):
        queue.enqueue([WorkUnit("u", {"batch_size": 8})])


def test_example_training_function_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    storage = f"sqlite:///{tmp_path / 'ex.db'}"
    args = ["sweep", str(REPO / "examples" / "sweep_train.py:train"), "--batch-sizes", "4,16,64"]
    args += ["--learning-rates", "0.2,0.8", "--steps", "150", "--storage", storage]
    assert main([*args, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["fit", storage, "--goal", "0.3", "--ema", "0.5", "--json"]) == 0
    (goal,) = json.loads(capsys.readouterr().out)["goals"]
    assert goal["b_crit"] > 0 and goal["b_simple"] > 0
