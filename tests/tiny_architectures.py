"""One seeded tiny random model per architecture people run (issue 16), built with transformers.

Every model has hidden 32, 2 blocks, vocab 128 and the character tokenizer of tiny_models.py, and
keeps what makes its family different: q/k norms (Qwen3, OLMo 2, Gemma 3), biases on q/k/v
(Qwen2), fused qkv_proj / gate_up_proj (Phi-3), sliding-window and hybrid attention with one
rotary table per layer type (Mistral, Gemma 2, Gemma 3; window 8, so any sequence past 8 tokens
sees it), post-attention / post-feedforward norms and scaled embeddings (Gemma, OLMo 2), and
experts stored as 3-D parameters beside a router (Mixtral, Qwen2-MoE with a shared expert).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_models import VOCAB, _save

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3)
SLIDING = 8  # attention window of the sliding-window layers

# name -> (config class, model class, config overrides); classes are looked up in transformers.
ARCHITECTURES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": SLIDING}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "sliding_window": SLIDING}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "head_dim": 8, "sliding_window": SLIDING, "layer_types": ["sliding_attention", "full_attention"]}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}),
}
DENSE = [name for name in ARCHITECTURES if name not in ("mixtral", "qwen2_moe")]
MOE = ["mixtral", "qwen2_moe"]


def tiny_config(name: str, **overrides):
    import transformers

    config_class, _, extra = ARCHITECTURES[name]
    return getattr(transformers, config_class)(**{**_COMMON, **extra, **overrides})


def make_tiny_arch(name: str, path: Path, seed: int = 0, **overrides) -> Path:
    """A complete Hugging Face directory of architecture `name` (config, safetensors, tokenizer)."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, ARCHITECTURES[name][1])(tiny_config(name, **overrides)).eval()
    return _save(model, Path(path))
