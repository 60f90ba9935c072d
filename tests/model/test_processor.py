import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import CogVLMConfig
from model.processor import (
    CLIP_MEAN,
    CLIP_STD,
    Conversation,
    Processor,
    PromptError,
    load_tokenizer,
    open_image,
    position_ids_for,
    preprocess_image,
    prompt_text,
    vision_expert_mask,
)


def test_expert_mask_is_shifted_by_one():
    # BOS, boi, P1, P2, P3, eoi, t1, t2
    types = [0, 1, 1, 1, 1, 1, 0, 0]
    assert vision_expert_mask(types) == [False, True, True, True, True, False, False, False]


def test_expert_mask_last_position_is_language_even_inside_an_image():
    # a prefill chunk that ends inside the image: without the next token the rule says language
    assert vision_expert_mask([0, 1, 1, 1]) == [False, True, True, False]
    assert vision_expert_mask([]) == []
    assert vision_expert_mask([1]) == [False]


def test_position_ids_share_one_id_for_all_patches():
    types = [0] + [1] * 6 + [0] * 3  # BOS, boi, P1..P4, eoi, t1..t3
    assert position_ids_for(types) == [0, 1, 2, 2, 2, 2, 3, 4, 5, 6]


def test_position_ids_without_image_are_a_plain_range():
    assert position_ids_for([0] * 5) == [0, 1, 2, 3, 4]


def test_templates_with_history():
    history = (("What is it?", "A cat."), ("Colour?", "Black."))
    assert prompt_text("Where?", history, "chat") == (
        "Question: What is it? Answer: A cat.\nQuestion: Colour? Answer: Black.\nQuestion: Where? Answer:"
    )
    assert prompt_text("Where?", history, "vqa") == (
        "Question: What is it? Short answer: A cat.\nQuestion: Colour? Short answer: Black.\n"
        "Question: Where? Short answer:"
    )
    assert prompt_text("Where?", history, "base") == "Where?"  # base ignores history
    assert prompt_text("Hi", (), "chat") == "Question: Hi Answer:"  # no trailing space


def test_system_text_comes_first_in_every_template():
    assert prompt_text("Hi", (("a", "b"),), "chat", system="Be brief.") == (
        "Be brief.\nQuestion: a Answer: b\nQuestion: Hi Answer:"
    )
    assert prompt_text("Hi", (), "base", system="Be brief.") == "Be brief.\nHi"


def test_unknown_template_is_refused():
    with pytest.raises(PromptError, match="template"):
        prompt_text("Hi", (), "llama3")


def test_preprocessing_of_a_non_square_rgba_image():
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, size=(30, 50, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: the colour must be kept, not composited on white/black
    image = Image.fromarray(rgba, mode="RGBA")
    pixels = preprocess_image(image, 28)
    assert pixels.shape == (3, 28, 28) and pixels.dtype == torch.float32
    # bicubic straight to 28 x 28 (no crop, no pad), then CLIP normalisation
    resized = np.asarray(Image.fromarray(rgba[..., :3], mode="RGB").resize((28, 28), Image.BICUBIC))
    want = (resized / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(pixels.numpy(), want.transpose(2, 0, 1), atol=1e-5)


def test_pixel_cap_refuses_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    with pytest.raises(PromptError, match="300x200"):
        open_image(path, max_pixels=300 * 200 - 1)
    assert open_image(path, max_pixels=300 * 200).size == (300, 200)


def test_a_decompression_bomb_is_refused_from_its_header():
    """30000 x 30000 one-bit pixels in a 109 KB PNG: Pillow itself refuses it on open (past 179 M
    pixels), which once escaped as a 500."""
    bomb = io.BytesIO()
    Image.new("1", (30000, 30000)).save(bomb, "PNG")
    with pytest.raises(PromptError, match="exceeds the cap"):
        open_image(bomb.getvalue())


def test_unreadable_image_is_a_clear_error():
    with pytest.raises(PromptError, match="cannot read image: not a format") as err:
        open_image(b"not an image")
    assert "BytesIO" not in str(err.value)  # the message once showed '<_io.BytesIO object at 0x...>'
    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, "PNG")
    with pytest.raises(PromptError, match="cannot decode image"):
        open_image(png.getvalue()[:100])  # a truncated file: the header reads, the pixels do not


def test_build_places_image_after_bos(tiny_checkpoint):
    cfg = CogVLMConfig.from_checkpoint(tiny_checkpoint)
    processor = Processor(load_tokenizer(tiny_checkpoint), cfg)
    text_ids = processor.tokenizer.encode("Question: Hi Answer:", add_special_tokens=False)
    inputs = processor.build(Conversation(query="Hi", image=Image.new("RGB", (10, 20), "red")), "chat")
    n = cfg.num_image_tokens
    assert inputs.input_ids == [cfg.bos_token_id] + [cfg.pad_token_id] * n + text_ids
    assert inputs.token_type_ids == [0] + [1] * n + [0] * len(text_ids)
    assert inputs.position_ids[: n + 2] == [0, 1] + [2] * (n - 2) + [3, 4]
    assert inputs.image_slots == list(range(1, n + 1))
    assert inputs.pixels.shape == (3, cfg.vision.image_size, cfg.vision.image_size)
    text_only = processor.build(Conversation(query="Hi"), "chat")
    assert text_only.input_ids == [cfg.bos_token_id] + text_ids and text_only.pixels is None


def test_a_word_takes_its_forms_in_generated_text(tiny_checkpoints):
    """bad_words' tokenization, vLLM's: the word alone and after a space; sentencepiece writes both
    as "▁red" (one form), Llama-3's BPE as "red" and "Ġred"."""

    def forms(generation, word):
        folder = tiny_checkpoints[generation]
        processor = Processor(load_tokenizer(folder), CogVLMConfig.from_checkpoint(folder))
        return [processor.tokenizer.convert_ids_to_tokens(list(ids)) for ids in processor.word_token_ids(word)]

    assert forms(1, "red") == forms(1, "  red") == [["▁red"]]
    assert ["Ġred"] in forms(2, "red") and len(forms(2, "red")) == 2
    assert "".join(forms(2, "red")[0]) == "red"
    assert forms(1, " ") == forms(2, "") == []


def test_missing_tokenizer_names_the_folder(tmp_path):
    with pytest.raises(PromptError, match="--tokenizer"):
        load_tokenizer(tmp_path)


def test_a_tokenizer_that_cannot_be_the_models_is_refused(tmp_path, tiny_checkpoints):
    """tokenizer_config.json without tokenizer.model (CogVLM-17B's sentencepiece) once loaded as a
    3-token tokenizer that made every prompt BOS alone: `cogserve generate` printed nothing."""
    tiny_checkpoint = tiny_checkpoints[1]
    shutil.copy(Path(tiny_checkpoint) / "tokenizer_config.json", tmp_path)
    with pytest.raises(PromptError, match="3 tokens but the model's vocabulary is"):
        load_tokenizer(tmp_path, CogVLMConfig.from_checkpoint(tiny_checkpoint).vocab_size)
    vocab = len(load_tokenizer(tiny_checkpoint))
    load_tokenizer(tiny_checkpoint, vocab)  # its own model's
    with pytest.raises(PromptError, match="tokenizer has"):
        load_tokenizer(tiny_checkpoint, vocab - 1)  # ids past the embedding
