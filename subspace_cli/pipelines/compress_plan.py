"""What compress factors, and at which rank: the targeted matrices of every block (Linears, each
expert's slices of the 3-D expert parameters) and, when `--targets` names them, the input
embedding and the LM head; then one rank per matrix (linalg/rank_allocation.py), every kind of
matrix counted alike.

Global allocation needs each matrix's spectrum before anything is compressed, so it reads them
from the dense model's statistics on the first PLAN_SAMPLES calibration samples.

Ranks are multiples of --rank-multiple (GEMM tiles). A matrix whose factored pair measures no
faster than the dense matrix at one token (layer_speed.py) is then held dense, while such matrices
together save a negligible share of the targeted parameters; the other ranks stay as planned.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from subspace_cli.errors import UsageError
from subspace_cli.linalg.gram import GramStats
from subspace_cli.linalg.rank_allocation import MatrixSpec, allocate
from subspace_cli.methods.compress.base import is_dictionary
from subspace_cli.pipelines.calibration import BlockStream, record_head_inputs, record_inputs
from subspace_cli.pipelines.compress_experts import reproduces_forward
from subspace_cli.pipelines.compress_vocab import VocabTargets
from subspace_cli.pipelines.expert_grams import finish_expert_stats, first_pass
from subspace_cli.pipelines.factoring import spectrum
from subspace_cli.pipelines.layer_speed import Speed, Timer, measure_candidates
from subspace_cli.walk import (
    ExpertMatrix,
    ExpertSet,
    block_experts,
    block_linears,
    find_blocks,
    find_experts,
    router_paths,
    weight_matrix,
)

# Rank planning needs only the shape of each whitened spectrum, which 16 × calib_seqlen tokens
# already resolve; it skips 3/4 of the planning pass's Gram cost at the default 64 samples.
PLAN_SAMPLES = 16


def expert_grams_mode(state) -> str:
    """`-O expert_grams=routed|pooled` of the Gram-based methods (routed when the method has none)."""
    return getattr(state.method_config, "expert_grams", "routed")


def compress_linears(block: nn.Module, prefix: str, config) -> dict[str, nn.Module]:
    """The block's targeted Linear-like layers, less any Linear router (never compressed)."""
    routers = router_paths(block, prefix)
    return {n: m for n, m in block_linears(block, prefix, config.targets, config.exclude).items() if n not in routers}


def expert_targets(block: nn.Module, prefix: str, config) -> dict[str, tuple[ExpertSet, dict[str, ExpertMatrix]]]:
    """{experts path: (the set, its targeted matrices by name)} for the sets compress can factor."""
    by_set: dict[str, tuple[ExpertSet, dict[str, ExpertMatrix]]] = {}
    for name, matrix in block_experts(block, prefix, config.targets, config.exclude).items():
        by_set.setdefault(matrix.experts.path, (matrix.experts, {}))[1][name] = matrix
    return {path: entry for path, entry in by_set.items() if reproduces_forward(entry[0])}


def expert_notes(model: nn.Module, dictionary_method: bool, pooled: bool = False) -> list[str]:
    """Why any experts module is left as it is, and how experts are fitted (once per run, not per block)."""
    blocks = find_blocks(model)
    sets = [s for i, block in enumerate(blocks.modules) for s in find_experts(block, blocks.block_path(i))]
    if not sets:
        return []
    if dictionary_method:
        return [f"{len(sets)} experts modules ({sets[0].path}, ...) copied unchanged: sparse-dictionary methods "
                "factor Linear layers only; the low-rank methods factor experts"]
    notes = []
    if pooled:
        notes.append("-O expert_grams=pooled: every expert fitted with the Grams of all its layer's tokens, not of "
                     "the tokens routed to it")
    unsupported = [s for s in sets if s.unsupported]
    if unsupported:
        notes.append(f"{len(unsupported)} experts modules copied unchanged: {unsupported[0].unsupported}")
    unchecked = [s for s in sets if not s.unsupported and not reproduces_forward(s)]
    if unchecked:
        notes.append(f"{len(unchecked)} experts modules ({type(unchecked[0].module).__name__}) copied unchanged: their "
                     "forward is not the expert loop subspace's factored experts reproduce")
    return notes


def _targeted(model: nn.Module, config, vocab: VocabTargets) -> dict[str, torch.Tensor]:
    """Every matrix to plan, {name: weight [out, in]}, in the order compress reports them."""
    blocks = find_blocks(model)
    found: dict[str, torch.Tensor] = {}
    if vocab.embedding:
        found[vocab.embedding] = model.get_submodule(vocab.embedding).weight
    for i, block in enumerate(blocks.modules):
        prefix = blocks.block_path(i)
        found.update({n: weight_matrix(m) for n, m in compress_linears(block, prefix, config).items()})
        for _, matrices in expert_targets(block, prefix, config).values():
            found.update({n: m.weight() for n, m in matrices.items()})
    if vocab.head:
        found[vocab.head] = model.get_submodule(vocab.head).weight
    if not found:
        raise UsageError(f"no layers matched --targets '{config.targets}' / --exclude '{config.exclude}' "
                         f"in {blocks.path}")
    return found


@torch.no_grad()
def collect_plan_grams(model: nn.Module, input_ids: torch.Tensor, config, state,
                       vocab: VocabTargets) -> dict[str, GramStats]:
    """Statistics of every planned matrix from the dense model (one-shot), summed over the processes."""
    processes, pooled = state.processes, expert_grams_mode(state) == "pooled"
    share = processes.share(input_ids)
    stream = BlockStream(model, share, batch_size=config.batch_size, device=config.device)
    grams: dict[str, GramStats] = {}
    for i, block in enumerate(stream.blocks.modules):
        prefix = stream.blocks.block_path(i)
        sets = [s for s, _ in expert_targets(block, prefix, config).values()]
        with record_inputs(compress_linears(block, prefix, config)) as stats, first_pass(sets, pooled) as records:
            outputs = stream.run_block(i)
        processes.sum_stats_(stats)
        grams.update(stats)
        if records:
            grams.update(finish_expert_stats(records, pooled_mode=pooled, rerun=lambda: stream.run_block(i),
                                             processes=processes).stats)
        stream.advance(outputs)
    if vocab.head:
        head = record_head_inputs(stream, share, config.batch_size, model.get_submodule(vocab.head))
        processes.sum_stats_({vocab.head: head})
        grams[vocab.head] = head
    return grams


def _budget_group(name: str) -> str:
    """`model.layers.7.mlp.up_proj` -> `model.layers.*.mlp.up_proj`; an expert's index too
    (`...experts.down_proj.3` -> `...experts.down_proj.*`), so `--budget-scope type` pools experts."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def resolve_rank_multiple(config, dictionary: bool) -> int:
    """--rank-multiple; auto: 64 on CUDA (tensor-core tiles), 8 on CPU (benchmarks/rank_multiple.py),
    1 for sparse dictionaries (no rank is stored). --format dense plans as factored does: its checkpoint
    is the factored model multiplied out."""
    if config.rank_multiple is not None:
        return config.rank_multiple
    if dictionary:
        return 1
    cuda = str(config.device).startswith("cuda") or str(config.devices or "").startswith(("cuda", "auto"))
    return 64 if cuda else 8


def plan_ranks(model: nn.Module, config, state, input_ids: torch.Tensor | None,
               vocab: VocabTargets | None = None) -> dict[str, int | None]:
    """Ranks for every targeted matrix; `global` reads spectra from the dense model's statistics."""
    vocab = vocab or VocabTargets()
    matrices = _targeted(model, config, vocab)
    dictionary = is_dictionary(state.method)
    multiple = resolve_rank_multiple(config, dictionary)
    if config.allocation == "uniform":
        specs = [MatrixSpec(n, w.shape[1], w.shape[0]) for n, w in matrices.items()]
    else:
        specs = _spectral_specs(model, matrices, config, state, input_ids, vocab)
    ranks = allocate(specs, config.ratio, config.allocation, config.normalise, multiple)
    if multiple > 1:
        how = f"auto on {config.device}" if config.rank_multiple is None else str(multiple)
        state.notes.append(f"ranks are multiples of {multiple} (--rank-multiple {how}), counted in the budget")
    if dictionary or not config.dense_if_slower_below:
        return ranks
    return keep_slow_dense(specs, ranks, config, state, vocab)


def _spectral_specs(model: nn.Module, matrices: dict[str, torch.Tensor], config, state,
                    input_ids: torch.Tensor | None, vocab: VocabTargets) -> list[MatrixSpec]:
    """Specs with each matrix's (whitened) spectrum, its floor rank and its budget group."""
    grams: dict[str, GramStats] = {}
    if input_ids is not None:
        grams = collect_plan_grams(model, input_ids[:PLAN_SAMPLES], config, state, vocab)
    if vocab.head and vocab.head in grams and grams[vocab.head].n_tokens == 0:
        del grams[vocab.head]  # the head is not called as a module: plain SVD (factor_head says so)
    specs = []
    for name, weight in matrices.items():
        weight = weight.detach()
        vocabulary = name in (vocab.embedding, vocab.head)
        spectral = spectrum(weight, grams.get(name), state, tall=vocabulary,
                            plain=name == vocab.embedding or (name == vocab.head and name not in grams))
        out_f, in_f = weight.shape
        uniform = (1.0 - config.ratio) * in_f * out_f / (in_f + out_f)
        group = _budget_group(name) if config.budget_scope == "type" else ""
        specs.append(MatrixSpec(name, in_f, out_f, energy=spectral.energy, group=group,
                                min_rank=max(1, int(config.min_rank_fraction * uniform))))
    return specs


def keep_slow_dense(specs: list[MatrixSpec], ranks: dict[str, int | None], config, state, vocab: VocabTargets,
                    timer: Timer | None = None) -> dict[str, int | None]:
    """Keep dense the matrices whose factored pair measured no faster at 1 token, smallest saving
    first, while the savings given up stay below --dense-if-slower-below of the targeted parameters
    together. The other ranks stay as planned, and the parameters removed fall short of --ratio by at
    most that fraction (re-planning the others to pay moved SmolLM2-135M perplexity by -2.3% / +5.2%
    at 20% / 40%; leaving them as planned, by -0.4% / +1.6%).
    Their timings go to `state.kept_dense`."""
    targeted = sum(s.dense_params for s in specs)
    cap = config.dense_if_slower_below * targeted
    timed = [s for s in specs if s.name != vocab.embedding]  # the embedding is a lookup, not a mat-vec
    speeds = measure_candidates(timed, ranks, cap, config.device, getattr(torch, config.dtype), timer)
    speeds = _main_process_figures(speeds, state.processes)
    spec_of = {s.name: s for s in specs}
    saving = {name: spec_of[name].dense_params - ranks[name] * spec_of[name].rank_cost for name in speeds}
    slow: list[str] = []
    given_up = 0
    for name in sorted((n for n, speed in speeds.items() if speed.slower), key=lambda n: (saving[n], n)):
        if given_up + saving[name] >= cap:
            break
        given_up += saving[name]
        slow.append(name)
    if not slow:
        return ranks
    state.kept_dense = {name: speeds[name] for name in speeds if name in slow}
    state.notes.append(slow_dense_note(state.kept_dense, config.dense_if_slower_below, given_up, targeted))
    return {name: None if name in slow else rank for name, rank in ranks.items()}


def slow_dense_note(kept: dict[str, Speed], fraction: float, given_up: int, targeted: int, shown: int = 3) -> str:
    listed = ", ".join(f"{name}: {s.dense_us:.0f} µs dense vs {s.factored_us:.0f} µs factored"
                       for name, s in list(kept.items())[:shown])
    more = ", ..." if len(kept) > shown else ""
    return (f"{len(kept)} {'matrix' if len(kept) == 1 else 'matrices'} kept dense: factored measured slower at "
            f"1 token, for < {fraction * 100:g}% of the targeted parameters together ({listed}{more}); "
            f"{given_up:,} parameters ({given_up / max(targeted, 1) * 100:.3f}% of the targeted) not removed for them")


def _main_process_figures(speeds: dict[str, Speed], processes) -> dict[str, Speed]:
    """Timings differ between processes; all of them must plan the same ranks, so the main one's count."""
    if not processes.distributed or not speeds:
        return speeds
    figures = processes.broadcast(torch.tensor([[s.dense_us, s.factored_us] for s in speeds.values()],
                                               dtype=torch.float64))  # [n, 2]
    return {name: Speed(float(row[0]), float(row[1])) for name, row in zip(speeds, figures)}
