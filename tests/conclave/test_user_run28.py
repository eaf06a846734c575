"""A first-time user's run: an audit refused for a typo in --state leaves nothing it made;
`bench --only` takes the summary's row names of the e2e call; the README says what ends a
scripted `join`."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pytest

from conclave.cli import main
from tests.conclave.served import conclave_serve, create_room
from tests.conclave.test_bench import ran_fixture  # noqa: F401 - the fixture `ran`

README = Path(__file__).resolve().parents[2] / "README.md"


# -- audit --state with a typo: the service refuses the new key; nothing made stays


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`conclave serve` (its auditor's key pinned) and a room `standup`: the URL, a directory."""
    state = tmp_path_factory.mktemp("served")
    with conclave_serve(state / "serve") as ds_url:
        create_room(ds_url, state / "owner", "owner", "standup")
        yield ds_url, state


def test_a_refused_audit_removes_the_directory_it_made(
    served: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    ds_url, _ = served
    typo = tmp_path / "nonexist" / "state"
    assert main(["audit", "--group", "standup", "--ds", ds_url, "--state", str(typo)]) == 2
    err = capsys.readouterr().err
    assert "'auditor' is reserved for an auditor of the delivery service" in err
    assert f"another key than a new one, not kept (no key of it in {typo})" in err
    assert not (tmp_path / "nonexist").exists()  # nor its parent, made for it too


def test_a_refused_audit_leaves_an_existing_directory_as_it_was(
    served: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    ds_url, _ = served
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["audit", "--group", "standup", "--ds", ds_url, "--state", str(tmp_path)]) == 2
    assert "reserved for an auditor" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_refused_audit_keeps_a_saved_key(
    served: tuple[str, Path], capsys: pytest.CaptureFixture[str],
) -> None:
    # A key saved before (not this run's) stays, and is the one to pin, as before.
    from conclave.services import auditor_identity

    ds_url, state = served
    kept = state / "kept"
    auditor_identity(kept, "auditor")  # an auditor's key, saved as `conclave serve` saves it
    before = (kept / "auditor.state").read_bytes()
    assert main(["audit", "--group", "standup", "--ds", ds_url, "--state", str(kept)]) == 2
    err = capsys.readouterr().err
    assert f"than the one in {kept}" in err and "--auditor auditor=" in err
    assert (kept / "auditor.state").read_bytes() == before


@pytest.mark.parametrize("row", ["e2e_call_plain", "e2e_call_e2ee"])
def test_only_takes_a_row_of_the_call_and_says_it_runs_both_modes(
    row: str, ran: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich: no line breaks inside what is looked for
    assert main(["bench", "--quick", "--out", str(tmp_path), "--only", row]) == 0
    # The summary's rows come from one script, the paired call: both of its modes run.
    assert ran == ["call plain", "call e2ee"]
    summary = [r["benchmark"] for r in csv.DictReader((tmp_path / "summary.csv").open())]
    assert summary == ["e2e_call_plain", "e2e_call_e2ee"]
    out = capsys.readouterr().out
    assert (f"{row}: the end-to-end call runs its plain and e2ee calls in pairs (the E2EE cost "
            "is their difference): running rows e2e_call_plain, e2e_call_e2ee") in out


def test_only_takes_the_numbered_rows_of_a_full_run(ran: list[str], tmp_path: Path) -> None:
    assert main(["bench", "--out", str(tmp_path), "--only", "e2e_call_e2ee_2,sframe"]) == 0
    assert ran == ["sframe"] + ["call plain", "call e2ee", "call e2ee", "call plain",
                                "call plain", "call e2ee"]
    summary = [r["benchmark"] for r in csv.DictReader((tmp_path / "summary.csv").open())]
    assert summary == ["sframe", "e2e_call_plain_1", "e2e_call_e2ee_1", "e2e_call_e2ee_2",
                       "e2e_call_plain_2", "e2e_call_plain_3", "e2e_call_e2ee_3"]


def test_an_unknown_only_name_lists_the_calls_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["bench", "--out", str(tmp_path / "out"), "--only", "e2e_call_clear"])
    assert info.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "unknown benchmark 'e2e_call_clear'" in err
    assert "e2e_call, also as its summary rows e2e_call_plain, e2e_call_e2ee" in err
    assert not (tmp_path / "out").exists()


# -- the README's scripted commands: the end of the input ends no call, `quit` does


def test_the_readme_says_what_ends_a_scripted_join() -> None:
    text = " ".join(README.read_text().split())
    assert ("`printf 'remove mallory\\nquit\\n' | conclave join --room standup --name alice` "
            "removes mallory, then ends the call") in text
    assert "The end of the input ends no call: without `quit`, `join` stays in it" in text
