"""Database passwords stay secret, and the URL need not be typed on the command line.

``noisescale sweep`` and ``fit`` print the storage in errors, summaries, ``--json`` and page
titles: always with the password masked. The URL may come from ``NOISESCALE_STORAGE`` or a file
(``--storage-file``). The real-server tests use the throw-away PostgreSQL of tests/conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from noisescale.cli import main
from noisescale.sweep.storage import STORAGE_ENV, mask_url, resolve_storage_url, scrub

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cretpw"
TRAIN = f"{REPO / 'examples' / 'sweep_train.py'}:train"
SWEEP = ["--batch-sizes", "4,16,64", "--learning-rates", "0.4", "--steps", "60"]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://alice:s3cretpw@db:5432/x", "postgresql://alice:***@db:5432/x"),
        ("postgresql+psycopg2://alice:p%40ss@db/x", "postgresql+psycopg2://alice:***@db/x"),
        ("mysql://bob:@host/db", "mysql://bob:***@host/db"),
        ("postgresql://alice@db/x", "postgresql://alice@db/x"),
        ("sqlite:///runs/sweep.db", "sqlite:///runs/sweep.db"),
    ],
)
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_scrub_removes_the_password_wherever_it_appears() -> None:
    url = "postgresql://alice:s3cretpw@db/x"
    text = f"could not connect to {url}; password s3cretpw rejected"
    assert (
        scrub(text, url)
        == "could not connect to postgresql://alice:***@db/x; password *** rejected"
    )


def test_resolve_storage_url_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    assert resolve_storage_url(None).url == "sqlite:///sweep.db"
    monkeypatch.setenv(STORAGE_ENV, "sqlite:///from-env.db")
    assert resolve_storage_url(None).origin == "environment"
    file = tmp_path / "url"
    file.write_text("\n  sqlite:///from-file.db  \n")
    got = resolve_storage_url(None, str(file))
    assert (got.url, got.origin, got.command_args()) == (
        "sqlite:///from-file.db",
        "file",
        ["--storage-file", str(file)],
    )
    assert resolve_storage_url("sqlite:///x.db").origin == "option"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty; write the database URL on its first line"):
        resolve_storage_url(None, str(tmp_path / "empty"))


@pytest.mark.parametrize("command", ["fit", "sweep"])
def test_unreachable_server_error_masks_the_password(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"postgresql+psycopg2://alice:{SECRET}@127.0.0.1:1/sweeps"  # nothing listens on port 1
    args = [url, "--study", "x"] if command == "fit" else [TRAIN, *SWEEP, "--storage", url]
    assert main([command, *args, "--no-progress"] if command == "sweep" else [command, *args]) == 2
    err = capsys.readouterr().err
    assert f"noisescale {command}: error: cannot open storage " in err
    assert "postgresql+psycopg2://alice:***@127.0.0.1:1/sweeps" in err
    assert SECRET not in err


def test_fit_does_not_create_a_missing_sqlite_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.db"
    assert main(["fit", f"sqlite:///{missing}"]) == 2
    assert "no such database" in capsys.readouterr().err
    assert not missing.exists()


def test_sweep_and_fit_through_the_environment_on_postgresql(
    postgres_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    password = postgres_url.split(":")[2].split("@")[0]
    monkeypatch.setenv(STORAGE_ENV, postgres_url)
    assert main(["sweep", TRAIN, *SWEEP, "--study", "env", "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "3 run(s) now" in out.out
    # The suggested next command names no URL: fit reads the same environment variable.
    assert "next: noisescale fit --study env" in out.out
    assert main(["sweep", TRAIN, *SWEEP, "--study", "env", "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["storage"] == mask_url(postgres_url) and summary["skipped"] == 3
    page = tmp_path / "pareto.html"
    args = ["fit", "--study", "env", "--goal", "0.3", "--ema", "0", "--json", "-o", str(page)]
    assert main(args) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert result["source"] == mask_url(postgres_url) and result["studies"] == ["env"]
    text = page.read_text(encoding="utf-8")
    assert f"<title>Critical batch size: {mask_url(postgres_url)}</title>" in text
    for shown in (out.out, out.err, text):
        assert password not in shown


def test_storage_file_and_a_wrong_password_on_postgresql(
    postgres_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    url_file = tmp_path / "storage-url"
    url_file.write_text(postgres_url + "\n")
    assert (
        main(
            [
                "sweep",
                TRAIN,
                *SWEEP,
                "--storage-file",
                str(url_file),
                "--study",
                "f",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"next: noisescale fit --storage-file {url_file} --study f" in out
    assert main(["fit", "--storage-file", str(url_file), "--study", "f", "--goal", "0.3"]) == 0
    assert "B_crit" in capsys.readouterr().out
    wrong = postgres_url.replace(postgres_url.split(":")[2].split("@")[0], "wrong-Pw-123")
    assert main(["fit", wrong, "--study", "f"]) == 2
    err = capsys.readouterr().err
    assert "cannot open storage" in err and "password authentication failed" in err
    assert "wrong-Pw-123" not in err
    # Without any storage, fit says where it looks.
    assert main(["fit", "--study", "f"]) == 2
    assert f"set {STORAGE_ENV}" in capsys.readouterr().err


def test_fit_reads_several_studies_and_warns_about_duplicates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    for study in ("lr-a", "lr-b"):
        assert (
            main(["sweep", TRAIN, *SWEEP, "--storage", storage, "--study", study, "--no-progress"])
            == 0
        )
    capsys.readouterr()
    assert main(["fit", storage, "--study", "lr-*", "--goal", "0.3", "--ema", "0", "--json"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert result["studies"] == ["lr-a", "lr-b"] and result["runs"] == 6
    assert {tuple(d["runs"]) for d in result["duplicates"]} == {
        ("lr-a/trial 0", "lr-b/trial 0"),
        ("lr-a/trial 1", "lr-b/trial 1"),
        ("lr-a/trial 2", "lr-b/trial 2"),
    }
    assert "noisescale fit: warning: 3 setting(s) have more than one run" in out.err
    # Naming one study reads only that one: no duplicates.
    assert main(["fit", storage, "--study", "lr-a", "--goal", "0.3", "--ema", "0", "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["duplicates"] == [] and "warning" not in out.err
    assert main(["fit", storage, "--study", "nope-*"]) == 2
    assert "no study 'nope-*'" in capsys.readouterr().err
