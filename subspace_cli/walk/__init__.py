"""Walking models: block discovery, weight access, submodule swap, MoE experts, vocabulary matrices.

The bottom layer for everything that looks inside an nn.Module: no I/O, no methods, no pipelines.
"""

from subspace_cli.walk.blocks import Blocks, block_linears, compile_pattern, find_blocks, linear_names
from subspace_cli.walk.experts import (EXPERT_MATRICES, ExpertMatrix, ExpertSet, ExpertStack, as_expert_set,
                                       block_expert_stacks, block_experts, block_routers, find_experts, router_paths)
from subspace_cli.walk.vocabulary import VocabularyMatrices, embedding_scale, vocabulary_matrices
from subspace_cli.walk.weights import in_out_features, is_conv1d, is_linear_like, set_submodule, weight_matrix

__all__ = [
    "EXPERT_MATRICES", "Blocks", "ExpertMatrix", "ExpertSet", "ExpertStack", "VocabularyMatrices", "as_expert_set",
    "block_expert_stacks", "block_experts", "block_linears", "block_routers", "compile_pattern", "embedding_scale",
    "find_blocks", "find_experts", "in_out_features", "is_conv1d", "is_linear_like", "linear_names", "router_paths",
    "set_submodule", "vocabulary_matrices", "weight_matrix",
]
