"""Task accuracy for the verbs that transform a model: the same tasks as `subspace eval --tasks`,
scored on each evaluation source's held-out text for each model the verb reads or writes, and
reported as report.tasks[SOURCE][TASK] = {"n", "chance", "acc": {MODEL_LABEL: accuracy}}."""

from __future__ import annotations

from subspace_cli.errors import UsageError


def check_task_names(tasks: list[str]) -> list[str]:
    """The result key of each --tasks name (exit 2 on an unknown one, before any weights load)."""
    from subspace_cli.evaluate.lm_eval_tasks import is_lm_eval, resolve
    from subspace_cli.evaluate.tasks import check_tasks

    names = check_tasks(tasks)
    return [n for n in names if not is_lm_eval(n)] + [t.key for t in resolve([n for n in names if is_lm_eval(n)])]


def model_task_scores(model, tokenizer, tasks: list[str], text: str, examples: int, device, batch_size: int,
                      what: str) -> dict[str, dict]:
    """One model's {task key: {acc, n, chance[, metric]}}: built-in tasks from `text`, lm-eval tasks
    from their own data (the first `examples` of each)."""
    from subspace_cli.evaluate.lm_eval_tasks import is_lm_eval, resolve
    from subspace_cli.evaluate.lm_eval_tasks import run as run_lm_eval
    from subspace_cli.evaluate.perplexity import is_causal_lm
    from subspace_cli.evaluate.tasks import CHOICES, build, score
    from subspace_cli.io.data import special_tokens
    from subspace_cli.pipelines.progress import progress_bar, progress_enabled

    if not is_causal_lm(model):
        raise UsageError(f"--tasks needs a causal language model; this one is a {type(model).__name__}")
    prefix = special_tokens(tokenizer).prefix
    results = {}
    for name in (n for n in tasks if not is_lm_eval(n)):
        built = build(name, tokenizer, text, examples, prefix, what)
        with progress_bar(f"task {name}", total=len(built)) as advance:
            acc = score(model, name, built, device, progress=advance)
        results[name] = {"acc": acc, "n": len(built), "chance": 0.0 if name == "lambada" else 1 / CHOICES}
    lm_eval_tasks = resolve([n for n in tasks if is_lm_eval(n)])
    if lm_eval_tasks:
        results.update(run_lm_eval(lm_eval_tasks, [model], tokenizer, examples, batch_size,
                                   progress=progress_enabled()))
    return results


class TaskTable:
    """report.tasks, filled one model at a time (models are scored as the verb holds them)."""

    def __init__(self, config, texts: dict[str, str], what: dict[str, str] | None = None):
        self.config = config  # reads tasks, task_examples, batch_size
        self.texts = texts  # source name -> the held-out text its built-in tasks are made from
        self.what = what or {name: f"the held-out 5% of '{name}'" for name in texts}  # for messages
        self.table: dict[str, dict[str, dict]] = {}

    @classmethod
    def of_sources(cls, config, sources: list[str]) -> TaskTable:
        """Held-out texts of data sources (each one's last 5%), read only when --tasks asks for tasks."""
        from subspace_cli.io.data import load_heldout

        return cls(config, {source: load_heldout(source) for source in sources} if config.tasks else {})

    def add(self, label: str, model, tokenizer, device) -> None:
        """Score `model` (named `label` in the report); nothing when --tasks is empty. Built-in tasks are
        made from each text; lm-eval tasks bring their own data, so they run once, under "lm-eval"."""
        from subspace_cli.evaluate.lm_eval_tasks import is_lm_eval

        builtin = [t for t in self.config.tasks if not is_lm_eval(t)]
        lm_eval = [t for t in self.config.tasks if is_lm_eval(t)]
        runs = [(name, text, builtin) for name, text in self.texts.items() if builtin]
        if lm_eval and self.texts:
            runs.append(("lm-eval", "", lm_eval))
        for name, text, tasks in runs:
            scores = model_task_scores(model, tokenizer, tasks, text, self.config.task_examples, device,
                                       getattr(self.config, "batch_size", 8), self.what.get(name, name))
            for task, entry in scores.items():
                row = self.table.setdefault(name, {}).setdefault(
                    task, {"n": entry["n"], "chance": entry["chance"], "acc": {}})
                row["acc"][label] = entry["acc"]
