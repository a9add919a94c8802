"""`--calib self`: calibration text sampled from the model itself.

Activations of text the model itself generates cover its own typical inputs rather than one
domain's, which keeps whitening from overfitting the calibration corpus (the data-free
calibration idea of e.g. "LLM-QAT", Liu et al. 2023, arXiv 2305.17888, Sec. 3.1).
"""

from __future__ import annotations

import torch

from subspace_cli.errors import UsageError


@torch.no_grad()
def generate_calibration(model, tokenizer, n_samples: int, seqlen: int, seed: int, *, batch_size: int = 16,
                         device: str = "cpu") -> torch.Tensor:
    """n_samples sequences of exactly seqlen tokens, sampled (top-p 0.95) from a BOS start: [n, seqlen]."""
    if not hasattr(model, "generate") or model.get_output_embeddings() is None:
        raise UsageError("--calib self needs a causal language model; pass text calibration data instead")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise UsageError("--calib self needs a tokenizer with a BOS or EOS token")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    rows = []
    try:
        for begin in range(0, n_samples, batch_size):
            count = min(batch_size, n_samples - begin)
            prompt = torch.full((count, 1), start, dtype=torch.long, device=device)
            out = model.generate(
                prompt, do_sample=True, top_p=0.95, top_k=0, temperature=1.0, max_new_tokens=seqlen,
                min_new_tokens=seqlen, pad_token_id=tokenizer.pad_token_id, eos_token_id=None,
            )
            rows.append(out[:, 1 : seqlen + 1].cpu())  # drop the BOS prompt
    finally:
        torch.random.set_rng_state(generator_state)
    return torch.cat(rows)
