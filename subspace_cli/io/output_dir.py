"""Output directories: checked before any work starts, written atomically, never at an input's cost.

Rules (exit 2 before anything runs):
- `--out` is never an input, never inside one, never contains one (model, base, data, resume, ...),
  and never the working directory or one of its parents;
- an existing non-empty `--out` needs `--overwrite`; an existing file is never replaced;
- the place `--out` will be created in must be writable (probed with a real temporary directory,
  since permission bits say nothing to root or on a read-only mount).

Work goes to a hidden sibling `.NAME.tmp-PID-RANDOM` renamed to `--out` at the end; with
`--overwrite` the old output is first renamed to `.NAME.old-PID-RANDOM` and removed once the new
one is in place. Siblings left by a process that was killed (the PID in the name is no longer
running) are removed at the next run, and an old output stranded in `.old-` is put back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from subspace_cli import lifecycle
from subspace_cli.errors import UsageError

log = logging.getLogger(__name__)

# (flag, value as given), e.g. ("--base", "models/llama"); a Path value is compared even before it exists
# (another output of the same run).
InputRef = tuple[str, "str | Path"]


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path.expanduser()))


def _real(path: Path) -> Path:
    """The path with symlinks followed as far as it exists (a missing tail is kept as written)."""
    return _absolute(path).resolve(strict=False)


def _local_path(value: str | Path) -> Path | None:
    """The local file or directory a reference names, or None (builtin:NAME, self, hub ids, TASK=SOURCE
    pairs are resolved to their SOURCE)."""
    if isinstance(value, Path):
        return value
    if not value or value.startswith("builtin:") or value == "self":
        return None
    path = Path(value).expanduser()
    if path.exists():
        return path
    task, sep, source = value.partition("=")  # merge --eval TASK=SOURCE
    if sep and source and Path(source).expanduser().exists():
        return Path(source).expanduser()
    return None


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_not_an_input(out: Path, inputs: Iterable[InputRef], flag: str = "--out") -> None:
    """Exit 2 when `out` is, lies inside, or contains an input, or is (a parent of) the working directory.

    An input's label is how the message names it: "model", "--calib", or a whole phrase such as
    "output directory --out" for another output that must not overlap this one."""
    target = _real(out)
    cwd = _real(Path.cwd())
    if _inside(cwd, target):
        what = "the current directory" if target == cwd else f"a parent of the current directory '{cwd}'"
        raise UsageError(f"{flag} '{out}' is {what}; replacing it would delete where you are working: "
                         "choose a new directory, e.g. out/result")
    for input_flag, value in inputs:
        for part in _parts(value):
            local = _local_path(part)
            if local is None:
                continue
            source = _real(local)
            if target == source:
                relation = "is"
            elif _inside(target, source):
                relation = "lies inside"
            elif _inside(source, target):
                relation = "contains"
            else:
                continue
            advice = ("an output directory is replaced as a whole, so it must stay away from every input"
                      if flag in ("--out", "--checkpoint-dir") else "write it away from every input")
            label = input_flag if " " in input_flag else f"input {input_flag}"
            raise UsageError(f"{flag} '{out}' {relation} the {label} '{part}'; {advice}")


def _parts(value: str | Path) -> list[str | Path]:
    """A value as given plus, for comma lists of sources, each item."""
    if isinstance(value, Path):
        return [value]
    items: list[str | Path] = [value]
    if "," in value and not Path(value).expanduser().exists():
        items += [p.strip() for p in value.split(",") if p.strip()]
    return items


def probe_writable(directory: Path, out: Path, flag: str) -> None:
    """Exit 2 unless a file can be created in `directory` (tried for real: root ignores permission bits)."""
    try:
        probe = tempfile.mkdtemp(prefix=".subspace-probe-", dir=directory)
    except OSError as err:
        raise UsageError(f"{flag} '{out}' cannot be written: {err.strerror or err} in '{directory}'; choose a "
                         "writable location") from None
    os.rmdir(probe)


def check_writable_dir(path: Path | str, flag: str) -> None:
    """Exit 2 unless `path` is a directory, or can be created as one, by this process."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} '{path}' is a file, not a directory; choose another {flag}")
    absolute = _absolute(path)
    probe_writable(absolute if path.is_dir() else _existing_ancestor(absolute, path, flag), path, flag)


def _existing_ancestor(path: Path, out: Path, flag: str) -> Path:
    """The nearest ancestor of `path` that exists; it must be a directory."""
    for ancestor in path.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise UsageError(f"{flag} '{out}': '{ancestor}' is a file, not a directory; choose another {flag}")
            return ancestor
    return Path(path.anchor or "/")


def check_output_dir(out: Path | str, overwrite: bool, inputs: Iterable[InputRef] = (), flag: str = "--out") -> None:
    """Refuse an output path that would lose data or cannot be written; call it before any work starts."""
    out = Path(out)
    if not str(out).strip():
        raise UsageError(f"{flag} is empty; pass a directory path")
    check_not_an_input(out, [*inputs, *lifecycle.command_inputs()], flag)
    absolute = _absolute(out)
    remove_stale_siblings(absolute)
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"output path '{out}' exists and is not a directory; choose another {flag}")
        if not overwrite and any(out.iterdir()):
            raise UsageError(f"output directory '{out}' is not empty; pass --overwrite or choose another {flag}")
    probe_writable(_existing_ancestor(absolute, out, flag), out, flag)


# ----------------------------------------------------------------------------- stale siblings

_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except OSError:
        return True  # cannot tell: leave it alone
    return True


def remove_stale_siblings(out: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID-*` left by killed runs writing `out`; put a stranded `.NAME.old-PID-*`
    back when `out` is missing (the kill fell between the two renames of an overwrite). Returns
    what was removed or restored."""
    parent = out.parent
    if not parent.is_dir():
        return []
    touched = []
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return []
    for entry in entries:
        match = _SIBLING.match(entry.name)
        if not match or match["name"] != out.name or _alive(int(match["pid"])) or not entry.is_dir():
            continue
        if match["kind"] == "old" and not out.exists():
            os.replace(entry, out)
            log.warning("restored '%s' from '%s', left by an interrupted overwrite", out, entry.name)
        else:
            shutil.rmtree(entry, ignore_errors=True)
            log.info("removed '%s', left by a run that was killed", entry)
        touched.append(entry)
    return touched


# ----------------------------------------------------------------------------- atomic writing


def _sibling(out: Path, tag: str) -> Path:
    return out.parent / f".{out.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def _make_parents(directory: Path) -> list[Path]:
    """mkdir -p, returning the directories it created (deepest last) so a failure can remove them."""
    created = []
    for ancestor in reversed([directory, *directory.parents]):
        if not ancestor.exists():
            ancestor.mkdir()
            created.append(ancestor)
    return created


def _remove_created(created: list[Path]) -> None:
    for directory in reversed(created):
        with contextlib.suppress(OSError):
            directory.rmdir()  # only if still empty


@contextlib.contextmanager
def atomic_output_dir(out: Path | str, overwrite: bool = False, inputs: Iterable[InputRef] = ()) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to `out` only if the block succeeds.

    On an exception (KeyboardInterrupt and SIGTERM included) the temporary directory, and any parent
    directory created for it, is deleted and `out` is left untouched. With `overwrite`, an existing
    `out` is first renamed to a backup sibling and deleted only once the new directory is in place,
    so a crash midway never loses both.
    """
    out = _absolute(Path(out))
    check_output_dir(out, overwrite, inputs)
    created: list[Path] = []
    try:
        created = _make_parents(out.parent)
        tmp = _sibling(out, "tmp")
        tmp.mkdir()
    except OSError as err:
        _remove_created(created)
        raise UsageError(f"cannot create output directory next to '{out}': {err.strerror}") from err
    try:
        yield tmp
        _commit(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    # Again: something may have appeared at `out` while we worked.
    if out.exists() and (not out.is_dir() or (not overwrite and any(out.iterdir()))):
        raise UsageError(f"output '{out}' appeared while the run was working; the result was not written "
                         "(pass --overwrite to replace it)")
    if out.exists() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(tmp, out)
        return
    backup = _sibling(out, "old")
    os.replace(out, backup)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(backup, out)  # put the old output back
        raise
    shutil.rmtree(backup, ignore_errors=True)
