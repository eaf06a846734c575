"""`replace_file` through a symbolic link: the file the link names is replaced, the link stays
(a state kept on another volume, linked from the state directory); a link that leads nowhere
is refused, naming where it points, and nothing is written."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from conclave.errors import ConclaveError
from conclave.files import replace_file
from conclave.participant import Participant


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """A state directory and another "volume"."""
    state, volume = tmp_path / "state", tmp_path / "volume"
    state.mkdir()
    volume.mkdir()
    return state, volume


def test_a_link_to_a_file_replaces_the_file_and_stays_a_link(dirs: tuple[Path, Path]) -> None:
    state, volume = dirs
    target = volume / "alice.state"
    target.write_bytes(b"old")
    os.chmod(target, 0o644)
    link = state / "alice.state"
    link.symlink_to(target)
    replace_file(link, b"new")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600  # a file of our own, as ever
    assert names(state) == ["alice.state"] and names(volume) == ["alice.state"]  # no temporary


def test_a_relative_chain_of_links_is_followed_and_keep_mode_keeps_the_files_mode(
    dirs: tuple[Path, Path],
) -> None:
    state, volume = dirs
    target = volume / "audit.log"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    (volume / "current").symlink_to("audit.log")  # relative to the link's own directory
    link = state / "saved.log"
    link.symlink_to(Path("..") / "volume" / "current")
    replace_file(link, b"new", keep_mode=True)
    assert link.is_symlink() and (volume / "current").is_symlink()
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
    assert names(volume) == ["audit.log", "current"]


@pytest.mark.parametrize("missing", ["file", "directory"])
def test_a_dangling_link_is_refused_naming_its_target_and_nothing_is_written(
    missing: str, dirs: tuple[Path, Path],
) -> None:
    state, volume = dirs
    target = volume / "alice.state" if missing == "file" else volume / "gone" / "alice.state"
    link = state / "alice.state"
    link.symlink_to(target)
    with pytest.raises(OSError) as info:
        replace_file(link, b"new")
    assert info.value.filename == str(link)
    assert f"a symbolic link to {target}, which does not exist" in str(info.value.strerror)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert names(state) == ["alice.state"] and names(volume) == []


def test_a_loop_of_links_is_refused_and_left_as_it_is(dirs: tuple[Path, Path]) -> None:
    state, _ = dirs
    (state / "a").symlink_to("b")
    (state / "b").symlink_to("a")
    with pytest.raises(OSError):
        replace_file(state / "a", b"new")
    assert names(state) == ["a", "b"] and (state / "a").is_symlink()


def test_a_participants_state_kept_elsewhere_through_a_link_stays_linked(
    dirs: tuple[Path, Path],
) -> None:
    state, volume = dirs
    first = Participant("alice", "http://127.0.0.1:9", state_dir=state)
    first.save()
    target = volume / "alice.state"
    os.replace(state / "alice.state", target)  # the user moves it to another volume
    (state / "alice.state").symlink_to(target)
    again = Participant("alice", "http://127.0.0.1:9", state_dir=state)
    assert again.key_fingerprint == first.key_fingerprint  # read through the link
    again.save()
    assert (state / "alice.state").is_symlink()
    assert Participant("alice", "http://127.0.0.1:9",
                       state_dir=state).key_fingerprint == first.key_fingerprint


def test_a_participants_state_link_to_nowhere_is_an_error_naming_both(
    dirs: tuple[Path, Path],
) -> None:
    state, volume = dirs
    target = volume / "unmounted" / "alice.state"
    (state / "alice.state").symlink_to(target)
    p = Participant("alice", "http://127.0.0.1:9", state_dir=state)
    with pytest.raises(ConclaveError) as info:
        p.save()
    assert str(state / "alice.state") in str(info.value) and str(target) in str(info.value)
    assert (state / "alice.state").is_symlink() and names(volume) == []
