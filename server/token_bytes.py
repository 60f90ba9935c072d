"""Each vocabulary token's raw bytes, for the `bytes` field of OpenAI logprobs.

Concatenated, the bytes of a completion's tokens are its text in UTF-8: that is what the field is
for. Decoding one token alone cannot give them: sentencepiece drops a leading space ("▁a" decodes
to "a"), and a token holding part of a multi-byte character (byte fallback "<0xE6>", or
byte-level BPE's "æ") decodes to U+FFFD. So the bytes come from the token's piece in the
vocabulary, read the way each of CogVLM's two tokenizer families writes them:

- sentencepiece (CogVLM-17B's vicuna): "▁" is a space, "<0xE6>" is the byte 0xE6;
- byte-level BPE (CogVLM2's Llama-3): each character stands for one byte (GPT-2's byte map).

Special tokens (EOS) are not part of the text; their names are plain ASCII, so either reading gives
the bytes of the name.
"""

from __future__ import annotations

import re

from tokenizers.decoders import ByteLevel

try:  # transformers 5 keeps GPT-2's byte map here; 4.x in the GPT-2 tokenizer module
    from transformers.convert_slow_tokenizer import bytes_to_unicode
except ImportError:  # pragma: no cover
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenBytes:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.byte_level = backend is not None and isinstance(backend.decoder, ByteLevel)
        self.char_to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
        self.cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        data = self.cache.get(token_id)
        if data is None:
            data = self.cache[token_id] = self._bytes(token_id)
        return data

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:  # an id past the tokenizer's vocabulary (the model's may be padded)
            return b""
        if self.byte_level:
            if all(char in self.char_to_byte for char in piece):
                return bytes(self.char_to_byte[char] for char in piece)
            return piece.encode("utf-8")  # an added token written as plain text
        if match := _BYTE_PIECE.fullmatch(piece):
            return bytes([int(match.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")
