"""``noisescale recommend``: the fastest, cheapest and balanced batch size on profiled hardware.

Combines a measured noise scale with a profile from ``noisescale profile``: every global batch
size (powers of two) on every device count, split into micro-batches that fit, priced with the
paper's eq. 2.11 (S = S_min(1 + B_noise/B), E = E_min(1 + B/B_noise)) and the profile's step time.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from noisescale.commands import _args
from noisescale.errors import NoiseScaleInputError

#: A currency is a code or a symbol, not a sentence.
MAX_CURRENCY_CHARS = 8

if TYPE_CHECKING:
    from noisescale.hardware.profile import ThroughputProfile
    from noisescale.hardware.recommend import Candidate, Recommendation


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "recommend",
        help="recommend a batch size from a noise scale and a hardware profile",
        description="Price batch sizes in steps, examples, wall-clock time, device-hours and money "
        "from a noise scale (paper eq. 2.11) and a profile written by `noisescale profile`; "
        "print the time/cost Pareto front and the fastest, cheapest and balanced choices.",
        epilog="Without --target-examples or --target-steps only ratios are known: times and "
        "costs are relative to the fastest and the cheapest candidate.",
    )
    parser.add_argument(
        "--noise-scale",
        type=_args.positive_float,
        required=True,
        metavar="B",
        help="measured noise scale B_noise (or B_crit), in the profile's examples (for a "
        "language model: sequences, i.e. tokens / block size)",
    )
    parser.add_argument("--profile", required=True, help="profile JSON from `noisescale profile`")
    parser.add_argument(
        "--gpus",
        type=_args.positive_int_list,
        default=[1],
        metavar="N1,N2,...",
        help="data-parallel device counts to consider (default: 1)",
    )
    parser.add_argument(
        "--price",
        type=_args.positive_float,
        help="price per device-hour, in the currency named by --currency",
    )
    parser.add_argument(
        "--currency",
        metavar="CODE",
        help="the currency of --price, printed with every cost (e.g. USD, EUR; needs --price)",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--target-examples",
        type=_args.positive_float,
        metavar="E_MIN",
        help="E_min: fewest examples to the goal",
    )
    target.add_argument(
        "--target-steps",
        type=_args.positive_float,
        metavar="S_MIN",
        help="S_min: fewest steps to the goal",
    )
    parser.add_argument(
        "--batch-sizes",
        type=_args.positive_int_list,
        metavar="B1,B2,...",
        help="global batch sizes to consider, each on the --gpus counts that divide it "
        "(default: for each device count N, N times powers of two up to 32·B_noise)",
    )
    parser.add_argument(
        "--max-micro-batch",
        type=_args.positive_int,
        help="largest micro-batch that fits (default: the profile's memory search)",
    )
    parser.add_argument(
        "--interconnect",
        default=None,
        metavar="NAME",
        help="assumed all-reduce bandwidth between devices: pcie4 (default, 20 GB/s), pcie5 "
        "(40 GB/s), nvlink3 (230 GB/s), nvlink4 (400 GB/s); see docs/hardware.md",
    )
    parser.add_argument(
        "--bandwidth",
        type=_args.positive_float,
        metavar="GB_PER_S",
        help="all-reduce bus bandwidth in GB/s (overrides --interconnect)",
    )
    parser.add_argument(
        "--grad-bytes",
        type=_args.nonnegative_float,
        help="gradient bytes per all-reduce (default: the profile's parameter bytes; halve "
        "them for bf16 gradient reduction)",
    )
    parser.add_argument("--json", action="store_true", help="print the recommendation as JSON")
    parser.add_argument(
        "-o", "--output", help="write a self-contained HTML page to this file (.html)"
    )
    _args.add_force(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from noisescale.hardware.page import recommendation_html
    from noisescale.hardware.profile import (
        DEFAULT_INTERCONNECT,
        INTERCONNECTS,
        Interconnect,
        ThroughputProfile,
    )
    from noisescale.hardware.recommend import recommend_batch_size

    if args.currency is not None:
        if args.price is None:
            raise NoiseScaleInputError("--currency names the currency of --price: give --price")
        if not args.currency.strip() or len(args.currency) > MAX_CURRENCY_CHARS:
            raise NoiseScaleInputError(
                f"--currency must be a short code such as USD or EUR, got {args.currency!r}"
            )
    output = (
        _args.check_output_file(
            args.output,
            flag="-o",
            force=args.force,
            suffixes=(".html", ".htm"),
            inputs=[args.profile],
        )
        if args.output
        else None
    )
    profile = ThroughputProfile.load(args.profile)
    name = args.interconnect or DEFAULT_INTERCONNECT
    if name not in INTERCONNECTS:
        raise NoiseScaleInputError(
            f"unknown --interconnect {name!r}: use one of {', '.join(sorted(INTERCONNECTS))}"
        )
    interconnect = INTERCONNECTS[name]
    if args.bandwidth is not None:
        interconnect = Interconnect(
            "custom", args.bandwidth * 1e9, f"given: {args.bandwidth:g} GB/s"
        )
    rec = recommend_batch_size(
        args.noise_scale,
        profile,
        devices=args.gpus,
        s_min=args.target_steps,
        e_min=args.target_examples,
        price_per_gpu_hour=args.price,
        batch_sizes=args.batch_sizes,
        max_micro_batch_size=args.max_micro_batch,
        interconnect=interconnect,
        grad_bytes=args.grad_bytes,
        currency=args.currency,
    )
    if rec.devices_without_candidates:
        counts = ", ".join(map(str, rec.devices_without_candidates))
        print(
            f"warning: no candidate on {counts} device(s): no batch size given divides evenly "
            "over that many (see the assumptions)",
            file=sys.stderr,
        )
    if output is not None:
        _args.write_or_rescue(
            output, recommendation_html(rec, profile), what="the page", replace=args.force
        )
    if args.json:
        data = rec.to_dict()
        data["profile"] = {
            "path": args.profile,
            "device": profile.device,
            "model": profile.model,
            "fit": profile.fit.to_dict(),
            "priced_fit": profile.pricing_fit().to_dict(),
            "max_batch_size": profile.max_batch_size,
            "optimizer_update_s": profile.optimizer_update_s,
            "out_of_memory_batch_size": profile.out_of_memory_batch_size,
        }
        print(json.dumps(data, indent=2, allow_nan=False))
    else:
        print(format_recommendation(rec, profile))
        if output is not None:
            print(f"wrote {output}")
    return 0


def format_recommendation(rec: Recommendation, profile: ThroughputProfile) -> str:
    """The Pareto front as a text table, the three picks and the assumptions."""
    device = profile.device.get("name") or profile.device.get("type")
    lines = [
        f"noisescale recommend: B_noise = {rec.b_noise:g} examples; "
        f"{profile.model.get('name')} profiled on {device}",
    ]
    if rec.relative:
        lines.append(
            "relative mode: no --target-examples/--target-steps, so time and cost are "
            "multiples of the fastest and the cheapest candidate"
        )
    else:
        lines.append(f"target: S_min = {rec.s_min:.4g} steps, E_min = {rec.e_min:.4g} examples")
    lines.append(
        f"time/cost Pareto front ({len(rec.pareto_front)} of {len(rec.candidates)} candidates; "
        "all in --json):"
    )
    header = (
        f"{'B':>8} {'N':>3} {'micro×k':>11} {'S/Smin':>7} {'E/Emin':>8} {'step ms':>9} "
        f"{'time':>10} {'cost':>24}  pick"
    )
    lines.append(header)
    for c in rec.pareto_front:
        picks = ", ".join(
            name
            for name, pick in (
                ("fastest", rec.fastest),
                ("balanced", rec.balanced),
                ("cheapest", rec.cheapest),
            )
            if pick is c
        )
        lines.append(
            f"{c.batch_size:>8} {c.devices:>3} {c.split!s:>11} {c.steps_over_min:>7.3g} "
            f"{c.examples_over_min:>8.3g} {c.step_time_s * 1e3:>9.4g} "
            f"{_time(c, rec):>10} {_cost(c, rec):>24}  {picks}"
        )
    for name, c in (
        ("fastest", rec.fastest),
        ("balanced", rec.balanced),
        ("cheapest", rec.cheapest),
    ):
        lines.append(
            f"{name + ':':<10} B = {c.batch_size} on {c.devices} device(s), micro-batch "
            f"{c.split} per device; time {_time(c, rec)}, cost {_cost(c, rec)}"
            + (" (extrapolated beyond the profiled batch sizes)" if c.extrapolated else "")
        )
    lines.append("assumptions:")
    lines.extend(f"  - {a}" for a in rec.assumptions)
    return "\n".join(lines)


def _time(c: Candidate, rec: Recommendation) -> str:
    if c.time_s is None:
        return f"×{c.time_rel:.3g}"
    hours = c.time_s / 3600
    return f"{hours:.3g} h" if hours >= 1 else f"{c.time_s / 60:.3g} min"


def _cost(c: Candidate, rec: Recommendation) -> str:
    if c.gpu_hours is None:
        return f"×{c.cost_rel:.3g}"
    hours = f"{c.gpu_hours:.3g} {rec.hours_unit}"
    if c.cost is not None:
        return f"{rec.money(c.cost)} ({hours})"
    return hours
