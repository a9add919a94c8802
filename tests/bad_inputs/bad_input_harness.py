"""Shared machinery of the bad-input sweep: the Case table row, the per-case context that builds
inputs under a temporary root, the tree snapshot and the contract every case asserts.

The contract (docs/troubleshooting.md, ARCHITECTURE.md "Exit codes", README "Conventions for
scripts"), for every bad input:
- exit code 2 (bad input / usage) or 3 (runtime failure), never 0 and never 1;
- exactly one stderr line starting with `error:`, no Python traceback, no uncaught exception;
- with --json: stdout is one strict JSON object with ok=false, exit_code and an error string;
- nothing new under the case's root and every input byte-identical afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable

import pytest

TRACEBACK = "Traceback (most recent call last)"
MISSING = object()  # leave an argument out altogether

RETAIN_TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n" * 80

# Tiny sizes for every verb (the tiny models have 256 positions and a character tokenizer).
TINY = {
    "compress": ["--calib-samples", "4", "--calib-seqlen", "16", "--eval-seqlen", "32", "--eval-chars", "500"],
    "adapt": ["--steps", "2", "--seqlen", "16", "--batch-size", "2", "--rank", "4", "--warmup-steps", "0",
              "--eval-every", "0", "--eval-rows", "2"],
    "unlearn": ["--forget-samples", "4", "--retain-samples", "4", "--seqlen", "16", "--eval-seqlen", "32",
                "--eval-chars", "500", "-O", "steps=2"],
    "eval": ["--eval-seqlen", "32", "--eval-chars", "500"],
    "inspect_calib": ["--calib-samples", "4", "--calib-seqlen", "16"],
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input: `build(ctx)` creates what it needs under ctx.root and returns the argv
    after the verb. `allow_new` are glob patterns (relative to the root, '../NAME' beside it) of paths that may appear."""

    verb: str
    id: str
    build: Callable[["Ctx"], list]
    expected_exit: int | tuple[int, ...] = 2
    json: bool = True  # also run it with --json
    allow_new: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.verb}-{self.id}"


def params(cases: list[Case]) -> list:
    """pytest params: every case without --json, and (where `json`) once more with it."""
    out, seen = [], set()
    for case in cases:
        assert case.name not in seen, f"duplicate case id {case.name}"
        seen.add(case.name)
        out.append(pytest.param(case, False, id=case.name))
        if case.json:
            out.append(pytest.param(case, True, id=f"{case.name}-json"))
    return out


class Ctx:
    """A case's temporary root (also the cwd) and the session's prebuilt assets."""

    def __init__(self, root: Path, assets: dict[str, Path], scope: Path | None = None):
        self.root = Path(root)
        self.assets = assets
        # What the snapshot covers: the root and its siblings (a temporary directory beside the
        # cwd is caught too); the root is the only thing in it when the case starts.
        self.scope = Path(scope) if scope is not None else self.root

    def path(self, rel: str) -> Path:
        return self.root / rel

    def model(self, name: str = "llama", dest: str | None = None) -> str:
        """Copy a session asset (model, adapter, checkpoint) into the root once; returns the relative path."""
        dest = dest or ("model" if name == "llama" else name)
        target = self.root / dest
        if target.exists():
            return dest
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.assets[name], target)
        return dest

    def text(self, rel: str = "data.txt", text: str | None = None) -> str:
        from tiny_models import write_text

        target = self.root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text(target, *([] if text is None else [text]))
        return rel

    def write(self, rel: str, content: str | bytes) -> str:
        target = self.root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
        return rel

    def mkdir(self, rel: str) -> str:
        (self.root / rel).mkdir(parents=True, exist_ok=True)
        return rel

    def absolute(self, rel: str) -> str:
        return str(self.root / rel)


# ----------------------------------------------------------------------------- standard argv per verb


def std(ctx: Ctx, verb: str, *, model=None, out="out", data=None, retain=None, extra=(), calib=False) -> list:
    """A valid tiny invocation of `verb` (argv after the verb), with the named parts replaced.

    model/data: None means a fresh valid copy; MISSING leaves the argument out. For merge, `model`
    replaces the second fine-tuned input (the first is ft1, the base is the tiny llama)."""
    if verb == "merge":
        first = ctx.model("ft1")
        second = ctx.model("ft2") if model is None else model
        argv = [first] + ([] if second is MISSING else [second]) + ["--base", ctx.model("llama", "base")]
        if out is not MISSING:
            argv += ["--out", out]
        return argv + list(extra)
    model = ctx.model() if model is None else model
    argv = [] if model is MISSING else [model]
    if verb in ("compress", "adapt", "eval") or (verb == "inspect" and (calib or data is not None)):
        data = ctx.text() if data is None else data
        flag = {"compress": "--calib", "adapt": "--data", "eval": "--data", "inspect": "--calib"}[verb]
        if data is not MISSING:
            argv += [flag, data]
        argv += TINY["inspect_calib" if verb == "inspect" else verb]
    elif verb == "unlearn":
        data = ctx.text("forget.txt") if data is None else data
        retain = ctx.text("retain.txt", RETAIN_TEXT) if retain is None else retain
        if data is not MISSING:
            argv += ["--forget", data]
        if retain is not MISSING:
            argv += ["--retain", retain]
        argv += TINY["unlearn"]
    if verb in ("compress", "adapt", "unlearn") and out is not MISSING:
        argv += ["--out", out]
    return argv + list(extra)


# ----------------------------------------------------------------------------- broken models


def _config(ctx: Ctx, rel: str) -> dict:
    return json.loads((ctx.root / rel / "config.json").read_text())


def _set_config(ctx: Ctx, rel: str, raw: str | bytes) -> None:
    target = ctx.root / rel / "config.json"
    target.write_bytes(raw if isinstance(raw, bytes) else raw.encode())


def _unlink(ctx: Ctx, rel: str, *patterns: str) -> None:
    for pattern in patterns:
        for p in (ctx.root / rel).glob(pattern):
            p.unlink()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:8] = (2**60).to_bytes(8, "little")  # a header length far past the end of the file
    data[8:40] = b"\x00not json at all\xff\xfe" + b"\x00" * 15
    path.write_bytes(bytes(data))


def _with(name: str, mutate: Callable[[Ctx, str], None] | None = None) -> Callable[[Ctx, str], str]:
    def make(ctx: Ctx, dest: str) -> str:
        ctx.model(name, dest)
        if mutate is not None:
            mutate(ctx, dest)
        return dest

    return make


def _not_utf8_config(ctx: Ctx, rel: str) -> None:
    config = _config(ctx, rel)
    config["_comment"] = "café crème"
    _set_config(ctx, rel, json.dumps(config, ensure_ascii=False).encode("latin-1"))


def _quantized(ctx: Ctx, rel: str) -> None:
    config = _config(ctx, rel)
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False}
    _set_config(ctx, rel, json.dumps(config))


def _unknown_arch(ctx: Ctx, rel: str) -> None:
    config = _config(ctx, rel)
    config["model_type"] = "frobnicator"
    config["architectures"] = ["FrobnicatorForCausalLM"]
    _set_config(ctx, rel, json.dumps(config))


# kind -> builder(ctx, dest) -> reference to pass; each builds the broken model under the root.
BROKEN_MODELS: dict[str, Callable[[Ctx, str], str]] = {
    "missing": lambda ctx, dest: dest,
    "file": lambda ctx, dest: ctx.write(dest, "this is not a model directory\n"),
    "empty-dir": lambda ctx, dest: ctx.mkdir(dest),
    "no-config": _with("llama", lambda ctx, rel: _unlink(ctx, rel, "config.json")),
    "config-invalid-json": _with("llama", lambda ctx, rel: _set_config(ctx, rel, '{"model_type": "llama", "hidden_')),
    "config-json-list": _with("llama", lambda ctx, rel: _set_config(ctx, rel, '[{"model_type": "llama"}]')),
    "config-not-utf8": _with("llama", _not_utf8_config),
    "quantized": _with("llama", _quantized),
    "no-weights": _with("llama", lambda ctx, rel: _unlink(ctx, rel, "*.safetensors", "*.safetensors.index.json")),
    "truncated-weights": _with("llama", lambda ctx, rel: _truncate(ctx.root / rel / "model.safetensors")),
    "corrupt-weights": _with("llama", lambda ctx, rel: _garbage_header(ctx.root / rel / "model.safetensors")),
    "pickle-only": _with("pickle"),
    "nan-weights": _with("nan"),
    "inf-weights": _with("inf"),
    "unknown-arch": _with("llama", _unknown_arch),
    "no-tokenizer": _with("llama", lambda ctx, rel: _unlink(
        ctx, rel, "tokenizer*.json", "special_tokens_map.json", "vocab*", "merges.txt", "*.model")),
}


def broken_model(kind: str, dest: str | None = None) -> Callable[[Ctx], str]:
    dest = dest or ("no-such-model" if kind == "missing" else f"model-{kind}")
    return lambda ctx: BROKEN_MODELS[kind](ctx, dest)


# ----------------------------------------------------------------------------- the contract


def snapshot(scope: Path, root: Path) -> dict[str, tuple]:
    """Every path under scope (hidden ones included), named relative to root ('../x' for a sibling):
    directories, links, files with size and sha256."""
    entries: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(scope):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = os.path.relpath(p, root)
            if p.is_symlink():
                entries[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                entries[rel] = ("dir",)
            else:
                data = p.read_bytes()
                entries[rel] = ("file", len(data), hashlib.sha256(data).hexdigest())
    return entries


def _strict_json(text: str):
    def reject(constant):
        raise ValueError(f"non-strict JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


def check_contract(case: Case, as_json: bool, result, before: dict, after: dict) -> list[str]:
    """The list of contract violations (empty when the case behaves)."""
    problems: list[str] = []
    expected = case.expected_exit if isinstance(case.expected_exit, tuple) else (case.expected_exit,)
    stdout, stderr = result.stdout or "", result.stderr or ""
    if result.returncode not in expected:
        problems.append(f"exit code {result.returncode}, expected {' or '.join(map(str, expected))}")
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    if len(errors) != 1:
        problems.append(f"{len(errors)} stderr lines start with 'error:' (want exactly 1)")
    if TRACEBACK in stdout or TRACEBACK in stderr:
        problems.append("a Python traceback was printed")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        problems.append(f"uncaught {type(result.exception).__name__}: {' '.join(str(result.exception).split())[:200]}")
    if as_json:
        try:
            payload = _strict_json(stdout.strip())
        except ValueError as exc:
            problems.append(f"--json: stdout is not one strict JSON object ({str(exc)[:80]}); "
                            f"stdout starts {stdout.strip()[:80]!r}")
        else:
            if not isinstance(payload, dict):
                problems.append(f"--json: stdout is a {type(payload).__name__}, not an object")
            else:
                if payload.get("ok") is not False:
                    problems.append(f"--json: ok is {payload.get('ok')!r}, want false")
                if payload.get("exit_code") != result.returncode:
                    problems.append(f"--json: exit_code {payload.get('exit_code')!r} != process exit {result.returncode}")
                if not isinstance(payload.get("error"), str) or not payload.get("error"):
                    problems.append("--json: no 'error' string")
    new = sorted(p for p in after if p not in before and not any(fnmatch(p, g) for g in case.allow_new))
    # Report only the top of each new subtree.
    new_tops = [p for p in new if not any(p.startswith(q + "/") for q in new if q != p)]
    if new_tops:
        problems.append(f"new paths under the root: {', '.join(new_tops[:6])}" + (" ..." if len(new_tops) > 6 else ""))
    removed = sorted(p for p in before if p not in after)
    if removed:
        problems.append(f"inputs removed: {', '.join(removed[:6])}" + (" ..." if len(removed) > 6 else ""))
    changed = sorted(p for p in before if p in after and before[p] != after[p])
    if changed:
        problems.append(f"inputs changed: {', '.join(changed[:6])}" + (" ..." if len(changed) > 6 else ""))
    return problems


def describe(result) -> str:
    def head(text: str, n: int = 6) -> str:
        lines = [line for line in (text or "").splitlines() if line.strip()]
        return "\n    ".join(lines[:n]) or "(empty)"

    exc = result.exception
    exc_text = "" if exc is None or isinstance(exc, SystemExit) else f"\n  exception: {type(exc).__name__}: {exc}"
    return f"  stderr: {head(result.stderr)}\n  stdout: {head(result.stdout, 3)}{exc_text}"


def run_case(case: Case, as_json: bool, ctx: Ctx) -> None:
    from cli_runner import run_cli

    try:
        built = case.build(ctx)
    except Exception as exc:  # a broken case must not read as a product defect
        pytest.fail(f"{case.name}: building the case's inputs failed (a bug in the sweep, not in subspace): "
                    f"{type(exc).__name__}: {exc}")
    argv = [case.verb, *map(str, built)] + (["--json"] if as_json else [])
    before = snapshot(ctx.scope, ctx.root)
    result = run_cli(*argv)
    after = snapshot(ctx.scope, ctx.root)
    problems = check_contract(case, as_json, result, before, after)
    _log(case, as_json, argv, result, problems)
    assert not problems, (f"{case.name}{' --json' if as_json else ''}: " + "; ".join(problems)
                          + f"\n  argv: subspace {' '.join(argv)}\n" + describe(result))


def _log(case: Case, as_json: bool, argv: list, result, problems: list[str]) -> None:
    """With BAD_INPUTS_LOG=FILE, append one JSON line per case (for summarising a sweep)."""
    target = os.environ.get("BAD_INPUTS_LOG")
    if not target:
        return
    record = {"id": case.name + ("-json" if as_json else ""), "exit": result.returncode, "problems": problems,
              "errors": [line for line in (result.stderr or "").splitlines() if line.startswith("error:")],
              "stderr": [line for line in (result.stderr or "").splitlines() if line.strip()][:4],
              "exception": None if result.exception is None or isinstance(result.exception, SystemExit)
              else f"{type(result.exception).__name__}: {str(result.exception)[:160]}"}
    with open(target, "a") as f:
        f.write(json.dumps(record) + "\n")
