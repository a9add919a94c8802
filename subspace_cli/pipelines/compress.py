"""The compress verb: load -> calibrate -> plan ranks -> factor block by block -> write -> report.

Sequential calibration (default): block i's input statistics are taken from activations that
went through blocks 0..i-1 *after* they were compressed, so every block is fitted to what it
will receive at inference. One-shot (`sequential=False`) takes all statistics from the dense
model. Global rank allocation needs every matrix's spectrum before any block is compressed, so
it first plans ranks from the dense model's (one-shot) statistics, then applies them.

Several processes (`accelerate launch` / `torchrun`, see pipelines/distributed.py): each
propagates its share of the calibration samples, and every statistic is summed over the
processes before it is used, so all of them fit the same factors; the main process writes.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from subspace_cli import __version__
from subspace_cli.errors import UsageError
from subspace_cli.io.checkpoint import param_count, write_checkpoint
from subspace_cli.io.discovery import block_linears, compile_pattern, find_blocks, set_submodule, weight_matrix
from subspace_cli.io.models import load_model_and_tokenizer
from subspace_cli.io.output_dir import atomic_output_dir, check_output_dir
from subspace_cli.io.sharded_writer import shard_size_bytes
from subspace_cli.linalg.gram import GramStats
from subspace_cli.linalg.rank_allocation import MatrixSpec, allocate, factored_params
from subspace_cli.linalg.truncation import decompose, energy_kept, factors, weighted_relative_error
from subspace_cli.methods.registry import Method, MethodConfig, get_method
from subspace_cli.modules.lowrank import LowRankLinear, densify_
from subspace_cli.pipelines.calibration import BlockStream, collect_dense_grams, record_inputs
from subspace_cli.pipelines.compress_config import CompressConfig
from subspace_cli.pipelines.config_paths import input_refs, stored_recipe
from subspace_cli.pipelines.datasets import EvalSet, calibration_ids, evaluation_sets
from subspace_cli.pipelines.dictionary_layers import Member, compress_group, dictionary_budget, projection_type
from subspace_cli.pipelines.distributed import Processes, current_processes, shared_perplexity
from subspace_cli.pipelines.placement import place_blocks
from subspace_cli.pipelines.progress import progress_bar, set_quiet
from subspace_cli.report.render import write_outputs
from subspace_cli.report.resources import StageTimer, peak_device_mb, peak_rss_mb
from subspace_cli.report.schema import MatrixReport, ParamTotals, PerplexityReport, Report

log = logging.getLogger(__name__)

# Rank planning needs only the shape of each whitened spectrum, which 16 × calib_seqlen tokens
# already resolve; it skips 3/4 of the planning pass's Gram cost at the default 64 samples.
PLAN_SAMPLES = 16


@dataclass
class CompressState:
    """Runtime state of one compress run (the config stays frozen)."""

    config: CompressConfig
    method: Method
    method_config: MethodConfig
    matrices: list[MatrixReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fit_seconds: dict[str, float] = field(default_factory=dict)  # dictionary methods: coding / update
    processes: Processes = field(default_factory=Processes)  # one, unless launched with several


def validate(config: CompressConfig) -> tuple[Method, MethodConfig]:
    """Everything checkable before loading weights, so bad input fails fast with exit 2."""
    method = get_method("compress", config.method)
    options = dict(config.options)
    if config.structure is not None:
        if "structure" not in method.config_class.model_fields:
            raise UsageError(f"--structure applies to sparse-dictionary methods (cospadi), not '{method.name}'")
        options["structure"] = config.structure
    method_config = method.make_config(options)
    compile_pattern(config.targets, "--targets")
    compile_pattern(config.exclude, "--exclude")
    check_output_dir(Path(config.out), config.overwrite, input_refs(config))
    shard_size_bytes(config.shard_size)
    if "calibration" in method.needs and not config.calib:
        raise UsageError(f"method '{method.name}' needs calibration data; pass --calib (e.g. builtin:shakespeare)")
    return method, method_config


def refuse_factored(model: nn.Module, ref: str) -> None:
    """A checkpoint written by compress holds LowRankLinear / DictionaryLinear layers, not Linears to factor."""
    if getattr(model.config, "subspace", None):
        raise UsageError(f"model '{ref}' is already compressed by subspace (a factored checkpoint); compress the "
                         "dense model it came from (its recipe.yaml names it) at the ratio you want overall")


def compress_layer(module: nn.Module, stats: GramStats | None, rank: int | None, state: CompressState, name: str) -> nn.Module:
    """Factor one Linear/Conv1D at `rank` (None: keep dense) and record its report row."""
    weight = weight_matrix(module).detach()  # [out, in]
    out_f, in_f = weight.shape
    spec = MatrixSpec(name, in_f, out_f)
    gram = stats.covariance if stats is not None else None
    bias = getattr(module, "bias", None)
    if rank is None:
        state.matrices.append(MatrixReport(
            name=name, shape=(out_f, in_f), rank=None, params_before=spec.dense_params,
            params_after=spec.dense_params, whitened_rel_error=0.0, energy_kept=1.0))
        return module
    spectral = decompose(weight, state.method.build(weight, stats, state.method_config))
    up, down = factors(spectral, rank)  # [out, r], [r, in] float64
    state.matrices.append(MatrixReport(
        name=name, shape=(out_f, in_f), rank=rank, params_before=spec.dense_params,
        params_after=factored_params(spec, rank),
        whitened_rel_error=weighted_relative_error(weight, up @ down, gram),
        energy_kept=energy_kept(spectral, rank)))
    dtype = weight.dtype
    return LowRankLinear.from_factors(
        up.to(dtype), down.to(dtype), None if bias is None else bias.detach().clone()
    ).to(weight.device)


def plan_ranks(model: nn.Module, config: CompressConfig, state: CompressState, input_ids: torch.Tensor | None) -> dict[str, int | None]:
    """Ranks for every targeted matrix; `global` reads spectra from the dense model's statistics."""
    blocks = find_blocks(model)
    layers: dict[str, nn.Module] = {}
    for i, block in enumerate(blocks.modules):
        layers.update(block_linears(block, blocks.block_path(i), config.targets, config.exclude))
    if not layers:
        raise UsageError(f"no layers matched --targets '{config.targets}' / --exclude '{config.exclude}' in {blocks.path}")
    if config.allocation == "uniform":
        specs = [MatrixSpec(n, *reversed(tuple(weight_matrix(m).shape))) for n, m in layers.items()]
        return allocate(specs, config.ratio, "uniform")
    grams: dict[str, GramStats] = {}
    if input_ids is not None:
        # The first PLAN_SAMPLES of the whole set, split over the processes and summed back.
        grams = collect_dense_grams(model, state.processes.share(input_ids[:PLAN_SAMPLES]), targets=config.targets,
                                    exclude=config.exclude, device=config.device, batch_size=config.batch_size)
        state.processes.sum_stats_(grams)
    specs = []
    for name, module in layers.items():
        weight = weight_matrix(module).detach()
        spectral = decompose(weight, state.method.build(weight, grams.get(name), state.method_config))
        out_f, in_f = weight.shape
        uniform = (1.0 - config.ratio) * in_f * out_f / (in_f + out_f)
        group = re.sub(r"\.\d+\.", ".*.", name) if config.budget_scope == "type" else ""
        specs.append(MatrixSpec(name, in_f, out_f, energy=spectral.energy, group=group,
                                min_rank=max(1, int(config.min_rank_fraction * uniform))))
    return allocate(specs, config.ratio, "global", config.normalise)


@torch.no_grad()
def compress_model(model: nn.Module, config: CompressConfig, state: CompressState, ranks: dict[str, int | None],
                   input_ids: torch.Tensor | None) -> None:
    """Replace targeted layers block by block, streaming calibration activations."""
    if state.method.fit is not None:
        return compress_dictionary_model(model, config, state, ranks, input_ids)
    blocks = find_blocks(model)
    stream = (BlockStream(model, state.processes.share(input_ids), batch_size=config.batch_size, device=config.device)
              if input_ids is not None else None)
    with progress_bar("compressing blocks", total=len(blocks)) as advance:
        for i, block in enumerate(blocks.modules):
            layers = block_linears(block, blocks.block_path(i), config.targets, config.exclude)
            stats: dict[str, GramStats] = {}
            outputs = None
            if stream is not None:
                with record_inputs(layers) as stats:
                    outputs = stream.run_block(i)
                state.processes.sum_stats_(stats)  # this share's sums -> all samples' sums
            for name, module in layers.items():
                new = compress_layer(module, stats.get(name), ranks[name], state, name)
                if new is not module:
                    set_submodule(model, name, new)
            if stream is not None:
                # Sequential: the next block sees this block's compressed output.
                stream.advance(stream.run_block(i) if config.sequential else outputs)
            advance()


@torch.no_grad()
def compress_dictionary_model(model: nn.Module, config: CompressConfig, state: CompressState,
                              ranks: dict[str, int | None], input_ids: torch.Tensor) -> None:
    """Sparse-dictionary methods: blocks are taken `group_size` at a time (1: per layer).

    Statistics of a group's blocks are recorded with the group still dense (each block fed the
    dense output of the one before); with `sequential`, the group is then re-run compressed so
    the next group sees compressed activations.
    """
    blocks = find_blocks(model)
    group_size = state.method_config.group_size
    stream = BlockStream(model, state.processes.share(input_ids), batch_size=config.batch_size, device=config.device)
    # K-SVD's per-atom steps are mat-vecs that one core already saturates: fit groups in parallel.
    workers = max(1, torch.get_num_threads())
    with progress_bar("compressing blocks", total=len(blocks)) as advance, ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(blocks), group_size):
            indices = range(start, min(start + group_size, len(blocks)))
            entry = stream.hidden
            groups: dict[str, list[Member]] = {}
            order: list[str] = []
            for i in indices:
                layers = block_linears(blocks.modules[i], blocks.block_path(i), config.targets, config.exclude)
                with record_inputs(layers) as stats:
                    stream.advance(stream.run_block(i))
                state.processes.sum_stats_(stats)
                for name, module in layers.items():
                    out_f, in_f = weight_matrix(module).shape
                    budget = dictionary_budget(MatrixSpec(name, in_f, out_f), ranks[name], config.ratio, config.allocation)
                    groups.setdefault(projection_type(name), []).append(Member(name, module, stats[name], budget))
                    order.append(name)
            results = list(pool.map(lambda members: compress_group(members, state, config.seed), groups.values()))
            rows = {}
            for result in results:
                for name, new in result.modules.items():
                    set_submodule(model, name, new)
                rows.update({row.name: row for row in result.rows})
                state.notes.extend(result.notes)
                for stage, seconds in result.seconds.items():
                    state.fit_seconds[stage] = state.fit_seconds.get(stage, 0.0) + seconds
            state.matrices.extend(rows[name] for name in order)  # block order, as for low-rank methods
            if config.sequential:
                stream.hidden = entry
                for i in indices:
                    stream.advance(stream.run_block(i))
            for _ in indices:
                advance()


def _perplexities(model, sets: list[EvalSet], config: CompressConfig, processes: Processes) -> dict[str, dict]:
    """Each process scores its share of the windows; NLL sums and token counts are summed."""
    return {s.name: shared_perplexity(processes, model, s.windows, batch_size=config.batch_size, device=config.device)
            for s in sets}


def run_compress(config: CompressConfig) -> Report:
    return compress_and_write(config)[0]


def compress_and_write(config: CompressConfig) -> tuple[Report, nn.Module]:
    """The whole verb; also returns the in-memory compressed model (what was written).

    Under a launcher every process runs this with the same config; only the main one writes.
    """
    method, method_config = validate(config)
    processes = current_processes(config.device)
    # `--device cuda` under a launcher is each process's own GPU; report and recipe keep what was asked.
    work = config.model_copy(update={"device": processes.device(config.device)})
    if not processes.is_main:
        set_quiet(True)  # one set of progress bars, the main process's
    torch.manual_seed(config.seed)
    timer = StageTimer()
    if config.devices and processes.distributed:
        raise UsageError("--devices spreads one model over several devices in one process; under a launcher "
                         "pass --device cuda instead (each process takes its own GPU)")
    placement = None
    with timer.stage("load"):
        loaded = load_model_and_tokenizer(work.model, device="cpu" if work.devices else work.device, dtype=work.dtype,
                                          allow_pickle=work.allow_pickle)
        if work.devices:
            placement = place_blocks(loaded.model, work.devices, unit=getattr(method_config, "group_size", 1))
            work = work.model_copy(update={"device": placement.input_device})  # where inputs go in
    model, tokenizer = loaded.model, loaded.tokenizer
    refuse_factored(model, work.model)
    state = CompressState(config=work, method=method, method_config=method_config, processes=processes)
    notes = state.notes
    if placement is not None:
        notes.append(placement.note())
    params_before = param_count(model)

    input_ids = None
    with timer.stage("data"):
        if work.calib:
            # Every process draws the same [calib_samples, calib_seqlen] set; `self` text is sampled
            # on each, so the main process's copy is the one all of them split.
            input_ids = processes.broadcast(calibration_ids(work, model, tokenizer))
        eval_sets = [] if work.skip_eval else evaluation_sets(work, model, tokenizer, notes)
    if processes.distributed and input_ids is not None:
        shares = [int(part.shape[0]) for part in torch.tensor_split(input_ids, processes.world)]
        notes.append(f"calibration split over {processes.world} processes ({'+'.join(map(str, shares))} samples); "
                     "statistics summed over all of them")

    with timer.stage("eval_before"):
        before = _perplexities(model, eval_sets, work, processes)

    with timer.stage("plan"):
        ranks = plan_ranks(model, work, state, input_ids)
    with timer.stage("compress"):
        compress_model(model, work, state, ranks, input_ids)

    with timer.stage("eval_after"):
        after = _perplexities(model, eval_sets, work, processes)

    if not processes.is_main:
        processes.barrier()  # released once the main process has written (or failed to)
        return _build_report(config, state, model, params_before, before, after, timer, notes), model
    try:
        with atomic_output_dir(Path(config.out), config.overwrite, input_refs(config)) as tmp:
            with timer.stage("write"):
                if config.format == "dense":
                    densify_(model)
                write_checkpoint(model, tmp, source_dir=loaded.path, max_shard_size=shard_size_bytes(config.shard_size))
            report = _build_report(config, state, model, params_before, before, after, timer, notes)
            write_outputs(tmp, report, stored_recipe("compress", config))
    finally:
        processes.barrier()  # in `finally`: a failed write must not leave the others waiting forever
    return report, model


def _build_report(config, state, model, params_before, before, after, timer, notes) -> Report:
    targeted_before = sum(m.params_before for m in state.matrices)
    targeted_after = sum(m.params_after for m in state.matrices)
    # Counted from the stored sizes: a DictionaryLinear's positions are buffers, not parameters.
    params_after = params_before - targeted_before + targeted_after
    perplexity = {
        name: PerplexityReport(before=before[name]["ppl"], after=after[name]["ppl"],
                               ratio=after[name]["ppl"] / before[name]["ppl"], n_tokens=after[name]["n_tokens"])
        for name in before
    }
    return Report(
        tool_version=__version__, verb="compress", model=config.model, method=config.method,
        options=config.model_dump(mode="json"), matrices=state.matrices,
        params=ParamTotals(
            targeted_before=targeted_before, targeted_after=targeted_after,
            targeted_ratio_removed=1 - targeted_after / max(targeted_before, 1),
            model_before=params_before, model_after=params_after,
            model_ratio_removed=1 - params_after / max(params_before, 1)),
        perplexity=perplexity,
        timings_s={**timer.seconds, **{f"compress.{stage}": s for stage, s in state.fit_seconds.items()}}, peak_rss_mb=peak_rss_mb(),
        peak_device_mb=peak_device_mb(), output={"path": str(config.out), "format": config.format}, notes=notes,
    )
