"""The compress verb: load -> calibrate -> plan ranks -> factor block by block -> write -> report.

Sequential calibration (default): block i's input statistics are taken from activations that
went through blocks 0..i-1 *after* they were compressed, so every block is fitted to what it
will receive at inference. One-shot (`sequential=False`) takes all statistics from the dense
model. Global rank allocation needs every matrix's spectrum before any block is compressed, so
it first plans ranks from the dense model's (one-shot) statistics, then applies them.

What is factored (compress_plan.py): the Linears of the repeated blocks (routers excepted), each
expert's slices of a mixture-of-experts block's 3-D parameters (compress_experts.py, with the
per-expert Grams of expert_grams.py), and, when `--targets` names them, the input embedding and
the LM head (compress_vocab.py).

Several processes (`accelerate launch` / `torchrun`, see pipelines/distributed.py): each
propagates its share of the calibration samples, and every statistic is summed over the
processes before it is used, so all of them fit the same factors; the main process writes.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from subspace_cli.errors import UsageError
from subspace_cli.evaluate.perplexity import is_causal_lm, perplexity
from subspace_cli.evaluate.samples import add_samples
from subspace_cli.io.output_dir import check_output_dir
from subspace_cli.io.sharded_writer import shard_size_bytes
from subspace_cli.linalg.gram import GramStats
from subspace_cli.linalg.rank_allocation import MatrixSpec
from subspace_cli.methods.catalog import get_method, methods_for
from subspace_cli.methods.compress.base import LowRankMethod, is_dictionary
from subspace_cli.methods.registry import MethodConfig, Needs
from subspace_cli.modules.checkpoint import param_count, write_checkpoint
from subspace_cli.modules.loading import load_model_and_tokenizer
from subspace_cli.modules.lowrank import LowRankLinear, densify_, fuse_shared_inputs
from subspace_cli.pipelines.calibration import BlockStream, record_head_inputs, record_inputs
from subspace_cli.pipelines.compress_config import CompressConfig
from subspace_cli.pipelines.compress_experts import compress_experts
from subspace_cli.pipelines.compress_plan import (
    PLAN_SAMPLES,
    compress_linears,
    expert_grams_mode,
    expert_notes,
    expert_targets,
    plan_ranks,
)
from subspace_cli.pipelines.compress_vocab import (
    VocabTargets,
    factor_embedding,
    factor_head,
    tied_note,
    vocabulary_targets,
)
from subspace_cli.pipelines.config_paths import input_refs
from subspace_cli.pipelines.datasets import EvalSet, calibration_ids, evaluation_sets
from subspace_cli.pipelines.dictionary_layers import Member, compress_group, dictionary_budget, projection_type
from subspace_cli.pipelines.distributed import Processes, current_processes
from subspace_cli.pipelines.expert_grams import ExpertStats, finish_expert_stats, first_pass
from subspace_cli.pipelines.factoring import factor_matrix
from subspace_cli.pipelines.healing import TeacherTargets, heal_model, heal_rows, healing_report, teacher_targets
from subspace_cli.pipelines.layer_speed import Speed
from subspace_cli.pipelines.lifecycle import measured, report_fields, write_output
from subspace_cli.pipelines.placement import place_blocks
from subspace_cli.pipelines.progress import progress_bar, set_quiet
from subspace_cli.pipelines.task_checks import TaskTable, check_task_names
from subspace_cli.report.resources import StageTimer
from subspace_cli.report.schema import HealingReport, MatrixReport, ParamTotals, PerplexityReport, Report
from subspace_cli.walk import compile_pattern, find_blocks, set_submodule, weight_matrix

log = logging.getLogger(__name__)
__all__ = ["PLAN_SAMPLES", "compress_and_write", "compress_model", "plan_ranks", "run_compress"]


@dataclass
class CompressState:
    """Runtime state of one compress run (the config stays frozen)."""

    config: CompressConfig
    method: LowRankMethod
    method_config: MethodConfig
    matrices: list[MatrixReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fit_seconds: dict[str, float] = field(default_factory=dict)  # dictionary methods: coding / update
    processes: Processes = field(default_factory=Processes)  # one, unless launched with several
    kept_dense: dict[str, Speed] = field(default_factory=dict)  # held dense by the plan: factored measured slower


def validate(config: CompressConfig) -> tuple[LowRankMethod, MethodConfig]:
    """Everything checkable before loading weights, so bad input fails fast with exit 2."""
    method = get_method("compress", config.method)
    options = dict(config.options)
    if config.structure is not None:
        if "structure" not in method.config_class.model_fields:
            takes = ", ".join(n for n, m in methods_for("compress").items() if "structure" in m.config_class.model_fields)
            raise UsageError(f"--structure applies to sparse-dictionary methods ({takes}), not '{method.name}'")
        options["structure"] = config.structure
    if is_dictionary(method) and (config.rank_multiple or 1) > 1:
        raise UsageError(f"--rank-multiple {config.rank_multiple} applies to low-rank methods, not the sparse "
                         f"dictionaries of '{method.name}'; leave it out (or pass 1)")
    method_config = method.make_config(options)
    compile_pattern(config.targets, "--targets")
    compile_pattern(config.exclude, "--exclude")
    check_output_dir(Path(config.out), config.overwrite, input_refs(config))
    shard_size_bytes(config.shard_size)
    check_task_names(config.tasks)
    if Needs.CALIBRATION in method.needs and not config.calib:
        raise UsageError(f"method '{method.name}' needs calibration data; pass --calib (e.g. builtin:shakespeare)")
    return method, method_config


def refuse_factored(model: nn.Module, ref: str) -> None:
    """A checkpoint written by compress holds LowRankLinear / DictionaryLinear layers, not Linears to factor."""
    if getattr(model.config, "subspace", None):
        raise UsageError(f"model '{ref}' is already compressed by subspace (a factored checkpoint); compress the "
                         "dense model it came from (its recipe.yaml names it) at the ratio you want overall")


def compress_layer(module: nn.Module, stats: GramStats | None, rank: int | None, state: CompressState, name: str) -> nn.Module:
    """Factor one Linear/Conv1D at `rank` (None: keep dense) and record its report row."""
    pair = factor_matrix(weight_matrix(module), stats, rank, state, name)  # [out, r], [r, in]
    if pair is None:
        return module
    bias = getattr(module, "bias", None)
    return LowRankLinear.from_factors(*pair, None if bias is None else bias.detach().clone()).to(pair[0].device)


@torch.no_grad()
def compress_model(model: nn.Module, config: CompressConfig, state: CompressState, ranks: dict[str, int | None],
                   input_ids: torch.Tensor | None, vocab: VocabTargets | None = None) -> None:
    """Replace targeted layers block by block, streaming calibration activations.

    The input embedding (when targeted) goes first, so with sequential calibration block 0 sees
    its compressed output; each block's Linears and experts next; an untied LM head last, fitted
    to the final hidden states.
    """
    if is_dictionary(state.method):
        return compress_dictionary_model(model, config, state, ranks, input_ids)
    vocab = vocab or VocabTargets()
    pooled = expert_grams_mode(state) == "pooled"
    blocks = find_blocks(model)
    share = state.processes.share(input_ids) if input_ids is not None else None
    if vocab.embedding and config.sequential:
        factor_embedding(model, vocab, ranks[vocab.embedding], state)
    stream = (BlockStream(model, share, batch_size=config.batch_size, device=config.device)
              if share is not None else None)
    if vocab.embedding and not config.sequential:
        factor_embedding(model, vocab, ranks[vocab.embedding], state)  # after the dense capture
    with progress_bar("compressing blocks", total=len(blocks)) as advance:
        for i, block in enumerate(blocks.modules):
            prefix = blocks.block_path(i)
            layers = compress_linears(block, prefix, config)
            experts = expert_targets(block, prefix, config)
            stats: dict[str, GramStats] = {}
            groups: list[list[str]] = []  # layers fed one input tensor, seen in calibration
            expert_stats: ExpertStats | None = None
            outputs = None
            if stream is not None:
                with record_inputs(layers) as stats, first_pass([s for s, _ in experts.values()], pooled) as records:
                    outputs = stream.run_block(i)
                groups = state.processes.input_groups(stats)  # q/k/v, gate/up: before the sums may unshare
                state.processes.sum_stats_(stats)  # this share's sums -> all samples' sums
                if records:
                    expert_stats = finish_expert_stats(records, pooled_mode=pooled, rerun=lambda: stream.run_block(i),
                                                       processes=state.processes)
                    state.notes.extend(expert_stats.notes)
            for name, module in layers.items():
                new = compress_layer(module, stats.get(name), ranks[name], state, name)
                if new is not module:
                    set_submodule(model, name, new)
            if config.fuse_projections and config.format == "factored":
                for group in groups:
                    fuse_shared_inputs(model, group)
            for path, (expert_set, targeted) in experts.items():
                new = compress_experts(expert_set, targeted, expert_stats, ranks, state)
                if new is not None:
                    set_submodule(model, path, new)
            if stream is not None:
                # Sequential: the next block sees this block's compressed output.
                stream.advance(stream.run_block(i) if config.sequential else outputs)
            advance()
    if vocab.head:
        head_stats = None
        if stream is not None:
            head_stats = record_head_inputs(stream, share, config.batch_size, model.get_submodule(vocab.head))
            state.processes.sum_stats_({vocab.head: head_stats})
        factor_head(model, vocab, ranks[vocab.head], head_stats, state)


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
                layers = compress_linears(blocks.modules[i], blocks.block_path(i), config)
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
    return {s.name: perplexity(model, s.windows, batch_size=config.batch_size, device=config.device, processes=processes)
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
    if config.heal and (processes.distributed or config.devices):
        raise UsageError("--heal runs in one process on one device; compress without --heal, then run `subspace heal` "
                         "(which trains under `accelerate launch`)")
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
    vocab = vocabulary_targets(model, work, dictionary_method=is_dictionary(method))  # exit 2 before any work
    notes.extend(expert_notes(model, dictionary_method=is_dictionary(method),
                              pooled=expert_grams_mode(state) == "pooled"))
    if vocab.tied_head:
        notes.append(tied_note(vocab))

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

    samples: list[dict] = []
    causal = is_causal_lm(model)
    task_table = TaskTable.of_sources(work, [s.name for s in eval_sets])
    with timer.stage("eval_before"):
        before = _perplexities(model, eval_sets, work, processes)
        if causal:
            add_samples(samples, "dense", model, tokenizer, work.device)
            task_table.add("dense", model, tokenizer, work.device)
    healing = None
    if config.heal:
        with timer.stage("heal_targets"):
            healing = HealingInputs.before_compression(model, tokenizer, work)

    with timer.stage("plan"):
        ranks = plan_ranks(model, work, state, input_ids, vocab)
    with timer.stage("compress"):
        compress_model(model, work, state, ranks, input_ids, vocab)
    for row in state.matrices:
        if row.name in state.kept_dense:
            speed = state.kept_dense[row.name]
            row.kept_dense_us = (speed.dense_us, speed.factored_us)

    with timer.stage("eval_after"):
        after = _perplexities(model, eval_sets, work, processes)
        if causal:
            add_samples(samples, "compressed", model, tokenizer, work.device)
            task_table.add("compressed", model, tokenizer, work.device)
    if healing is not None:
        with timer.stage("heal"):
            outcome = healing.heal(model, work, eval_sets)
        with timer.stage("eval_healed"):
            healed = _perplexities(model, eval_sets, work, processes)
            add_samples(samples, "healed", model, tokenizer, work.device)
            task_table.add("healed", model, tokenizer, work.device)
        healing.report = healing_report(work, healing.teacher, healing.sources, healing.rows, outcome, before, after,
                                        healed)
        after = healed

    def write(tmp: Path) -> Report:
        with timer.stage("write"):
            if config.format == "dense":
                densify_(model)
            write_checkpoint(model, tmp, source_dir=loaded.path, max_shard_size=shard_size_bytes(config.shard_size))
        report = _build_report(config, state, params_before, before, after, timer, notes)
        report.samples, report.tasks = samples, task_table.table
        if healing is not None:
            from subspace_cli.report.plots import plot_curve

            report.healing = healing.report
            plot_curve(healing.report.curve, healing.report.evals, tmp / "healing_curve.png", f"healing {config.out}")
            report.output["plot"] = "healing_curve.png"
        if config.bench:
            with timer.stage("bench"):
                report.bench = bench_output(config, tmp)
            measured(report, timer)
        return report

    report = write_output("compress", config, write, processes)
    return report or _build_report(config, state, params_before, before, after, timer, notes), model


@dataclass
class HealingInputs:
    """compress --heal: what the dense model gives healing before it is compressed in place (its
    top-k targets on the healing rows), so the teacher is never held beside the student."""

    teacher: str
    sources: list[str]
    rows: torch.Tensor  # [N, heal_seqlen]
    targets: TeacherTargets | None
    report: HealingReport | None = None

    @classmethod
    def before_compression(cls, model: nn.Module, tokenizer, config: CompressConfig) -> HealingInputs:
        sources = config.heal_data or list(config.calib) or ["builtin:shakespeare"]
        rows = heal_rows(config, sources, model, tokenizer, config.heal, config.seed, config.device)
        targets = None if config.heal_loss == "lm" else teacher_targets(model, rows, config.heal_top_k,
                                                                        config.batch_size, config.device)
        return cls(config.model, sources, rows, targets)

    def heal(self, model: nn.Module, config: CompressConfig, eval_sets: list[EvalSet]):
        windows = eval_sets[0].windows[:8] if eval_sets else None
        return heal_model(model, self.rows, self.targets, config, config.heal, windows,
                          {"eval_every": max(1, config.heal // 4), "eval_rows": 8, "save_every": 0, "seed": config.seed})


def bench_output(config: CompressConfig, written: Path) -> dict:
    """`subspace bench` of the input model and the checkpoint just written (in the temporary directory;
    the report names it by --out)."""
    from subspace_cli.pipelines.bench import BenchConfig, run_bench

    result = run_bench(BenchConfig(models=[config.model, str(written)], device=config.device, dtype=config.dtype,
                                   allow_pickle=config.allow_pickle, seed=config.seed))
    result["models"][1]["model"] = str(config.out)
    return result


def _build_report(config, state, params_before, before, after, timer, notes) -> Report:
    targeted_before = sum(m.params_before for m in state.matrices)
    targeted_after = sum(m.params_after for m in state.matrices)
    # Counted from the stored sizes: a DictionaryLinear's positions are buffers, not parameters.
    params_after = params_before - targeted_before + targeted_after
    scores = {
        name: PerplexityReport(before=before[name]["ppl"], after=after[name]["ppl"],
                               ratio=after[name]["ppl"] / before[name]["ppl"], n_tokens=after[name]["n_tokens"])
        for name in before
    }
    report = Report(
        **report_fields("compress", config, state.method_config), matrices=state.matrices,
        params=ParamTotals(
            targeted_before=targeted_before, targeted_after=targeted_after,
            targeted_ratio_removed=1 - targeted_after / max(targeted_before, 1),
            model_before=params_before, model_after=params_after,
            model_ratio_removed=1 - params_after / max(params_before, 1)),
        perplexity=scores,
        timings_s={f"compress.{stage}": s for stage, s in state.fit_seconds.items()},
        output={"path": str(config.out), "format": config.format}, notes=notes,
    )
    return measured(report, timer)
