"""vae/files.py: atomic writes that leave the old file or the new one, never half of either, and say why they failed."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import vae.files
from vae.files import WriteError, describe_write_failure, disk_full, free_bytes, temporary_path, write_atomically


def test_a_write_replaces_the_file_creates_its_folder_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "file.bin"
    assert write_atomically(target, lambda f: f.write(b"first")) == target
    assert target.read_bytes() == b"first"
    write_atomically(str(target), lambda f: f.write(b"second, longer"))
    assert target.read_bytes() == b"second, longer"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def test_the_temporary_file_sits_beside_the_target_and_names_this_process(tmp_path: Path) -> None:
    tmp = temporary_path(tmp_path / "last.pt")
    assert tmp.parent == tmp_path and tmp.name == f".last.pt.{os.getpid()}.tmp"


def test_the_data_reach_the_disk_before_the_rename(tmp_path: Path, monkeypatch) -> None:
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(vae.files.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(vae.files.os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    write_atomically(tmp_path / "f", lambda f: f.write(b"x"))
    assert calls == ["fsync", "replace"]


def test_a_full_disk_found_at_fsync_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    # A filesystem that allocates late reports ENOSPC only when the data are flushed.
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(vae.files.os, "fsync", full)
    with pytest.raises(WriteError, match=rf"^disk full: could not write {target}, [0-9.]+ MiB free there$") as info:
        write_atomically(target, lambda f: f.write(b"new"))
    assert info.value.errno == errno.ENOSPC and "[Errno" not in str(info.value)
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]


def test_an_interrupt_removes_the_temporary_file_and_is_not_turned_into_a_write_error(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def interrupted(f) -> None:
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, interrupted)
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]


def test_a_folder_that_cannot_be_made_is_a_write_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("a file, not a folder")
    target = tmp_path / "plain" / "sub" / "file.bin"
    with pytest.raises(WriteError, match=rf"^could not write {target}: ") as info:
        write_atomically(target, lambda f: f.write(b"x"))
    assert info.value.errno in (errno.EEXIST, errno.ENOTDIR) and isinstance(info.value, OSError)


def test_disk_full_searches_the_whole_chain_of_causes() -> None:
    # torch's zip writer raises RuntimeError("... unexpected pos ...") during the ENOSPC it hit.
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 64 vs 0") from None
    except RuntimeError as e:
        hidden = e
    assert hidden.__cause__ is None and disk_full(hidden)
    assert disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not disk_full(ValueError("no errno at all"))
    # A chain that loops back on itself ends.
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a
    assert not disk_full(a)


def test_the_reason_of_other_failures_is_one_line_with_its_errno(tmp_path: Path) -> None:
    path = tmp_path / "f"
    message, code = describe_write_failure(path, PermissionError(errno.EACCES, "Permission\ndenied"))
    assert (message, code) == (f"could not write {path}: [Errno {errno.EACCES}] Permission denied", errno.EACCES)
    assert describe_write_failure(path, ValueError()) == (f"could not write {path}: ValueError", None)


def test_free_bytes_is_none_where_it_cannot_be_told(tmp_path: Path) -> None:
    assert free_bytes(tmp_path) > 0
    assert free_bytes(tmp_path / "missing" / "folder") is None
