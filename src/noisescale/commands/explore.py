"""``noisescale explore``: write the interactive batch-size explorer, one self-contained HTML file.

Example::

    noisescale explore --noise-scale 2048 -o explore.html    # then open explore.html

The page works offline from ``file://`` (inline SVG and JavaScript, no network): a box for the
noise scale, a log-scale batch-size slider, the ε_opt/ε_max curve (eq. 2.6) and the Pareto front of
steps against examples (eq. 2.11) with the regimes shaded, and readouts that match ``calc``.
"""

from __future__ import annotations

import argparse

from noisescale.commands._args import MAX_COUNT, add_force, check_output_file, write_atomic
from noisescale.errors import NoiseScaleInputError

DEFAULT_NOISE_SCALE = 1000.0
#: The page is HTML; a .png name would hold HTML that no image viewer opens.
HTML_SUFFIXES = (".html", ".htm")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "explore",
        help="write the interactive batch-size explorer page (self-contained HTML)",
        description="Write a self-contained HTML page (works offline) to explore what each batch "
        "size costs for a noise scale: optimal learning rate (eq. 2.6), steps and examples "
        "relative to their minima (eq. 2.11), and the small/balanced/large regimes.",
    )
    parser.add_argument(
        "--noise-scale",
        metavar="N",
        default=str(DEFAULT_NOISE_SCALE),
        help=f"initial noise scale B_noise or B_simple (default {DEFAULT_NOISE_SCALE:g})",
    )
    parser.add_argument(
        "--batch-size",
        metavar="B",
        help="initial batch size (default: the noise scale, rounded, within the slider's "
        "range 1 to 2^30)",
    )
    parser.add_argument(
        "-o",
        "--output",
        metavar="PAGE",
        default="explore.html",
        help="where to write the page (default explore.html)",
    )
    add_force(parser)
    parser.add_argument(
        "--json", action="store_true", help="print the written path and settings as JSON"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from noisescale.commands.calc import positive_number
    from noisescale.report.explore import explore_html

    b_noise = positive_number(args.noise_scale, "--noise-scale", maximum=MAX_COUNT)
    batch_size = (
        None
        if args.batch_size is None
        else positive_number(args.batch_size, "--batch-size", maximum=MAX_COUNT)
    )
    output = check_output_file(args.output, flag="-o", force=args.force, suffixes=HTML_SUFFIXES)
    page = explore_html(b_noise, batch_size)
    try:
        write_atomic(output, page)
    except OSError as err:
        raise NoiseScaleInputError(f"cannot write {args.output}: {err.strerror}") from None
    if args.json:
        print(json.dumps({"output": str(output), "noise_scale": b_noise}))
    else:
        print(f"Wrote {output} (noise scale {b_noise:g}); open it in a browser, it works offline.")
    return 0
