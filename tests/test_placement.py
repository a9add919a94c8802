"""`--devices`: one model's blocks spread over several devices in one process (accelerate hooks).

No GPU here, so the device map is checked on its own (device names are only strings there),
and the dispatched path runs end to end on `cpu,cpu`: accelerate attaches the same hooks as on
GPUs (force_hooks), and the result must be the single-device result, bit for bit.
"""

import pytest
import torch
from safetensors.torch import load_file

from subspace_cli.errors import UsageError
from subspace_cli.modules.loading import load_model
from subspace_cli.modules.lowrank import DictionaryLinear
from subspace_cli.pipelines.compress import compress_and_write
from subspace_cli.pipelines.compress_config import CompressConfig
from subspace_cli.pipelines.evaluate import EvalConfig, run_eval
from subspace_cli.pipelines.placement import check_fits, parse_devices, plan_placement
from tiny_models import make_tiny_llama

TINY = dict(calib_samples=8, calib_seqlen=32, eval_seqlen=64, eval_chars=2000)
GPUS = ("cuda:0", "cuda:1", "cuda:2")


@pytest.fixture(scope="module")
def six_blocks(tmp_path_factory):
    from transformers import AutoConfig

    path = make_tiny_llama(tmp_path_factory.mktemp("six"))
    config = AutoConfig.from_pretrained(path)
    config.num_hidden_layers = 6
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(config)


@pytest.fixture()
def gpus(monkeypatch):
    """Three pretend GPUs: enough for parse_devices and check_fits, which only ask torch.cuda."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)


def test_blocks_in_balanced_contiguous_runs_rest_on_the_first(six_blocks):
    placement = plan_placement(six_blocks, GPUS)
    assert placement.blocks_per_device == (("cuda:0", 0, 1), ("cuda:1", 2, 3), ("cuda:2", 4, 5))
    rest = {k: v for k, v in placement.device_map.items() if not k.startswith("model.layers.")}
    assert rest == {"lm_head": "cuda:0", "model.embed_tokens": "cuda:0", "model.norm": "cuda:0",
                    "model.rotary_emb": "cuda:0"}
    from accelerate.utils import check_device_map

    check_device_map(six_blocks, placement.device_map)  # every parameter has a device
    assert "cuda:1: blocks 2-3" in placement.note()


def test_a_group_of_blocks_stays_on_one_device(six_blocks):
    """cospadi's group_size=2 shares one dictionary tensor between two blocks."""
    placement = plan_placement(six_blocks, GPUS[:2], unit=4)
    assert placement.blocks_per_device == (("cuda:0", 0, 3), ("cuda:1", 4, 5))
    runs = plan_placement(six_blocks, GPUS[:2], unit=2).blocks_per_device
    assert all((first % 2, last % 2) == (0, 1) for _, first, last in runs)


def test_a_device_without_room_is_named_before_anything_moves(six_blocks, gpus, monkeypatch):
    weights = sum(p.numel() * p.element_size() for p in six_blocks.parameters())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (weights // 10, weights))
    with pytest.raises(UsageError, match=r"cuda:0 would hold .* GiB of weights but has .* GiB free"):
        check_fits(six_blocks, plan_placement(six_blocks, GPUS))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (weights, weights))
    check_fits(six_blocks, plan_placement(six_blocks, GPUS))
    assert next(six_blocks.parameters()).device.type == "cpu"


@pytest.mark.parametrize("spec, problem", [
    ("cuda:0,cpu", "mixes GPUs with other devices"),
    ("cuda:0,cuda:0", "names a GPU twice"),
    ("cuda,cuda:1", "name each GPU with its index"),
    ("cuda:0,,cuda:1", "empty entry"),
    ("cuda:0,cuda:7", r"cuda:7: this machine has 3 GPU\(s\)"),
])
def test_bad_device_lists_exit_2(gpus, spec, problem):
    with pytest.raises(UsageError, match=problem):
        parse_devices(spec)


def test_auto_is_every_visible_gpu(gpus):
    assert parse_devices("auto") == GPUS


def test_auto_without_a_gpu_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match=r"--devices auto: .*drop --devices to run on one device"):
        parse_devices("auto")


@pytest.mark.parametrize("method, options", [("svd-llm", {}), ("cospadi", {"group_size": 2})])
def test_dispatched_compress_is_the_one_device_result(tiny_llama, text_file, tmp_path, method, options):
    plain, plain_model = compress_and_write(CompressConfig(model=str(tiny_llama), out=str(tmp_path / "a"),
                                                           calib=[str(text_file)], method=method, options=options,
                                                           **TINY))
    spread, spread_model = compress_and_write(CompressConfig(model=str(tiny_llama), out=str(tmp_path / "b"),
                                                             calib=[str(text_file)], method=method, options=options,
                                                             devices="cpu,cpu", **TINY))
    assert hasattr(spread_model.model.layers[0], "_hf_hook")  # accelerate's hooks did run
    assert any("blocks placed over 2 devices" in note for note in spread.notes)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert spread.perplexity == plain.perplexity
    loaded = load_model(tmp_path / "b")  # no trace of the hooks in what was written
    for module in loaded.modules():  # the stored product, as the in-memory model runs it: bitwise comparable
        if isinstance(module, DictionaryLinear):
            module.representation = "packed"
    probe = torch.randint(4, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(probe).logits, plain_model(probe).logits)


def test_dispatched_eval_scores_the_same(tiny_llama, text_file):
    args = dict(model=str(tiny_llama), data=str(text_file), baseline=str(tiny_llama), eval_seqlen=64, eval_chars=2000)
    plain, spread = run_eval(EvalConfig(**args)), run_eval(EvalConfig(**args, devices="cpu,cpu"))
    assert (spread["ppl"], spread["kl"]) == (plain["ppl"], plain["kl"])


def test_devices_under_a_launcher_exit_2(tiny_llama, text_file, tmp_path, monkeypatch):
    from subspace_cli.pipelines import compress as compress_module
    from subspace_cli.pipelines.distributed import Processes

    monkeypatch.setattr(compress_module, "current_processes", lambda device: Processes(world=2, local_world=2))
    with pytest.raises(UsageError, match="one process; under a launcher pass --device cuda"):
        compress_and_write(CompressConfig(model=str(tiny_llama), out=str(tmp_path / "o"), calib=[str(text_file)],
                                          devices="cuda:0,cuda:1", **TINY))
    assert not (tmp_path / "o").exists()
