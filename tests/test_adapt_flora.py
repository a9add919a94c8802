"""FLoRA (Tucker-core adapter): zero update at init, the exported LoRA pair equals the dense Tucker ΔW,
the adapted layer equals the base op on W + ΔW, and conv and Conv1D models round-trip through a saved PEFT adapter."""

import copy
import string

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from subspace_cli.errors import UsageError
from subspace_cli.methods.adapt.base import AdaptContext
from subspace_cli.methods.catalog import methods_for
from subspace_cli.pipelines.adapter_export import attach_exported

FLORA = methods_for("adapt")["flora"]
CONV_FN = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}

# (layer, input) pairs; convs with stride, padding, a 1-wide kernel mode and a kernel rank cap (rank 3 > k=2).
CASES = {
    "linear": (lambda: nn.Linear(12, 10), lambda: torch.randn(2, 5, 12)),
    "conv1d-hf": (lambda: Conv1D(10, 12), lambda: torch.randn(2, 5, 12)),  # transformers Conv1D(nf=out, nx=in)
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), lambda: torch.randn(2, 4, 11)),
    "conv2d": (lambda: nn.Conv2d(5, 7, (3, 2), padding=(1, 0)), lambda: torch.randn(2, 5, 6, 5)),
    "conv3d": (lambda: nn.Conv3d(3, 4, (2, 3, 1), stride=(1, 2, 1)), lambda: torch.randn(2, 3, 4, 5, 3)),
}


def _wrap(base, rank=3, alpha=6.0, seed=0, **options):
    return FLORA.attach.factory(base, rank, alpha, FLORA.make_config(options), torch.Generator().manual_seed(seed))


@torch.no_grad()
def _perturb(layer, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    for p in [layer.core, *layer.factors]:
        p.add_(scale * torch.randn(p.shape, generator=g))


def _dense_tucker(layer):
    """s · G ×₀ U₀ ×₁ U₁ … by one einsum, independent of the module's own mode products."""
    n = layer.core.dim()
    rs, ds = string.ascii_lowercase[:n], string.ascii_uppercase[:n]
    spec = f"{rs}," + ",".join(f"{d}{r}" for d, r in zip(ds, rs)) + f"->{ds}"
    return layer.scaling * torch.einsum(spec, layer.core, *layer.factors)


def _reference(base, x, delta):
    """The base op on W + ΔW; ΔW is [out, in, …] (Conv1D stores its weight as [in, out])."""
    if isinstance(base, Conv1D):
        return x @ (base.weight + delta.t()) + base.bias
    if isinstance(base, nn.Linear):
        return F.linear(x, base.weight + delta, base.bias)
    return CONV_FN[type(base)](x, base.weight + delta, base.bias, base.stride, base.padding)


@pytest.mark.parametrize("case", CASES)
def test_init_is_the_base_and_the_core_gets_gradients(case):
    make_base, make_x = CASES[case]
    torch.manual_seed(0)
    base, x = make_base(), make_x()
    expected = base(x)
    layer = _wrap(copy.deepcopy(base))
    out = layer(x)
    assert (out - expected).abs().max().item() < 1e-6  # core is zero: ΔW = 0 exactly
    out.square().sum().backward()
    assert layer.core.grad.abs().max() > 1e-3  # the zero core still learns (factors are not zero)
    assert not any(p.requires_grad for p in layer.base.parameters())


@pytest.mark.parametrize("init", ["orthonormal", "kaiming"])
@pytest.mark.parametrize("case", CASES)
def test_export_and_forward_equal_the_dense_tucker_update(case, init):
    make_base, make_x = CASES[case]
    torch.manual_seed(0)
    base, x = make_base(), make_x()
    layer = _wrap(copy.deepcopy(base), init=init)
    _perturb(layer)
    with torch.no_grad():
        dense = _dense_tucker(layer)
        assert dense.abs().max() > 0.1  # the perturbation makes ΔW far from zero
        exported = layer.delta_weight()  # B·A of the LoRA export
        assert exported.shape == dense.shape
        assert (exported - dense).abs().max().item() < 1e-5
        err = (layer(x) - _reference(base, x, dense)).abs().max().item()
    assert err < 1e-5, f"{case}: max |Δy| {err:.2e}"  # measured ≤ 3e-6 (conv3d)


@pytest.mark.parametrize("case, options, ranks", [
    ("linear", {}, [3, 3]),
    ("conv2d", {}, [3, 3, 3, 2]),  # kernel modes capped at the kernel size (3, 2)
    ("conv2d", {"kernel_rank": 1}, [3, 3, 1, 1]),
    ("conv3d", {}, [3, 3, 2, 3, 1]),
])
def test_trainable_parameters_are_the_tucker_core_and_factors(case, options, ranks):
    layer = _wrap(CASES[case][0](), **options)
    dims = [layer.factors[i].shape[0] for i in range(len(ranks))]
    expected = torch.tensor(ranks).prod().item() + sum(d * r for d, r in zip(dims, ranks))
    assert list(layer.core.shape) == ranks
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == expected
    assert layer.lora_delta().rank == ranks[0]  # the export rank is the output mode's


def test_orthonormal_init_is_deterministic_and_orthonormal():
    first, second = _wrap(nn.Linear(12, 10), seed=7), _wrap(nn.Linear(12, 10), seed=7)
    for u, v in zip(first.factors, second.factors):
        assert torch.equal(u, v)
        assert (u.t() @ u - torch.eye(u.shape[1])).abs().max().item() < 1e-5


class ConvNet(nn.Module):
    """Conv2d ×2 -> Conv1d -> Conv3d; out channels 2 < rank 3 on `mix1d` gives it another export rank."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.down = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.mix1d = nn.Conv1d(8, 2, 3, padding=1)
        self.mix3d = nn.Conv3d(2, 4, (2, 3, 1), padding=(0, 1, 0))

    def forward(self, x):  # x [B, 3, 8, 8]
        y = self.down(torch.relu(self.stem(x)))  # [B, 8, 4, 4]
        y = self.mix1d(y.flatten(2))  # [B, 2, 16]
        return self.mix3d(y.reshape(-1, 2, 4, 2, 2))  # [B, 4, 3, 2, 2]


class Conv1DNet(nn.Module):
    """A GPT-2-style MLP of transformers Conv1D layers (weights stored [in, out]; PEFT fan_in_fan_out)."""

    def __init__(self):
        super().__init__()
        self.c_fc = Conv1D(16, 8)
        self.c_proj = Conv1D(8, 16)

    def forward(self, x):  # x [B, 8]
        return self.c_proj(torch.tanh(self.c_fc(x)))


# (model, input, expected export ranks at rank 3, perturbation: large enough to move the output by > 0.1,
# small enough that it stays O(1), where fp32 rounding is far below the atol)
ROUND_TRIPS = {
    "convnet": (ConvNet, lambda: torch.randn(2, 3, 8, 8), {"stem": 3, "down": 3, "mix1d": 2, "mix3d": 3}, 0.1),
    "conv1d-hf": (Conv1DNet, lambda: torch.randn(4, 8), {"c_fc": 3, "c_proj": 3}, 0.5),  # Conv1D init: std 0.02
}


@pytest.mark.filterwarnings("ignore:The PEFT config's `base_model_name_or_path`")  # a plain nn.Module has no name
@pytest.mark.parametrize("case", ROUND_TRIPS)
def test_model_round_trips_through_a_saved_peft_adapter(tmp_path, case):
    from peft import PeftModel

    make_model, make_x, ranks, scale = ROUND_TRIPS[case]
    torch.manual_seed(0)
    untouched = make_model()
    model = copy.deepcopy(untouched)
    adapted = FLORA.attach(model, {n: model.get_submodule(n) for n in ranks}, 3, 3.0, FLORA.make_config({}),
                          AdaptContext(torch.Generator().manual_seed(0)))
    for name in ranks:
        _perturb(model.get_submodule(name), scale=scale)
    x = make_x()
    with torch.no_grad():
        trained = adapted.model(x)
        assert (trained - untouched(x)).abs().max() > 0.1  # the adapters changed the model
    deltas = adapted.deltas()
    assert {n: d.rank for n, d in deltas.items()} == ranks  # mix1d: 2 out channels < rank 3 (rank_pattern)
    peft_model = attach_exported(copy.deepcopy(untouched), deltas, adapted.use_dora, case)
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(untouched), tmp_path / "adapter").eval()
    with torch.no_grad():
        err = (reloaded(x) - trained).abs().max().item()
    assert err < 1e-5, f"{case}: max |Δy| {err:.2e}"  # measured 7e-8 (convnet), 2e-7 (conv1d-hf)


@pytest.mark.parametrize("base, message", [
    (nn.Embedding(10, 4), "not Embedding"),
    (nn.LayerNorm(4), "not LayerNorm"),
    (nn.Conv2d(4, 4, 3, groups=2), "groups=1 only"),
    (nn.Conv2d(4, 4, 3, dilation=2), "dilation 1 only"),
    (nn.Conv1d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='zeros'"),
])
def test_unsupported_layers_are_usage_errors(base, message):
    with pytest.raises(UsageError, match=message):
        _wrap(base)


def test_bad_option_is_a_usage_error():
    with pytest.raises(UsageError, match="kernel_rank"):
        FLORA.make_config({"kernel_rank": 0})
