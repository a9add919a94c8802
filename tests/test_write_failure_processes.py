"""Several processes, and the main one fails to write: no process may be left waiting.

Under a launcher only the main process writes the output; the others wait at a barrier until it is
done. The barrier is in `finally` (pipelines/lifecycle.py `write_output`), so a write that fails on
the main process (here: a full disk while writing the report) still releases the others: they
finish normally while the main process exits 3 naming the stage. Before, the main process raised
without reaching the barrier; the others waited until the process group noticed (gloo: "Connection
closed by peer", exit 3; nccl: the 30-minute timeout). The two ranks are started by hand, as a
launcher would, so each one's exit code is seen (torchrun's agent kills the survivors).
Every verb that runs on several processes is covered.
"""

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from tiny_models import write_text

pytestmark = pytest.mark.slow

# Rank 0's report write fails with ENOSPC; then the ordinary CLI runs on both ranks.
DRIVER = textwrap.dedent("""
    import os, sys
    from subspace_cli.pipelines import lifecycle

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if os.environ["RANK"] == "0":
        lifecycle.write_outputs = disk_full
    from subspace_cli.cli.app import main

    sys.argv = ["subspace", *sys.argv[1:]]
    main()
""")

VERB_ARGS = {
    "compress": lambda data, retain: ["--calib", data, "--calib-samples", "4", "--calib-seqlen", "32", "--skip-eval"],
    "unlearn": lambda data, retain: ["--method", "ga", "--forget", data, "--retain", retain, "--forget-samples", "8",
                                     "--retain-samples", "8", "--seqlen", "32", "--eval-seqlen", "32", "-O", "steps=2",
                                     "-O", "batch_size=2"],
    "adapt": lambda data, retain: ["--data", data, "--rank", "2", "--steps", "2", "--seqlen", "32", "--batch-size", "2",
                                   "--warmup-steps", "0", "--eval-every", "0"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("verb", sorted(VERB_ARGS))
def test_failed_write_on_the_main_process_releases_the_others(verb, tiny_llama, tmp_path):
    data = write_text(tmp_path / "text.txt")
    retain = write_text(tmp_path / "retain.txt", "And God said, Let there be light: and there was light.\n" * 60)
    (tmp_path / "driver.py").write_text(DRIVER)
    out = tmp_path / "out"
    command = [sys.executable, str(tmp_path / "driver.py"), verb, str(tiny_llama), *VERB_ARGS[verb](str(data), str(retain)),
               "--device", "cpu", "--out", str(out), "--quiet"]
    port = str(_free_port())
    ranks = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2",
                                   "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"})
             for rank in range(2)]
    try:
        results = [(proc.wait(timeout=240), *proc.communicate()) for proc in ranks]
    except subprocess.TimeoutExpired:
        for proc in ranks:
            proc.kill()
        pytest.fail(f"{verb}: a process was left waiting after the main process failed to write")
    (main_code, _, main_err), (other_code, _, other_err) = results
    assert main_code == 3, main_err
    assert "error: write: No space left on device" in main_err  # exit 3 names the stage
    assert other_code == 0 and "error:" not in other_err, other_err  # released by the barrier, not by a crash
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))  # nothing half-written left behind
