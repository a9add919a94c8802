"""Greedy generation samples: a few fixed prompts continued by each model a verb reads or writes.

Perplexity can hide a broken model (fluent-looking numbers, incoherent text); reading three short
continuations before and after a transform catches that at a glance. Greedy decoding, so the
samples are deterministic and comparable across runs.
"""

from __future__ import annotations

import torch

PROMPTS = (
    "The capital of France is",
    "Once upon a time, there was a",
    "The best way to learn a new language is",
)
MAX_NEW_TOKENS = 32


@torch.no_grad()
def greedy_samples(model, tokenizer, device, prompts: tuple[str, ...] = PROMPTS,
                   max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Each prompt's greedy continuation (the new text only, special tokens dropped)."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = []
    try:
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)  # [1, p], the tokenizer's own BOS
            new = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad)[0, ids.shape[1]:]
            outputs.append(tokenizer.decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return outputs


def add_samples(samples: list[dict], label: str, model, tokenizer, device) -> list[dict]:
    """Add `label`'s continuations to samples [{"prompt", "outputs": {label: text}}] (made on first use)."""
    texts = greedy_samples(model, tokenizer, device)
    if not samples:
        samples.extend({"prompt": prompt, "outputs": {}} for prompt in PROMPTS)
    for sample, text in zip(samples, texts):
        sample["outputs"][label] = text
    return samples
