"""Units of work in one Optuna study that any number of workers claim, each run once.

This is the machinery under ``noisescale sweep`` (a unit is one batch size × learning rate) and
anything else that spreads independent runs over processes and machines sharing one database
(e.g. branched training from checkpoints). It uses Optuna's own mechanisms:

- **Enqueued trials.** :meth:`WorkQueue.enqueue` adds each unit as a WAITING trial with fixed
  parameters, unless the unit already has a waiting, running or complete trial.
- **Atomic claims.** :meth:`WorkQueue.claim` moves a WAITING trial to RUNNING the way Optuna's
  ``Study.ask`` pops its queue: a read-check-write of the trial's state under a row lock
  (``SELECT … FOR UPDATE`` on PostgreSQL; ``BEGIN IMMEDIATE`` on SQLite, see
  :mod:`noisescale.sweep.storage`), so exactly one worker gets each trial.
- **Heartbeats.** A claim records the trial's first heartbeat in the transaction that marks it
  RUNNING (so a worker dead right after its claim is released like any other), then every
  ``heartbeat_interval`` seconds from a background thread. Before claiming, a worker fails
  the RUNNING trials whose heartbeat is older than ``grace_period`` (Optuna's
  ``fail_stale_trials``); its ``failed_trial_callback`` enqueues the unit again, up to
  ``max_retries`` times, so a killed worker's unit is rerun.
- **Results kept.** When the work returns, its value is stored on the trial
  (:data:`FINISHED_ATTR`) before the trial is marked COMPLETE. A worker that dies between the
  two leaves a trial that the next claimer of that unit adopts (copies and completes) instead of
  running the work again.

Two workers that start together may both enqueue the same unit. The claimer of a trial checks
the unit's other trials first: if one is COMPLETE, or an earlier one is waiting or running, the
claimed trial is a duplicate and is closed as PRUNED with ``duplicate_of``. The earliest live
trial of a unit is therefore the only one that runs.

A trial that crashes or is interrupted (the work raises) is marked FAIL and not retried by this
queue; enqueueing the unit again (e.g. running the sweep command again) reruns it.
"""

from __future__ import annotations

import contextlib
import json
import threading
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from noisescale.errors import NoiseScaleInputError
from noisescale.sweep.storage import mask_url, open_storage, scrub

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

#: User attribute holding a trial's unit key.
UNIT_ATTR = "unit"
#: User attribute listing the names of the unit's own attributes (copied to retries).
UNIT_ATTRS_ATTR = "unit_attrs"
#: User attribute written when the work returned: its value (``null`` for +inf or NaN).
FINISHED_ATTR = "finished_value"
#: User attribute on a retry: the trial numbers it retries, oldest first.
RETRY_ATTR = "retry_history"
#: Seconds between heartbeats of a claimed trial unless told otherwise.
DEFAULT_HEARTBEAT_S = 10
#: Retries of a unit whose worker died, per unit (a crash of the work itself is not retried).
DEFAULT_MAX_RETRIES = 3
#: SQLite's errors for a storage it may not write (a read-only file, or directory: no journal).
_SQLITE_WRITE_REFUSED = ("attempt to write a readonly database", "unable to open database file")
#: PostgreSQL's SQLSTATEs for it: insufficient_privilege, read_only_sql_transaction.
_PG_WRITE_REFUSED = ("42501", "25006")
_BOOKKEEPING = {UNIT_ATTR, UNIT_ATTRS_ATTR, FINISHED_ATTR, RETRY_ATTR, "error", "recovered_from"}


@dataclass(frozen=True)
class WorkUnit:
    """One independent run: its identity, its Optuna parameters and its fixed attributes.

    Attributes:
        key: Identifies the unit: two trials with the same key are the same work.
        params: Optuna parameters (numbers or strings), stored with one-point distributions.
        attrs: Further user attributes fixed for the unit (e.g. ``steps``), JSON-ready.
    """

    key: str
    params: Mapping[str, int | float | str]
    attrs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UnitOutcome:
    """What happened to a claimed unit.

    Attributes:
        unit: The unit.
        trial_number: The trial that was claimed.
        state: ``"complete"`` (the work ran and returned), ``"recovered"`` (a dead worker's
            finished results were adopted), ``"duplicate"`` (another trial of the unit runs or
            ran it), ``"failed"`` (the work raised) or ``"lost"`` (the claim expired while the
            work ran: the heartbeat stopped for longer than the grace period).
        value: The work's value (``"complete"``, ``"recovered"``).
        error: What the work raised (``"failed"``), or why the claim was lost.
        other_trial: The trial duplicated or recovered from.
    """

    unit: WorkUnit
    trial_number: int
    state: str
    value: float | None = None
    error: BaseException | None = None
    other_trial: int | None = None


class ClaimLostError(RuntimeError):
    """The claimed trial was finished by someone else: its heartbeat lapsed while it ran."""


class Claim:
    """A claimed trial: the work's handle on it, alive while its heartbeat thread runs.

    Use as a context manager; :meth:`complete` or :meth:`fail` close it. Leaving the block
    stops the heartbeat, so a claim left open (its process killed) expires after the grace
    period and its unit is retried.
    """

    def __init__(
        self, queue: WorkQueue, trial: optuna.trial.Trial, trial_id: int, unit: WorkUnit
    ) -> None:
        self.queue = queue
        self.trial = trial
        self.trial_id = trial_id
        self.unit = unit
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def number(self) -> int:
        """The claimed trial's number."""
        return int(self.trial.number)

    def start_heartbeat(self) -> None:
        """Record a heartbeat now and then every ``heartbeat_interval`` seconds."""
        storage, trial_id = self.queue.storage, self.trial_id
        storage.record_heartbeat(trial_id)
        interval = float(self.queue.heartbeat_interval)

        def beat() -> None:
            while not self._stop.wait(interval):
                try:
                    storage.record_heartbeat(trial_id)
                except Exception:  # a database hiccup: the next beat tries again
                    continue

        self._thread = threading.Thread(target=beat, name=f"heartbeat-{self.number}", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        """Stop the heartbeat (the claim then expires after the grace period unless closed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_heartbeat()

    def mark_finished(self, value: float) -> None:
        """Store the work's value on the trial, before :meth:`complete` marks it COMPLETE.

        Raises:
            ClaimLostError: the trial is no longer this worker's.
        """
        self._write(FINISHED_ATTR, _json_value(value))

    def complete(self, value: float) -> None:
        """Mark the trial COMPLETE with ``value`` (after :meth:`mark_finished`).

        Raises:
            ClaimLostError: the trial is no longer this worker's; its results stay on it and
                the unit's next claimer adopts them.
        """
        self._tell(value, None)

    def fail(self, error: BaseException | str) -> None:
        """Mark the trial FAIL, recording ``error``; never raises (the error is what matters)."""
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        with contextlib.suppress(Exception):
            self.trial.set_user_attr("error", text[:2000])
        with contextlib.suppress(Exception):
            self._tell(None, "FAIL")

    def prune(self, duplicate_of: int) -> None:
        """Close the trial as PRUNED: trial ``duplicate_of`` runs or ran the same unit."""
        self._write("duplicate_of", duplicate_of)
        self._tell(None, "PRUNED")

    def _write(self, key: str, value: Any) -> None:
        import optuna

        try:
            self.trial.set_user_attr(key, value)
        except optuna.exceptions.UpdateFinishedTrialError as err:
            raise self._lost() from err

    def _tell(self, value: float | None, state: str | None) -> None:
        import optuna
        from optuna.trial import TrialState

        try:
            if state is None:
                self.queue.study.tell(self.trial, value)
            else:
                self.queue.study.tell(self.trial, state=TrialState[state])
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError) as err:
            if self.queue.trial(self.number).state == TrialState.RUNNING:
                raise
            raise self._lost() from err

    def lost_error(self) -> ClaimLostError:
        """The error that says this claim was taken over by another worker."""
        return self._lost()

    def _lost(self) -> ClaimLostError:
        state = self.queue.trial(self.number).state.name
        return ClaimLostError(
            f"trial {self.number} ({self.unit.key}) was marked {state} by another worker while "
            f"this one ran it: its heartbeat lapsed for more than {self.queue.grace_period} s"
        )


class WorkQueue:
    """Units of work in one Optuna study, claimed by any number of workers (module docstring).

    Args:
        storage_url: The database URL (password included; shown masked).
        study_name: The study; created if missing (``create``), safely under races.
        heartbeat_interval: Seconds between heartbeats of a running unit (whole seconds, ≥ 1).
        grace_period: Seconds without a heartbeat after which a running unit's worker counts
            as dead (default: three intervals).
        max_retries: How often a dead worker's unit is enqueued again.
        create: Create the study if it does not exist.
        key_of: The unit key of a trial (default: its ``unit`` user attribute); trials without
            one are not units of this queue.

    Raises:
        NoiseScaleInputError: a storage that cannot be opened, a missing study without
            ``create``, or settings out of range.
    """

    def __init__(
        self,
        storage_url: str,
        study_name: str,
        *,
        heartbeat_interval: int = DEFAULT_HEARTBEAT_S,
        grace_period: int | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        create: bool = True,
        key_of: Callable[[FrozenTrial], str | None] | None = None,
    ) -> None:
        import optuna

        if int(heartbeat_interval) != heartbeat_interval or heartbeat_interval < 1:
            raise NoiseScaleInputError(
                f"the heartbeat interval must be a whole number of seconds ≥ 1, "
                f"got {heartbeat_interval}"
            )
        grace = 3 * int(heartbeat_interval) if grace_period is None else grace_period
        if int(grace) != grace or grace <= heartbeat_interval:
            raise NoiseScaleInputError(
                f"the grace period must be a whole number of seconds above the heartbeat "
                f"interval ({heartbeat_interval} s), got {grace_period}"
            )
        if max_retries < 0:
            raise NoiseScaleInputError(f"max_retries must be ≥ 0, got {max_retries}")
        self.storage_shown = mask_url(storage_url)
        self.study_name = study_name
        self.heartbeat_interval = int(heartbeat_interval)
        self.grace_period = int(grace)
        self.max_retries = int(max_retries)
        self.key_of = key_of or _unit_key
        self.storage = open_storage(
            storage_url,
            heartbeat_interval=self.heartbeat_interval,
            grace_period=self.grace_period,
            stale_trial_callback=self._requeue_stale,
        )
        self._url = storage_url
        sampler = optuna.samplers.RandomSampler(seed=0)  # every parameter is fixed per trial
        try:
            # create_study writes even when the study exists (its insert is what finds it)
            with self._writing():
                if create:
                    self.study = optuna.create_study(
                        storage=self.storage,
                        study_name=study_name,
                        direction="minimize",
                        load_if_exists=True,
                        sampler=sampler,
                    )
                else:
                    self.study = optuna.load_study(
                        storage=self.storage, study_name=study_name, sampler=sampler
                    )
        except KeyError:
            raise NoiseScaleInputError(f"no study {study_name!r} in {self.storage_shown}") from None
        self.study_id = self.storage.get_study_id_from_name(study_name)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Refuse, with exit code 2 and the driver's words, a storage this worker may not write
        (it writes claims, heartbeats and curves) instead of the driver's traceback."""
        try:
            yield
        except Exception as err:
            cause = _write_refusal(err)
            if cause is None:
                raise
            cause = scrub(cause.splitlines()[0], self._url)
            if self._url.startswith("sqlite"):
                head = f"storage {self.storage_shown} is read-only ({cause})"
                fix = (
                    "Open it writable (drop mode=ro from the URL; check the permissions of the "
                    "file and its directory)"
                )
            else:
                head = f"storage {self.storage_shown} does not let this worker write ({cause})"
                fix = (
                    "Connect as a user that may SELECT, INSERT, UPDATE and DELETE its tables "
                    "and use their sequences, in transactions that are not read-only"
                )
            raise NoiseScaleInputError(
                f"{head}: workers write their claims, heartbeats and curves there. {fix}, or "
                "read its finished runs with noisescale fit, which only reads"
            ) from None

    # -- reading -----------------------------------------------------------------------------

    def trials(self, states: Iterable[Any] | None = None) -> list[FrozenTrial]:
        """The study's trials (all, or those in ``states``), by number."""
        return self.study.get_trials(
            deepcopy=False, states=None if states is None else tuple(states)
        )

    def trial(self, number: int) -> FrozenTrial:
        """The trial with this number, fresh from the storage."""
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)
        return self.storage.get_trial(trial_id)

    def by_unit(self, keys: Collection[str] | None = None) -> dict[str, list[FrozenTrial]]:
        """The trials of each unit key (only ``keys`` when given), by number."""
        out: dict[str, list[FrozenTrial]] = {} if keys is None else {k: [] for k in keys}
        for t in self.trials():
            key = self.key_of(t)
            if key is not None and (keys is None or key in out):
                out.setdefault(key, []).append(t)
        return out

    # -- enqueueing ----------------------------------------------------------------------------

    def enqueue(self, units: Iterable[WorkUnit]) -> int:
        """Add a WAITING trial for each unit that has no waiting, running or complete trial.

        Returns:
            How many trials were added.
        """
        from optuna.trial import TrialState

        units = list(units)
        live = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
        existing = self.by_unit([u.key for u in units])
        added = 0
        with self._writing():
            for unit in units:
                if any(t.state in live for t in existing[unit.key]):
                    continue
                self._add_waiting(unit.params, unit.key, dict(unit.attrs), {})
                added += 1
        return added

    def _add_waiting(
        self,
        params: Mapping[str, Any],
        key: str,
        attrs: dict[str, Any],
        extra: dict[str, Any],
        distributions: Mapping[str, Any] | None = None,
    ) -> None:
        import optuna
        from optuna.trial import TrialState

        user_attrs = {**attrs, **extra, UNIT_ATTR: key, UNIT_ATTRS_ATTR: sorted(attrs)}
        self.study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING,
                params=dict(params),
                distributions=dict(distributions or _point_distributions(params)),
                user_attrs=user_attrs,
            )
        )

    def _requeue_stale(self, study: optuna.Study, frozen: FrozenTrial) -> None:
        """Optuna's ``failed_trial_callback``: enqueue a dead worker's unit again."""
        key = self.key_of(frozen)
        if key is None:
            return
        history = [*frozen.user_attrs.get(RETRY_ATTR, []), frozen.number]
        if FINISHED_ATTR not in frozen.user_attrs and len(history) > self.max_retries:
            return
        names = frozen.user_attrs.get(UNIT_ATTRS_ATTR, [])
        attrs = {n: frozen.user_attrs[n] for n in names if n in frozen.user_attrs}
        self._add_waiting(frozen.params, key, attrs, {RETRY_ATTR: history}, frozen.distributions)

    # -- claiming and running ------------------------------------------------------------------

    def release_stale(self) -> None:
        """Fail the running trials whose heartbeat stopped; their units are enqueued again.

        A RUNNING trial with no heartbeat at all is an older worker's (a claim of this version
        writes its first heartbeat with it): Optuna never takes it for dead, so it is given one
        here, stamped by the database's clock like every heartbeat, and is released after the
        grace period unless its worker beats.
        """
        import optuna

        with self._writing(), warnings.catch_warnings():
            _beat_silent_running(self.storage, self.study_id)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)

    def claim(self, keys: Collection[str] | None = None) -> Claim | None:
        """Claim a WAITING trial (of one of ``keys``) and start its heartbeat.

        Units are claimed in the order of ``keys`` when it is a list or tuple (else by trial
        number), and a unit's trials by number.

        Returns:
            The claim, or ``None`` when no such trial is waiting.
        """
        import optuna
        from optuna.trial import TrialState

        order = {k: i for i, k in enumerate(keys)} if isinstance(keys, list | tuple) else {}
        waiting = [
            (frozen, key)
            for frozen in self.trials((TrialState.WAITING,))
            if (key := self.key_of(frozen)) is not None and (keys is None or key in keys)
        ]
        waiting.sort(key=lambda fk: (order.get(fk[1], 0), fk[0].number))
        for frozen, key in waiting:
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(
                self.study_id, frozen.number
            )
            try:
                with self._writing():
                    if not _claim_trial(self.storage, trial_id):
                        continue  # another worker claimed it first
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            unit = WorkUnit(
                key,
                dict(frozen.params),
                {n: frozen.user_attrs[n] for n in frozen.user_attrs.get(UNIT_ATTRS_ATTR, [])},
            )
            claim = Claim(self, optuna.trial.Trial(self.study, trial_id), trial_id, unit)
            claim.start_heartbeat()
            return claim
        return None

    def run_next(
        self,
        work: Callable[[Claim], float],
        keys: Collection[str] | None = None,
    ) -> UnitOutcome | None:
        """Claim one unit and run it: the one claimed unit of work, start to finish.

        Releases stale claims first, claims the earliest waiting trial of ``keys``, and then:
        closes it as a duplicate if another trial of the unit ran or runs it; adopts a dead
        worker's finished results if there are any; otherwise calls ``work(claim)``, stores its
        value and marks the trial COMPLETE. If ``work`` raises, the trial is marked FAIL with
        the error and the outcome says so; Ctrl-C and ``SystemExit`` are re-raised after that.

        Args:
            work: Runs the unit (``claim.unit``, ``claim.trial`` for writing attributes) and
                returns its value (``inf`` for a diverged run; NaN is stored as ``inf``).
            keys: Only claim these units (default: any unit of the study), in this order
                when a list or tuple.

        Returns:
            What happened, or ``None`` when nothing was waiting.
        """
        self.release_stale()
        claim = self.claim(keys)
        if claim is None:
            return None
        with claim:
            other = self._earlier_trial(claim)
            if other is not None:
                try:
                    claim.prune(other)
                except ClaimLostError as err:
                    return UnitOutcome(claim.unit, claim.number, "lost", None, err, other)
                return UnitOutcome(claim.unit, claim.number, "duplicate", other_trial=other)
            finished = self._finished_elsewhere(claim)
            if finished is not None:
                return self._adopt(claim, finished)
            try:
                value = _finite_or_inf(work(claim))
            except BaseException as err:
                if not isinstance(err, KeyboardInterrupt | SystemExit) and not self._running(claim):
                    # The work failed because its trial was taken away (writes to it raise).
                    return UnitOutcome(claim.unit, claim.number, "lost", error=claim.lost_error())
                claim.fail(err)
                if isinstance(err, KeyboardInterrupt | SystemExit):
                    raise
                return UnitOutcome(claim.unit, claim.number, "failed", error=err)
            try:
                claim.mark_finished(value)
                claim.complete(value)
            except ClaimLostError as err:
                return UnitOutcome(claim.unit, claim.number, "lost", value, err)
            return UnitOutcome(claim.unit, claim.number, "complete", value)

    def _running(self, claim: Claim) -> bool:
        from optuna.trial import TrialState

        try:
            return self.trial(claim.number).state == TrialState.RUNNING
        except Exception:  # the database is unreachable: treat the failure as the work's own
            return True

    def _earlier_trial(self, claim: Claim) -> int | None:
        from optuna.trial import TrialState

        for t in self.by_unit([claim.unit.key])[claim.unit.key]:
            if t.number == claim.number:
                continue
            if t.state == TrialState.COMPLETE:
                return t.number
            if t.number < claim.number and t.state in (TrialState.WAITING, TrialState.RUNNING):
                return t.number
        return None

    def _finished_elsewhere(self, claim: Claim) -> FrozenTrial | None:
        from optuna.trial import TrialState

        done = [
            t
            for t in self.by_unit([claim.unit.key])[claim.unit.key]
            if t.state == TrialState.FAIL and FINISHED_ATTR in t.user_attrs
        ]
        return done[-1] if done else None

    def _adopt(self, claim: Claim, finished: FrozenTrial) -> UnitOutcome:
        stored = finished.user_attrs[FINISHED_ATTR]
        value = float("inf") if stored is None else float(stored)
        for key, attr in finished.user_attrs.items():
            if key not in _BOOKKEEPING:
                claim.trial.set_user_attr(key, attr)
        claim.trial.set_user_attr("recovered_from", finished.number)
        try:
            claim.mark_finished(value)
            claim.complete(value)
        except ClaimLostError as err:
            return UnitOutcome(claim.unit, claim.number, "lost", value, err, finished.number)
        return UnitOutcome(claim.unit, claim.number, "recovered", value, None, finished.number)


def _claim_trial(storage: optuna.storages.RDBStorage, trial_id: int) -> bool:
    """Move a WAITING trial to RUNNING and record its first heartbeat, in one transaction.

    Optuna's ``set_trial_state_values`` and ``record_heartbeat`` commit separately, and its
    ``fail_stale_trials`` skips a RUNNING trial that has no heartbeat: a worker killed between
    the two (or whose first heartbeat failed) left its unit RUNNING for ever, every later worker
    waiting for it. Here a claimed trial has a heartbeat from its first moment, so a worker dead
    at any point after its claim is released after the grace period. This is Optuna's own claim
    (``set_trial_state_values``) with the heartbeat row added to its transaction.

    Returns:
        Whether this worker claimed it (``False``: it was no longer WAITING).
    """
    from datetime import datetime

    import sqlalchemy
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna.trial import TrialState

    try:
        with _create_scoped_session(storage.scoped_session) as session:
            trial = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
            storage.check_trial_is_updatable(trial_id, trial.state)
            if trial.state != TrialState.WAITING:
                return False
            trial.state = TrialState.RUNNING
            trial.datetime_start = datetime.now()
            beat = models.TrialHeartbeatModel.where_trial_id(trial_id, session, True)
            if beat is None:
                session.add(models.TrialHeartbeatModel(trial_id=trial_id))
            else:
                beat.heartbeat = session.execute(sqlalchemy.func.now()).scalar_one()
    except sqlalchemy.exc.IntegrityError:
        return False
    return True


def _beat_silent_running(storage: optuna.storages.RDBStorage, study_id: int) -> None:
    """Record a first heartbeat for the study's RUNNING trials that have none.

    Such a trial was claimed by an older noisescale (its claim and first heartbeat were two
    commits) whose worker died in between, or is about to beat: Optuna's ``fail_stale_trials``
    skips a trial without a heartbeat, and every other worker waited for it for ever. The row
    gets the database's time (the column's default), as Optuna's own heartbeats do.
    """
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna.trial import TrialState
    from sqlalchemy import orm

    # ignore_integrity_error: another worker (or the trial's own) wrote the row first
    with _create_scoped_session(storage.scoped_session, True) as session:
        running = (
            session.query(models.TrialModel)
            .options(orm.selectinload(models.TrialModel.heartbeats))
            .filter(models.TrialModel.state == TrialState.RUNNING)
            .filter(models.TrialModel.study_id == study_id)
            .all()
        )
        for trial in running:
            if not trial.heartbeats:
                session.add(models.TrialHeartbeatModel(trial_id=trial.trial_id))


def _write_refusal(err: BaseException) -> str | None:
    """The driver's own message when ``err`` (or an error it wraps) says that the storage may
    not be written: SQLite's read-only file or one it cannot open for writing (a read-only
    directory), PostgreSQL's missing privilege (42501) or read-only transaction (25006).

    Only the driver's error is read, never SQLAlchemy's text around it, which quotes the
    statement and its parameters (a lock timeout on a study named ``readonly-ablation`` is no
    read-only storage).
    """
    import sqlite3

    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        orig = getattr(current, "orig", None)
        if isinstance(orig, BaseException):
            text = str(orig).strip()
            code = getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)
            if code in _PG_WRITE_REFUSED or (
                isinstance(orig, sqlite3.OperationalError)
                and text.lower().startswith(_SQLITE_WRITE_REFUSED)
            ):
                return text
            return None
        current = current.__cause__ or current.__context__
    return None


def _unit_key(trial: FrozenTrial) -> str | None:
    key = trial.user_attrs.get(UNIT_ATTR)
    return key if isinstance(key, str) else None


def _point_distributions(params: Mapping[str, Any]) -> dict[str, Any]:
    """One-point Optuna distributions that hold exactly these parameter values."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out: dict[str, Any] = {}
    for name, value in params.items():
        if isinstance(value, bool | str):
            out[name] = CategoricalDistribution([value])
        elif isinstance(value, int):
            out[name] = IntDistribution(value, value)
        elif isinstance(value, float):
            out[name] = FloatDistribution(value, value)
        else:
            raise NoiseScaleInputError(
                f"parameter {name!r} must be a number or a string, got {value!r}"
            )
    return out


def _finite_or_inf(value: Any) -> float:
    number = float(value)
    return number if number == number and abs(number) != float("inf") else float("inf")


def _json_value(value: float) -> float | None:
    return value if value == value and abs(value) != float("inf") else None


def unit_key(params: Mapping[str, Any], attrs: Mapping[str, Any] | None = None) -> str:
    """A canonical key for a unit: its parameters and attributes as sorted JSON, floats at 12
    significant digits (so 0.1 typed twice is one unit).

    >>> unit_key({"learning_rate": 0.1, "batch_size": 8}, {"steps": None})
    '{"batch_size": 8, "learning_rate": 0.1, "steps": null}'
    """
    merged = {**dict(params), **dict(attrs or {})}
    canonical = {
        k: float(f"{v:.12g}") if isinstance(v, float) else v for k, v in sorted(merged.items())
    }
    return json.dumps(canonical, sort_keys=True)


# -- running a set of units to the end, and what became of each ------------------------------------


@dataclass
class UnitStatus:
    """Where a unit stands after a worker has run what it could claim.

    ``state``: ``"skipped"`` (complete before this worker started), ``"complete"`` or
    ``"recovered"`` (by this worker), ``"by another worker"``, ``"running elsewhere"`` (a live
    trial another worker runs or that waits to be claimed) or ``"failed"``. ``trial``: the
    complete trial, the live one, or the last failed one (``None`` if the unit has no trial).
    """

    unit: WorkUnit
    state: str
    trial: FrozenTrial | None


@dataclass
class QueueSummary:
    """Counts of what became of the units of one :func:`run_units` call (and notes to show);
    ``storage`` is the URL with its password masked."""

    storage: str
    study_name: str
    ran: int = 0
    skipped: int = 0
    failed: int = 0
    others: int = 0
    recovered: int = 0
    pending: int = 0
    notes: list[str] = field(default_factory=list)

    _COUNTERS: ClassVar[dict[str, str]] = {
        "complete": "ran",
        "skipped": "skipped",
        "failed": "failed",
        "by another worker": "others",
        "recovered": "recovered",
        "running elsewhere": "pending",
    }

    def count(self, status: UnitStatus) -> None:
        name = self._COUNTERS[status.state]
        setattr(self, name, getattr(self, name) + 1)

    def counts_dict(self) -> dict[str, Any]:
        """The JSON-ready head of a summary: storage, study, counts and notes."""
        return {
            "storage": self.storage,
            "study": self.study_name,
            "ran": self.ran,
            "skipped": self.skipped,
            "failed": self.failed,
            "by_other_workers": self.others,
            "recovered": self.recovered,
            "running_elsewhere": self.pending,
            "notes": list(self.notes),
        }


def completed(trials: Iterable[FrozenTrial]) -> bool:
    """Whether one of a unit's trials is COMPLETE."""
    from optuna.trial import TrialState

    return any(t.state == TrialState.COMPLETE for t in trials)


def unit_statuses(
    queue: WorkQueue,
    units: Iterable[WorkUnit],
    done_before: Collection[str] = (),
    mine: Mapping[str, UnitOutcome] | None = None,
) -> list[UnitStatus]:
    """What became of each unit: ``done_before`` are the keys complete before this worker
    started, ``mine`` this worker's outcomes by key."""
    from optuna.trial import TrialState

    units = list(units)
    mine = mine or {}
    trials = queue.by_unit([u.key for u in units])
    out = []
    for unit in units:
        unit_trials = trials[unit.key]
        complete = [t for t in unit_trials if t.state == TrialState.COMPLETE]
        if complete:
            t = complete[0]
            outcome = mine.get(unit.key)
            if unit.key in done_before:
                state = "skipped"
            elif outcome is not None and outcome.trial_number == t.number:
                state = "recovered" if outcome.state == "recovered" else "complete"
            else:
                state = "by another worker"
            out.append(UnitStatus(unit, state, t))
            continue
        live = [t for t in unit_trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        if live:
            out.append(UnitStatus(unit, "running elsewhere", live[0]))
        else:
            out.append(UnitStatus(unit, "failed", unit_trials[-1] if unit_trials else None))
    return out


def run_units(
    queue: WorkQueue,
    units: Sequence[WorkUnit],
    work: Callable[[Claim, Any], float],
    *,
    failure: Callable[[UnitOutcome], Exception],
    keep_going: bool,
    progress: bool,
    bar_unit: str,
    bar_desc: str,
    wait: bool,
    on_wait: Callable[[list[UnitStatus]], None] | None,
) -> tuple[list[UnitStatus], list[UnitOutcome]]:
    """Enqueue ``units`` and run every one this worker can claim, ``work(claim, bar)`` each.

    When nothing is left to claim, waits (``wait``) for the units other workers run — they may
    die and leave them to this worker — calling ``on_wait`` with those units whenever that set
    changes. A unit whose work raised stops the run with ``failure(outcome)`` unless
    ``keep_going`` (a :class:`~noisescale.errors.NoiseScaleInputError` always stops it).
    Returns every unit's :class:`UnitStatus` and this worker's claims that were lost (their
    work ran on after its heartbeat had been silent for the grace period).
    """
    import time

    from tqdm.auto import tqdm

    keys = [u.key for u in units]
    done_before = {k for k, trials in queue.by_unit(keys).items() if completed(trials)}
    queue.enqueue(units)
    bar = tqdm(
        total=len(units),
        initial=len(done_before),
        unit=bar_unit,
        desc=bar_desc,
        disable=not progress,
    )

    def sync_bar() -> None:
        done = sum(completed(trials) for trials in queue.by_unit(keys).values())
        if done != bar.n:
            bar.n = done
            bar.refresh()

    mine: dict[str, UnitOutcome] = {}
    waited_for: list[int] = []
    looked_again: set[int] = set()
    try:
        while True:
            outcome = queue.run_next(lambda claim: work(claim, bar), keys)
            if outcome is None:
                statuses = unit_statuses(queue, units)
                pending = [s for s in statuses if s.state == "running elsewhere"]
                sync_bar()
                if not pending and wait:
                    # A dead worker's trial is failed and its unit enqueued again in two
                    # writes (Optuna's fail_stale_trials, then its callback): read between them,
                    # the unit looks failed for good. Look once more at each such trial (failed
                    # without an error of its own) before calling it failed.
                    stale = {
                        s.trial.number
                        for s in statuses
                        if s.state == "failed"
                        and s.trial is not None
                        and "error" not in s.trial.user_attrs
                    } - looked_again
                    if stale:
                        looked_again |= stale
                        time.sleep(min(float(queue.heartbeat_interval), 5.0))
                        continue
                if not pending or not wait:
                    break
                numbers = [-1 if s.trial is None else s.trial.number for s in pending]
                if numbers != waited_for and on_wait is not None:
                    on_wait(pending)
                waited_for = numbers
                time.sleep(min(float(queue.heartbeat_interval), 5.0))
                continue
            if outcome.state != "duplicate":
                mine[outcome.unit.key] = outcome
            if outcome.state == "failed":
                if isinstance(outcome.error, NoiseScaleInputError):
                    raise outcome.error
                if not keep_going:
                    raise failure(outcome) from outcome.error
            sync_bar()
    finally:
        bar.close()
    lost = [o for o in mine.values() if o.state == "lost"]
    return unit_statuses(queue, units, done_before, mine), lost
