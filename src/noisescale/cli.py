"""The ``noisescale`` command line: ``noisescale <command> [options]``.

Every command prints human-readable text by default and machine-readable JSON with ``--json``
where it produces numbers. Bad input raises :class:`~noisescale.errors.NoiseScaleInputError`,
which is printed as ``noisescale <command>: error: ...`` with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from noisescale import __version__, commands
from noisescale.errors import NoiseScaleInputError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="noisescale",
        description="Measure the gradient noise scale of a training run and turn it into "
        "batch-size decisions (McCandlish et al. 2018).",
    )
    parser.add_argument("--version", action="version", version=f"noisescale {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except NoiseScaleInputError as err:
        print(f"noisescale {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"noisescale {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
