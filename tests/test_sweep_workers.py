"""Several sweep workers on one study, on SQLite and on a real PostgreSQL server.

Workers are separate ``python -m noisescale sweep`` processes started together on one grid, as
on several machines. Each run appends ``batch_size,learning_rate,pid`` to a calls file, so the
tests see who ran what: every grid point exactly once, also when one worker is killed with
SIGKILL mid-run (its point is then run once more, by another worker, after the grace period).
The PostgreSQL server is started by the ``postgres_server`` fixture (tests/conftest.py) and the
tests skip, saying why, where it cannot start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from noisescale.sweep.queue import WorkQueue, WorkUnit, unit_key

REPO = Path(__file__).resolve().parents[1]

TRAIN = textwrap.dedent(
    """
    import os
    import signal
    import time


    def train(batch_size, learning_rate, reporter, steps=20):
        with open(os.environ["SWEEP_CALLS"], "a") as f:
            f.write(f"{batch_size},{learning_rate},{os.getpid()}\\n")
        for step in range(1, steps + 1):
            time.sleep(float(os.environ.get("SWEEP_STEP_SECONDS", "0.05")))
            reporter.report(step, 1.0 / (1.0 + step * learning_rate * batch_size / 64))
            if os.environ.get("SWEEP_KILL_ME") and step == 10:
                os.kill(os.getpid(), signal.SIGKILL)
    """
)

BATCH_SIZES = (8, 16, 32, 64)
LEARNING_RATES = (0.1, 0.3)
GRID = {(b, lr) for b in BATCH_SIZES for lr in LEARNING_RATES}


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return request.getfixturevalue("postgres_url")


def _start_worker(
    tmp_path: Path, storage: str, *, kill: bool = False, extra: tuple[str, ...] = ()
) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
        "SWEEP_CALLS": str(tmp_path / "calls.txt"),
        # The URL, password included, travels in the environment, not on the command line.
        "NOISESCALE_STORAGE": storage,
    }
    if kill:
        env["SWEEP_KILL_ME"] = "1"
    (tmp_path / "train_fn.py").write_text(TRAIN)
    args = [sys.executable, "-m", "noisescale", "sweep", f"{tmp_path / 'train_fn.py'}:train"]
    args += ["--batch-sizes", ",".join(map(str, BATCH_SIZES))]
    args += ["--learning-rates", ",".join(map(str, LEARNING_RATES))]
    # A grace of 8 heartbeats: on a loaded machine (the suite runs two test workers on two
    # cores beside these three processes) a healthy worker's heartbeat was once 3 s late, its
    # point taken for dead and run twice; only the killed worker's point may be.
    args += ["--study", "shared", "--no-progress", "--json", "--heartbeat", "1", "--grace", "8"]
    return subprocess.Popen(
        [*args, *extra],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _calls(tmp_path: Path) -> list[tuple[int, float, int]]:
    lines = (tmp_path / "calls.txt").read_text().split()
    return [(int(b), float(lr), int(pid)) for b, lr, pid in (line.split(",") for line in lines)]


def _trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name="shared", storage=storage).get_trials()


def _complete_points(trials: list[optuna.trial.FrozenTrial]) -> Counter[tuple[int, float]]:
    return Counter(
        (t.params["batch_size"], t.params["learning_rate"])
        for t in trials
        if t.state == TrialState.COMPLETE
    )


def test_four_workers_run_every_point_exactly_once(tmp_path: Path, storage: str) -> None:
    workers = [_start_worker(tmp_path, storage) for _ in range(4)]
    outputs = [w.communicate(timeout=240) for w in workers]
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err
        assert "s3cret" not in out + err  # the password never shows
    calls = _calls(tmp_path)
    assert Counter((b, lr) for b, lr, _ in calls) == Counter(dict.fromkeys(GRID, 1))
    trials = _trials(storage)
    # One COMPLETE trial per point; no live worker's run was failed by another worker starting.
    assert _complete_points(trials) == Counter(dict.fromkeys(GRID, 1))
    assert not [t for t in trials if t.state in (TrialState.FAIL, TrialState.RUNNING)]
    summaries = [json.loads(out) for out, _ in outputs]
    assert sum(s["ran"] for s in summaries) == len(GRID)
    assert all(s["failed"] == 0 and s["running_elsewhere"] == 0 for s in summaries)
    # Every worker waited for the others and reports the whole grid complete: run by itself,
    # by another worker, or skipped (complete before it started: a worker that starts late,
    # e.g. on a loaded machine, may find any number of points done, even all of them).
    for s in summaries:
        assert {r["state"] for r in s["runs"]} <= {"complete", "by another worker", "skipped"}
        assert s["ran"] + s["by_other_workers"] + s["skipped"] == len(GRID)


def test_a_killed_worker_s_point_is_rerun_once_by_another(tmp_path: Path, storage: str) -> None:
    # The first worker claims the first point and dies with SIGKILL at its 10th step; two
    # healthy workers start a moment later (so that the doomed one claims first).
    doomed = _start_worker(tmp_path, storage, kill=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "calls.txt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    healthy = [_start_worker(tmp_path, storage) for _ in range(2)]
    doomed.communicate(timeout=240)
    assert doomed.returncode == -9
    outputs = [w.communicate(timeout=240) for w in healthy]
    for worker, (out, err) in zip(healthy, outputs, strict=True):
        assert worker.returncode == 0, (err, out, _calls(tmp_path))
    calls = _calls(tmp_path)
    killed_pid = doomed.pid
    killed_points = [(b, lr) for b, lr, pid in calls if pid == killed_pid]
    assert len(killed_points) == 1
    counts = Counter((b, lr) for b, lr, _ in calls)
    # The killed point ran twice (killed, then rerun); every other point once.
    assert counts == Counter({**dict.fromkeys(GRID, 1), killed_points[0]: 2})
    trials = _trials(storage)
    assert _complete_points(trials) == Counter(dict.fromkeys(GRID, 1))
    (dead,) = [t for t in trials if t.state == TrialState.FAIL]
    (rerun,) = [t for t in trials if t.user_attrs.get("retry_history")]
    assert (dead.params["batch_size"], dead.params["learning_rate"]) == killed_points[0]
    assert rerun.user_attrs["retry_history"] == [dead.number]
    assert rerun.state == TrialState.COMPLETE and rerun.user_attrs["records"] == 20


def test_a_finished_run_survives_its_worker(storage: str) -> None:
    """A worker that dies after its work returned but before marking the trial COMPLETE leaves
    its results to the next claimer, which adopts them instead of running the work again."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    params = {"batch_size": 8, "learning_rate": 0.1}
    unit = WorkUnit(unit_key(params), params, {"steps": 5})
    first = WorkQueue(storage, "adopt", heartbeat_interval=1, grace_period=2)
    assert first.enqueue([unit]) == 1
    assert first.enqueue([unit]) == 0  # already waiting
    claim = first.claim()
    assert claim is not None and claim.unit == unit
    claim.trial.set_user_attr("curve_00000", {"step": [1, 2], "loss": [0.5, 0.25]})
    claim.mark_finished(0.25)
    claim.stop_heartbeat()  # the worker dies here: never marks the trial COMPLETE

    second = WorkQueue(storage, "adopt", heartbeat_interval=1, grace_period=2)

    def must_not_run(_: object) -> float:
        raise AssertionError("the finished work ran again")

    deadline = time.monotonic() + 30
    outcome = second.run_next(must_not_run)
    while outcome is None and time.monotonic() < deadline:
        time.sleep(0.5)  # until the dead claim's heartbeat is older than the grace period
        outcome = second.run_next(must_not_run)
    assert outcome is not None and outcome.state == "recovered"
    assert outcome.value == 0.25 and outcome.other_trial == claim.number
    adopted = second.trial(outcome.trial_number)
    assert adopted.state == TrialState.COMPLETE and adopted.value == 0.25
    assert adopted.user_attrs["curve_00000"] == {"step": [1, 2], "loss": [0.5, 0.25]}
    assert adopted.user_attrs["recovered_from"] == claim.number
    assert second.trial(claim.number).state == TrialState.FAIL


def test_a_worker_dead_before_its_first_heartbeat_is_released(
    storage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that dies right after its claim, before its heartbeat thread starts (killed, or
    its first heartbeat failing), must not leave its unit RUNNING for ever: Optuna's
    fail_stale_trials skips a RUNNING trial without a heartbeat, so the claim itself writes the
    first one and the unit is rerun after the grace period (2 s here)."""
    from noisescale.sweep.queue import Claim

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    params = {"batch_size": 8, "learning_rate": 0.1}
    unit = WorkUnit(unit_key(params), params)
    first = WorkQueue(storage, "nobeat", heartbeat_interval=1, grace_period=2)
    first.enqueue([unit])

    def killed(self: Claim) -> None:
        raise SystemExit("killed after the claim, before the heartbeat thread")

    with monkeypatch.context() as patch:
        patch.setattr(Claim, "start_heartbeat", killed)
        with pytest.raises(SystemExit):
            first.claim()
    (dead,) = first.trials()
    assert dead.state == TrialState.RUNNING

    second = WorkQueue(storage, "nobeat", heartbeat_interval=1, grace_period=2)
    deadline = time.monotonic() + 20  # ten grace periods
    outcome = second.run_next(lambda claim: 0.5)
    while outcome is None and time.monotonic() < deadline:
        time.sleep(0.5)
        outcome = second.run_next(lambda claim: 0.5)
    assert outcome is not None and outcome.state == "complete", [t.state for t in second.trials()]
    assert second.trial(dead.number).state == TrialState.FAIL
    assert second.trial(outcome.trial_number).user_attrs["retry_history"] == [dead.number]


def test_an_older_worker_s_claim_without_a_heartbeat_is_released(storage: str) -> None:
    """A study left by an older version: a unit claimed (RUNNING) by Optuna's claim alone, its
    worker dead before its first heartbeat. Optuna's fail_stale_trials skips a trial without a
    heartbeat, so the waiting worker waited for ever; now the trial is given a heartbeat when a
    worker first sees it and released once that has been silent for the grace period (2 s)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    params = {"batch_size": 8, "learning_rate": 0.1}
    unit = WorkUnit(unit_key(params), params)
    queue = WorkQueue(storage, "oldclaim", heartbeat_interval=1, grace_period=2)
    queue.enqueue([unit])
    (dead,) = queue.trials()
    trial_id = queue.storage.get_trial_id_from_study_id_trial_number(queue.study_id, dead.number)
    assert queue.storage.set_trial_state_values(trial_id, state=TrialState.RUNNING)
    time.sleep(2.5)  # older than the grace period by any clock: still not released at once

    started = time.monotonic()
    assert queue.run_next(lambda claim: 0.5) is None
    assert queue.trial(dead.number).state == TrialState.RUNNING
    outcome = queue.run_next(lambda claim: 0.5)
    while outcome is None and time.monotonic() < started + 20:  # ten grace periods
        time.sleep(0.5)
        outcome = queue.run_next(lambda claim: 0.5)
    assert outcome is not None and outcome.state == "complete", [t.state for t in queue.trials()]
    assert time.monotonic() - started > 1.5  # a grace period (2 s) less clock granularity
    assert queue.trial(dead.number).state == TrialState.FAIL
    assert queue.trial(outcome.trial_number).user_attrs["retry_history"] == [dead.number]


def test_duplicate_enqueues_run_once(storage: str) -> None:
    """Two workers that enqueue the same unit at the same moment: the later trial is closed as
    a duplicate of the earlier one, whichever worker claims which."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    params = {"batch_size": 4, "learning_rate": 0.5}
    unit = WorkUnit(unit_key(params), params)
    a = WorkQueue(storage, "dup", heartbeat_interval=1)
    b = WorkQueue(storage, "dup", heartbeat_interval=1)
    # Both looked before either enqueued: simulate by enqueueing twice past the check.
    a._add_waiting(unit.params, unit.key, {}, {})
    b._add_waiting(unit.params, unit.key, {}, {})
    first = a.claim()
    second = b.claim()
    assert first is not None and second is not None
    assert (first.number, second.number) == (0, 1)
    with second:
        assert b._earlier_trial(second) == first.number
    ran: list[int] = []
    with first:
        assert a._earlier_trial(first) is None
        first.mark_finished(1.0)
        first.complete(1.0)
        ran.append(first.number)
    # The later trial, still open, is now a duplicate of a COMPLETE one.
    third = b.run_next(lambda claim: ran.append(claim.number) or 0.0)
    assert third is None  # nothing waiting: trial 1 is RUNNING (its claim was not closed)
    assert ran == [0]


CLAIMER = textwrap.dedent(
    """
    import sys
    import time

    import optuna

    from noisescale.sweep.queue import WorkQueue

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    queue = WorkQueue(sys.argv[1], "race", heartbeat_interval=5)
    start = float(sys.argv[2])
    while time.time() < start:
        time.sleep(0.001)
    claim = queue.claim()
    print("claimed" if claim is not None else "none")
    if claim is not None:
        claim.stop_heartbeat()
    """
)


def test_one_waiting_trial_is_claimed_by_one_of_four_processes(
    tmp_path: Path, storage: str
) -> None:
    # Without BEGIN IMMEDIATE, SQLite let 3 of 4 such processes claim the same trial (18
    # claims in 6 rounds, measured); PostgreSQL's row lock lets one.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    WorkQueue(storage, "race").enqueue([WorkUnit("only", {"a": 1})])
    script = tmp_path / "claimer.py"
    script.write_text(CLAIMER)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    start = time.time() + 6.0  # all four have opened the storage by then
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), storage, str(start)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    assert sorted(out.strip() for out, _ in results) == ["claimed", "none", "none", "none"]
