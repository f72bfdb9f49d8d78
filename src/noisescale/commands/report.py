"""``noisescale report``: a self-contained HTML report of a run recorded by the tracker.

Example::

    noisescale report runs/mnist/history.jsonl                  # → runs/mnist/history.html
    noisescale report history.jsonl -o report.html --batch-sizes 64:4096:x2

Writes the page and, next to it in ``<page stem>_figures/``, the same figures as PNG files:
B_simple against step and against loss with its interval, the |G|² and tr Σ EMAs, the temperature,
and the cost of other fixed batch sizes and of an adaptive schedule (paper eq. 2.11, App. D).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from noisescale.commands._args import add_force, check_output_file, write_atomic
from noisescale.errors import NoiseScaleInputError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write an HTML report (and PNG figures) of a recorded run",
        description="Read a history written by the tracker (JSON Lines) and write a "
        "self-contained HTML report: the noise scale B_simple against step and loss with its "
        "interval, the |G|² and tr Σ averages, the temperature, what fixed batch sizes would have "
        "cost over the run (eq. 2.11 along the trajectory, App. D) and what an adaptive batch size "
        "B = √(r·B_simple) would have saved (γ, eq. D.4/D.5). The figures are also written as PNG "
        "files into <page stem>_figures/ next to the page.",
    )
    parser.add_argument("history", help="the history file (JSON Lines) written by the tracker")
    parser.add_argument(
        "-o",
        "--output",
        metavar="PAGE",
        help="where to write the page (default: the history's path with suffix .html)",
    )
    parser.add_argument(
        "--batch-sizes",
        metavar="BATCH",
        help="fixed batch sizes to cost, in calc's syntax (e.g. 64:4096:x2; default: powers of 2 "
        "around the measured B_simple and the run's batch size)",
    )
    add_force(parser)
    parser.add_argument(
        "--json", action="store_true", help="also print the headline numbers as JSON"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from noisescale.commands.calc import parse_batch_sizes
    from noisescale.report.data import load_history, report_data, summary_dict
    from noisescale.report.figures import draw_all
    from noisescale.report.html import report_html

    # the history first: it names an empty path (pathlib's "PosixPath('.') has an empty name"
    # came out of with_suffix below until 2026-12-07, a hunt) and any value it cannot hold
    history_path = Path(args.history)
    history = load_history(args.history)
    # (an empty --batch-sizes, an unset shell variable, is refused as calc's: until 2026-12-07
    # it costed the default sizes without a word, a hunt)
    batch_sizes = (
        None if args.batch_sizes is None else parse_batch_sizes(args.batch_sizes, "--batch-sizes")
    )
    default = history_path.with_suffix(".html")
    if args.output is None and default.exists() and default.resolve() == history_path.resolve():
        # (until 2026-12-06 this named "-o run.html", an option the user never passed, a hunt)
        example = history_path.with_name(history_path.stem + "_report.html")
        raise NoiseScaleInputError(
            f"the page goes by default to the history's path with suffix .html, which is the "
            f"history {history_path} itself; writing it would overwrite the run's records: "
            f"name the page with -o (e.g. -o {example})"
        )
    output = check_output_file(
        args.output or default,
        flag="-o" if args.output else "the default page",
        force=args.force,
        suffixes=(".html", ".htm"),
        inputs=[history_path],
    )
    figures_dir = output.with_name(output.stem + "_figures")
    if figures_dir.exists() and not figures_dir.is_dir():
        raise NoiseScaleInputError(
            f"{figures_dir} is a file; the report writes its PNG figures into a folder of that "
            "name: move the file or choose another -o"
        )
    if figures_dir.is_dir() and any(figures_dir.glob("*.png")) and not args.force:
        raise NoiseScaleInputError(
            f"{figures_dir}/ already holds figures; pass --force to replace them, or choose "
            "another -o"
        )
    data = report_data(history, batch_sizes)
    figures = draw_all(data)
    try:
        figures_dir.mkdir(exist_ok=True)
        for name, png in figures.items():
            write_atomic(figures_dir / f"{name}.png", png)
        write_atomic(output, report_html(data, figures, str(figures_dir)))
    except OSError as err:
        raise NoiseScaleInputError(f"cannot write the report to {output}: {err.strerror}") from None

    for warning in data.warnings:
        print(f"noisescale report: warning: {warning}", file=sys.stderr)
    if args.json:
        summary = summary_dict(data)
        summary.update(output=str(output), figures_dir=str(figures_dir))
        print(json.dumps(summary, indent=2, allow_nan=False))
    else:
        print(f"Wrote {output} and {len(figures)} PNG figures in {figures_dir}/")
    return 0
