"""`subspace eval MODEL --data D`: perplexity, drift against a baseline, quality gates (exit 1)."""

from __future__ import annotations

from typing import List, Optional

import typer

from subspace_cli.cli.common import run_command
from subspace_cli.cli.options import JsonFlag, QuietFlag, config_from_cli, field_argument, field_option
from subspace_cli.pipelines.evaluate import EvalConfig as C
from subspace_cli.pipelines.verbs import VERBS
from subspace_cli.report.render import print_eval


def evaluate(
    model: str = field_argument(C, "model"),
    data: str = field_option(C, "data", "--data", "-d", default=...),
    baseline: Optional[str] = field_option(C, "baseline"),
    eval_seqlen: int = field_option(C, "eval_seqlen"),
    eval_chars: int = field_option(C, "eval_chars"),
    split: str = field_option(C, "split"),
    tasks: Optional[List[str]] = field_option(C, "tasks", "--tasks", default=None),
    task_examples: int = field_option(C, "task_examples"),
    fail_if: Optional[List[str]] = field_option(C, "fail_if", "--fail-if", default=None),
    batch_size: int = field_option(C, "batch_size"),
    device: str = field_option(C, "device"),
    devices: Optional[str] = field_option(C, "devices"),
    dtype: str = field_option(C, "dtype"),
    allow_pickle: bool = field_option(C, "allow_pickle"),
    json_out: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Score MODEL's perplexity on held-out text; with --baseline also ppl_ratio and per-token KL."""
    values = {k: v for k, v in locals().items() if k in C.model_fields}
    values["fail_if"] = list(fail_if or [])
    values["tasks"] = list(tasks or [])

    def go():
        from subspace_cli.errors import GateFailed

        try:
            return VERBS["eval"].run(config_from_cli(C, values))
        except GateFailed as exc:
            if not json_out and getattr(exc, "summary", None):
                print_eval(exc.summary)  # people see the numbers as well as the failed gates
            raise

    run_command(go, as_json=json_out, quiet=quiet, render=VERBS["eval"].render)


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)
