"""Ranks shaped for the hardware: every rank a multiple of --rank-multiple with the budget counted
on the rounded ranks, and matrices kept dense where the factored pair measures slower for a
negligible saving (timings injected: nothing here depends on the machine's speed)."""

import json
from types import SimpleNamespace

import pytest
import torch
from cli_runner import run_cli

from subspace_cli.linalg.rank_allocation import MatrixSpec, allocate, factored_params
from subspace_cli.pipelines import layer_speed
from subspace_cli.pipelines.compress_config import CompressConfig
from subspace_cli.pipelines.compress_plan import keep_slow_dense, resolve_rank_multiple
from subspace_cli.pipelines.compress_vocab import VocabTargets
from subspace_cli.pipelines.distributed import Processes
from subspace_cli.pipelines.layer_speed import LinearTimer, measure_candidates

TINY = ["--calib-samples", "8", "--calib-seqlen", "32", "--eval-seqlen", "64", "--eval-chars", "2000"]


def group_usage(specs: list[MatrixSpec], ranks: dict, ratio: float, allocation: str) -> dict[str, tuple[float, int]]:
    """{budget group: (budget (1 − ratio)·Σ dense, stored params)}; `uniform` has one group."""
    usage: dict[str, tuple[float, int]] = {}
    for s in specs:
        group = s.group if allocation == "global" else ""
        budget, params = usage.get(group, (0.0, 0))
        usage[group] = (budget + (1.0 - ratio) * s.dense_params, params + factored_params(s, ranks[s.name]))
    return usage


def _fixed_specs(min_rank=1, groups=False):
    """The specs the expected allocations below were computed on, before rank multiples existed."""
    g = torch.Generator().manual_seed(7)
    shapes = [(32, 32), (64, 32), (32, 64), (48, 48), (96, 40), (40, 96), (24, 80)]
    specs = []
    for i, (o, n) in enumerate(shapes):
        k = min(o, n)
        decay = 0.5 + 2.5 * torch.rand((), generator=g, dtype=torch.float64)
        noise = 1 + torch.rand(k, generator=g, dtype=torch.float64) * 0.1
        s = torch.arange(1, k + 1, dtype=torch.float64) ** -decay * noise
        specs.append(MatrixSpec(f"m{i}", n, o, energy=s.sort(descending=True).values.square(), min_rank=min_rank,
                                group=("a" if i % 2 else "b") if groups else ""))
    return specs


# Computed with the allocation code before --rank-multiple (commit of this change's parent).
PREVIOUS = [
    (dict(), 0.2, "uniform", "relative",
     {"m0": 12, "m1": 17, "m2": 17, "m3": 19, "m4": 22, "m5": 22, "m6": 14}),
    (dict(), 0.5, "uniform", "relative", {"m0": 8, "m1": 10, "m2": 10, "m3": 12, "m4": 14, "m5": 14, "m6": 9}),
    (dict(), 0.2, "global", "relative",
     {"m0": None, "m1": 14, "m2": None, "m3": None, "m4": None, "m5": 8, "m6": None}),
    (dict(), 0.5, "global", "relative", {"m0": None, "m1": 4, "m2": 16, "m3": None, "m4": 12, "m5": 3, "m6": 11}),
    (dict(), 0.4, "global", "absolute", {"m0": None, "m1": 4, "m2": None, "m3": None, "m4": 17, "m5": 3, "m6": 16}),
    (dict(min_rank=6, groups=True), 0.3, "global", "relative",
     {"m0": None, "m2": 19, "m4": 14, "m6": 13, "m1": 21, "m3": None, "m5": 10}),
    (dict(), 0.6, "global", "relative", {"m0": 12, "m1": 3, "m2": 11, "m3": None, "m4": 8, "m5": 2, "m6": 9}),
    (dict(min_rank=4), 0.6, "global", "relative", {"m0": 11, "m1": 4, "m2": 11, "m3": 23, "m4": 7, "m5": 4, "m6": 8}),
]


@pytest.mark.parametrize("spec_kw, ratio, allocation, normalise, expected", PREVIOUS)
def test_multiple_one_reproduces_the_previous_allocation(spec_kw, ratio, allocation, normalise, expected):
    assert allocate(_fixed_specs(**spec_kw), ratio, allocation, normalise, multiple=1) == expected
    assert allocate(_fixed_specs(**spec_kw), ratio, allocation, normalise) == expected  # 1 is the default


def _random_specs(seed: int, n: int = 12, groups: bool = False, floor: float = 0.0, ratio: float = 0.3):
    """Shapes 256..1024 wide (break-even ≥ 128, above every multiple tested), power-law spectra,
    floors as compress_plan sets them (a fraction of the uniform rank)."""
    g = torch.Generator().manual_seed(seed)
    specs = []
    for i in range(n):
        o, k = (int(v) for v in torch.randint(256, 1025, (2,), generator=g))
        decay = 0.2 + 2.0 * float(torch.rand((), generator=g))
        energy = (torch.arange(1, min(o, k) + 1, dtype=torch.float64) ** -decay
                  * (0.5 + torch.rand(min(o, k), generator=g, dtype=torch.float64))).sort(descending=True).values ** 2
        uniform = (1 - ratio) * o * k / (o + k)
        specs.append(MatrixSpec(f"m{i}", k, o, energy=energy, group=f"g{i % 3}" if groups else "",
                                min_rank=max(1, int(floor * uniform))))
    return specs


@pytest.mark.parametrize("multiple", [8, 16, 64])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_ranks_are_multiples_below_break_even(multiple, allocation):
    for seed in range(3):
        specs = _random_specs(seed, floor=0.5)
        ranks = allocate(specs, 0.3, allocation, multiple=multiple)
        assert any(r is not None for r in ranks.values())
        for s in specs:
            r = ranks[s.name]
            assert r is None or (r % multiple == 0 and multiple <= r < s.break_even), (s, r)


@pytest.mark.parametrize("multiple, ratio", [(8, 0.2), (8, 0.6), (16, 0.4), (64, 0.2), (64, 0.4)])
@pytest.mark.parametrize("allocation, groups", [("uniform", False), ("global", False), ("global", True)])
def test_rounded_ranks_stay_within_every_budget(multiple, ratio, allocation, groups):
    """(1 − ratio)·Σ dense ≥ Σ stored params per budget group, for 5 random sets of shapes and spectra.
    (Uniform rounds down; its at-least-one-multiple floor only binds past these ratios.)"""
    for seed in range(5):
        specs = _random_specs(seed, groups=groups, floor=0.5, ratio=ratio)
        ranks = allocate(specs, ratio, allocation, multiple=multiple)
        for group, (budget, params) in group_usage(specs, ranks, ratio, allocation).items():
            assert params <= budget, (seed, group, params, budget)
        if allocation == "global":  # and spends it: no more than one chunk of the widest matrix is left over
            chunk = multiple * max(s.rank_cost for s in specs)
            for budget, params in group_usage(specs, ranks, ratio, allocation).values():
                assert budget - params < chunk


def test_global_floor_rounds_up_and_takes_chunks():
    """A floor of 5 is paid as 8; the rest comes 8 singular values at a time."""
    specs = [MatrixSpec(f"m{i}", 64, 64, energy=torch.logspace(0, -3 - i, 64, dtype=torch.float64), min_rank=5)
             for i in range(4)]
    ranks = allocate(specs, 0.6, "global", multiple=8)
    assert all(r is not None and r >= 8 and r % 8 == 0 for r in ranks.values())


def test_break_even_at_or_below_the_multiple_stays_dense():
    small = MatrixSpec("small", 16, 12, energy=torch.ones(12, dtype=torch.float64))  # break-even 7
    big = MatrixSpec("big", 256, 256, energy=torch.logspace(0, -4, 256, dtype=torch.float64))
    for allocation in ("uniform", "global"):
        ranks = allocate([small, big], 0.3, allocation, multiple=8)
        assert ranks["small"] is None and ranks["big"] % 8 == 0


def test_rank_multiple_zero_in_the_api_is_refused():
    from subspace_cli.errors import UsageError

    with pytest.raises(UsageError, match="--rank-multiple 0"):
        allocate(_fixed_specs(), 0.3, "uniform", multiple=0)


@pytest.mark.parametrize("kw, expected", [
    (dict(), 8), (dict(device="cuda"), 64), (dict(device="cuda:1"), 64), (dict(devices="cuda:0,cuda:1"), 64),
    (dict(devices="auto"), 64), (dict(format="dense"), 8), (dict(rank_multiple=4, device="cuda"), 4),
])
def test_auto_rank_multiple(kw, expected):
    assert resolve_rank_multiple(CompressConfig(model="m", out="o", **kw), dictionary=False) == expected
    assert resolve_rank_multiple(CompressConfig(model="m", out="o"), dictionary=True) == 1


# ------------------------------------------------------------------------------------------ keep dense

def _timer(slow_shapes: set, calls: list):
    """Dense 10 µs; factored 12 µs (slower) for the (in, out) in `slow_shapes`, else 5 µs."""

    def timer(in_f, out_f, rank, device, dtype):
        calls.append((in_f, out_f, rank))
        if rank is None:
            return 10.0
        return 12.0 if (in_f, out_f) in slow_shapes else 5.0

    return timer


def _plan(specs, **kw):
    config = CompressConfig(model="m", out="o", ratio=0.3, **{"allocation": "global", **kw})
    state = SimpleNamespace(notes=[], processes=Processes(), kept_dense={})
    multiple = resolve_rank_multiple(config, dictionary=False)
    ranks = allocate(specs, config.ratio, config.allocation, config.normalise, multiple)
    return config, state, multiple, ranks


def _three_kinds():
    """Four small [64, 256] matrices (each 4% of the parameters) and two large [512, 512] ones."""
    specs = [MatrixSpec(f"small{i}", 256, 64, energy=torch.logspace(0, -3, 64, dtype=torch.float64))
             for i in range(4)]
    specs += [MatrixSpec(f"large{i}", 512, 512, energy=torch.logspace(0, -3, 512, dtype=torch.float64))
              for i in range(2)]
    return specs


def test_slower_and_negligible_is_kept_dense_and_the_others_keep_their_ranks():
    specs = _three_kinds()
    config, state, multiple, ranks = _plan(specs, dense_if_slower_below=0.05)
    calls = []
    held = keep_slow_dense(specs, ranks, config, state, VocabTargets(), timer=_timer({(256, 64)}, calls))
    assert all(held[f"small{i}"] is None for i in range(4))
    assert all(held[f"large{i}"] == ranks[f"large{i}"] for i in range(2))  # not re-planned: dense is exact
    # The parameters not removed are the savings given up, below the cap together.
    (_, params), = group_usage(specs, held, 0.3, "global").values()
    (_, planned), = group_usage(specs, ranks, 0.3, "global").values()
    given_up = sum(s.dense_params - ranks[s.name] * s.rank_cost for s in specs if s.name.startswith("small"))
    assert params - planned == given_up < 0.05 * sum(s.dense_params for s in specs)
    assert set(state.kept_dense) == {f"small{i}" for i in range(4)}
    assert state.kept_dense["small0"] == layer_speed.Speed(10.0, 12.0)
    note, = state.notes
    assert note.startswith("4 matrices kept dense: factored measured slower at 1 token, for < 5% of the targeted "
                           "parameters together (small0: 10 µs dense vs 12 µs factored, small1: ")
    share = given_up / sum(s.dense_params for s in specs) * 100
    assert note.endswith(f"...); {given_up:,} parameters ({share:.3f}% of the targeted) not removed for them")
    # Memoised: one dense and one factored timing per distinct (in, out, rank); large ones are not timed.
    assert len(calls) == len(set(calls)) and {(i, o) for i, o, _ in calls} == {(256, 64)}


def test_the_savings_given_up_are_capped_together():
    """Slow matrices are held dense smallest saving first, only while their savings sum below the cap:
    many small matrices must not take real rank from the others."""
    specs = _three_kinds()
    config, state, multiple, ranks = _plan(specs, dense_if_slower_below=0.05)
    saving = specs[0].dense_params - ranks["small0"] * specs[0].rank_cost
    targeted = sum(s.dense_params for s in specs)
    config = config.model_copy(update={"dense_if_slower_below": 2.5 * saving / targeted})  # room for two
    held = keep_slow_dense(specs, ranks, config, state, VocabTargets(), timer=_timer({(256, 64)}, []))
    assert sorted(n for n in held if held[n] is None) == ["small0", "small1"]
    assert set(state.kept_dense) == {"small0", "small1"} and state.notes[0].startswith("2 matrices kept dense")


def test_slower_but_a_large_saving_stays_factored():
    specs = _three_kinds()
    config, state, multiple, ranks = _plan(specs, dense_if_slower_below=0.001)  # each small one saves 0.17%
    calls = []
    held = keep_slow_dense(specs, ranks, config, state, VocabTargets(), timer=_timer({(256, 64)}, calls))
    assert held == ranks and not state.notes and not state.kept_dense and not calls  # nothing even timed


def test_faster_and_negligible_stays_factored():
    specs = _three_kinds()
    config, state, multiple, ranks = _plan(specs, dense_if_slower_below=0.05)
    calls = []
    held = keep_slow_dense(specs, ranks, config, state, VocabTargets(), timer=_timer(set(), calls))
    assert held == ranks and not state.notes and calls  # timed, and faster


def test_every_process_plans_with_the_main_process_figures():
    """Timings differ between processes; the main one's are broadcast, so all plan the same ranks."""
    main = torch.tensor([10.0, 12.0], dtype=torch.float64)  # slower, as the main process measured
    processes = SimpleNamespace(distributed=True, broadcast=lambda figures: main.expand_as(figures).clone())
    specs = _three_kinds()
    config, state, multiple, ranks = _plan(specs, dense_if_slower_below=0.05)
    state.processes = processes
    here = _timer(set(), [])  # this process measured the pair faster
    held = keep_slow_dense(specs, ranks, config, state, VocabTargets(), timer=here)
    assert all(held[f"small{i}"] is None for i in range(4)) and len(state.kept_dense) == 4


def test_the_embedding_is_never_timed():
    specs = [MatrixSpec("emb", 32, 4096, energy=torch.logspace(0, -3, 32, dtype=torch.float64)), *_three_kinds()]
    config, state, multiple, ranks = _plan(specs, dense_if_slower_below=0.5, allocation="uniform")
    assert ranks["emb"] is not None
    calls = []
    keep_slow_dense(specs, ranks, config, state, VocabTargets(embedding="emb"), timer=_timer(set(), calls))
    assert calls and not [c for c in calls if c[:2] == (32, 4096)]


def test_measure_candidates_and_the_real_timer_run():
    """The real timer on a tiny shape: positive figures, no assertion on which is faster."""
    specs = [MatrixSpec("a", 32, 32)]
    speeds = measure_candidates(specs, {"a": 8}, max_saving=1e9, device="cpu", dtype=torch.float32, timer=LinearTimer())
    assert speeds["a"].dense_us > 0 and speeds["a"].factored_us > 0


# ------------------------------------------------------------------------------------------ end to end

def test_cli_rounds_ranks_and_reports_matrices_kept_dense(tiny_llama, text_file, tmp_path, monkeypatch):
    """k_proj and v_proj ([16, 32]) 'measure' slower factored: they stay dense, the report says so,
    every other rank in the written checkpoint is a multiple of 8, and what is not removed for them
    stays below the cap."""
    calls = []
    monkeypatch.setattr(layer_speed, "LinearTimer", lambda: _timer({(32, 16)}, calls))
    out = tmp_path / "out"
    # uniform: k/v at rank 8 (global may keep them dense on its own, leaving nothing to test)
    res = run_cli("compress", tiny_llama, "--calib", text_file, "--out", out, "--ratio", "0.3", "--skip-eval",
                  "--allocation", "uniform", "--rank-multiple", "8", "--dense-if-slower-below", "0.5", *TINY)
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    rows = {m["name"]: m for m in report["matrices"]}
    slow = {n for n in rows if n.endswith(("k_proj", "v_proj"))}
    assert {n for n, m in rows.items() if m["kept_dense_us"]} == slow and len(slow) == 4
    assert all(rows[n]["rank"] is None and rows[n]["kept_dense_us"] == [10.0, 12.0] for n in slow)
    note = next(n for n in report["notes"] if "kept dense" in n)
    assert note.startswith("4 matrices kept dense: factored measured slower at 1 token, for < 50% of the targeted")
    assert "self_attn.k_proj: 10 µs dense vs 12 µs factored" in note
    assert "ranks are multiples of 8 (--rank-multiple 8), counted in the budget" in report["notes"]
    plain = tmp_path / "plain"  # the same plan without the check: only the slow matrices differ
    res = run_cli("compress", tiny_llama, "--calib", text_file, "--out", plain, "--ratio", "0.3", "--skip-eval",
                  "--allocation", "uniform", "--rank-multiple", "8", "--dense-if-slower-below", "0", *TINY)
    assert res.returncode == 0, res.stderr
    planned = {m["name"]: m for m in json.loads((plain / "report.json").read_text())["matrices"]}
    assert {n for n in rows if rows[n]["rank"] != planned[n]["rank"]} == slow
    given_up = sum(rows[n]["params_after"] - planned[n]["params_after"] for n in slow)
    targeted = report["params"]["targeted_before"]
    assert 0 < given_up < 0.5 * targeted  # below the cap together
    assert report["params"]["targeted_after"] - given_up == pytest.approx(
        json.loads((plain / "report.json").read_text())["params"]["targeted_after"], abs=0)
    modules = json.loads((out / "config.json").read_text())["subspace"]["modules"]
    ranks = [spec["rank"] for spec in modules.values() if "rank" in spec]
    assert ranks and all(r % 8 == 0 for r in ranks)
    assert not [path for path in modules if path in slow]
    assert [m["rank"] for m in report["matrices"] if m["rank"]] and all(
        m["rank"] % 8 == 0 for m in report["matrices"] if m["rank"])


def test_auto_multiple_on_cpu_is_8_and_noted(tiny_llama, text_file, tmp_path):
    res = run_cli("compress", tiny_llama, "--calib", text_file, "--out", tmp_path / "out", "--allocation", "uniform",
                  "--skip-eval", *TINY)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "ranks are multiples of 8 (--rank-multiple auto on cpu), counted in the budget" in report["notes"]
    assert all(m["rank"] is None or m["rank"] % 8 == 0 for m in report["matrices"])
    assert not any("kept dense" in n for n in report["notes"])  # --dense-if-slower-below is off by default


@pytest.mark.parametrize("args, fragment", [
    (["--rank-multiple", "0"], "--rank-multiple 0"),
    (["--rank-multiple", "8", "--method", "cospadi"], "--rank-multiple 8 applies to low-rank methods"),
    (["--dense-if-slower-below", "1.5"], "--dense-if-slower-below 1.5"),
])
def test_bad_values_exit_2_with_one_line(args, fragment, tiny_llama, text_file, tmp_path):
    out = tmp_path / "out"
    res = run_cli("compress", tiny_llama, "--calib", text_file, "--out", out, *args)
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], res.stderr
    assert "Traceback" not in res.stderr and not out.exists()


def test_recorded_timings_make_a_second_plan_identical(tmp_path, monkeypatch):
    """Figures are kept per machine in SUBSPACE_HOME: a second run reads them instead of re-timing,
    so the same command keeps the same matrices dense; an unreadable file only means re-timing."""
    monkeypatch.setenv("SUBSPACE_HOME", str(tmp_path))
    calls = []

    def base(in_f, out_f, rank, device, dtype):
        calls.append((in_f, out_f, rank))
        return 10.0 + len(calls)  # different every call: only a recorded figure repeats

    first = layer_speed.RecordedTimer(base)
    figure = first(32, 16, 8, "cpu", torch.float32)
    first.save()
    second = layer_speed.RecordedTimer(base)
    assert second(32, 16, 8, "cpu", torch.float32) == figure and len(calls) == 1
    (tmp_path / "layer_speed.json").write_text("{not json")
    assert layer_speed.RecordedTimer(base)(32, 16, 8, "cpu", torch.float32) == 12.0 and len(calls) == 2
