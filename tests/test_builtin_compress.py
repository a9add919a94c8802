"""Integration on the real built-in model (SmolLM2-135M, Llama with GQA) and corpora."""

import json
import subprocess
import sys

import pytest
import torch

from subspace_cli.modules.loading import load_model
from subspace_cli.pipelines.compress import compress_and_write
from subspace_cli.pipelines.compress_config import CompressConfig

pytestmark = [pytest.mark.builtin, pytest.mark.slow]

_BLOCK_SUBSPACE = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "subspace_cli" or name.startswith("subspace_cli."):
            raise ImportError("subspace_cli is blocked in this test")
sys.meta_path.insert(0, Block())
sys.path = [p for p in sys.path if p not in ("", {repo!r})]
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({out!r}, trust_remote_code=True).eval()
ids = torch.load({probe!r})
with torch.no_grad():
    torch.save(model(ids).logits, {logits!r})
print(sum(p.numel() for p in model.parameters()))
"""


@pytest.fixture(scope="module")
def smollm2_compressed(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "out"
    config = CompressConfig(model="builtin:smollm2-135m", out=str(out), calib=["builtin:shakespeare"], ratio=0.3,
                            calib_samples=8, calib_seqlen=128, eval_seqlen=128, eval_chars=4000)
    report, model = compress_and_write(config)
    return out, report, model


def test_compress_smollm2_meets_budget_and_reports(smollm2_compressed):
    out, report, _ = smollm2_compressed
    assert report.params.targeted_ratio_removed == pytest.approx(0.3, abs=0.01)
    assert len(report.matrices) == 30 * 7  # q, k, v, o, gate, up, down in 30 blocks
    ppl = report.perplexity["builtin:shakespeare"]
    # 30% of the block weights removed with 1k calibration tokens: worse, but not broken
    assert 1.0 < ppl.ratio < 4.0, ppl
    data = json.loads((out / "report.json").read_text())
    assert set(data["timings_s"]) >= {"load", "data", "plan", "compress", "write"}
    assert data["peak_rss_mb"] > 0


def test_smollm2_round_trip_both_loaders(smollm2_compressed, tmp_path):
    out, report, model = smollm2_compressed
    probe = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(probe).logits
        via_load_model = load_model(out)(probe).logits
    assert torch.allclose(via_load_model, expected, atol=1e-5)
    torch.save(probe, tmp_path / "probe.pt")
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[1])
    code = _BLOCK_SUBSPACE.format(repo=repo, out=str(out), probe=str(tmp_path / "probe.pt"),
                                  logits=str(tmp_path / "logits.pt"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert int(res.stdout.strip().splitlines()[-1]) == report.params.model_after
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5)
