"""The linear-time k-largest selection behind TIES trimming: the same value as a sort, the same kept
set as mergekit's argsort, and a fallback exactly where only a sort's tie order decides."""

import pytest
import torch

from subspace_cli.linalg.selection import kth_largest, largest_k_mask
from subspace_cli.methods.merge.task_arithmetic import magnitude_trim


@pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (1000, 1), (1000, 1000), (50_000, 12_345), (300_000, 150_000)])
def test_kth_largest_equals_sorted_value(n, k):
    values = torch.randn(n, generator=torch.Generator().manual_seed(n)).abs() * 1e-3
    assert torch.equal(kth_largest(values, k), values.sort(descending=True).values[k - 1])


def test_kth_largest_handles_zeros_denormals_and_huge_values():
    values = torch.tensor([0.0, 1e-42, 3e38, 0.0, 1.0, 1e-42, float("inf")])
    ordered = values.sort(descending=True).values
    for k in range(1, values.numel() + 1):
        assert torch.equal(kth_largest(values, k), ordered[k - 1]), k


def test_kth_largest_rejects_bad_arguments():
    with pytest.raises(ValueError, match="outside"):
        kth_largest(torch.ones(3), 4)
    with pytest.raises(ValueError, match="flat float32"):
        kth_largest(torch.ones(2, 2), 1)


def test_mask_is_none_only_when_a_tie_straddles_the_kth_position():
    values = torch.tensor([3.0, 2.0, 2.0, 1.0])
    assert largest_k_mask(values, 2) is None  # two 2.0s compete for one place
    assert largest_k_mask(values, 3).tolist() == [True, True, True, False]
    assert largest_k_mask(torch.tensor([1.0, 0.0, 0.0]), 2).tolist() == [True, True, True]  # zeros: either way
    assert largest_k_mask(torch.tensor([1.0, float("nan")]), 1) is None


@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.9])
def test_trim_of_continuous_deltas_is_bitwise_mergekit(density):
    pytest.importorskip("mergekit")  # a dev extra: only this parity test needs it
    from mergekit.sparsify import magnitude

    # Fine-tuning deltas: continuous values, a block of exact zeros (untrained rows), signed zeros.
    g = torch.Generator().manual_seed(int(density * 100))
    delta = torch.randn(384, 256, generator=g) * 1e-4
    delta[:40] = 0.0
    delta[40:44] = -0.0
    for rescale in (False, True):
        ours = magnitude_trim(delta, density, rescale)
        theirs = magnitude(delta, density, "l1" if rescale else None)
        assert torch.equal(ours, theirs) and torch.equal(ours.signbit(), theirs.signbit()), (density, rescale)
