"""Where sweep studies live: database URLs, their passwords, and opening them safely.

A storage is any database URL Optuna's :class:`~optuna.storages.RDBStorage` accepts: an SQLite
file (``sqlite:///sweep.db``, the default) for one machine, or a server
(``postgresql+psycopg2://user:password@host/db``) that workers on several machines share.

The URL need not be typed on the command line, where it would land in shell histories and
process lists: :func:`resolve_storage_url` also reads it from a file (``--storage-file``) or the
environment variable :data:`STORAGE_ENV`. Every message, JSON output and page shows it through
:func:`mask_url`, with the password replaced by ``***``.

:func:`open_storage` makes concurrent workers safe where the backends are not by themselves:
workers that create the tables of a new database at the same moment retry instead of failing
(``table alembic_version already exists``), and SQLite transactions start with ``BEGIN
IMMEDIATE``, so that Optuna's read-check-write of a trial's state (a ``SELECT … FOR UPDATE`` on
PostgreSQL, which SQLite ignores) cannot let two workers claim the same trial.
"""

from __future__ import annotations

import inspect
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlparse

from noisescale.errors import NoiseScaleInputError

if TYPE_CHECKING:
    import optuna

#: The environment variable that holds the storage URL when none is given.
STORAGE_ENV = "NOISESCALE_STORAGE"
#: Where ``noisescale sweep`` keeps its study unless told otherwise.
DEFAULT_STORAGE = "sqlite:///sweep.db"
#: Seconds an SQLite connection waits for another worker's write to finish before giving up.
SQLITE_TIMEOUT_S = 60.0
#: Attempts to open a database whose tables another worker may be creating at the same time.
OPEN_ATTEMPTS = 8
#: Fragments of the errors two workers get when they create the same tables or rows at once.
_RACE_MESSAGES = ("already exists", "duplicate key", "unique constraint", "database is locked")
#: What SQLAlchemy takes for true in ``uri=`` (its ``asbool``, any case).
_TRUE = ("true", "yes", "on", "y", "t", "1")
#: The query parameters SQLAlchemy gives the sqlite3 driver; the others go to SQLite's URI.
_DRIVER_PARAMS = (
    "uri",
    "timeout",
    "isolation_level",
    "detect_types",
    "check_same_thread",
    "cached_statements",
)
_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^@\s]*)@")


def mask_url(url: str) -> str:
    """The URL with its password, if any, replaced by ``***``.

    >>> mask_url("postgresql://alice:s3cret@db.example.org:5432/sweeps")
    'postgresql://alice:***@db.example.org:5432/sweeps'
    >>> mask_url("sqlite:///sweep.db")
    'sqlite:///sweep.db'
    """
    return _PASSWORD.sub(lambda m: f"{m['head']}***@", url)


def scrub(text: str, url: str) -> str:
    """``text`` (e.g. a database driver's error) with the password of ``url`` masked out."""
    match = _PASSWORD.search(url)
    masked = text.replace(url, mask_url(url))
    if match and match["pw"]:
        masked = masked.replace(match["pw"], "***")
    return _PASSWORD.sub(lambda m: f"{m['head']}***@", masked)


@dataclass(frozen=True)
class StorageURL:
    """A storage URL and where it came from.

    Attributes:
        url: The URL itself, password included: give it to the database, never print it.
        origin: ``"option"``, ``"file"``, ``"environment"`` or ``"default"``.
        file: The file it was read from (``origin == "file"``).
    """

    url: str
    origin: str
    file: str | None = None

    @property
    def shown(self) -> str:
        """The URL as messages show it: password masked."""
        return mask_url(self.url)

    @property
    def has_password(self) -> bool:
        """Whether the URL carries a password."""
        match = _PASSWORD.search(self.url)
        return bool(match and match["pw"])

    def command_args(self) -> list[str]:
        """Arguments that name this storage again in a suggested next command, without the
        password: the file when it came from one, nothing when from the environment."""
        if self.origin == "file":
            return ["--storage-file", str(self.file)]
        if self.origin == "environment":
            return []
        return [self.shown]


def resolve_storage_url(
    url: str | None, file: str | None = None, *, default: str | None = DEFAULT_STORAGE
) -> StorageURL:
    """The storage URL from, in order: ``url``, the first line of ``file``, :data:`STORAGE_ENV`,
    ``default``.

    Raises:
        NoiseScaleInputError: both ``url`` and ``file`` given, an unreadable or empty file, or
            nothing at all when there is no default.
    """
    if url is not None and file is not None:
        raise NoiseScaleInputError("give the storage either as a URL or with --storage-file")
    if url is not None:
        if not url.strip():
            raise NoiseScaleInputError("the storage URL is empty")
        return StorageURL(url.strip(), "option")
    if file is not None:
        try:
            lines = Path(file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            reason = getattr(err, "strerror", None) or str(err)
            raise NoiseScaleInputError(
                f"--storage-file {file}: cannot read it ({reason})"
            ) from None
        first = next((line.strip() for line in lines if line.strip()), "")
        if not first:
            raise NoiseScaleInputError(
                f"--storage-file {file} is empty; write the database URL on its first line"
            )
        return StorageURL(first, "file", file)
    env = os.environ.get(STORAGE_ENV, "").strip()
    if env:
        return StorageURL(env, "environment")
    if default is None:
        raise NoiseScaleInputError(
            f"no storage given: name a database URL or file, use --storage-file, or set "
            f"{STORAGE_ENV}"
        )
    return StorageURL(default, "default")


def sqlite_file(url: str) -> Path | None:
    """The database file of an ``sqlite://`` URL (``None`` for other URLs or in-memory ones),
    also of SQLite's URI form (``sqlite:///file:/path/sweep.db?mode=ro&uri=true``; ``uri`` any
    spelling SQLAlchemy takes for true: ``True``, ``1``, ``yes``…).

    >>> sqlite_file("sqlite:///file:/data/sweep.db?mode=ro&uri=True").as_posix()
    '/data/sweep.db'
    >>> sqlite_file("sqlite:///file::memory:?uri=true") is None
    True

    Raises:
        NoiseScaleInputError: SQLite URI options (``mode=ro``) on a path without ``file:``:
            SQLAlchemy would open (and create) a file whose name ends in ``?mode=ro``.
    """
    if not url.startswith("sqlite"):
        return None
    _, sep, rest = url.partition(":///")
    if not sep or not rest or rest.startswith(":memory:"):
        return None
    database, _, query = rest.partition("?")
    params = parse_qs(query)
    if params.get("uri", [""])[-1].strip().lower() not in _TRUE:
        return Path(database)
    if not database.startswith("file:"):
        options = sorted(set(params) - set(_DRIVER_PARAMS))
        if options:
            named = "&".join(f"{k}={params[k][-1]}" for k in options)
            path = "/" + database.lstrip("/") if database.startswith("/") else database
            raise NoiseScaleInputError(
                f"{mask_url(url)}: SQLite reads URI options ({named}) only from a file: URI; "
                f"this URL would open (or create) a file named {database + '?' + named!r}. "
                f"Write sqlite:///file:{path}?{query}"
            )
        return Path(database)
    if params.get("mode") == ["memory"]:
        return None
    path = unquote(urlparse(database).path)
    return Path(path) if path and path != ":memory:" else None


def open_storage(
    url: str,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    stale_trial_callback: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    must_exist: bool = False,
) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage that several worker processes can share.

    Args:
        url: The database URL (password included).
        heartbeat_interval: Seconds between a running trial's heartbeats; ``None``: none.
        grace_period: Seconds without a heartbeat after which a running trial counts as dead
            (default: twice the interval).
        stale_trial_callback: Called with each trial this process marks failed because its
            heartbeat stopped (Optuna's ``failed_trial_callback``).
        must_exist: Refuse an SQLite URL whose file does not exist instead of creating it.

    Raises:
        NoiseScaleInputError: Optuna is missing, the URL is malformed, its driver is not
            installed, or the database cannot be reached; the message masks the password.
    """
    try:
        import optuna
        import sqlalchemy.exc
    except ImportError:
        raise NoiseScaleInputError("sweeps need Optuna: pip install 'noisescale[sweep]'") from None
    shown = mask_url(url)
    path = sqlite_file(url)
    if must_exist and url.startswith("sqlite") and (path is None or not path.is_file()):
        raise NoiseScaleInputError(
            f"no such database: {shown} (no file {str(path or url)!r}); check the path"
        )
    engine_kwargs: dict[str, Any] = {}
    if path is not None:
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    kwargs: dict[str, Any] = {
        "engine_kwargs": engine_kwargs,
        "heartbeat_interval": heartbeat_interval,
        "grace_period": grace_period,
    }
    if stale_trial_callback is not None:
        # Optuna 4.9 renamed failed_trial_callback; older releases know only the old name.
        parameters = inspect.signature(optuna.storages.RDBStorage).parameters
        name = (
            "heartbeat_stale_trial_callback"
            if "heartbeat_stale_trial_callback" in parameters
            else "failed_trial_callback"
        )
        kwargs[name] = stale_trial_callback
    for attempt in range(OPEN_ATTEMPTS):
        try:
            storage = _quiet_rdb_storage(url, kwargs)
            break
        except sqlalchemy.exc.SQLAlchemyError as err:
            text = str(err)
            if attempt + 1 < OPEN_ATTEMPTS and any(m in text.lower() for m in _RACE_MESSAGES):
                # Another worker is creating the same tables: wait a little and read them.
                time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))
                continue
            raise NoiseScaleInputError(
                f"cannot open storage {shown}: {scrub(_first_line(text), url)}"
            ) from None
        except (ValueError, ImportError, ModuleNotFoundError) as err:
            raise NoiseScaleInputError(
                f"cannot open storage {shown}: {scrub(_first_line(str(err)), url)}"
                + _driver_hint(url, err)
            ) from None
    if path is not None:
        _begin_immediate(storage)
    return storage


def _quiet_rdb_storage(url: str, kwargs: dict[str, Any]) -> optuna.storages.RDBStorage:
    import warnings

    import optuna

    with warnings.catch_warnings():
        # Heartbeats are "experimental" in Optuna; they are what makes a killed worker's
        # claim expire, and this module tests them.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, **kwargs)


def _begin_immediate(storage: optuna.storages.RDBStorage) -> None:
    """Make every SQLite transaction of ``storage`` take the write lock when it begins.

    Optuna claims a waiting trial by reading its state and writing RUNNING in one transaction,
    with ``SELECT … FOR UPDATE``; SQLite ignores ``FOR UPDATE`` and its default deferred
    transactions let two processes read WAITING before either writes. ``BEGIN IMMEDIATE`` (the
    SQLAlchemy recipe for serializable SQLite) orders them: the second reads RUNNING.
    """
    from sqlalchemy import event

    engine = storage.engine

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners would still defer


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else text
    return line[:500]


def _driver_hint(url: str, err: Exception) -> str:
    if url.startswith("postgresql") and "psycopg" in str(err).lower():
        return "; install the driver: pip install 'noisescale[postgres]' (psycopg2-binary)"
    return ""
