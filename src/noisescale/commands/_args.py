"""What every command shares: argument types that refuse bad values, and safe output files.

Argument types raise :class:`argparse.ArgumentTypeError`, so argparse prints the subcommand's
usage and ``noisescale CMD: error: argument --flag: <what was wrong>`` with exit code 2 before any
work starts. Output paths are checked before a command measures anything
(:func:`check_output_file`, :func:`check_output_dir`) and written through a temporary file that
is renamed into place (:func:`write_atomic`), so a crash never leaves half a file and an existing
file is only replaced with ``--force``. When a result was measured and its file still cannot be
written, :func:`write_or_rescue` puts it somewhere it can and says where.

This module's name starts with an underscore, so the CLI does not take it for a command.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from noisescale.errors import NoiseScaleInputError
from noisescale.theory import MAX_COUNT


def _number(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def positive_float(text: str) -> float:
    """A finite number > 0 (and at most :data:`MAX_COUNT`)."""
    value = _number(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite positive number, got {text!r}")
    if value > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_COUNT:g}, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number ≥ 0 (and at most :data:`MAX_COUNT`)."""
    value = _number(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number ≥ 0, got {text!r}")
    if value > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_COUNT:g}, got {text!r}")
    return value


def _integer(text: str) -> int:
    value = _number(text)
    if not math.isfinite(value) or not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(value)


def positive_int(text: str) -> int:
    """A whole number ≥ 1 (``64`` or ``1e3``), at most :data:`MAX_COUNT`."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    if value > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_COUNT:g}, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    """A whole number ≥ 0, at most :data:`MAX_COUNT`."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text!r}")
    if value > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_COUNT:g}, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1]."""
    value = _number(text)
    if not (0 < value <= 1):
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def decay(text: str) -> float:
    """An EMA decay in [0, 1)."""
    value = _number(text)
    if not (0 <= value < 1):
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def positive_int_list(text: str) -> list[int]:
    """Comma-separated whole numbers ≥ 1, each given once."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated whole numbers such as 8,16,32, got {text!r}"
        )
    values = [positive_int(item) for item in items]
    _refuse_repeats(values, text)
    return values


def positive_float_list(text: str) -> list[float]:
    """Comma-separated finite numbers > 0, each given once."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0.01,0.03,0.1, got {text!r}"
        )
    values = [positive_float(item) for item in items]
    _refuse_repeats(values, text)
    return values


def _refuse_repeats(values: Sequence[float], text: str) -> None:
    seen: set[float] = set()
    for value in values:
        if value in seen:
            raise argparse.ArgumentTypeError(
                f"{value:g} is given twice in {text!r}; give each value once"
            )
        seen.add(value)


def add_force(parser: argparse.ArgumentParser) -> None:
    """The ``--force`` flag of a command that writes files."""
    parser.add_argument(
        "--force", action="store_true", help="replace output files that already exist"
    )


def check_output_file(
    path: str | Path,
    *,
    flag: str,
    force: bool,
    suffixes: Iterable[str] | None = None,
    inputs: Iterable[str | Path] = (),
) -> Path:
    """Check, before any work, that a command may write the file ``path``.

    Args:
        path: The output file as the user gave it.
        flag: The option that named it, for messages (``-o``).
        force: Whether an existing file may be replaced.
        suffixes: Allowed suffixes (lower case, with the dot), or ``None`` for any.
        inputs: Files the command reads; an output that is one of them is always refused.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        NoiseScaleInputError: a wrong suffix, a directory, a missing or read-only folder, an
            input file, or an existing file without ``force``.
    """
    out = Path(path)
    if out.is_dir():
        raise NoiseScaleInputError(f"{flag} {path} is a directory; give a file name")
    for source in inputs:
        if Path(source).exists() and out.exists() and out.resolve() == Path(source).resolve():
            raise NoiseScaleInputError(
                f"{flag} {path} is also an input of this command; writing it would overwrite "
                "that input: choose another file name"
            )
    allowed = tuple(suffixes) if suffixes is not None else None
    if allowed is not None and out.suffix.lower() not in allowed:
        names = allowed[0] if len(allowed) == 1 else f"{', '.join(allowed[:-1])} or {allowed[-1]}"
        raise NoiseScaleInputError(f"{flag} {path}: the file name must end in {names}")
    parent = out.parent
    if not parent.is_dir():
        raise NoiseScaleInputError(
            f"{flag} {path}: the folder {str(parent)!r} does not exist; create it first "
            f"(mkdir -p {parent}) or choose another path"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise NoiseScaleInputError(f"{flag} {path}: cannot write into the folder {str(parent)!r}")
    if out.exists() and not force:
        raise NoiseScaleInputError(
            f"{flag} {path} already exists; pass --force to replace it, or choose another name"
            + ("" if flag.startswith("-") else " with -o")
        )
    return out


def check_output_dir(path: str | Path, *, flag: str) -> Path:
    """Check that ``path`` is a folder or can become one (its nearest existing parent is one).

    Raises:
        NoiseScaleInputError: ``path`` or one of its parents is a file, or the nearest existing
            parent is not writable.
    """
    out = Path(path)
    if out.exists():
        if not out.is_dir():
            raise NoiseScaleInputError(f"{flag} {path} is a file; give a folder for the outputs")
        if not os.access(out, os.W_OK | os.X_OK):
            raise NoiseScaleInputError(f"{flag} {path}: cannot write into this folder")
        return out
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NoiseScaleInputError(f"{flag} {path}: {str(ancestor)!r} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise NoiseScaleInputError(f"{flag} {path}: cannot create folders in {str(ancestor)!r}")
    return out


def write_atomic(path: str | Path, data: str | bytes, *, replace: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    Readers see either the old file or the whole new one, never half of it; when writing fails
    the old file is untouched and the temporary file removed. With ``replace=False`` the
    temporary file is hard-linked into place instead, which fails if ``path`` exists by then
    (checked and done in one step by the file system, so a file that another job wrote since
    the command's first check is never overwritten); where hard links are not supported the
    file is created exclusively (``O_EXCL``) and written.

    Raises:
        FileExistsError: ``replace`` is false and ``path`` exists.
        OSError: the folder is missing or not writable, or the disk is full.
    """
    target = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, target)
        else:
            _link_new(tmp, target, payload)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if not replace:
        Path(tmp).unlink(missing_ok=True)


def _link_new(tmp: str, target: Path, payload: bytes) -> None:
    """Put the finished ``tmp`` at ``target`` only if ``target`` does not exist (atomically)."""
    try:
        os.link(tmp, target)
        return
    except FileExistsError:
        raise
    except OSError:
        pass  # a file system without hard links: create the file exclusively instead
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # (as mkstemp's)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def write_or_rescue(
    path: str | Path, data: str | bytes, *, what: str, replace: bool = True
) -> None:
    """Write a measured result to ``path``; if that fails, keep it elsewhere and say where.

    The result is written atomically (:func:`write_atomic`). When ``path`` cannot be written
    (its folder vanished, the disk is full, permissions changed while measuring, or, with
    ``replace=False``, another job created it meanwhile), the data go to a new file in the
    current folder or, failing that, the temporary folder; an existing file is left as it is.

    Raises:
        NoiseScaleInputError: ``path`` could not be written; the message names the file that
            holds the result instead (or says that none could be written).
    """
    try:
        write_atomic(path, data, replace=replace)
        return
    except FileExistsError:
        reason = (
            "it was created while this command ran, and is not replaced without --force; "
            "it is left as it is"
        )
    except OSError as err:
        reason = err.strerror or str(err)
    target = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    for folder in (Path.cwd(), Path(tempfile.gettempdir())):
        try:
            fd, rescue = tempfile.mkstemp(
                prefix=f"noisescale-{target.stem}-", suffix=target.suffix, dir=folder
            )
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
        except OSError:
            continue
        raise NoiseScaleInputError(
            f"cannot write {what} to {path} ({reason}); it was saved to {rescue} instead"
        )
    raise NoiseScaleInputError(
        f"cannot write {what} to {path} ({reason}), nor to the current or temporary folder"
    )
