"""The unlearn verb on a tiny Llama: only the targeted tensors change, SSPU's updates stay in the
relevant span, the report holds perplexities and membership AUCs, and bad input exits 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_runner import run_cli as cli
from method_contracts import method_names
from tiny_models import write_text

FAST = ["--forget-samples", "8", "--retain-samples", "8", "--seqlen", "32", "--eval-seqlen", "32",
        "--eval-chars", "1500", "-O", "steps=3", "-O", "layer=1", "-O", "batch_size=2"]
SSPU_FAST = ["-O", "sae_steps=50", "-O", "relevant=4", "-O", "irrelevant=4", "-O", "sae_k=4", "-O", "sae_features=64"]
FAST_OPTIONS = {"sspu": SSPU_FAST}  # per method, beside FAST; methods not named run with FAST alone
RETAIN_TEXT = (
    "In the beginning God created the heaven and the earth.\n"
    "And the earth was without form, and void; and darkness was upon the face of the deep.\n"
    "And God said, Let there be light: and there was light.\n"
) * 40


@pytest.fixture()
def texts(tmp_path):
    return write_text(tmp_path / "forget.txt"), write_text(tmp_path / "retain.txt", RETAIN_TEXT)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("method, extra", [(m, FAST_OPTIONS.get(m, [])) for m in method_names("unlearn")])
def test_only_targeted_tensors_change(tiny_llama, texts, tmp_path, method, extra):
    forget, retain = texts
    out = tmp_path / "out"
    proc = cli("unlearn", tiny_llama, "--method", method, "--forget", forget, "--retain", retain, "--out", out,
               "--json", *FAST, *extra)
    assert proc.returncode == 0, proc.stderr
    before, after = tensors(tiny_llama), tensors(out)
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    # Default targets: mlp.down_proj of blocks layer−2 … layer = blocks 0 and 1.
    assert changed == {f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)}
    summary = json.loads(proc.stdout)
    report = summary["unlearn"]
    assert {c["name"] for c in report["changed"]} == changed
    assert report["unchanged"] == len(before) - len(changed)
    assert all(c["rel_change"] > 0 for c in report["changed"])
    assert 0.0 <= report["mia_auc_before"] <= 1.0 and 0.0 <= report["mia_auc_after"] <= 1.0
    for name in ("forget", "retain"):
        ppl = summary["perplexity"][name]
        assert ppl["before"] > 1 and ppl["after"] > 1
    report_md = (out / "report.md").read_text()
    assert "Membership-inference AUC" in report_md


def test_sspu_updates_lie_in_the_relevant_span_and_the_control_in_the_irrelevant(tiny_llama, texts):
    from subspace_cli.io import data
    from subspace_cli.modules.loading import load_model_and_tokenizer
    from subspace_cli.methods.catalog import get_method
    from subspace_cli.methods.unlearn.base import UnlearnData
    from subspace_cli.pipelines.unlearn import train_plan

    forget, retain = texts
    loaded = load_model_and_tokenizer(str(tiny_llama))
    rows = {name: data.sample_calibration(loaded.tokenizer, path.read_text(), 8, 32, 0) for name, path in texts_dict(texts).items()}
    method = get_method("unlearn", "sspu")
    config = method.make_config({"layer": 1, "steps": 5, "lr": 1e-2, "batch_size": 2, "sae_steps": 50, "relevant": 4,
                                 "irrelevant": 4, "sae_k": 4, "sae_features": 64})
    model = loaded.model
    originals = {name: p.detach().clone() for name, p in model.named_parameters()}
    plan = method.plan(model, UnlearnData(rows["forget"], rows["retain"]), config, torch.Generator().manual_seed(0))
    train_plan(plan, config, UnlearnData(rows["forget"], rows["retain"]), seed=0)
    plan.finish()
    q_rel = plan.diagnostics["relevant_basis"].double()  # [d, r]
    q_irr = plan.diagnostics["irrelevant_basis"].double()
    assert torch.allclose(q_rel.T @ q_rel, torch.eye(q_rel.shape[1], dtype=torch.float64), atol=1e-6)
    control = plan.diagnostics["control"].double()
    assert (control - q_irr @ (q_irr.T @ control)).norm() <= 1e-5 * control.norm()
    for name, p in model.named_parameters():
        delta = p.detach().double() - originals[name].double()
        if name in plan.targeted:
            outside = delta - q_rel @ (q_rel.T @ delta)  # the part of ΔW's columns outside the relevant span
            assert delta.norm() > 0 and outside.norm() <= 1e-5 * delta.norm(), name
        else:
            assert delta.abs().max() == 0, name


def texts_dict(texts):
    return {"forget": texts[0], "retain": texts[1]}


def test_membership_auc_counts_pairs_and_ties():
    from subspace_cli.evaluate.membership import auc

    assert auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert auc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 0.0
    assert auc(torch.tensor([1.0, 1.0]), torch.tensor([1.0])) == 0.5
    assert auc(torch.tensor([1.0, 3.0]), torch.tensor([2.0])) == 0.5


@pytest.mark.parametrize("case, message", [
    ("empty forget", "is empty"),
    ("same source", "nothing to keep apart"),
    ("same text", "same text"),
    ("layer", "out of range"),
    ("update layers", "out of range"),
    ("modules", "matched no Linear layer"),
    ("method", "valid:"),
    ("option", "valid options"),
])
def test_bad_input_exits_2_and_writes_nothing(tiny_llama, texts, tmp_path, case, message):
    forget, retain = texts
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    copy = write_text(tmp_path / "copy.txt")  # the forget text under another name
    args = {
        "empty forget": ["--forget", empty, "--retain", retain],
        "same source": ["--forget", forget, "--retain", forget],
        "same text": ["--forget", forget, "--retain", copy],
        "layer": ["--forget", forget, "--retain", retain, "-O", "layer=2"],
        "update layers": ["--forget", forget, "--retain", retain, "-O", "update_layers=[0,5]"],
        "modules": ["--forget", forget, "--retain", retain, "-O", "modules=nothing_here"],
        "method": ["--forget", forget, "--retain", retain, "--method", "nope"],
        "option": ["--forget", forget, "--retain", retain, "-O", "bogus=1"],
    }[case]
    out = tmp_path / "out"
    proc = cli("unlearn", tiny_llama, "--out", out, *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("launcher", [
    ["torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "subspace_cli"],
    # `accelerate launch --cpu` starts a single process (several CPU processes need mpirun); --multi_gpu
    # starts two plain processes, which open a gloo group for --device cpu.
    ["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
     "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", "-m", "subspace_cli"],
])
@pytest.mark.slow
def test_two_processes_take_the_steps_of_one(tiny_llama, texts, tmp_path, launcher):
    # Each process takes every other row of a step's batch and the gradients are averaged (gloo on CPU),
    # so two processes take the steps one process takes, up to float reassociation.
    forget, retain = texts
    args = ["unlearn", tiny_llama, "--method", "rmu", "--forget", forget, "--retain", retain, "--json", "--quiet",
            "--device", "cpu", *FAST]
    one = cli(*args, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", *launcher, *map(str, args), "--out", str(tmp_path / "two")],
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    assert len([line for line in two.stdout.splitlines() if line.startswith("{")]) == 1  # one process prints
    reports = [json.loads((tmp_path / run / "report.json").read_text()) for run in ("one", "two")]
    assert any("trained on 2 processes" in note for note in reports[1]["notes"])  # really two
    assert not any("processes" in note for note in reports[0]["notes"])
    base, a, b = tensors(tiny_llama), tensors(tmp_path / "one"), tensors(tmp_path / "two")
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-6, name  # tolerance for float reassociation
    assert any(not torch.equal(a[name], base[name]) for name in a)  # the steps did change weights
    curves = [report["unlearn"]["losses"] for report in reports]
    assert len(curves[0]) == len(curves[1]) == 3
    for x, y in zip(*curves):  # the logged loss is the mean over the processes: the one-process loss
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * max(1.0, abs(x["loss"])), (x, y)
