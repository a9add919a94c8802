"""`subspace compress` on several processes (gloo on CPU) writes the checkpoint one process writes.

Each process propagates its share of the calibration samples block by block and the float64
statistics are summed over the processes before every factorisation and the rank plan, so
the factors differ from one process's only by the order of float64 additions.
"""

import json
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from subspace_cli.linalg.gram import GramStats
from subspace_cli.pipelines.distributed import Processes, current_processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher(name: str) -> list[str]:
    # `accelerate launch --cpu --num_processes 2` would start ONE process (accelerate runs several CPU
    # processes only through mpirun); `--multi_gpu` goes through torchrun, and the pipeline asks
    # accelerate for gloo because --device is cpu.
    if name == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port()), "-m", "subspace_cli"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "subspace_cli"]


def _run(prefix: list[str], args: list) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("method, samples, launcher", [
    ("svd-llm", 7, "accelerate"),  # uneven shares: 4 + 3 samples
    ("asvd", 1, "torchrun"),  # the second process has no sample at all: it contributes zeros
])
@pytest.mark.slow
def test_two_processes_match_one(tiny_llama, text_file, tmp_path, method, samples, launcher):
    args = ["compress", tiny_llama, "--method", method, "--calib", text_file, "--calib-samples", samples,
            "--calib-seqlen", 32, "--eval-seqlen", 64, "--eval-chars", 2000, "--batch-size", 2, "--json", "--quiet"]
    one = _run([sys.executable, "-m", "subspace_cli"], [*args, "--out", tmp_path / "one"])
    assert one.returncode == 0, one.stderr
    two = _run(_launcher(launcher), [*args, "--out", tmp_path / "two"])
    assert two.returncode == 0, two.stderr
    assert len([line for line in two.stdout.splitlines() if line.startswith("{")]) == 1  # only the main process prints

    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("one", "two"))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name  # same rank plan
        # fp32 tolerance: weights are O(0.1-1); the float64 Grams differ in the last bits only.
        assert (a[name].double() - b[name].double()).abs().max() <= 1e-6, name  # measured: 0.0 (both cases)

    reports = [json.loads((tmp_path / run / "report.json").read_text()) for run in ("one", "two")]
    shares = "4+3" if samples == 7 else "1+0"
    assert any(f"2 processes ({shares} samples)" in note for note in reports[1]["notes"])  # two processes did run
    assert [m["rank"] for m in reports[0]["matrices"]] == [m["rank"] for m in reports[1]["matrices"]]
    for x, y in zip(reports[0]["matrices"], reports[1]["matrices"]):
        # Computed from the float64 Grams: tolerance 1e-12 absolute, measured ≤ 6e-17.
        assert x["whitened_rel_error"] == pytest.approx(y["whitened_rel_error"], rel=1e-9, abs=1e-12)
    for name, ppl in reports[0]["perplexity"].items():  # windows split over the processes, NLL sums reduced
        other = reports[1]["perplexity"][name]
        assert other["n_tokens"] == ppl["n_tokens"]
        assert other["after"] == pytest.approx(ppl["after"], rel=1e-9)  # measured: equal


def test_one_process_touches_no_process_group(tiny_llama, text_file, tmp_path, monkeypatch):
    """Without a launcher nothing is split or reduced, and torch.distributed is never initialised."""
    from subspace_cli.pipelines.compress import run_compress
    from subspace_cli.pipelines.compress_config import CompressConfig

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    single = current_processes()
    assert single == Processes() and not single.distributed and single.is_main
    ids = torch.arange(14).reshape(7, 2)
    assert single.share(ids) is ids and single.device("cuda") == "cuda"
    stats = {"a": GramStats(3)}
    stats["a"].update(torch.ones(2, 3))
    single.sum_stats_(stats)
    assert stats["a"].n_tokens == 2 and torch.equal(stats["a"].gram, torch.full((3, 3), 2.0, dtype=torch.float64))
    report = run_compress(CompressConfig(model=str(tiny_llama), out=str(tmp_path / "o"), calib=[str(text_file)],
                                         calib_samples=4, calib_seqlen=32, skip_eval=True))
    assert not any("processes" in note for note in report.notes)
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())


def test_shares_cover_every_sample_once():
    """Shares are contiguous, differ by at most one row, and may be empty when rows < processes."""
    ids = torch.arange(14).reshape(7, 2)
    parts = [Processes(world=2, rank=r).share(ids) for r in range(2)]
    assert [p.shape[0] for p in parts] == [4, 3] and torch.equal(torch.cat(parts), ids)
    parts = [Processes(world=3, rank=r).share(ids[:2]) for r in range(3)]
    assert [p.shape[0] for p in parts] == [1, 1, 0] and torch.equal(torch.cat(parts), ids[:2])



def test_cuda_means_each_process_its_own_gpu(monkeypatch):
    from subspace_cli.errors import UsageError

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [Processes(world=2, rank=r, local_rank=r, local_world=2).device("cuda") for r in range(2)] == [
        "cuda:0", "cuda:1"]
    assert Processes(world=2, rank=1, local_rank=1, local_world=2).device("cpu") == "cpu"
    with pytest.raises(UsageError, match="launch one process per GPU"):
        Processes(world=3, rank=0, local_rank=0, local_world=3).device("cuda")  # every process stops, rank 0 too
    with pytest.raises(UsageError, match="pass --device cuda "):
        Processes(world=2, rank=0, local_rank=0, local_world=2).device("cuda:1")


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="with two GPUs, --device cuda is a valid two-process run")
@pytest.mark.slow
def test_two_processes_without_two_gpus_exit_2(tiny_llama, text_file, tmp_path):
    """`--device cuda` gives each process its own GPU: with fewer GPUs than processes nothing runs."""
    out = tmp_path / "out"
    res = _run(_launcher("torchrun"), ["compress", tiny_llama, "--calib", text_file, "--calib-samples", 4,
                                       "--calib-seqlen", 32, "--skip-eval", "--device", "cuda", "--out", out])
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("--device cuda" in line for line in errors), res.stderr  # one per process
    assert "exitcode  : 2" in res.stderr  # torchrun's summary of the failed process: a usage error
    assert not out.exists()
