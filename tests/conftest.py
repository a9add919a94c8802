import os
import sys
from pathlib import Path

# Kernels are tested in the Triton interpreter on CPU; it must be set before any kernel is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import make_tiny_bert, make_tiny_gpt2, make_tiny_llama, write_text  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("models") / "gpt2")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("models") / "bert")


@pytest.fixture(params=["llama", "gpt2", "bert"])
def tiny_model(request, tiny_llama, tiny_gpt2, tiny_bert) -> Path:
    return {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}[request.param]


@pytest.fixture()
def text_file(tmp_path) -> Path:
    return write_text(tmp_path / "calib.txt")


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip themselves without CUDA, so `make test` can select every tier anywhere."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if not torch.cuda.is_available():
        for item in gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
