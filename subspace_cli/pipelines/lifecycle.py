"""What every verb does around its own transform, written once.

    validate(config)            exit 2 before any weight is read (each verb's `validate`)
    StageTimer stages           the report's timings, and the stage an error names
    write_output(...)           only the main process writes, into an atomic output directory;
                                every process meets at the barrier in `finally`, so a failed write
                                never leaves the others waiting
    report_fields(...)          the fields every Report shares: `config` (the verb's options) and
                                `method_options` (the method's resolved options), kept apart
    rendering                   pipelines/verbs.py maps each verb to its renderer; `--json` is
                                the report's summary (cli/common.py)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from subspace_cli import __version__
from subspace_cli import lifecycle as run_state  # the stage an error names
from subspace_cli.io.output_dir import atomic_output_dir
from subspace_cli.pipelines.config_paths import input_refs, stored_recipe
from subspace_cli.pipelines.distributed import Processes
from subspace_cli.report.render import write_outputs
from subspace_cli.report.resources import StageTimer, peak_device_mb, peak_rss_mb
from subspace_cli.report.schema import Report

SINGLE_PROCESS = Processes()


def report_fields(verb: str, config: BaseModel, method_config: BaseModel | None, *, model: str | None = None
                  ) -> dict[str, Any]:
    """The fields every verb's Report starts from."""
    return {
        "tool_version": __version__, "verb": verb, "model": model or config.model, "method": getattr(config, "method", verb),
        "config": config.model_dump(mode="json"),
        "method_options": method_config.model_dump(mode="json", by_alias=True) if method_config is not None else {},
    }


def measured(report: Report, timer: StageTimer) -> Report:
    """Timings and peak memory as of now (call last, after the write stage)."""
    report.timings_s = {**report.timings_s, **timer.seconds}
    report.peak_rss_mb = round(peak_rss_mb(), 1)
    report.peak_device_mb = peak_device_mb()
    return report


def write_output(verb: str, config: BaseModel, write: Callable[[Path], Report],
                 processes: Processes = SINGLE_PROCESS) -> Report | None:
    """Run `write(tmp) -> report` on the main process into a temporary sibling of `config.out`, then add
    report.json, report.md and recipe.yaml and rename it into place. Returns the report (None on the
    other processes). The barrier is in `finally`: a main process that fails to write still releases
    the others, which then exit while the main process reports the failure."""
    try:
        if not processes.is_main:
            return None
        with run_state.stage("write"), atomic_output_dir(Path(config.out), config.overwrite, input_refs(config)) as tmp:
            report = write(tmp)
            write_outputs(tmp, report, stored_recipe(verb, config))
        return report
    finally:
        processes.barrier()
