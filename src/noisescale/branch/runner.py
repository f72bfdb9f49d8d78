"""Run the branches of a training run in an Optuna study that any number of workers share.

One branch is one unit of a :class:`~noisescale.sweep.WorkQueue`: checkpoint × batch size ×
learning rate × seed, with the budget as a fixed attribute. Its curve is stored like a sweep
run's, by a :class:`~noisescale.sweep.Reporter` (user attributes ``curve_00000``, …), so branches
live in the same storage as sweeps (SQLite on one machine, PostgreSQL for several; the URL from
``NOISESCALE_STORAGE`` or a file, its password masked in every message) and inherit their
guarantees: each branch is run by exactly one worker, a killed worker's branch is rerun after
its heartbeat has been silent for the grace period, and running the same call again skips the
finished branches.

**The training function** extends the ``noisescale sweep`` convention with where to start and
how far to go::

    def train(batch_size, learning_rate, reporter, *, checkpoint, budget, seed):
        model, optimizer = load_my_checkpoint(checkpoint)  # the main run's, after `checkpoint`
        for group in optimizer.param_groups:                # examples (or tokens)
            group["lr"] = learning_rate                     # constant over the branch
        order = my_data_order(seed)                         # a fresh data order per seed
        step, seen = 0, 0
        reporter.report(0, evaluate(model), examples=0)     # the checkpoint's own loss
        while seen < budget:
            ...one optimizer step on `batch_size` examples...
            step, seen = step + 1, seen + batch_size
            reporter.report(step, evaluate(model), examples=seen)

``checkpoint`` is the position of a checkpoint of the main run, in examples (or tokens) it had
consumed — the function knows where it keeps them; ``budget`` the examples (tokens) the branch
must train for; ``seed`` the data order. Report the loss often (the reference branch's curve is
inverted to find the examples it needed for a loss) and at least once at or after the budget;
a held-out loss on fixed data is far less noisy than the training batch's. Steps and examples
count from the branch point. Restore the optimizer's state with the weights; keep the learning
rate constant over the branch (a branch compares batch sizes, not schedules).

Optuna is imported inside the functions, so ``import noisescale.branch`` does not need it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from noisescale import theory
from noisescale.branch.compare import BranchRun
from noisescale.errors import NoiseScaleInputError
from noisescale.sweep.queue import (
    DEFAULT_HEARTBEAT_S,
    DEFAULT_MAX_RETRIES,
    UNIT_ATTR,
    Claim,
    QueueSummary,
    UnitOutcome,
    UnitStatus,
    WorkQueue,
    WorkUnit,
    run_units,
    unit_key,
)
from noisescale.sweep.runs import Run
from noisescale.sweep.storage import DEFAULT_STORAGE, mask_url
from noisescale.sweep.study import (
    FLUSH_EVERY,
    FLUSH_SECONDS,
    Reporter,
    open_study,
    select_studies,
    trial_curve,
)

if TYPE_CHECKING:
    import optuna

#: The study name unless told otherwise.
DEFAULT_STUDY = "noisescale-branch"
#: Data orders per batch size unless told otherwise: the fewest that give an interval that is
#: not absurdly wide (Student t with 2 degrees of freedom: 4.30 standard errors).
DEFAULT_REPEATS = 3
#: How a branch's learning rate follows its batch size from the main run's (B₀, ε₀).
LR_RULES = ("none", "linear", "sqrt", "paper")
#: Study user attribute holding the latest plan run on it (for analyses without the plan).
PLAN_ATTR = "branch_plan"
#: The unit attribute that marks a trial as a branch.
KIND = "branch"
#: What a plan's checkpoints, budget and batch sizes can count.
UNITS = ("examples", "tokens")


class BranchRunError(RuntimeError):
    """The training function raised; the branch is recorded as failed and reruns next time."""


@dataclass(frozen=True)
class BranchPlan:
    """Which branches to run.

    Attributes:
        checkpoints: Positions of the main run's checkpoints (examples or tokens consumed).
        batch_sizes: Batch sizes of the branches; the smallest is the default reference.
        base_batch_size: B₀, the main run's batch size, where ``base_learning_rate`` holds.
        base_learning_rate: ε₀, the main run's learning rate at the checkpoints.
        budget: Δ: examples (tokens) every branch trains for.
        lr_rule: ``"none"``, ``"linear"``, ``"sqrt"`` or ``"paper"`` (eq. A.3 with B* =
            ``b_star`` and exponent ``alpha``): ε(B) = ε₀ × the rule's factor from B₀ to B.
        alpha: α of eq. A.3.
        b_star: B* of eq. A.3, for ``"paper"``.
        lr_grid: Multipliers of the rule's rate tried at every batch size (``(1.0,)``: the rule
            alone; e.g. ``(0.5, 1, 2)`` tunes each branch on a small grid; the best at the
            budget is compared).
        repeats: Data orders (seeds 0 … repeats − 1) per batch size and learning rate.
        unit: What checkpoints, budget and batch sizes count: ``"examples"`` or ``"tokens"``.
            Stored with the plan so that an analysis reads the branches in their own unit.
    """

    checkpoints: tuple[float, ...]
    batch_sizes: tuple[int, ...]
    base_batch_size: int
    base_learning_rate: float
    budget: float
    lr_rule: str = "sqrt"
    alpha: float = 1.0
    b_star: float | None = None
    lr_grid: tuple[float, ...] = (1.0,)
    repeats: int = DEFAULT_REPEATS
    unit: str = "examples"

    def __post_init__(self) -> None:
        def positive_ints(values: Sequence[Any]) -> bool:
            return all(not isinstance(v, bool) and float(v).is_integer() and v >= 1 for v in values)

        if not self.checkpoints:
            raise NoiseScaleInputError("give at least one checkpoint to branch from")
        if any(not (math.isfinite(c) and c >= 0) for c in self.checkpoints):
            raise NoiseScaleInputError("checkpoints are positions along the run: numbers ≥ 0")
        if len(set(self.checkpoints)) != len(self.checkpoints):
            raise NoiseScaleInputError("a checkpoint is given twice")
        if len(self.batch_sizes) < 2 or not positive_ints(self.batch_sizes):
            raise NoiseScaleInputError("give at least two batch sizes, positive whole numbers")
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise NoiseScaleInputError("a batch size is given twice")
        if not positive_ints([self.base_batch_size]):
            raise NoiseScaleInputError(
                f"the base batch size must be a positive whole number, got {self.base_batch_size}"
            )
        if not (math.isfinite(self.base_learning_rate) and self.base_learning_rate > 0):
            raise NoiseScaleInputError(
                f"the base learning rate must be positive, got {self.base_learning_rate}"
            )
        if not (math.isfinite(self.budget) and self.budget >= max(self.batch_sizes)):
            raise NoiseScaleInputError(
                f"the budget ({self.budget:g}) must be at least the largest batch size "
                f"({max(self.batch_sizes)}): every branch needs a step; give it a few dozen "
                "steps at the smallest batch size at least"
            )
        if self.lr_rule not in LR_RULES:
            raise NoiseScaleInputError(
                f"unknown learning-rate rule {self.lr_rule!r}; choose one of {', '.join(LR_RULES)}"
            )
        if self.lr_rule == "paper":
            if self.b_star is None or not (math.isfinite(self.b_star) and self.b_star > 0):
                raise NoiseScaleInputError(
                    "the 'paper' learning-rate rule (eq. A.3) needs a positive B* (b_star)"
                )
        elif self.b_star is not None:
            raise NoiseScaleInputError("b_star goes with the 'paper' learning-rate rule only")
        if not 0 < self.alpha <= 1:
            raise NoiseScaleInputError(f"alpha must be in (0, 1], got {self.alpha}")
        if not self.lr_grid or any(not (math.isfinite(m) and m > 0) for m in self.lr_grid):
            raise NoiseScaleInputError("learning-rate multipliers must be positive numbers")
        if len(set(self.lr_grid)) != len(self.lr_grid):
            raise NoiseScaleInputError("a learning-rate multiplier is given twice")
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise NoiseScaleInputError(f"repeats must be a whole number ≥ 1, got {self.repeats}")
        if self.unit not in UNITS:
            raise NoiseScaleInputError(f"unit must be one of {', '.join(UNITS)}, got {self.unit!r}")

    def learning_rates(self, batch_size: float) -> list[float]:
        """ε₀ × rule factor from B₀ to ``batch_size`` × each multiplier of the grid."""
        rule = "noise" if self.lr_rule == "paper" else self.lr_rule
        lr = theory.scaled_lr(
            self.base_batch_size,
            batch_size,
            self.base_learning_rate,
            rule,  # type: ignore[arg-type]
            b_noise=self.b_star,
            alpha=self.alpha,
        )
        return [float(f"{lr * m:.12g}") for m in self.lr_grid]

    def units(self) -> list[WorkUnit]:
        """Every branch, checkpoint by checkpoint, seed by seed, smallest batch size first."""
        out = []
        for c in self.checkpoints:
            for seed in range(self.repeats):
                for b in sorted(self.batch_sizes):
                    for lr in self.learning_rates(b):
                        params = {
                            "checkpoint": _number(c),
                            "batch_size": int(b),
                            "learning_rate": lr,
                            "seed": seed,
                        }
                        attrs = {"budget": _number(self.budget), "kind": KIND}
                        out.append(WorkUnit(unit_key(params, attrs), params, attrs))
        return out

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class BranchState:
    """One branch and what happened to it (states as for sweep grid points)."""

    checkpoint: float
    batch_size: int
    learning_rate: float
    seed: int
    state: str
    trial_number: int | None = None
    final_loss: float | None = None
    error: str | None = None


@dataclass
class BranchSummary(QueueSummary):
    """The branches after :func:`run_branches`; ``storage`` has its password masked."""

    branches: list[BranchState] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite losses as ``null``)."""
        return {
            **self.counts_dict(),
            "branches": [
                {
                    **b.__dict__,
                    "final_loss": b.final_loss
                    if b.final_loss is None or math.isfinite(b.final_loss)
                    else None,
                }
                for b in self.branches
            ],
        }


class _BranchReporter(Reporter):
    """A :class:`Reporter` that also remembers how far the branch got, in examples."""

    def __init__(self, trial: optuna.trial.Trial, batch_size: int, **kwargs: Any) -> None:
        super().__init__(trial, **kwargs)
        self._batch_size = batch_size
        self.examples_reached = 0.0

    def report(
        self,
        step: int,
        loss: float | None,
        *,
        examples: float | None = None,
        b_simple: float | None = None,
        **extra: float | None,
    ) -> None:
        super().report(step, loss, examples=examples, b_simple=b_simple, **extra)
        seen = float(step) * self._batch_size if examples is None else float(examples)
        self.examples_reached = max(self.examples_reached, seen)


def run_branches(
    train: Callable[..., Any],
    plan: BranchPlan,
    *,
    storage: str = DEFAULT_STORAGE,
    study_name: str = DEFAULT_STUDY,
    keep_going: bool = False,
    progress: bool = True,
    flush_every: int = FLUSH_EVERY,
    flush_seconds: float = FLUSH_SECONDS,
    heartbeat_interval: int = DEFAULT_HEARTBEAT_S,
    grace_period: int | None = None,
    max_retries: int = DEFAULT_MAX_RETRIES,
    wait: bool = True,
    on_wait: Callable[[list[BranchState]], None] | None = None,
) -> BranchSummary:
    """Run every branch of ``plan`` not yet done and store the curves (module docstring).

    ``train`` is called as ``train(batch_size=B, learning_rate=lr, reporter=reporter,
    checkpoint=c, budget=Δ, seed=r)``. Any number of processes may call this with the same plan
    on one study at once; each branch runs once.

    Args:
        train: The training function.
        plan: The branches.
        storage: Database URL (password included; messages mask it). The same storage as
            sweeps; a study of its own.
        study_name: The study; created if missing.
        keep_going: Record a branch that raises as failed and go on.
        progress: Show a progress bar.
        flush_every, flush_seconds: When a branch's curve is written (see :class:`Reporter`).
        heartbeat_interval, grace_period, max_retries: As for :func:`~noisescale.sweep.run_sweep`.
        wait: When nothing is left to claim, wait for branches other workers are running.
        on_wait: Called with the branches being waited for, each time that set changes.

    Raises:
        BranchRunError: ``train`` raised (unless ``keep_going``); the branch is stored as failed.
        NoiseScaleInputError: a branch that reported nothing or stopped short of its budget, or
            a storage that cannot be opened.
    """
    units = plan.units()
    queue = WorkQueue(
        storage,
        study_name,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        max_retries=max_retries,
    )
    before = queue.study.user_attrs.get(PLAN_ATTR)
    # Plans stored before the unit was kept have none; their branches cannot be checked.
    before_unit = before.get("unit") if isinstance(before, dict) else None
    if before_unit is not None and before_unit != plan.unit:
        raise NoiseScaleInputError(
            f"study {queue.study_name!r} holds branches counted in {before_unit}; these count "
            f"{plan.unit}, and the two cannot be compared: use another study, or give the "
            f"branches in {before_unit}"
        )
    queue.study.set_user_attr(PLAN_ATTR, plan.as_dict())

    def work(claim: Claim, bar: Any) -> float:
        return _branch_one(claim, train, bar, flush_every, flush_seconds)

    def failure(outcome: UnitOutcome) -> Exception:
        return BranchRunError(
            f"the branch {_describe(outcome.unit)} raised {type(outcome.error).__name__}: "
            f"{outcome.error}"
        )

    statuses, lost = run_units(
        queue,
        units,
        work,
        failure=failure,
        keep_going=keep_going,
        progress=progress,
        bar_unit="branch",
        bar_desc="branch",
        wait=wait,
        on_wait=None if on_wait is None else lambda pending: on_wait([_state(s) for s in pending]),
    )
    summary = BranchSummary(storage=queue.storage_shown, study_name=queue.study_name)
    for status in statuses:
        summary.count(status)
        summary.branches.append(_state(status))
    summary.notes.extend(
        f"{o.error} (its results stay on that trial; the branch was handed to another worker)"
        for o in lost
    )
    return summary


def read_branches(
    storage: str, study_name: str | None = None, *, budget: float | None = None
) -> list[BranchRun]:
    """The finished branches stored in a study, for :func:`~noisescale.branch.compare`.

    Args:
        storage: Database URL.
        study_name: The study (default: the only one in the storage).
        budget: Keep only the branches of this budget; needed when the study holds several.

    Raises:
        NoiseScaleInputError: no such study, no finished branch, or several budgets and no
            ``budget``.
    """
    from optuna.trial import TrialState

    names = select_studies(storage, study_name)
    if len(names) != 1:
        raise NoiseScaleInputError(
            f"{len(names)} studies match {study_name!r}: {', '.join(names)}; name one"
        )
    name = names[0]
    study = open_study(storage, name, create=False)
    out = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if trial.user_attrs.get("kind") != KIND or "budget" not in trial.user_attrs:
            continue
        branch = _branch_of(trial)
        if branch is not None:
            out.append(branch)
    if not out:
        raise NoiseScaleInputError(f"study {name!r} in {mask_url(storage)} has no finished branch")
    budgets = sorted({b.budget for b in out})
    if budget is not None:
        out = [b for b in out if b.budget == budget]
        if not out:
            raise NoiseScaleInputError(
                f"study {name!r} has no branch with budget {budget:g}; its budgets: "
                f"{', '.join(f'{b:g}' for b in budgets)}"
            )
    elif len(budgets) > 1:
        raise NoiseScaleInputError(
            f"study {name!r} holds branches of several budgets "
            f"({', '.join(f'{b:g}' for b in budgets)}); choose one"
        )
    return out


def stored_plan(storage: str, study_name: str) -> dict[str, Any] | None:
    """The plan last run on a study (:meth:`BranchPlan.as_dict`), or ``None``."""
    plan = open_study(storage, study_name, create=False).user_attrs.get(PLAN_ATTR)
    return plan if isinstance(plan, dict) else None


def plan_from_dict(stored: dict[str, Any] | None) -> BranchPlan | None:
    """The :class:`BranchPlan` of :meth:`BranchPlan.as_dict` (e.g. :func:`stored_plan`), or
    ``None`` when there is none or it does not describe a plan."""
    if not isinstance(stored, dict):
        return None
    names = {f.name for f in fields(BranchPlan)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in names}
    try:
        return BranchPlan(**kwargs)
    except (NoiseScaleInputError, TypeError, ValueError):
        return None


def split_by_plan(
    branches: Sequence[BranchRun], plan: BranchPlan
) -> tuple[list[BranchRun], list[BranchRun]]:
    """The branches that ``plan`` runs (its checkpoints, batch sizes, learning rates, seeds and
    budget) and the others, e.g. those of an earlier plan with another learning rate."""
    rates: dict[tuple[float, float, int], list[float]] = {}
    for u in plan.units():
        p = u.params
        key = (float(p["checkpoint"]), float(p["batch_size"]), int(p["seed"]))
        rates.setdefault(key, []).append(float(p["learning_rate"]))
    mine, others = [], []
    for b in branches:
        # Rates are compared to 1e-9: a plan stored by another version may round differently.
        planned = rates.get((b.checkpoint, float(b.batch_size), b.seed), [])
        ours = b.budget == plan.budget and any(
            math.isclose(b.learning_rate, lr, rel_tol=1e-9) for lr in planned
        )
        (mine if ours else others).append(b)
    return mine, others


def missing_branches(
    storage: str, study_name: str, plan: BranchPlan, finished: Sequence[BranchRun]
) -> list[BranchState]:
    """The branches of ``plan`` that ``finished`` (:func:`split_by_plan`'s) lacks, with what
    became of them: ``"failed"``, ``"running"`` (or waiting to be claimed), ``"finished
    without a curve"`` or ``"not run yet"``. An analysis of a partial study must say which
    branches it compares without, or it silently compares fewer batch sizes, seeds or
    checkpoints."""
    from optuna.trial import TrialState

    done = {
        (b.checkpoint, float(b.batch_size), b.seed, b.learning_rate, b.budget) for b in finished
    }

    def is_done(p: dict[str, Any]) -> bool:
        return any(
            (c, b, s, bud)
            == (float(p["checkpoint"]), float(p["batch_size"]), int(p["seed"]), plan.budget)
            and math.isclose(lr, float(p["learning_rate"]), rel_tol=1e-9)
            for c, b, s, lr, bud in done
        )

    units = [u for u in plan.units() if not is_done(u.params)]
    if not units:
        return []
    trials: dict[str, list[Any]] = {}
    for t in open_study(storage, study_name, create=False).get_trials(deepcopy=False):
        key = t.user_attrs.get(UNIT_ATTR)
        if isinstance(key, str):
            trials.setdefault(key, []).append(t)
    out = []
    for u in units:
        mine = trials.get(u.key, [])
        states = {t.state for t in mine}
        if TrialState.COMPLETE in states:
            state = "finished without a curve"
        elif TrialState.RUNNING in states:
            state = "running"
        elif TrialState.FAIL in states:
            state = "failed"
        else:
            # (every branch is queued as a waiting trial when the plan starts: one nobody ran)
            state = "not run yet"
        p = u.params
        last = mine[-1] if mine else None
        out.append(
            BranchState(
                checkpoint=float(p["checkpoint"]),
                batch_size=int(p["batch_size"]),
                learning_rate=float(p["learning_rate"]),
                seed=int(p["seed"]),
                state=state,
                trial_number=None if last is None else last.number,
                error=None if last is None else last.user_attrs.get("error"),
            )
        )
    return out


def planned_reference_sizes(storage: str, study_name: str, budget: float) -> dict[float, float]:
    """The smallest batch size of the study's branches of ``budget`` at each checkpoint, in any
    state (failed, running or queued ones too): the reference an earlier plan, analysed with
    ``--budget``, meant to compare against."""
    out: dict[float, float] = {}
    for trial in open_study(storage, study_name, create=False).get_trials(deepcopy=False):
        attrs, p = trial.user_attrs, trial.params
        if attrs.get("kind") != KIND or attrs.get("budget") is None:
            continue
        if "checkpoint" not in p or "batch_size" not in p:
            continue
        if not math.isclose(float(attrs["budget"]), float(budget), rel_tol=1e-9):
            continue
        c, b = float(p["checkpoint"]), float(p["batch_size"])
        out[c] = min(out.get(c, b), b)
    return out


def stored_unit(storage: str, study_name: str) -> str | None:
    """The unit of the plan last run on a study, or ``None`` (no plan, or one stored before
    plans kept their unit: those count examples unless told otherwise)."""
    unit = (stored_plan(storage, study_name) or {}).get("unit")
    return unit if unit in UNITS else None


def _branch_of(trial: optuna.trial.FrozenTrial) -> BranchRun | None:
    p = trial.params
    if not {"checkpoint", "batch_size", "learning_rate", "seed"} <= set(p):
        return None
    curve = trial_curve(trial)
    rows = [
        (step, _loss(loss), examples)
        for step, loss, examples in zip(
            curve.get("step", []),
            curve.get("loss", []),
            curve.get("examples") or [None] * len(curve.get("step", [])),
            strict=True,
        )
        if loss is not None
    ]
    if not rows:
        return None
    steps, losses, examples = zip(*rows, strict=True)
    b = float(p["batch_size"])
    run = Run.from_arrays(
        f"trial {trial.number}",
        b,
        float(p["learning_rate"]),
        steps,
        losses,
        examples=[b * s if e is None else e for s, e in zip(steps, examples, strict=True)],
    )
    return BranchRun(float(p["checkpoint"]), int(p["seed"]), float(trial.user_attrs["budget"]), run)


def _branch_one(
    claim: Claim, train: Callable[..., Any], bar: Any, flush_every: int, flush_seconds: float
) -> float:
    """Run the training function on one claimed branch; returns its final loss."""
    p = claim.unit.params
    b = int(p["batch_size"])
    budget = float(claim.unit.attrs["budget"])
    bar.set_postfix_str(_describe(claim.unit), refresh=True)
    reporter = _BranchReporter(claim.trial, b, flush_every=flush_every, flush_seconds=flush_seconds)
    kwargs = {
        "batch_size": b,
        "learning_rate": float(p["learning_rate"]),
        "reporter": reporter,
        "checkpoint": p["checkpoint"],
        "budget": claim.unit.attrs["budget"],
        "seed": int(p["seed"]),
    }
    try:
        train(**kwargs)
    except BaseException:
        # Keep what was reported; an error while storing it must not hide the branch's own.
        with contextlib.suppress(Exception):
            reporter.flush()
        raise
    reporter.flush()
    if reporter.records == 0:
        raise NoiseScaleInputError(
            "the training function returned without calling reporter.report(step, loss)"
        )
    final = reporter.last_loss
    diverged = final is None or not math.isfinite(final)
    if not diverged and reporter.examples_reached < budget * (1 - 1e-9):
        raise NoiseScaleInputError(
            f"the branch {_describe(claim.unit)} stopped at {reporter.examples_reached:g} "
            f"examples, short of its budget of {budget:g}: train until at least the budget"
        )
    return math.inf if diverged else float(final)  # type: ignore[arg-type]


def _describe(unit: WorkUnit) -> str:
    p = unit.params
    return (
        f"checkpoint={p['checkpoint']:g} B={p['batch_size']} lr={p['learning_rate']:g} "
        f"seed={p['seed']}"
    )


def _loss(value: Any) -> float:
    return math.nan if value == "nan" else float(value)


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _state(status: UnitStatus) -> BranchState:
    """A unit's status as a branch of the summary."""
    p, t = status.unit.params, status.trial
    extra: dict[str, Any] = {}
    if status.state == "failed":
        extra["error"] = None if t is None else t.user_attrs.get("error")
    elif status.state != "running elsewhere":
        extra["final_loss"] = t.value
    return BranchState(
        checkpoint=float(p["checkpoint"]),
        batch_size=int(p["batch_size"]),
        learning_rate=float(p["learning_rate"]),
        seed=int(p["seed"]),
        state=status.state,
        trial_number=None if t is None else t.number,
        **extra,
    )
