"""Tiny random models built on the fly (no network), in the spirit of mergekit's picollama.

Each builder writes a complete Hugging Face directory (config, safetensors, a character-level
tokenizer) and returns its path. Hidden 32, 2 blocks, vocab 128: every test runs in seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 128


def make_char_tokenizer(bos: bool = False):
    """A character-level fast tokenizer over printable ASCII (ids < VOCAB).

    It adds no special tokens, as GPT-2's, SmolLM2's and Qwen's; with `bos`, it opens every text
    with <s> (id 1), as Llama's, Mistral's and Gemma's do (a TemplateProcessing post-processor,
    saved in tokenizer.json, so `tokenizer(text)` adds it and `add_special_tokens=False` does not).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    vocab["\n"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _save(model, path: Path, bos: bool = False) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    make_char_tokenizer(bos).save_pretrained(path)
    return path


def use_bos_tokenizer(path: Path) -> Path:
    """Replace the tokenizer of a tiny model directory (e.g. from make_tiny_arch) by the BOS-adding one."""
    make_char_tokenizer(bos=True).save_pretrained(Path(path))
    return Path(path)


def make_tiny_llama(path: Path, seed: int = 0, bos: bool = False) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    return _save(LlamaForCausalLM(config).eval(), Path(path), bos)


def make_tiny_gpt2(path: Path, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256,
        bos_token_id=1, eos_token_id=2,
    )
    return _save(GPT2LMHeadModel(config).eval(), Path(path))


def make_tiny_bert(path: Path, seed: int = 0) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=256, pad_token_id=3,
    )
    return _save(BertModel(config).eval(), Path(path))


TEXT = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n"
    "And by opposing end them. To die: to sleep;\n"
) * 40


def write_text(path: Path, text: str = TEXT) -> Path:
    path = Path(path)
    path.write_text(text)
    return path


def perturbed_copy(base: Path, out: Path, seed: int, scale: float = 0.05) -> Path:
    """A 'fine-tuned' copy of a tiny model: every tensor plus seeded noise (merge inputs)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return _save(model, Path(out))


def make_lora_adapter(base: Path, out: Path, seed: int):
    """A PEFT LoRA adapter on `base` (q_proj, up_proj; B randomised so it changes the model), saved to
    `out`; PEFT records `base` as base_model_name_or_path. Returns the PeftModel."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(out)
    return model
