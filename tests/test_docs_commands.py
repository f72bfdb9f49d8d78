"""Every shell command in the README and docs/ runs as written on a fresh CPU machine.

The fenced shell blocks are extracted (``bash``/``sh``/``console`` blocks, and untagged blocks
of commands), comments dropped and continuation lines joined. Each block runs in a folder of its
own that holds the repository's ``examples/`` and ``experiments/`` and a ``runs/demo`` history
like the one ``make demo`` writes, so relative paths mean what they mean in a checkout.

``noisescale`` commands run through the CLI in-process, in order, and must exit 0 — except the
few that need what a fresh CPU machine lacks (a GPU, a database server, minutes of training),
which must still parse: their flags exist and their values are accepted (:data:`PARSE_ONLY`,
each with its reason). Python scripts must exist and answer ``--help``. Set-up commands (make,
apt-get, pip, source, ...) are listed with the reason they are not run here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from noisescale.cli import _attach_dash_values, _subparsers, build_parser, main
from test_recommend_cli import ALPHA, BETA, PARAM_BYTES
from test_report import synthetic_records, write_synthetic_history

pytestmark = pytest.mark.usefixtures("gc_frozen")  # (tests/conftest.py)

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_FENCES = {"bash", "sh", "shell", "console", ""}

#: Commands not run here, by their first word, and why.
NOT_RUN = {
    "make": "the set-up commands themselves: make demo trains for minutes, make test is this suite",
    "source": "shell set-up: activates the virtual environment",
    "export": "shell set-up: sets an environment variable",
    "apt-get": "machine set-up: installs Debian packages",
    "pip": "machine set-up: installs packages",
    "mkdir": "machine set-up: copies data for a GPU machine",
    "cp": "machine set-up: copies data for a GPU machine",
    "echo": "machine set-up: writes the database URL to a file in the home folder",
    "chmod": "machine set-up: protects that file",
}

#: noisescale commands that must parse but are not run here, and why.
PARSE_ONLY = [
    (r"--device cuda", "needs a CUDA GPU"),
    (
        r"^noisescale demo\b",
        "1,248 training steps, minutes on 2 cores (tests/test_demo.py runs it short)",
    ),
    (
        r"^noisescale profile mnist-cnn",
        "times the CNN for a minute or more on a CPU; a stand-in profile is written",
    ),
    (
        r"~/.noisescale-storage|^noisescale (sweep|fit) .*NOISESCALE|^noisescale fit --study",
        "needs the PostgreSQL server of the set-up above (tests/test_sweep_workers.py runs "
        "sweeps against a throw-away one)",
    ),
    (r"runs/critical_batch_full", "needs the output of the GPU reproduction run"),
    (
        r"runs/lm-shakespeare",
        "reads the language-model example's run (tests/test_lm_example.py runs it short)",
    ),
    (r"\btrain\.py:run\b", "names the reader's own training function"),
]


@dataclass(frozen=True)
class Command:
    """One command line from a fenced block: where it is, and its words."""

    doc: str
    line: int
    text: str

    @property
    def program(self) -> str:
        return self.text.split()[0]

    @property
    def words(self) -> list[str]:
        return shlex.split(self.text, comments=True)


def _blocks(path: Path) -> list[tuple[int, list[tuple[int, str]]]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^\s*```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not re.match(r"^\s*```", lines[i]):
            body.append((i + 1, lines[i]))
            i += 1
        i += 1
        if fence.group(1) in SHELL_FENCES:
            blocks.append((start, body))
    return blocks


def _commands(path: Path, body: list[tuple[int, str]]) -> list[Command]:
    commands, pending, first = [], "", 0
    for number, line in body:
        text = line.split("  #")[0].rstrip() if not line.lstrip().startswith("#") else ""
        if not text.strip() and not pending:
            continue
        if not pending:
            first = number
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        pending += text
        if pending.strip():
            commands.append(Command(path.name, first, " ".join(pending.split())))
        pending = ""
    return commands


def _doc_blocks() -> list[tuple[str, list[Command]]]:
    out = []
    for path in DOCS:
        for start, body in _blocks(path):
            commands = _commands(path, body)
            programs = {c.program for c in commands}
            known = {"noisescale", "python", "torchrun", *NOT_RUN}
            if commands and programs <= known:
                out.append((f"{path.name}:{start}", commands))
            elif commands and "noisescale" in programs:
                raise AssertionError(f"{path.name}:{start}: commands with unknown programs")
    return out


BLOCKS = _doc_blocks()


def test_the_docs_have_commands_and_every_one_is_classified() -> None:
    commands = [c for _, block in BLOCKS for c in block]
    assert sum(c.program == "noisescale" for c in commands) >= 25
    for c in commands:
        assert c.program in {"noisescale", "python", "torchrun", *NOT_RUN}, c
        assert c.words  # shell syntax that splits


def _parse_only_reason(command: Command) -> str | None:
    for pattern, reason in PARSE_ONLY:
        if re.search(pattern, command.text):
            return reason
    return None


@pytest.fixture
def checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder that looks like a fresh checkout after `make demo`."""
    for name in ("examples", "experiments"):
        (tmp_path / name).symlink_to(REPO / name)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    write_synthetic_history(tmp_path / "runs" / "demo" / "history.jsonl", synthetic_records())
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NOISESCALE_STORAGE", raising=False)
    return tmp_path


def _stand_in_profile(path: Path) -> None:
    from noisescale.hardware import ThroughputPoint, ThroughputProfile

    points = [ThroughputPoint(b, (ALPHA + BETA * b,) * 3) for b in (1, 2, 4, 8, 16, 32, 64)]
    ThroughputProfile.from_points(
        points,
        device={"type": "cpu", "name": "stand-in"},
        model={"name": "mnist-cnn", "parameters": 1e8, "param_bytes": PARAM_BYTES},
        max_batch_size=64,
    ).save(path)


def _parses(words: list[str]) -> None:
    parser = build_parser()
    sub = _subparsers(parser)[words[0]]
    args, extras = parser.parse_known_args(_attach_dash_values(sub, words))
    assert not extras, f"unknown arguments {extras}"
    assert callable(args.func)


_HELPED: set[str] = set()


def _script_answers_help(script: str) -> None:
    if script in _HELPED:
        return
    assert (REPO / script).is_file(), f"no such script: {script}"
    proc = subprocess.run(
        [sys.executable, str(REPO / script), "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert proc.returncode == 0, proc.stderr
    _HELPED.add(script)


#: Stand-in files written for parse-only commands, per document, for its later blocks to read.
_STAND_INS: dict[str, dict[str, bytes]] = {}


@pytest.mark.parametrize(("where", "commands"), BLOCKS, ids=[w for w, _ in BLOCKS])
def test_block_runs_as_written(
    checkout: Path, capsys: pytest.CaptureFixture[str], where: str, commands: list[Command]
) -> None:
    doc = where.split(":")[0]
    for name, data in _STAND_INS.get(doc, {}).items():
        (checkout / name).write_bytes(data)
    for command in commands:
        words = command.words
        program = words[0]
        if program in NOT_RUN:
            continue
        if program in ("python", "torchrun"):
            script = next(w for w in words[1:] if w.endswith(".py"))
            _script_answers_help(script)
            continue
        argv = words[1:]
        reason = _parse_only_reason(command)
        if reason is not None:
            _parses(argv)
            if argv[0] == "profile" and "-o" in argv:
                name = argv[argv.index("-o") + 1]
                _stand_in_profile(checkout / name)
                _STAND_INS.setdefault(doc, {})[name] = (checkout / name).read_bytes()
            continue
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 0, f"{command.doc}:{command.line}: {command.text}\n{err}"


def test_the_docs_name_no_missing_example_file() -> None:
    for _, commands in BLOCKS:
        for command in commands:
            for word in command.words:
                spec = word.split(":")[0]
                if spec.startswith(("examples/", "experiments/")) and spec.endswith(
                    (".py", ".csv")
                ):
                    assert (REPO / spec).is_file(), f"{command.doc}:{command.line}: {spec}"
