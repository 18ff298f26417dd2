"""An offline byte-level tokenizer for the demo model and test checkpoints.

Real checkpoints ship their own tokenizer files; the demo model and the tiny
test checkpoints need one that can be built with no download.  This is a
byte-level BPE with no merges: every UTF-8 byte is one token, so any text
round-trips, plus a few special tokens and a small chat template.  It is built
with the `tokenizers` library and saved in the Hugging Face layout, so
mlx-lm's tokenizer loader reads it like any other checkpoint's.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, the format of the Qwen family: a plausible default for MoE demos.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_vocab_size() -> int:
    """Number of tokens of the byte tokenizer: 256 bytes plus the specials."""
    return 256 + len(SPECIAL_TOKENS)


def save_byte_tokenizer(path: str | Path) -> Path:
    """Write tokenizer.json / tokenizer_config.json for the byte tokenizer into `path`.

    Token ids: 0..255 are bytes (in the GPT-2 byte-to-unicode order), then
    <|endoftext|> (256, also EOS), <|im_start|> (257), <|im_end|> (258).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # A stable order: sort the 256 byte symbols by the byte they stand for.
    byte_to_symbol = _bytes_to_unicode()
    vocab = {byte_to_symbol[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable symbol table that byte-level BPE uses (GPT-2's scheme)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table
