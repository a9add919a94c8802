"""`subspace merge --base BASE MODEL... --method M --out DIR`, or `subspace merge CONFIG.yaml --out DIR`."""

from __future__ import annotations

from typing import List, Optional

import typer

from subspace_cli.cli.common import parse_options, run_command
from subspace_cli.cli.options import JsonFlag, MethodOptionFlags, QuietFlag, config_from_cli, field_option
from subspace_cli.pipelines.merge_config import MergeConfig as C
from subspace_cli.pipelines.verbs import VERBS


def merge(
    models: List[str] = typer.Argument(..., help=C.model_fields["models"].description
                                        + "; or one CONFIG.yaml (ours or mergekit's)"),
    out: str = field_option(C, "out", "--out", "-o", default=...),
    base: Optional[str] = field_option(C, "base"),
    force_base: bool = field_option(C, "force_base"),
    method: str = field_option(C, "method"),
    option: MethodOptionFlags = None,
    weights: Optional[str] = typer.Option(None, "--weights", help=C.model_fields["weights"].description + ", comma-separated"),
    density: Optional[str] = typer.Option(None, "--density", help=C.model_fields["density"].description + ", comma-separated"),
    data: Optional[List[str]] = typer.Option(None, "--data", help=C.model_fields["data"].description),
    samples: int = field_option(C, "samples"),
    seqlen: int = field_option(C, "seqlen"),
    eval: Optional[List[str]] = typer.Option(None, "--eval", help=C.model_fields["eval"].description),
    tasks: Optional[List[str]] = field_option(C, "tasks", "--tasks", default=None),
    task_examples: int = field_option(C, "task_examples"),
    eval_seqlen: int = field_option(C, "eval_seqlen"),
    eval_chars: int = field_option(C, "eval_chars"),
    batch_size: int = field_option(C, "batch_size"),
    shard_size: str = field_option(C, "shard_size"),
    dtype: str = field_option(C, "dtype"),
    overwrite: bool = field_option(C, "overwrite"),
    device: str = field_option(C, "device"),
    seed: int = field_option(C, "seed"),
    allow_pickle: bool = field_option(C, "allow_pickle"),
    json_out: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Merge fine-tuned models (or LoRA adapters) of one base into one checkpoint, one tensor at a time."""
    given = {k: v for k, v in locals().items() if k in C.model_fields}

    def go():
        from pathlib import Path

        from subspace_cli.pipelines.merge_yaml import read_merge_file

        values = dict(given)
        values["options"] = parse_options(option)
        values["data"] = data or []
        values["eval"] = eval or []
        if len(models) == 1 and Path(models[0]).suffix in (".yaml", ".yml"):
            from subspace_cli import lifecycle

            lifecycle.add_input("merge config", models[0])  # --out must not replace the file that describes it
            from_file = read_merge_file(Path(models[0]))
            # Flags given on the command line (anything not at its default) win over the file.
            for key, value in values.items():
                if key == "models":
                    continue
                default = C.model_fields[key].get_default(call_default_factory=True)
                if value is not None and value != default or key not in from_file:
                    from_file[key] = value
            values = from_file
        return VERBS["merge"].run(config_from_cli(C, values))

    run_command(go, as_json=json_out, quiet=quiet, render=VERBS["merge"].render)


def register(app: typer.Typer) -> None:
    app.command("merge")(merge)
