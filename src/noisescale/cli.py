"""The ``noisescale`` command line: ``noisescale <command> [options]``.

Every command prints human-readable text by default and machine-readable JSON with ``--json``
where it produces numbers. :func:`main` owns the exit codes: 0 on success, 2 for bad input of any
kind (a usage error, a :class:`~noisescale.errors.NoiseScaleInputError`, or a ``ValueError`` from
the library), printed as ``noisescale <command>: error: ...`` without a traceback, and 130 on
Ctrl-C. Set ``NOISESCALE_TRACEBACK=1`` to see the traceback of such an error. Output cut short
by its reader (``| head``) is dropped quietly: the command still finishes, and writes its files.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence
from typing import Any

from noisescale import __version__, commands
from noisescale.errors import NoiseScaleInputError


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per module of :mod:`noisescale.commands`."""
    parser = argparse.ArgumentParser(
        prog="noisescale",
        description="Measure the gradient noise scale of a training run and turn it into "
        "batch-size decisions (McCandlish et al. 2018).",
    )
    parser.add_argument("--version", action="version", version=f"noisescale {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):  # shared helpers, not commands
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit code (see the module docstring)."""
    parser = build_parser()
    args_list = list(sys.argv[1:] if argv is None else argv)
    subparsers = _subparsers(parser)
    command = next((a for a in args_list if not a.startswith("-")), None)
    sub = subparsers.get(command) if command is not None else None
    if sub is not None:
        args_list = _attach_dash_values(sub, args_list)
    try:
        args, extras = parser.parse_known_args(args_list)
        if extras:
            # Unknown flags belong to the subcommand: show its usage, not the top-level one.
            (sub or parser).error(f"unrecognized arguments: {' '.join(extras)}")
    except SystemExit as exit_:  # argparse's usage errors (2) and --help/--version (0)
        return exit_.code if isinstance(exit_.code, int) else 2
    guard = _PipeGuard(sys.stdout)
    sys.stdout = guard  # type: ignore[assignment]
    try:
        return int(args.func(args) or 0)
    except (ValueError, OverflowError) as err:
        # NoiseScaleInputError is a ValueError; library functions raise plain ValueErrors for
        # inputs they refuse, and arithmetic on absurd inputs overflows. Either way the input
        # was bad: say so, exit 2, no traceback.
        if os.environ.get("NOISESCALE_TRACEBACK"):
            raise
        message = str(err) if isinstance(err, NoiseScaleInputError) else _describe(err)
        print(f"noisescale {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"noisescale {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        guard.flush()
        sys.stdout = guard.stream


class _PipeGuard:
    """Standard output that drops what its reader no longer takes (``| head`` closed the pipe).

    A broken pipe would otherwise end the command with a traceback, before it wrote its files
    (a profile measured for minutes, say); the rest of its output goes to the null device.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return int(self.stream.write(text))
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._drop()

    def _drop(self) -> None:
        self.broken = True
        try:  # the interpreter flushes the stream at exit: let that go to the null device
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)
        except (OSError, ValueError, AttributeError):
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _describe(err: ArithmeticError | ValueError) -> str:
    text = str(err) or type(err).__name__
    return text if type(err) is ValueError else f"{type(err).__name__}: {text}"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _attach_dash_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Join ``--flag -value`` into ``--flag=-value`` for flags that take one value.

    argparse reads ``--lr -1e-3`` or ``--goal -inf`` as a flag with no value ("expected one
    argument"); the value should instead reach the flag's own check, whose message says what is
    wrong with it.
    """
    takes_one = {
        option
        for action in parser._actions
        if action.nargs is None and action.option_strings and action.type is not bool
        for option in action.option_strings
        if not isinstance(action, argparse._StoreConstAction | argparse._HelpAction)
    }
    known = {option for action in parser._actions for option in action.option_strings}
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if (
            token in takes_one
            and nxt is not None
            and nxt.startswith("-")
            and nxt != "-"
            and nxt.split("=")[0] not in known
        ):
            out.append(f"{token}={nxt}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


if __name__ == "__main__":
    sys.exit(main())
