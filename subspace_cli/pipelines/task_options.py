"""The task-check options every verb that scores text shares (eval, compress, heal, unlearn, merge):
declared once, so `--tasks` and `--task-examples` mean the same everywhere. Imports no torch."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TaskOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    tasks: list[str] = Field(
        default_factory=list,
        description="zero-shot tasks built from the evaluated text's held-out part, scored beside perplexity: lambada "
        "(last-word prediction), cloze (4-way continuation choice); or lm-evaluation-harness tasks (pip install "
        "lm-eval==0.4.13): lm-eval:NAME from its registry, lm-eval:path/to/task.yaml a local task YAML, reported as "
        "lm-eval:NAME (NAME the YAML's task:); comma-separated")
    task_examples: int = Field(100, ge=1, description="examples per task (fewer when the text is short); "
                               "for lm-eval tasks, its limit")

    @field_validator("tasks", mode="before")
    @classmethod
    def _split_tasks(cls, value):
        if isinstance(value, str):
            value = [value]
        return [part.strip() for item in value or [] for part in str(item).split(",") if part.strip()]
