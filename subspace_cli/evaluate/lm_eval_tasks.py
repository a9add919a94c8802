"""`eval --tasks lm-eval:NAME` and `lm-eval:path/to/task.yaml`: lm-evaluation-harness tasks.

The model already loaded by `eval` (a factored checkpoint included: it is a PreTrainedModel) is
wrapped in lm-eval's HFLM and scored with `lm_eval.simple_evaluate` (lm-eval 0.4.13; Gao et al.,
"A framework for few-shot language model evaluation", Zenodo 10256836). lm_eval is imported only
when such a task is asked for.

A task is a registry name (`lm-eval:hellaswag`) or a local task YAML (`lm-eval:tasks/mine.yaml`),
whose directory lm-eval indexes (TaskManager include_path) and whose `task:` key names what runs.
Results are keyed `lm-eval:NAME`, NAME the registry name or the YAML's `task:` (a path would put
dots and slashes into the gate field `lm-eval:NAME.acc`).

Datasets are read offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE while lm-eval runs): a registry
task whose data is not in the local cache fails at once with exit 2, not after a minute of
retries; `HF_DATASETS_OFFLINE=0` in the environment lets datasets download instead.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import math
import os
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from subspace_cli.errors import RuntimeFailure, SubspaceError, UsageError, did_you_mean

PREFIX = "lm-eval:"
VERSION = "0.4.13"
INSTALL = f"pip install lm-eval=={VERSION}"
METRICS = ("acc", "acc_norm", "exact_match")  # the task's main accuracy, in this order of preference
DOCS = "docs/inspect-and-eval.md, 'lm-evaluation-harness tasks'"
_managers: dict[tuple, object] = {}  # a TaskManager per set of include paths: the registry index takes seconds


def is_lm_eval(name: str) -> bool:
    return name.startswith(PREFIX)


@dataclass(frozen=True)
class LmEvalTask:
    spec: str  # as the user wrote it: lm-eval:NAME or lm-eval:PATH.yaml
    name: str  # the registry name, or the YAML's `task:`
    yaml: Path | None  # the local task YAML (resolved), None for a registry task

    @property
    def key(self) -> str:
        """The result key and gate prefix: `lm-eval:NAME`."""
        return PREFIX + self.name


def resolve(specs: list[str]) -> list[LmEvalTask]:
    """Each `lm-eval:` spec checked before any weights load (exit 2 naming the fix): lm-eval
    installed, the YAML present with a `task:`, the registry name known and scorable."""
    if not specs:
        return []
    _require_lm_eval(specs[0])
    tasks: dict[str, LmEvalTask] = {}
    for spec in specs:
        target = spec[len(PREFIX):].strip()
        if not target:
            raise UsageError(f"--tasks '{spec}': name an lm-eval task, e.g. lm-eval:hellaswag or "
                             "lm-eval:path/to/task.yaml")
        if target.endswith((".yaml", ".yml")) or "/" in target or os.sep in target:
            path = Path(target).expanduser()
            if not path.is_file():
                raise UsageError(f"--tasks '{spec}': task YAML '{target}' does not exist; pass the path of an "
                                 f"lm-eval task YAML (see {DOCS})")
            task = LmEvalTask(spec, _yaml_task_name(path, spec), path.resolve())
        else:
            task = LmEvalTask(spec, target, None)
        other = tasks.get(task.key)
        if other is not None and other.yaml != task.yaml:
            raise UsageError(f"--tasks '{spec}' and '{other.spec}' both name lm-eval task '{task.name}'; ask for one")
        tasks.setdefault(task.key, task)
    manager = _manager(list(tasks.values()))
    for task in tasks.values():
        _check_entry(manager, task)
    return list(tasks.values())


def _require_lm_eval(spec: str) -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise UsageError(f"--tasks '{spec}' needs lm-evaluation-harness, which is not installed; {INSTALL}")
    try:
        import lm_eval.tasks  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken install is reported, not shown as a traceback
        raise UsageError(f"--tasks '{spec}': lm-eval could not be imported ({_line(exc)}); {INSTALL}") from None


def _yaml_task_name(path: Path, spec: str, seen: frozenset = frozenset()) -> str:
    """The `task:` of a task YAML (its includes merged under it, as lm-eval merges them)."""
    import yaml

    class Loader(yaml.SafeLoader):  # lm-eval's `!function utils.f` tags are read as plain strings here
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: loader.construct_scalar(node)
                                 if isinstance(node, yaml.ScalarNode) else None)
    try:
        config = yaml.load(path.read_text(), Loader=Loader)  # noqa: S506 - a SafeLoader subclass
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UsageError(f"--tasks '{spec}': cannot read task YAML '{path}' ({_line(exc)})") from None
    if not isinstance(config, dict):
        raise UsageError(f"--tasks '{spec}': '{path}' is not an lm-eval task YAML (a mapping with a task: key)")
    if "group" in config:
        raise UsageError(f"--tasks '{spec}': '{path}' is an lm-eval group config (group: key); pass the YAML of "
                         "one of its tasks")
    name = config.get("task")
    includes = config.get("include") or []
    if name is None and path not in seen:  # lm-eval merges includes under the file: the last one's task counts
        for include in includes if isinstance(includes, list) else [includes]:
            included = path.parent / str(include)
            if included.is_file():
                try:
                    name = _yaml_task_name(included, spec, seen | {path})
                except UsageError:
                    pass
    if not isinstance(name, str) or not name.strip():
        raise UsageError(f"--tasks '{spec}': task YAML '{path}' has no task: key naming the task (e.g. task: mytask)"
                         if name is None else f"--tasks '{spec}': the task: key of '{path}' must be one task name")
    return name.strip()


def _manager(tasks: list[LmEvalTask]):
    """The TaskManager over the YAMLs' directories, with the registry only when a registry task is asked."""
    from lm_eval.tasks import TaskManager

    paths = tuple(sorted({str(t.yaml.parent) for t in tasks if t.yaml is not None}))
    registry = any(t.yaml is None for t in tasks)
    key = (paths, registry, tuple(sorted((str(t.yaml), t.yaml.stat().st_mtime_ns) for t in tasks if t.yaml)))
    if key not in _managers:
        with _quiet():
            _managers[key] = TaskManager(include_path=list(paths) or None, include_defaults=registry)
    return _managers[key]


def _check_entry(manager, task: LmEvalTask) -> None:
    from lm_eval.tasks._index import Kind

    entry = manager.task_index.get(task.name)
    if task.yaml is not None:
        if entry is None or entry.yaml_path is None or Path(entry.yaml_path).resolve() != task.yaml:
            where = f"'{entry.yaml_path}' also defines task '{task.name}'" if entry is not None and entry.yaml_path \
                else "lm-eval could not read it (check its include: files and keys)"
            raise UsageError(f"--tasks '{task.spec}': {where}; give the task a name of its own, or its YAML a "
                             "directory of its own")
        return
    if entry is None:
        hint = did_you_mean(task.name, manager.all_tasks)
        raise UsageError(f"--tasks '{task.spec}': unknown lm-eval task '{task.name}'{hint}; `lm-eval ls tasks` lists "
                         "them, or pass a local task YAML as lm-eval:path/to/task.yaml")
    if entry.kind == Kind.TAG:
        some = ", ".join(f"lm-eval:{t}" for t in sorted(entry.tags)[:3])
        raise UsageError(f"--tasks '{task.spec}': '{task.name}' is an lm-eval tag of {len(entry.tags)} tasks with no "
                         f"score of its own; ask for its tasks, e.g. {some}")
    if entry.kind == Kind.GROUP and not (entry.cfg or {}).get("aggregate_metric_list"):
        raise UsageError(f"--tasks '{task.spec}': lm-eval group '{task.name}' reports no aggregate score; ask for "
                         "its tasks one by one")


def run(tasks: list[LmEvalTask], models: list, tokenizer, limit: int, batch_size: int,
        progress: bool = False) -> dict[str, dict]:
    """{`lm-eval:NAME`: {acc, n, chance, metric[, baseline_acc, acc_ratio]}}; `models` is the model,
    then the baseline if any, each scored on the same examples (the first `limit` of each task)."""
    results = {}
    with _quiet(), _bars(progress), _offline():
        manager = _manager(tasks)
        lms = [_wrap(model, tokenizer, batch_size, progress) for model in models]
        for task in tasks:
            loaded = _load(manager, task)
            runs = [_evaluate(lm, manager, loaded, task, limit) for lm in lms]
            metric, acc = _main_metric(runs[0], task)
            entry = {"acc": acc, "n": sum(int(v.get("effective", 0)) for v in runs[0].get("n-samples", {}).values()),
                     "chance": _chance(loaded, metric), "metric": metric.removesuffix(",none")}
            if len(runs) > 1:
                base = runs[1]["results"].get(task.name, {}).get(metric)
                entry["baseline_acc"] = float(base) if _is_number(base) else float("nan")
                entry["acc_ratio"] = acc / entry["baseline_acc"] if entry["baseline_acc"] else float("nan")
            if task.yaml is not None:
                entry["yaml"] = str(task.yaml)
            results[task.key] = entry
    return results


def _wrap(model, tokenizer, batch_size: int, progress: bool):
    """The in-memory model as an lm-eval LM; its progress bars follow ours (off with --quiet or no terminal)."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not progress)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not progress)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not progress)

    try:
        return QuietHFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    except Exception as exc:  # noqa: BLE001 - lm-eval internals: one line, stage "tasks"
        raise RuntimeFailure("tasks", f"lm-eval could not wrap the model ({_line(exc)})") from None


def _load(manager, task: LmEvalTask) -> dict:
    """The task's lm-eval objects, its data read (exit 2 when that fails: the data or the YAML is the cause)."""
    try:
        return manager.load([task.name])
    except Exception as exc:  # noqa: BLE001 - datasets and lm-eval raise many kinds; each is one line here
        if task.yaml is None:
            where = ("datasets are read offline, from the local cache" if _offline_wanted() else
                     "the hub was not reachable or the dataset is gated")
            raise UsageError(
                f"--tasks '{task.spec}': lm-eval could not load the data of '{task.name}' ({_line(exc)}); {where}: "
                f"write a task YAML over local data files and pass lm-eval:path/to/task.yaml (see {DOCS})"
                + (", or set HF_DATASETS_OFFLINE=0 to let datasets download it" if _offline_wanted() else "")
            ) from None
        raise UsageError(f"--tasks '{task.spec}': lm-eval could not load task '{task.name}' from '{task.yaml}' "
                         f"({_line(exc)}); check its dataset_path, dataset_kwargs and keys (see {DOCS})") from None


def _evaluate(lm, manager, loaded: dict, task: LmEvalTask, limit: int) -> dict:
    import lm_eval

    top = [loaded["groups"][task.name]] if task.name in loaded["groups"] else list(loaded["tasks"].values())
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=top, task_manager=manager, limit=limit, log_samples=False,
                                      bootstrap_iters=0)
    except SubspaceError:
        raise
    except Exception as exc:  # noqa: BLE001 - lm-eval internals: one line, stage "tasks"
        if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
            raise  # the CLI reports it as out of memory, with its hint
        raise RuntimeFailure("tasks", f"lm-eval task '{task.name}' failed: {type(exc).__name__}: "
                                      f"{_line(exc)}") from None
    if not out or task.name not in out.get("results", {}):
        raise RuntimeFailure("tasks", f"lm-eval returned no result for task '{task.name}'")
    return out


def _main_metric(out: dict, task: LmEvalTask) -> tuple[str, float]:
    """(lm-eval's key, e.g. 'acc,none', and value) of the main accuracy: acc, acc_norm, exact_match, else
    the first number the task reports."""
    row = out["results"][task.name]
    numbers = [k for k, v in row.items() if "," in k and "_stderr" not in k and _is_number(v)]
    for metric in METRICS:
        for key in numbers:
            if key.split(",")[0] == metric:
                return key, float(row[key])
    if not numbers:
        raise RuntimeFailure("tasks", f"lm-eval task '{task.name}' reported no numeric metric")
    return numbers[0], float(row[numbers[0]])


def _chance(loaded: dict, metric: str) -> float:
    """Accuracy of a uniform guess over the choices of the scored examples, for multiple-choice acc /
    acc_norm (one loglikelihood request per choice); NaN (null in JSON) for other tasks."""
    leaves = list(loaded["tasks"].values())
    if metric.split(",")[0] not in ("acc", "acc_norm") or any(t.OUTPUT_TYPE != "multiple_choice" for t in leaves):
        return float("nan")
    choices = [n for t in leaves for n in Counter(i.doc_id for i in t.instances).values()]
    return sum(1 / n for n in choices) / len(choices) if choices else float("nan")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@contextmanager
def _quiet():
    """lm-eval's and datasets' logs down to errors: their INFO and WARNING lines are about their own
    defaults (an in-memory model, a metric's default aggregation), not the user's run."""
    loggers = [logging.getLogger(name) for name in ("lm_eval", "datasets")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextmanager
def _bars(progress: bool):
    """Without our progress bars (--quiet, no terminal), none of lm-eval's or datasets' either: the
    documents loop of lm-eval's Task has no switch, so its `tqdm` is swapped for one that is off.
    (The model's loops are switched off by QuietHFLM.)"""
    if progress:
        yield
        return
    import datasets.utils as datasets_bars
    import lm_eval.api.task as task_module

    bar, was_disabled = task_module.tqdm, datasets_bars.are_progress_bars_disabled()
    task_module.tqdm = functools.partial(bar, disable=True)
    with warnings.catch_warnings():  # it warns, and does nothing, when HF_DATASETS_DISABLE_PROGRESS_BARS=0
        warnings.simplefilter("ignore")
        datasets_bars.disable_progress_bars()
    try:
        yield
    finally:
        task_module.tqdm = bar
        if not was_disabled:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                datasets_bars.enable_progress_bars()


@contextmanager
def _offline():
    """HF_DATASETS_OFFLINE and HF_HUB_OFFLINE on while lm-eval runs, unless HF_DATASETS_OFFLINE is set
    false. datasets and huggingface_hub read them at import, so their module flags are set too."""
    if not _offline_wanted():
        yield
        return
    names = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    env = {name: os.environ.get(name) for name in names}
    flags = []
    for module, attrs in (("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
                          ("huggingface_hub.constants", ("HF_HUB_OFFLINE",))):
        try:
            loaded = importlib.import_module(module)
        except ImportError:
            continue
        flags += [(loaded, attr, getattr(loaded, attr)) for attr in attrs if hasattr(loaded, attr)]
    os.environ.update(dict.fromkeys(names, "1"))
    for module, attr, _ in flags:
        setattr(module, attr, True)
    try:
        yield
    finally:
        for module, attr, value in flags:
            setattr(module, attr, value)
        _restore_env(env)


def _offline_wanted() -> bool:
    return os.environ.get("HF_DATASETS_OFFLINE", "").strip().lower() not in ("0", "false", "no", "off")


def _restore_env(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
