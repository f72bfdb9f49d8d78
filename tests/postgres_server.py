"""A throw-away PostgreSQL server on 127.0.0.1 for the sweep tests (Debian's ``postgresql``).

:func:`start` runs ``initdb`` into a fresh temporary folder and ``pg_ctl start`` on a free port,
with password authentication over TCP, and returns a :class:`Server` that creates one database
per test. As root it runs the server as the ``postgres`` user (PostgreSQL refuses to run as root).
When any of that is impossible it raises :class:`Unavailable` with the reason, which the fixture
turns into a skip.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

USER = "noisescale"
#: A test-only password; the tests check that no message ever shows it.
PASSWORD = "s3cret-Pw-4-tests"


class Unavailable(RuntimeError):
    """PostgreSQL cannot be started here; the message says why."""


@dataclass
class Server:
    """A running server: ``url(db)`` for SQLAlchemy/Optuna, ``create_database()`` per test."""

    port: int
    root: Path
    pg_ctl: str
    run_as: list[str]

    def url(self, database: str, password: str = PASSWORD) -> str:
        return f"postgresql+psycopg2://{USER}:{password}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        import psycopg2

        name = f"t_{uuid.uuid4().hex[:12]}"
        conn = psycopg2.connect(
            host="127.0.0.1", port=self.port, user=USER, password=PASSWORD, dbname="postgres"
        )
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return self.url(name)

    def stop(self) -> None:
        subprocess.run(
            [*self.run_as, self.pg_ctl, "-D", str(self.root / "data"), "-m", "immediate", "stop"],
            capture_output=True,
            check=False,
            timeout=60,
        )
        shutil.rmtree(self.root, ignore_errors=True)


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start() -> Server:
    """Start a server, or raise :class:`Unavailable` saying why it cannot."""
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        raise Unavailable(
            "psycopg2 is not installed (pip install 'noisescale[postgres]')"
        ) from None
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise Unavailable("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    run_as: list[str] = []
    owner: pwd.struct_passwd | None = None
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root: run it as Debian's postgres user.
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise Unavailable(
                "running as root and there is no 'postgres' user to run the server as"
            ) from None
        runuser = shutil.which("runuser")
        if runuser is None:
            raise Unavailable("running as root and runuser is missing")
        run_as = [runuser, "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="noisescale-pg-"))
    pwfile = root / "pw"
    pwfile.write_text(PASSWORD + "\n")
    if owner is not None:
        for path in (root, pwfile):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    root.chmod(0o700)
    port = _free_port()
    data = root / "data"
    steps = [
        [
            *run_as,
            initdb,
            "-D",
            str(data),
            "-U",
            USER,
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
        ],
        [
            *run_as,
            pg_ctl,
            "-D",
            str(data),
            "-l",
            str(root / "log"),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=60",
            "start",
        ],
    ]
    for command in steps:
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as err:
            shutil.rmtree(root, ignore_errors=True)
            raise Unavailable(f"{Path(command[len(run_as)]).name} failed: {err}") from None
        if proc.returncode != 0:
            log = (root / "log").read_text() if (root / "log").exists() else ""
            shutil.rmtree(root, ignore_errors=True)
            tail = (proc.stderr + proc.stdout + log).strip().splitlines()[-3:]
            raise Unavailable(
                f"{Path(command[len(run_as)]).name} failed: {' | '.join(tail) or proc.returncode}"
            )
    return Server(port=port, root=root, pg_ctl=pg_ctl, run_as=run_as)
