"""benchmarks/gpu.sh: its commands are valid, it refuses to run without CUDA, and it records
every step's exit code, wall time and report (run here with a stand-in interpreter: no GPU)."""

import os
import shlex
import subprocess

import pytest

from doc_checks import REPO, check_subspace, subspace_argv
from doc_commands import Command

SCRIPT = REPO / "benchmarks" / "gpu.sh"

# Stands in for python3 on a CUDA machine: answers the device probes, writes a report.json into
# each verb's --out, and fails the adapt step with exit 3.
FAKE_PYTHON = r"""#!/usr/bin/env bash
if [[ "$1" == -c ]]; then
  case "$2" in *get_device_name*) echo "Fake GPU 9000 (80GB)";; *) echo "torch 0.0-fake";; esac
  exit 0
fi
echo "ran: $*"
out=""; prev=""
for a in "$@"; do [[ "$prev" == --out ]] && out="$a"; prev="$a"; done
if [[ -n "$out" ]]; then mkdir -p "$out"; echo '{"verb": "fake"}' > "$out/report.json"; fi
[[ " $* " == *" adapt "* ]] && exit 3
exit 0
"""


def _run(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_dry_run_commands_are_valid(tmp_path):
    result = _run({"DRY_RUN": "1", "PYTHON": "python3"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 9
    verbs = []
    for number, line in enumerate(lines, 1):
        command = Command("benchmarks/gpu.sh", number, line, tuple(shlex.split(line)))
        if subspace_argv(command) is not None:
            config = check_subspace(command, tmp_path / str(number), [])
            verbs.append(subspace_argv(command)[0])
            assert config.device == "cuda"
        else:
            assert (REPO / command.argv[1]).is_file(), f"gpu.sh runs a missing script: {line}"
    assert verbs == ["compress", "compress", "compress", "bench", "adapt"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU refusal")
def test_without_cuda_exits_2_and_writes_nothing(tmp_path):
    result = _run({"PYTHON": str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else "python3"},
                  str(tmp_path / "results"))
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr and "nothing was run" in result.stderr
    assert not (tmp_path / "results").exists()


def test_records_each_step_and_exits_with_the_failing_code(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    results = tmp_path / "results"
    result = _run({"PYTHON": str(fake)}, str(results))
    assert result.returncode == 3, result.stderr
    summary = (results / "summary.md").read_text()
    assert summary.startswith("# GPU figures: Fake GPU 9000 (80GB)")
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in summary.splitlines()
            if line.startswith("| ") and not line.startswith("| step")}
    assert rows == {"dictionary_kernel": "0", "dora_speed_r16": "0", "dora_speed_r256": "0", "rank_multiple": "0",
                    "compress": "0", "compress_40": "0", "compress_cospadi": "0", "bench": "0", "adapt": "3"}
    assert "ran: benchmarks/dictionary_kernel.py --json" in (results / "dictionary_kernel.log").read_text()
    assert (results / "compress.report.json").read_text().strip() == '{"verb": "fake"}'
    assert "adapt failed with exit 3" in result.stderr


def test_default_results_folder_is_named_after_the_device(tmp_path):
    copy = tmp_path / "checkout" / "benchmarks" / "gpu.sh"  # the script writes under its own checkout
    copy.parent.mkdir(parents=True)
    copy.write_text(SCRIPT.read_text())
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.replace("exit 3", "exit 0"))
    fake.chmod(0o755)
    result = subprocess.run(["bash", str(copy)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHON": str(fake)})
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "checkout" / "benchmarks" / "results" / "gpu" / "Fake-GPU-9000-80GB"
    assert (folder / "summary.md").is_file() and (folder / "adapt.report.json").is_file()
