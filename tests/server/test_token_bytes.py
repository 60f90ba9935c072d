from model.processor import load_tokenizer
from server.token_bytes import TokenBytes

TEXT = "a purple ünï 日本, ok"


def test_the_bytes_of_a_texts_tokens_are_the_text(tiny_checkpoint):
    """One-token decode gives "a" for "▁a" and U+FFFD for each byte of "日"; the pieces give the bytes.
    Both tokenizer families: sentencepiece with byte fallback (gen 1), byte-level BPE (gen 2)."""
    tokenizer = load_tokenizer(tiny_checkpoint)
    token_bytes = TokenBytes(tokenizer)
    ids = tokenizer.encode(" " + TEXT, add_special_tokens=False)
    assert any(tokenizer.decode([i]) == "\ufffd" for i in ids)  # some token holds part of a character
    joined = b"".join(token_bytes(i) for i in ids)
    assert joined == (" " + TEXT).encode("utf-8")
    assert any(len(token_bytes(i)) == 1 and token_bytes(i)[0] >= 0x80 for i in ids)


def test_special_tokens_keep_their_names(tiny_checkpoint):
    tokenizer = load_tokenizer(tiny_checkpoint)
    eos = tokenizer.eos_token_id
    assert TokenBytes(tokenizer)(eos) == tokenizer.convert_ids_to_tokens(eos).encode("utf-8")
