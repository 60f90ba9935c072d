import random

import pytest

from model.processor import load_tokenizer
from server.detokenizer import IncrementalDetokenizer

TEXTS = ["a red circle and a blue square", "Grüße, 日本語 😀 text!", "  two  spaces\nnew line", "[[120,340,560,780]]"]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


def stream(tokenizer, ids, stop=(), min_tokens=0, keep_stop=False):
    detok = IncrementalDetokenizer(tokenizer, stop, min_tokens, keep_stop)
    deltas = []
    for token in ids:
        detok.add([token])
        deltas.append(detok.take_delta(finished=False))
        if detok.stopped:
            break
    detok.flush()
    deltas.append(detok.take_delta(finished=True))
    return deltas, detok


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_a_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas, _ = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in d for d in deltas)  # no half characters (byte fallback, byte-level BPE)


def test_random_texts_stream_exactly(tokenizer):
    """Random valid text (spaces, accents, CJK, emoji: multi-token characters under byte
    fallback): the stream equals the full decode. (Invalid byte soups may differ, as in vLLM.)"""
    rng = random.Random(0)
    alphabet = list("ab cde  ,.!?\n") + ["é", "ß", "日", "本", "😀", "🚀", "Ω", "red", " circle", "[[1"]
    for _ in range(40):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30)))
        ids = tokenizer.encode(text, add_special_tokens=False)
        deltas, _ = stream(tokenizer, ids)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
        assert not any("\ufffd" in d for d in deltas)


def test_stop_string_across_token_boundaries_is_cut_and_never_streamed(tokenizer):
    text = "a red circle and a blue square"
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas, detok = stream(tokenizer, ids, stop=("circle and",))
    assert detok.stopped
    assert "".join(deltas) == "a red "
    assert not any("circ" in d for d in deltas)
    kept, _ = stream(tokenizer, ids, stop=("circle and",), keep_stop=True)  # include_stop_str_in_output
    assert "".join(kept) == "a red circle and"


def test_hold_back_releases_text_that_turned_out_not_to_be_a_stop(tokenizer):
    ids = tokenizer.encode("a red circle", add_special_tokens=False)
    deltas, detok = stream(tokenizer, ids, stop=("red square",))
    assert not detok.stopped and "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


def test_no_stop_string_ends_the_text_before_min_tokens(tokenizer):
    """As vLLM: a stop string completed within the first min_tokens tokens stays in the text; the
    first one completed after them cuts it. It once stopped at the first token with min_tokens 5."""
    text = "a red circle and a red square"
    ids = tokenizer.encode(text, add_special_tokens=False)
    first_red = next(n for n in range(1, len(ids) + 1) if "red" in tokenizer.decode(ids[:n]))
    deltas, detok = stream(tokenizer, ids, stop=("red",), min_tokens=first_red + 1)
    assert detok.stopped and "".join(deltas) == "a red circle and a "
    _, early = stream(tokenizer, ids, stop=("red",), min_tokens=first_red)  # reached with the first "red"
    assert early.text == "a "


def test_special_tokens_leave_no_text_unless_asked(tokenizer):
    ids = tokenizer.encode("a red circle", add_special_tokens=False)
    bos = tokenizer.bos_token_id
    with_specials = [bos, *ids, bos]
    assert "".join(stream(tokenizer, with_specials)[0]) == tokenizer.decode(ids)  # vLLM's default: skipped
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    for token in with_specials:
        detok.add([token])
    detok.flush()
    text = detok.take_delta(finished=True)
    assert text == tokenizer.decode(with_specials, skip_special_tokens=False)
    assert text.startswith(tokenizer.bos_token) and text.endswith(tokenizer.bos_token)
