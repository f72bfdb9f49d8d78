"""``noisescale calc``: what a batch size costs, given a noise scale (paper eq. 2.6, 2.7, 2.11).

Examples::

    noisescale calc --noise-scale 2048 --batch-size 4096
    noisescale calc --noise-scale 2048 --batch-size 256:16384:x2 --json
    noisescale calc --noise-scale 900 --batch-size 64,128,256 --lr 0.1 --lr-batch-size 64
    noisescale calc --kaplan-loss 3.0 --batch-size 1e5:1e7:x10      # batch sizes in tokens
    noisescale calc --history runs/lm/history.jsonl --batch-size 8192:262144:x2

With ``--history`` the noise scale is the run's last B_simple, in the unit the run measured
(tokens when its loss averaged tokens; ``--unit`` converts with the run's tokens per example),
printed with its interval; a regime is stated as settled only where it holds over the whole
interval (else the range of regimes is shown), and the report's warnings (an interval open above,
a short run, a switch to preconditioned norms, later records that lost the estimate: then the
numbers are that step's, and an averaged |G|² ≤ 0 means the noise scale outgrew them) are printed
too;
for a language model measured in tokens, Kaplan et al.'s B_crit at the run's last loss is printed
beside it for comparison (their law was fitted on WebText2 with GPT-2-like models).

Batch-size syntax (``--batch-size``): a comma-separated list of items, each either a number or a
range ``START:STOP[:STEP]`` that includes STOP when the steps land on it. STEP is ``xK`` for a
geometric range (multiply by K > 1; the default is ``x2``) or ``+K`` for an arithmetic one (add
K > 0). So ``16:4096:x2`` is 16, 32, …, 4096 and ``100:1000:+100`` is 100, 200, …, 1000.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, NamedTuple

from noisescale.commands._args import MAX_COUNT
from noisescale.errors import NoiseScaleInputError

#: A range may expand to at most this many batch sizes (protects against ``1:1e9:+1``).
MAX_BATCH_SIZES = 10_000
#: The smallest batch size accepted: one example or token.
MIN_SIZE = 1.0
#: The largest batch size or noise scale accepted (examples or tokens): beyond any real run.
MAX_SIZE = MAX_COUNT
#: Eq. A.3's exponent is 0.5–1 in the paper's fits; far above that the rule means nothing.
MAX_ALPHA = 4.0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calc",
        help="steps, examples and learning rate at a batch size, given a noise scale",
        description="Given a noise scale B_noise (or B_simple), say which regime a batch size B is "
        "in and what it costs: the optimal learning rate relative to the noiseless one "
        "(ε_opt/ε_max, eq. 2.6), the optimisation steps relative to the fewest possible "
        "(S/S_min = 1 + B_noise/B) and the training examples relative to the fewest possible "
        "(E/E_min = 1 + B/B_noise, eq. 2.11).",
        epilog="BATCH syntax: a comma-separated list of numbers and ranges START:STOP[:STEP]; "
        "STEP is xK (geometric, default x2) or +K (arithmetic); STOP is included when reached. "
        "Examples: 256 | 64,128,256 | 16:4096:x2 | 100:1000:+100.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--noise-scale",
        metavar="N",
        help="the noise scale B_noise or B_simple, in the unit of the batch size (examples or "
        "tokens)",
    )
    source.add_argument(
        "--kaplan-loss",
        metavar="L",
        help="instead of --noise-scale, use Kaplan et al.'s B_crit(L) = 2.0e8·L^-4.76 tokens for "
        "a language model at loss L (nats/token); batch sizes are then in tokens",
    )
    source.add_argument(
        "--history",
        metavar="PATH",
        help="instead of --noise-scale, the last B_simple of a tracker history (its unit: "
        "examples or tokens)",
    )
    parser.add_argument(
        "--unit",
        choices=("examples", "tokens"),
        help="with --history: give the noise scale and batch sizes in this unit (converting with "
        "the run's tokens per example; default: the run's own unit)",
    )
    parser.add_argument(
        "--batch-size", required=True, metavar="BATCH", help="one batch size, a list or a range"
    )
    parser.add_argument(
        "--lr", metavar="LR", help="a learning rate tuned at --lr-batch-size; prints it scaled"
    )
    parser.add_argument(
        "--lr-batch-size",
        metavar="B0",
        help="the batch size --lr was tuned at (default: the first batch size when several)",
    )
    parser.add_argument(
        "--lr-rule",
        default="noise",
        choices=("noise", "linear", "sqrt", "none"),
        help="noise: ε ∝ 1/(1+B_noise/B)^α (eq. 2.6/A.3, default); linear: ε ∝ B; "
        "sqrt: ε ∝ √B; none: ε unchanged",
    )
    parser.add_argument(
        "--alpha",
        default="1",
        metavar="A",
        help="exponent of the noise rule (eq. A.3): 1 for SGD, 0.5–1 for Adam (default 1)",
    )
    parser.add_argument(
        "--temperature-from",
        metavar="T0",
        help="the temperature ε/B at which the noise scale was measured (needs --temperature-to)",
    )
    parser.add_argument(
        "--temperature-to",
        metavar="T1",
        help="re-express the noise scale at this temperature, B_noise·T0/T1 (eq. C.2)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from noisescale import theory

    origin: str | None = None
    measurement: _Measured | None = None
    if args.unit is not None and args.history is None:
        raise NoiseScaleInputError("--unit goes with --history (the run's B_simple)")
    if args.noise_scale is not None:
        measured = positive_number(args.noise_scale, "--noise-scale", maximum=MAX_SIZE)
        unit = "examples"
    elif args.history is not None:
        measurement = _from_history(args.history, args.unit)
        measured, unit, origin = measurement.b_simple, measurement.unit, measurement.sentence
    else:
        measured = _kaplan_b_crit(args.kaplan_loss)
        unit = "tokens"
    batch_sizes = parse_batch_sizes(args.batch_size)
    several = len(batch_sizes) > 1 or any(c in args.batch_size for c in ",:")

    b_noise = measured
    temperatures: dict[str, float] = {}
    if (args.temperature_from is None) != (args.temperature_to is None):
        raise NoiseScaleInputError("--temperature-from and --temperature-to go together")
    if args.temperature_from is not None:
        t_from = positive_number(args.temperature_from, "--temperature-from")
        t_to = positive_number(args.temperature_to, "--temperature-to")
        # its under- and overflow refused there (until 2026-12-07 B·T0 underflowed first for
        # equal temperatures of 1e-320, a review)
        b_noise = float(theory.b_noise_at_temperature(measured, t_from, t_to))
        temperatures = {"temperature_from": t_from, "temperature_to": t_to}

    # (checked whether a rule reads it or not, as --lr-batch-size is: until 2026-12-07 --alpha
    # nan or abc exited 0 wherever the noise rule was not used, a hunt)
    alpha = positive_number(args.alpha, "--alpha")
    if alpha > MAX_ALPHA:
        raise NoiseScaleInputError(
            f"--alpha must be at most {MAX_ALPHA:g} (eq. A.3 fits 0.5–1), got {args.alpha}"
        )
    lr_settings: dict[str, Any] = {}
    if args.lr is not None:
        lr_settings = {
            "lr_rule": args.lr_rule,
            "lr_batch_size": _size(args.lr_batch_size, "--lr-batch-size")
            if args.lr_batch_size is not None
            else _default_lr_batch_size(batch_sizes, several),
            "lr_tuned": positive_number(args.lr, "--lr"),
        }
        if args.lr_rule == "noise":
            lr_settings["alpha"] = alpha
    elif args.lr_batch_size is not None:
        raise NoiseScaleInputError("--lr-batch-size needs --lr")

    try:
        # Overflow is detected below and explained; NumPy's own warning would only add noise.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            rows = [
                batch_size_row(
                    b, b_noise, measured=measured, unit=unit, **temperatures, **lr_settings
                )
                for b in batch_sizes
            ]
    except OverflowError:
        rows = []
    if not rows or not all(_finite_values(row) for row in rows):
        raise NoiseScaleInputError(
            "the numbers overflow: the batch sizes, noise scale, learning rates or temperatures "
            "given are too far apart (e.g. B/B_noise beyond 1e300); use values closer together"
        )
    if measurement is not None:
        # the interval in the unit and at the temperature of the noise scale printed
        scale = b_noise / measured
        low, high = measurement.low * scale, measurement.high * scale
        for row in rows:
            row["noise_scale_interval"] = [low, high if math.isfinite(high) else None]
            row["confidence"] = measurement.confidence
            row["regimes_over_interval"] = regimes_between(row["batch_size"], low, high)
            row["preconditioned"] = measurement.preconditioned
            row["warnings"] = list(measurement.warnings)
        for warning in measurement.warnings:
            print(f"noisescale calc: warning: {warning}", file=sys.stderr)
    if args.json:
        if origin is not None:
            for row in rows:
                row["history"] = args.history
        print(json.dumps(rows if several else rows[0], indent=2, allow_nan=False))
    elif several:
        print(_table_text(rows, b_noise, unit, measured, temperatures, lr_settings, origin))
    else:
        print(_single_text(rows[0], unit, measured, temperatures, lr_settings, origin))
    return 0


class _Measured(NamedTuple):
    """The last B_simple of a history, its interval, and what the report would warn about."""

    b_simple: float
    low: float
    high: float  # inf: open above
    confidence: float
    unit: str
    sentence: str
    preconditioned: bool
    warnings: tuple[str, ...]


def regimes_between(batch_size: float, low: float, high: float) -> list[str]:
    """The regimes of ``batch_size`` for noise scales in [low, high], from small to large.

    One entry: the regime is settled over the interval. A low end of 0 reaches the large-batch
    regime and an open high end (``inf``) the small-batch one.
    """
    from noisescale import theory

    order = ["small", "balanced", "large"]
    first = theory.regime(batch_size, high) if math.isfinite(high) else "small"
    last = theory.regime(batch_size, low) if low > 0 else "large"
    return order[order.index(first) : order.index(last) + 1]


def _from_history(path: str, unit: str | None) -> _Measured:
    """The run's last B_simple in ``unit`` (default the run's) with its interval, and a sentence
    saying where it came from (with Kaplan's B_crit at the run's loss for a run measured in
    tokens)."""
    from noisescale import theory
    from noisescale.report.data import b_simple_vs_step, load_history, run_warnings
    from noisescale.report.text import format_number as f

    history = load_history(path)
    series = b_simple_vs_step(history)
    if series.b_simple.size == 0:
        raise NoiseScaleInputError(
            f"{path!r} has no step with a B_simple estimate yet (train longer, or see the "
            "'unavailable' reason in its records)"
        )
    b, step = float(series.b_simple[-1]), int(series.step[-1])
    low, high = float(series.low[-1]), float(series.high[-1])
    low = low if math.isfinite(low) and low > 0 else 0.0
    high = high if math.isfinite(high) else math.inf
    own = history.unit
    t = history.tokens_per_example_at(step)  # (the T̄ of the record whose B_simple this is)
    target = unit or own
    if target != own:
        if not (math.isfinite(t) and t > 0):
            raise NoiseScaleInputError(
                f"{path!r} is in {own} and its run counted no tokens, so it cannot be given in "
                f"{target}; count them while training (noisescale.tokens)"
            )
        factor = t if target == "tokens" else 1 / t
        b, low, high = b * factor, low * factor, high * factor
    confidence = float(history.header.get("confidence", 0.95))
    interval = f"[{f(low)}, {f(high)}]" if math.isfinite(high) else f"[{f(low)}, ∞)"
    kind = " of the preconditioned gradient P ⊙ g" if history.preconditioned else ""
    sentence = (
        f"Noise scale B_simple{kind} = {f(b)} {target}, {100 * confidence:g}% interval "
        f"{interval}, the last estimate of {path} (step {step:,}"
    )
    if math.isfinite(t) and t > 0:
        sentence += f"; {t:.3g} tokens per example"
    sentence += ")"
    at_step = history.loss[history.step == step]
    loss = float(at_step[0]) if at_step.size else math.nan
    if own == "tokens" and target == "tokens" and math.isfinite(loss) and loss > 0:
        kaplan = float(theory.b_crit_kaplan(loss))
        sentence += (
            f". For comparison, Kaplan et al.'s law at this loss ({f(loss)} nats/token) gives "
            f"B_crit = {f(kaplan)} tokens (fitted on WebText2; --kaplan-loss)"
        )
    warnings = (*history.warnings, *run_warnings(history, series))
    return _Measured(
        b, low, high, confidence, target, sentence, history.preconditioned, tuple(warnings)
    )


def batch_size_row(
    batch_size: float,
    b_noise: float,
    *,
    measured: float | None = None,
    unit: str = "examples",
    temperature_from: float | None = None,
    temperature_to: float | None = None,
    lr_tuned: float | None = None,
    lr_batch_size: float | None = None,
    lr_rule: str = "noise",
    alpha: float = 1.0,
) -> dict[str, Any]:
    """The numbers ``calc`` prints for one batch size, as a JSON-ready dict."""
    from noisescale import theory

    row: dict[str, Any] = {
        "noise_scale": b_noise,
        "batch_size": _json_number(batch_size),
        "unit": unit,
        "b_over_b_noise": batch_size / b_noise,
        "regime": theory.regime(batch_size, b_noise),
        "lr_over_max": theory.lr_over_max(batch_size, b_noise),
        "loss_improvement_over_max": theory.loss_improvement_over_max(batch_size, b_noise),
        "steps_over_min": theory.steps_over_min(batch_size, b_noise),
        "examples_over_min": theory.examples_over_min(batch_size, b_noise),
    }
    if temperature_from is not None:
        row.update(
            noise_scale_measured=measured,
            temperature_from=temperature_from,
            temperature_to=temperature_to,
        )
    if lr_tuned is not None and lr_batch_size is not None:
        row.update(
            lr=theory.scaled_lr(
                lr_batch_size, batch_size, lr_tuned, lr_rule, b_noise=b_noise, alpha=alpha
            ),
            lr_rule=lr_rule,
            lr_tuned=lr_tuned,
            lr_batch_size=_json_number(lr_batch_size),
        )
        if lr_rule == "noise":
            row["alpha"] = alpha
    return row


def parse_batch_sizes(text: str, flag: str = "--batch-size") -> list[float]:
    """Expand the ``--batch-size`` syntax (see the module docstring) into a list of sizes;
    ``flag`` names the option in the messages (report's is ``--batch-sizes``)."""
    sizes: list[float] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise NoiseScaleInputError(f"{flag} {text!r}: empty item in the list")
        parts = item.split(":")
        if len(parts) == 1:
            sizes.append(_size(item, flag))
        elif len(parts) in (2, 3):
            sizes.extend(_expand_range(item, parts, flag))
        else:
            raise NoiseScaleInputError(
                f"{flag} {item!r}: a range is START:STOP[:STEP], e.g. 16:4096:x2"
            )
        if len(sizes) > MAX_BATCH_SIZES:
            raise NoiseScaleInputError(
                f"{flag} {text!r} expands to more than {MAX_BATCH_SIZES} batch sizes"
            )
    return sizes


def positive_number(
    text: str | float, what: str, *, minimum: float | None = None, maximum: float | None = None
) -> float:
    """Parse a finite positive number from the command line, or say clearly what is wrong.

    Args:
        text: What the user typed.
        what: The option, for the message.
        minimum: The smallest value accepted, if any.
        maximum: The largest value accepted, if any.
    """
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise NoiseScaleInputError(f"{what} must be a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise NoiseScaleInputError(f"{what} must be a finite positive number, got {text!r}")
    if minimum is not None and value < minimum:
        raise NoiseScaleInputError(f"{what} must be at least {minimum:g}, got {text!r}")
    if maximum is not None and value > maximum:
        raise NoiseScaleInputError(f"{what} must be at most {maximum:g}, got {text!r}")
    return value


def _kaplan_b_crit(text: str) -> float:
    """Kaplan's B_crit(L) at ``--kaplan-loss``, refused where it is below one token or above
    :data:`MAX_SIZE` (until 2026-12-07 a loss above ~1e67 underflowed it to 0, a
    ZeroDivisionError, a hunt)."""
    from noisescale import theory

    loss = positive_number(text, "--kaplan-loss")
    low, high = (
        (size / theory.KAPLAN_B_CRIT_SCALE) ** (1 / theory.KAPLAN_B_CRIT_EXPONENT)
        for size in (MAX_SIZE, MIN_SIZE)
    )
    if not low <= loss <= high:
        raise NoiseScaleInputError(
            f"--kaplan-loss must be between {low:.4g} and {high:.4g} nats/token, where Kaplan's "
            f"B_crit(L) = 2.0e8·L^-4.76 lies between {MIN_SIZE:g} and {MAX_SIZE:g} tokens, got "
            f"{text!r}"
        )
    return float(theory.b_crit_kaplan(loss))


def _size(text: str, what: str) -> float:
    """A batch size: at least :data:`MIN_SIZE` (a subnormal one overflowed the costs to
    matplotlib's "Axis limits cannot be NaN or Inf" in report until 2026-12-07, a hunt), at most
    :data:`MAX_SIZE`."""
    return positive_number(text, what, minimum=MIN_SIZE, maximum=MAX_SIZE)


def _expand_range(item: str, parts: list[str], flag: str) -> list[float]:
    start = _size(parts[0], f"{flag} range {item!r}: START")
    stop = _size(parts[1], f"{flag} range {item!r}: STOP")
    step = parts[2].strip() if len(parts) == 3 else "x2"
    if stop < start:
        raise NoiseScaleInputError(f"{flag} range {item!r}: STOP is below START")
    if step[:1] in ("x", "*"):
        factor = positive_number(step[1:], f"{flag} range {item!r}: STEP")
        if factor <= 1:
            raise NoiseScaleInputError(f"{flag} range {item!r}: a factor must exceed 1")
        count = math.floor(math.log(stop / start) / math.log(factor) + 1e-9) + 1
        values = [start * factor**k for k in range(min(count, MAX_BATCH_SIZES + 1))]
    elif step[:1] == "+":
        increment = positive_number(step[1:], f"{flag} range {item!r}: STEP")
        count = math.floor((stop - start) / increment + 1e-9) + 1
        values = [start + increment * k for k in range(min(count, MAX_BATCH_SIZES + 1))]
    else:
        raise NoiseScaleInputError(
            f"{flag} range {item!r}: STEP must be xK (geometric) or +K (arithmetic)"
        )
    # Repeated multiplication drifts off the integers (16·1.5**k); snap back when within rounding.
    return [round(v) if abs(v - round(v)) < 1e-9 * v else v for v in values]


def _default_lr_batch_size(batch_sizes: list[float], several: bool) -> float:
    if not several:
        raise NoiseScaleInputError(
            "--lr needs --lr-batch-size (the batch size the learning rate was tuned at)"
        )
    return batch_sizes[0]


def _finite_values(row: dict[str, Any]) -> bool:
    return all(math.isfinite(v) for v in row.values() if isinstance(v, float))


def _json_number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def _regime_cell(row: dict[str, Any]) -> str:
    over = row.get("regimes_over_interval", [row["regime"]])
    return row["regime"] if len(over) == 1 else f"{over[0]}–{over[-1]}"


def _source_line(
    b_noise: float,
    unit: str,
    measured: float,
    temperatures: dict[str, float],
    origin: str | None = None,
) -> str:
    from noisescale.report.text import format_number as f

    if origin is not None:
        line = origin
    elif unit == "tokens":
        line = f"Critical batch size from Kaplan's law B_crit(L) = {f(measured)} tokens"
    else:
        line = f"Noise scale B_noise = {f(measured)}"
    if temperatures:
        line += (
            f" at temperature {f(temperatures['temperature_from'])}; at temperature "
            f"{f(temperatures['temperature_to'])} it is {f(b_noise)} (eq. C.2, B_noise ∝ 1/T)"
        )
    return line + "."


def _lr_line(lr_settings: dict[str, Any]) -> str:
    from noisescale.report.text import format_batch_size, format_number

    rule = lr_settings["lr_rule"]
    how = {
        "noise": "scaled by the noise-scale rule ε ∝ 1/(1 + B_noise/B)^α with α = "
        f"{format_number(lr_settings.get('alpha', 1.0))} (eq. 2.6, A.3)",
        "linear": "scaled by the linear rule, ε ∝ B",
        "sqrt": "scaled by the square-root rule, ε ∝ √B",
        "none": "kept unchanged (rule 'none')",
    }[rule]
    return (
        f"Learning rate {format_number(lr_settings['lr_tuned'])} tuned at batch size "
        f"{format_batch_size(lr_settings['lr_batch_size'])}, {how}."
    )


def _single_text(
    row: dict[str, Any],
    unit: str,
    measured: float,
    temperatures: dict[str, float],
    lr_settings: dict[str, Any],
    origin: str | None = None,
) -> str:
    from noisescale.report.text import REGIME_WORDS, format_batch_size, summary_sentence
    from noisescale.report.text import format_number as f

    b = format_batch_size(row["batch_size"])
    regime = f"{REGIME_WORDS[row['regime']]}."
    over = row.get("regimes_over_interval", [row["regime"]])
    if len(over) > 1:
        regime = (
            f"{row['regime']} regime at the estimate, but not settled: over its interval B is "
            f"anywhere from the {over[0]}- to the {over[-1]}-batch regime, and the ratios below "
            "are the estimate's only."
        )
    lines = [
        _source_line(row["noise_scale"], unit, measured, temperatures, origin),
        f"Batch size B = {b} {unit} is {f(row['b_over_b_noise'])}× the noise scale: {regime}",
        f"  optimal learning rate   ε_opt/ε_max   = {f(row['lr_over_max']):<10} (eq. 2.6)",
        f"  loss decrease per step  ΔL_opt/ΔL_max = {f(row['loss_improvement_over_max']):<10}"
        " (eq. 2.7)",
        f"  optimisation steps      S/S_min       = {f(row['steps_over_min']):<10}"
        " (eq. 2.11, time)",
        f"  training examples       E/E_min       = {f(row['examples_over_min']):<10}"
        " (eq. 2.11, compute)",
        summary_sentence(row["batch_size"], row["steps_over_min"], row["examples_over_min"]),
    ]
    if lr_settings:
        lines.append(_lr_line(lr_settings))
        lines.append(f"  learning rate at B = {b}: {f(row['lr'])}")
    return "\n".join(lines)


def _table_text(
    rows: list[dict[str, Any]],
    b_noise: float,
    unit: str,
    measured: float,
    temperatures: dict[str, float],
    lr_settings: dict[str, Any],
    origin: str | None = None,
) -> str:
    from noisescale.report.text import format_batch_size
    from noisescale.report.text import format_number as f

    header = ["batch size", "B/B_noise", "regime", "ε_opt/ε_max", "S/S_min", "E/E_min"]
    table = [
        [
            format_batch_size(r["batch_size"]),
            f(r["b_over_b_noise"]),
            _regime_cell(r),
            f(r["lr_over_max"]),
            f(r["steps_over_min"]),
            f(r["examples_over_min"]),
        ]
        for r in rows
    ]
    if lr_settings:
        header.append("lr")
        for line, r in zip(table, rows, strict=True):
            line.append(f(r["lr"]))
    widths = [max(len(h), *(len(line[i]) for line in table)) for i, h in enumerate(header)]
    out = [_source_line(b_noise, unit, measured, temperatures, origin)]
    if lr_settings:
        out.append(_lr_line(lr_settings))
    out.append(f"Batch sizes in {unit}; regimes: small B < B_noise/3, large B > 3·B_noise.")
    if any(len(r.get("regimes_over_interval", ())) > 1 for r in rows):
        out.append(
            "A regime X–Y is not settled: over the noise scale's interval it ranges from X to Y "
            "(the ratios are the estimate's only)."
        )
    out.append("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    out.extend("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in table)
    return "\n".join(out)
