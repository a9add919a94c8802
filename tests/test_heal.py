"""Healing (`subspace heal`, `compress --heal`): distillation of a compressed model toward its teacher.

What must hold: the loss is a KL divergence (zero at the teacher, exact when the teacher's top k
covers the vocabulary, a lower bound otherwise); healing trains only the compressed model's own
parameters, so the parameter count, the layout and every dictionary's sparsity pattern stay as
they were; it moves the student toward the teacher; an interrupted run resumes exactly; bad input
exits 2 with one line.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from cli_runner import run_cli
from safetensors.torch import load_file

from subspace_cli.modules.checkpoint import param_count
from subspace_cli.modules.loading import load_model
from subspace_cli.modules.lowrank import DictionaryLinear
from subspace_cli.pipelines.healing import _top_k_split, coarse_kl, teacher_targets

COMPRESS = ("--calib-samples", "8", "--calib-seqlen", "32", "--eval-seqlen", "32", "--eval-chars", "2000", "--quiet")
HEAL = ("--heal-seqlen", "32", "--heal-batch-size", "4", "--eval-seqlen", "32", "--eval-chars", "2000",
        "--eval-every", "2", "--heal-lr", "3e-4", "--quiet")


def _kl_full(teacher_logits, student_logits):
    p = teacher_logits.log_softmax(-1)
    return F.kl_div(student_logits.log_softmax(-1), p, log_target=True, reduction="sum")


@pytest.mark.parametrize("k", [1, 5, 39])
def test_coarse_kl_is_exact_at_full_k_a_lower_bound_below_and_zero_at_the_teacher(k):
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 3, 40, generator=generator) * 3  # [b, c, V]
    student = torch.randn(2, 3, 40, generator=generator) * 3
    ids, values, tail = _top_k_split(teacher, k)
    coarse = coarse_kl(student, ids, values, tail)
    full = _kl_full(teacher, student)
    assert float(coarse_kl(teacher, ids, values, tail)) == pytest.approx(0.0, abs=1e-4)
    if k == teacher.shape[-1] - 1:
        assert float(coarse) == pytest.approx(float(full), rel=1e-4)  # a one-token tail: the full KL
    else:
        assert 0.0 <= float(coarse) <= float(full) + 1e-4  # KL of a coarsening never exceeds the KL


def test_teacher_targets_are_the_teachers_top_k(tiny_llama):
    model = load_model(tiny_llama)
    ids = torch.randint(4, 100, (3, 16), generator=torch.Generator().manual_seed(1))
    targets = teacher_targets(model, ids, top_k=7, batch_size=2, device="cpu")
    assert targets.ids.shape == (3, 15, 7) and targets.logprobs.shape == (3, 15, 7) and targets.log_tail.shape == (3, 15)
    with torch.no_grad():
        logprobs = model(ids).logits[:, :-1].float().log_softmax(-1)
    top = logprobs.topk(7, dim=-1)
    torch.testing.assert_close(targets.logprobs, top.values, atol=1e-5, rtol=0)
    mass = targets.logprobs.exp().sum(-1) + targets.log_tail.exp()
    torch.testing.assert_close(mass, torch.ones_like(mass), atol=1e-5, rtol=0)  # top k + tail = 1


def test_lm_loss_is_the_causal_lm_loss_and_mix_their_mean(tiny_llama):
    from subspace_cli.evaluate.chunked_logits import causal_lm_loss
    from subspace_cli.pipelines.healing import heal_loss_fn, rows_as_batches

    model = load_model(tiny_llama)
    ids = torch.randint(4, 100, (3, 16), generator=torch.Generator().manual_seed(3))
    rows = torch.arange(3)
    batch = rows_as_batches(ids)
    batch = {"input_ids": batch.input_ids, "labels": batch.labels, "attention_mask": batch.attention_mask}
    targets = teacher_targets(model, ids, top_k=5, batch_size=2, device="cpu")
    with torch.no_grad():
        lm = float(heal_loss_fn(None, "lm")(model, batch, rows))
        kl = float(heal_loss_fn(targets, "kl")(model, batch, rows))
        mix = float(heal_loss_fn(targets, "mix")(model, batch, rows))
        reference = float(causal_lm_loss(model, ids))
    assert lm == pytest.approx(reference, rel=1e-5)
    assert kl == pytest.approx(0.0, abs=1e-5)  # the teacher against its own targets
    assert mix == pytest.approx(0.5 * (lm + kl), rel=1e-5)


@pytest.fixture(scope="module")
def compressed(tiny_llama, tmp_path_factory):
    """{method: a compressed checkpoint of tiny_llama}, both kinds of factored layer."""
    from tiny_models import write_text

    root = tmp_path_factory.mktemp("heal")
    text = write_text(root / "calib.txt")
    outs = {}
    for method in ("svd-llm", "cospadi"):
        out = root / method
        # A high ratio, so the compressed model is measurably far from its teacher.
        result = run_cli("compress", tiny_llama, "--method", method, "--ratio", "0.6", "--calib", text, "--out", out,
                         *COMPRESS)
        assert result.returncode == 0, result.stderr
        outs[method] = out
    return outs


def _student_kl(model_dir, teacher_dir, ids) -> float:
    """Mean per-token KL(teacher ‖ model) over ids [n, L] (full vocabulary)."""
    student, teacher = load_model(model_dir), load_model(teacher_dir)
    with torch.no_grad():
        return float(_kl_full(teacher(ids).logits.float(), student(ids).logits.float())) / ids[:, :1].numel() / ids.shape[1]


@pytest.mark.parametrize("method", ["svd-llm", "cospadi"])
def test_heal_keeps_structure_and_moves_toward_the_teacher(compressed, tiny_llama, text_file, tmp_path, method):
    source = compressed[method]
    out = tmp_path / "healed"
    result = run_cli("heal", source, "--out", out, "--steps", "8", "--heal-data", text_file, *HEAL, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    healing = report["healing"]
    before, after = load_model(source), load_model(out)
    # Same parameter count, same layout, same format: only values changed.
    assert param_count(before) == param_count(after) == healing["params_before"] == healing["params_after"]
    config_before = json.loads((source / "config.json").read_text())
    config_after = json.loads((out / "config.json").read_text())
    assert config_before["subspace"] == config_after["subspace"]
    tensors_before, tensors_after = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    assert {k: v.shape for k, v in tensors_before.items()} == {k: v.shape for k, v in tensors_after.items()}
    changed = [k for k in tensors_before if not torch.equal(tensors_before[k], tensors_after[k])]
    assert changed, "healing changed no tensor"
    dictionaries = [(p, m) for p, m in before.named_modules() if isinstance(m, DictionaryLinear)]
    assert bool(dictionaries) == (method == "cospadi")
    for path, module in dictionaries:
        assert torch.equal(module.atom_indices(), after.get_submodule(path).atom_indices()), path
    assert healing["dictionary_patterns_kept"] == len(dictionaries)
    # Only factored layers train (scope `factors`): norms and embeddings are bitwise unchanged.
    assert all(".layers." in k and ("proj" in k) for k in changed), changed[:5]
    # Closer to the teacher on the healing text (full-vocabulary KL, not the top-k loss it trained on).
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_llama)(text_file.read_text()[:2000], return_tensors="pt").input_ids
    ids = ids[:, :32 * (ids.shape[1] // 32)].reshape(-1, 32)  # [n, 32] windows of the healing text
    assert _student_kl(out, tiny_llama, ids) < _student_kl(source, tiny_llama, ids)
    assert set(healing["perplexity"][str(text_file)]) == {"dense", "compressed", "healed"}
    assert healing["teacher"] == str(tiny_llama.resolve()) or healing["teacher"] == str(tiny_llama)
    assert (out / "training_curve.png").is_file() and "## Healing" in (out / "report.md").read_text()


def test_resume_is_exact(compressed, text_file, tmp_path):
    """A run stopped at step 2 and resumed writes the tensors an uninterrupted run writes."""
    source = compressed["cospadi"]
    common = ("--steps", "4", "--heal-data", text_file, *HEAL)
    full = run_cli("heal", source, "--out", tmp_path / "full", *common)
    assert full.returncode == 0, full.stderr
    first = run_cli("heal", source, "--out", tmp_path / "part", "--save-every", "2", "--checkpoint-dir",
                    tmp_path / "ckpt", *common)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "ckpt" / "step-000002").is_dir()
    resumed = run_cli("heal", source, "--out", tmp_path / "resumed", "--resume", tmp_path / "ckpt" / "step-000002",
                      *common)
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)
    report = json.loads((tmp_path / "resumed" / "report.json").read_text())
    assert report["healing"]["resumed_from"] == 2


def test_compress_heal_reports_three_perplexities_at_one_parameter_count(tiny_llama, text_file, tmp_path):
    out = tmp_path / "out"
    result = run_cli("compress", tiny_llama, "--calib", text_file, "--out", out, "--ratio", "0.3", "--heal", "4",
                     "--heal-seqlen", "32", "--heal-batch-size", "4", *COMPRESS)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    healing = report["healing"]
    assert healing["steps"] == 4 and len(healing["curve"]) == 4
    assert healing["params_before"] == healing["params_after"] == report["params"]["model_after"]
    assert param_count(load_model(out)) == report["params"]["model_after"]
    ppl = healing["perplexity"][str(text_file)]
    assert report["perplexity"][str(text_file)]["after"] == pytest.approx(ppl["healed"])
    assert report["perplexity"][str(text_file)]["before"] == pytest.approx(ppl["dense"])
    assert (out / "healing_curve.png").is_file()


def _with_extra_token(model_dir, out):
    """model_dir's model with one more token in its tokenizer and embeddings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer.add_tokens(["<extra>"])
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("case", ["dense", "vocabulary", "steps", "compress-steps", "loss", "no-teacher"])
def test_bad_input_exits_2_with_one_line(case, compressed, tiny_llama, text_file, tmp_path):
    out = tmp_path / "out"
    source = compressed["svd-llm"]
    args = {
        "dense": ("heal", tiny_llama, "--teacher", tiny_llama),
        "vocabulary": ("heal", source, "--teacher", _with_extra_token(tiny_llama, tmp_path / "other")),
        "steps": ("heal", source, "--steps", "0"),
        "compress-steps": ("compress", tiny_llama, "--calib", text_file, "--heal", "0"),
        "loss": ("heal", source, "--heal-loss", "mse"),
        "no-teacher": ("heal", tmp_path / "copy"),
    }[case]
    if case == "no-teacher":  # a compressed checkpoint without its recipe.yaml
        import shutil

        shutil.copytree(source, tmp_path / "copy")
        (tmp_path / "copy" / "recipe.yaml").unlink()
    result = run_cli(*args, "--out", out, "--heal-data", text_file, *HEAL[:-1])
    assert result.returncode == 2, (result.returncode, result.stderr)
    message = result.stderr.strip()
    assert "Traceback" not in message and len(message.splitlines()) == 1, message
    expected = {"dense": "not a compressed checkpoint", "vocabulary": "vocabulary", "steps": "--steps",
                "compress-steps": "--heal", "loss": "--heal-loss", "no-teacher": "--teacher"}[case]
    assert expected in message
    assert not out.exists()
