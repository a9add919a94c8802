"""The architecture matrix (issue 16): what the verbs rely on holds for every family in
tests/tiny_architectures.py, not only Llama."""

import pytest
import torch

from subspace_cli.modules.loading import load_model
from subspace_cli.pipelines.calibration import BlockStream
from tiny_architectures import ARCHITECTURES, SLIDING, make_tiny_arch


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("architectures")
    return {name: make_tiny_arch(name, root / name) for name in ARCHITECTURES}


def _block_outputs(model, input_ids) -> list[torch.Tensor]:
    """Each block's output in a real forward pass (forward hooks, first element of tuples)."""
    from subspace_cli.walk import find_blocks

    outputs = []
    hooks = [block.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for block in find_blocks(model).modules]
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_streaming_reproduces_the_real_forward_pass(arch_dirs, name):
    """Block by block with each block's own masks and rotary tables, the streamed outputs are the
    real forward pass's (relative error ≤ 1e-5). Before: block 0's kwargs were replayed for every
    block, wrong wherever layer types differ (sliding-window against global attention)."""
    model = load_model(arch_dirs[name])
    input_ids = torch.randint(4, 128, (5, 4 * SLIDING), generator=torch.Generator().manual_seed(1))
    real = _block_outputs(model, input_ids)
    stream = BlockStream(model, input_ids, batch_size=2)
    for i, expected in enumerate(real):
        got = torch.cat(stream.run_block(i))
        error = float((got - expected).norm() / expected.norm())
        assert error <= 1e-5, f"{name} block {i}: relative error {error:.2e}"
        stream.advance(stream.run_block(i))
