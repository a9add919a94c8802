"""The verbs, declared once: each one's config class, pipeline runner, pre-load checks and renderer.

The CLI registers its commands from this table, `subspace run` validates and runs recipe steps
through it, and `subspace schema` describes its config classes. Importing this module imports no
torch: the config classes live in torch-free modules and the pipelines load on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from subspace_cli.pipelines.adapt_config import AdaptConfig
from subspace_cli.pipelines.bench import BenchConfig
from subspace_cli.pipelines.compress_config import CompressConfig
from subspace_cli.pipelines.evaluate import EvalConfig
from subspace_cli.pipelines.heal_config import HealConfig
from subspace_cli.pipelines.inspect import InspectConfig
from subspace_cli.pipelines.merge_config import MergeConfig
from subspace_cli.pipelines.unlearn_config import UnlearnConfig
from subspace_cli.report.render import print_bench, print_eval, print_inspect, print_report


@dataclass(frozen=True)
class Verb:
    name: str  # the command: `subspace NAME`
    config_class: type[BaseModel]
    pipeline: str  # module holding `validate(config)` and the runner; imported on first use (torch)
    runner: str  # run(config) -> Report (or a summary dict for eval / inspect)
    render: Callable[[Any], None]  # prints the result for people (the CLI's default, `subspace run` steps)
    writes_output: bool = True  # has --out, a report.json and a recipe.yaml

    def _pipeline(self):
        return importlib.import_module(self.pipeline)

    def validate(self, config: BaseModel) -> Any:
        """Everything checkable before loading weights (exit 2 on bad input)."""
        return self._pipeline().validate(config)

    def run(self, config: BaseModel) -> Any:
        return getattr(self._pipeline(), self.runner)(config)


VERBS: dict[str, Verb] = {verb.name: verb for verb in (
    Verb("compress", CompressConfig, "subspace_cli.pipelines.compress", "run_compress", print_report),
    Verb("adapt", AdaptConfig, "subspace_cli.pipelines.adapt", "run_adapt", print_report),
    Verb("heal", HealConfig, "subspace_cli.pipelines.heal", "run_heal", print_report),
    Verb("merge", MergeConfig, "subspace_cli.pipelines.merge", "run_merge", print_report),
    Verb("unlearn", UnlearnConfig, "subspace_cli.pipelines.unlearn", "run_unlearn", print_report),
    Verb("eval", EvalConfig, "subspace_cli.pipelines.evaluate", "run_eval", print_eval, writes_output=False),
    Verb("inspect", InspectConfig, "subspace_cli.pipelines.inspect", "run_inspect", print_inspect, writes_output=False),
    Verb("bench", BenchConfig, "subspace_cli.pipelines.bench", "run_bench", print_bench, writes_output=False),
)}


def config_classes() -> dict[str, type[BaseModel]]:
    """verb -> its pydantic config class."""
    return {name: verb.config_class for name, verb in VERBS.items()}
