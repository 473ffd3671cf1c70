"""A checkpoint folder without weights, for `LLM(..., load_format="dummy")`: config.json plus a byte-level
tokenizer in which one UTF-8 byte is one token, so a prompt of an exact token count is easy to make.

    write_dummy_checkpoint(folder, {"model_type": "llama", "hidden_size": 64, ...})
    LLM(folder, load_format="dummy")  # random weights of that shape

Token ids: 0-255 the bytes, 256 `<|begin_of_text|>` (added in front of plain-text prompts), 257
`<|end_of_text|>`, and up to `vocab_size` filler tokens that input text never produces (the BPE model has
no merges) but that decode to words (" w1234"), so whatever a random model generates is visible text.
The chat template is plain text: `<|begin_of_text|>` then `<|role|>\\ncontent\\n` per message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
BOS_ID, EOS_ID = 256, 257
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte (what the ByteLevel pre-tokenizer maps bytes to)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    symbols: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def write_byte_tokenizer(folder: str | Path, vocab_size: int) -> None:
    """tokenizer.json and tokenizer_config.json (with the chat template), via transformers' own writer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if vocab_size < EOS_ID + 1:
        raise ValueError(f"vocab_size must be at least {EOS_ID + 1} (256 bytes, bos, eos), got {vocab_size}")
    space = byte_symbols()[ord(" ")]
    vocab = {s: i for i, s in enumerate(byte_symbols())}
    vocab[BOS], vocab[EOS] = BOS_ID, EOS_ID
    vocab.update({f"{space}w{i}": i for i in range(EOS_ID + 1, vocab_size)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BOS, special=True), AddedToken(EOS, special=True)])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, BOS_ID)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))


def write_dummy_checkpoint(folder: str | Path, config: dict[str, Any]) -> Path:
    """Write `config` (a Hugging Face config dict; bos/eos ids filled in) and the byte-level tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, **config}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    write_byte_tokenizer(folder, int(cfg["vocab_size"]))
    return folder
