"""`--calib self`: calibration text sampled from the model itself.

Activations of text the model itself generates cover its own typical inputs rather than one
domain's, which keeps whitening from overfitting the calibration corpus (the data-free
calibration idea of e.g. "LLM-QAT", Liu et al. 2023, arXiv 2305.17888, Sec. 3.1).
"""

from __future__ import annotations

import torch

from subspace_cli.errors import UsageError
from subspace_cli.io.data import special_tokens, text_length


@torch.no_grad()
def generate_calibration(model, tokenizer, n_samples: int, seqlen: int, seed: int, *, batch_size: int = 16,
                         device: str = "cpu") -> torch.Tensor:
    """n_samples sequences of exactly seqlen tokens, sampled (top-p 0.95) from a BOS start: [n, seqlen].

    Where the tokenizer opens every text with a BOS (Llama, Mistral, Gemma), a row keeps it and
    holds seqlen − 1 sampled tokens, like the text calibration rows (io/data.py); elsewhere
    (GPT-2, SmolLM2) sampling starts from the BOS (else EOS) token, which the row drops.
    """
    if not hasattr(model, "generate") or model.get_output_embeddings() is None:
        raise UsageError("--calib self needs a causal language model; pass text calibration data instead")
    prefix = special_tokens(tokenizer).prefix
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None and not prefix:
        raise UsageError("--calib self needs a tokenizer with a BOS or EOS token")
    prompt_ids = list(prefix) or [start]
    new_tokens = text_length(seqlen, prefix, "--calib-seqlen")  # sampled tokens per row
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    rows = []
    try:
        for begin in range(0, n_samples, batch_size):
            count = min(batch_size, n_samples - begin)
            prompt = torch.tensor([prompt_ids] * count, dtype=torch.long, device=device)  # [count, p]
            out = model.generate(
                prompt, do_sample=True, top_p=0.95, top_k=0, temperature=1.0, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=None,
            )  # [count, p + new_tokens]
            # Keep the tokenizer's own prefix; drop a start token it would not add.
            rows.append((out[:, :seqlen] if prefix else out[:, 1 : seqlen + 1]).cpu())
    finally:
        torch.random.set_rng_state(generator_state)
    return torch.cat(rows)
