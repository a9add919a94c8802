"""Output directories: never an input, never the working directory, writable, and what killed runs
leave behind is cleaned (io/output_dir.py)."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from subspace_cli.errors import UsageError
from subspace_cli.io.output_dir import atomic_output_dir, check_output_dir, remove_stale_siblings


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _tree(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture()
def model_dir(tmp_path) -> Path:
    model = tmp_path / "models" / "llama"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    return model


@pytest.mark.parametrize("where, relation", [
    (lambda m: m, "is the input"),
    (lambda m: m / "compressed", "lies inside the input"),
    (lambda m: m.parent, "contains the input"),
])
def test_out_must_stay_away_from_inputs(model_dir, where, relation):
    before = _tree(model_dir.parent)
    for overwrite in (False, True):
        with pytest.raises(UsageError, match=relation):
            check_output_dir(where(model_dir), overwrite, [("model", str(model_dir))])
    assert _tree(model_dir.parent) == before


def test_data_files_and_comma_lists_are_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("text")
    with pytest.raises(UsageError, match="--out 'data' contains the input --calib 'data/a.txt'"):
        check_output_dir(Path("data"), True, [("--calib", "builtin:kjv,data/a.txt")])
    with pytest.raises(UsageError, match="is the input --eval"):
        check_output_dir(Path("data/a.txt"), True, [("--eval", "task=data/a.txt")])
    check_output_dir(Path("elsewhere"), False, [("--calib", "builtin:kjv"), ("--calib", "self")])  # no local path


def test_symlinked_input_is_seen_through(tmp_path, model_dir):
    link = tmp_path / "link"
    link.symlink_to(model_dir)
    with pytest.raises(UsageError, match="is the input"):
        check_output_dir(model_dir, True, [("model", str(link))])


def test_working_directory_and_its_parents_are_refused(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(UsageError, match="'.' is the current directory"):
        check_output_dir(Path("."), True)
    with pytest.raises(UsageError, match="a parent of the current directory"):
        check_output_dir(Path(".."), True)


def test_unwritable_location_is_refused_up_front(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="is a file, not a directory"):
        check_output_dir(blocker / "sub" / "out", False)
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        target = locked / "out"
    elif Path("/sys/fs").is_dir() and _cannot_write("/sys/fs"):
        target = Path("/sys/fs/subspace-out")  # root ignores permission bits; sysfs refuses new entries
    else:
        pytest.skip("no unwritable directory available to this user")
    with pytest.raises(UsageError, match="cannot be written"):
        check_output_dir(target, False)


def _cannot_write(directory: str) -> bool:
    try:
        os.rmdir(tempfile.mkdtemp(dir=directory))
    except OSError:
        return True
    return False


def test_failed_run_removes_the_parents_it_created(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "a" / "b" / "out"):
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_stale_temporary_directories_of_dead_processes_are_removed(tmp_path):
    out = tmp_path / "out"
    dead, alive = _dead_pid(), os.getpid()
    stale = tmp_path / f".out.tmp-{dead}-0123abcd"
    live = tmp_path / f".out.tmp-{alive}-89abcdef"
    other = tmp_path / f".other.tmp-{dead}-0123abcd"
    for d in (stale, live, other):
        d.mkdir()
        (d / "model.safetensors").write_text("half")
    with atomic_output_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert not stale.exists()  # a dead writer of this --out: removed
    assert live.exists() and other.exists()  # a running writer, another output: left alone
    assert _tree(out) == {"new.txt": b"new"}


def test_old_output_stranded_by_a_killed_overwrite_is_restored(tmp_path):
    """A kill between 'out -> .out.old-PID' and '.out.tmp-PID -> out' leaves no `out`: put the old one back."""
    out = tmp_path / "out"
    backup = tmp_path / f".out.old-{_dead_pid()}-0123abcd"
    backup.mkdir()
    (backup / "keep.txt").write_text("old")
    assert remove_stale_siblings(out) == [backup]
    assert _tree(out) == {"keep.txt": b"old"} and not backup.exists()
    # With the new output in place, a leftover backup is only garbage.
    backup.mkdir()
    (backup / "keep.txt").write_text("older")
    check_output_dir(out, overwrite=True)
    assert not backup.exists() and _tree(out) == {"keep.txt": b"old"}
