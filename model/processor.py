"""Prompt building exactly as CogVLM does it (COGVLM.md sections 3, 4 and 7).

Sequence = [BOS] + [PAD] * num_image_tokens + tokenize(template(history, query)), with token
types 0 (language) / 1 (vision) and CogVLM's position ids, plus the image as pixels.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.config import CogVLMConfig

LANGUAGE_TOKEN_TYPE = 0
VISION_TOKEN_TYPE = 1
TEMPLATES = ("chat", "vqa", "base")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000  # 8000 x 8000; a decompression bomb is refused before decoding


class PromptError(ValueError):
    """Input a user can fix: bad template, second image, unreadable or oversized image."""


@dataclass(frozen=True)
class Conversation:
    query: str
    history: tuple[tuple[str, str], ...] = ()  # past (question, answer) turns
    image: Image.Image | None = None
    system: str = ""  # system prompt text, put before everything else (see prompt_text)


@dataclass
class PromptInputs:
    input_ids: list[int]
    token_type_ids: list[int]
    position_ids: list[int]
    pixels: torch.Tensor | None = None  # [3, S, S] float32, CLIP-normalised
    image_slots: list[int] = field(default_factory=list)  # rows of input_ids that hold image features
    image_hash: str | None = None  # content hash of the pixels: the key of prefix and encoder caches

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


def prompt_text(query: str, history: tuple[tuple[str, str], ...], template: str, system: str = "") -> str:
    """CogVLM's templates. CogVLM has no system role: a system prompt becomes the first line
    of the text, before the history, so `base` keeps it too."""
    if template not in TEMPLATES:
        raise PromptError(f"template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    prefix = f"{system}\n" if system else ""
    if template == "base":
        return prefix + query  # base ignores history
    answer = "Answer:" if template == "chat" else "Short answer:"
    past = "".join(f"Question: {q} {answer} {a}\n" for q, a in history)
    return f"{prefix}{past}Question: {query} {answer}"


def position_ids_for(token_type_ids: list[int]) -> list[int]:
    """The reference rule: boi and eoi count as language; a position is consumed by every
    language token and by the first vision token after language. BOS, boi, P1..PN, eoi, t1
    get 0, 1, 2..2, 3, 4: an image uses 3 positions whatever its length."""
    types = list(token_type_ids)
    n = len(types)
    effective = types[:]
    for i in range(n):
        if types[i] != VISION_TOKEN_TYPE:
            continue
        is_first = i == 0 or types[i - 1] == LANGUAGE_TOKEN_TYPE
        is_last = i == n - 1 or types[i + 1] == LANGUAGE_TOKEN_TYPE
        if is_first or is_last:
            effective[i] = LANGUAGE_TOKEN_TYPE
    positions = [0] * n
    for i in range(1, n):
        step = effective[i] == LANGUAGE_TOKEN_TYPE or effective[i - 1] == LANGUAGE_TOKEN_TYPE
        positions[i] = positions[i - 1] + int(step)
    return positions


def vision_expert_mask(token_type_ids: list[int]) -> list[bool]:
    """Routing is shifted by one: a token uses the vision expert iff it and the NEXT token of
    the same sequence are vision. So boi and patches -> vision, eoi -> language, last -> language."""
    types, n = token_type_ids, len(token_type_ids)
    return [i + 1 < n and types[i] == VISION_TOKEN_TYPE and types[i + 1] == VISION_TOKEN_TYPE for i in range(n)]


def open_image(data: bytes | str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Any Pillow-readable image; the pixel cap is checked from the header, before decoding."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        image = Image.open(source)
    except Image.DecompressionBombError as err:  # Pillow's own cap (179 M pixels) is checked on open
        raise PromptError(f"image exceeds the cap of {max_pixels} pixels ({err})") from err
    except Image.UnidentifiedImageError as err:
        raise PromptError("cannot read image: not a format Pillow reads (PNG, JPEG, GIF, WebP, BMP, ...)") from err
    except OSError as err:
        raise PromptError(f"cannot read image: {err}") from err
    width, height = image.size
    if width * height > max_pixels:
        raise PromptError(f"image of {width}x{height} pixels exceeds the cap of {max_pixels} pixels")
    try:
        image.load()
    # NOTE: broad on purpose: Pillow's decoders raise OSError, ValueError, SyntaxError or struct.error
    # on malformed input, and any of them here is a bad image, never a server error
    except Exception as err:  # noqa: BLE001
        raise PromptError(f"cannot decode image: {err}") from err
    return image


def preprocess_image(image: Image.Image, size: int) -> torch.Tensor:  # -> [3, size, size] float32
    """RGB; bicubic resize straight to size x size (aspect ratio not kept); CLIP normalisation."""
    rgb = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(rgb, dtype=np.float32) / 255.0  # [S, S, 3]
    array = (array - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


class Processor:
    """Tokenizer + templates + image preprocessing for one checkpoint."""

    def __init__(self, tokenizer, cfg: CogVLMConfig):
        self.tokenizer = tokenizer
        self.cfg = cfg

    def build(self, conversation: Conversation, template: str | None = None) -> PromptInputs:
        template = template or self.cfg.template_version
        text = prompt_text(conversation.query, conversation.history, template, conversation.system)
        text_ids = self.tokenizer.encode(text, add_special_tokens=False)
        num_image = self.cfg.num_image_tokens if conversation.image is not None else 0
        input_ids = [self.cfg.bos_token_id] + [self.cfg.pad_token_id] * num_image + list(text_ids)
        token_types = [LANGUAGE_TOKEN_TYPE] + [VISION_TOKEN_TYPE] * num_image + [LANGUAGE_TOKEN_TYPE] * len(text_ids)
        pixels = image_hash = None
        if conversation.image is not None:
            pixels = preprocess_image(conversation.image, self.cfg.vision.image_size)
            image_hash = hashlib.sha256(pixels.numpy().tobytes()).hexdigest()
        return PromptInputs(
            input_ids=input_ids,
            token_type_ids=token_types,
            position_ids=position_ids_for(token_types),
            pixels=pixels,
            image_slots=list(range(1, 1 + num_image)),
            image_hash=image_hash,
        )

    def build_text(self, text: str, add_bos: bool = True) -> PromptInputs:
        """A raw text prompt (the completions API): no template, no image; BOS first unless asked
        not to, as a tokenizer's add_special_tokens does."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return self.build_token_ids(([self.cfg.bos_token_id] if add_bos else []) + list(ids))

    def build_token_ids(self, input_ids: list[int]) -> PromptInputs:
        """Token ids taken as they are (no BOS added), every one a language token."""
        outside = [t for t in input_ids if not 0 <= t < self.cfg.vocab_size]
        if outside:
            raise PromptError(f"token ids must be in [0, {self.cfg.vocab_size}), got {outside[:5]}")
        types = [LANGUAGE_TOKEN_TYPE] * len(input_ids)
        return PromptInputs(input_ids=list(input_ids), token_type_ids=types, position_ids=position_ids_for(types))

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def word_token_ids(self, word: str) -> list[tuple[int, ...]]:
        """The token sequences a word takes in generated text, as vLLM's bad_words tokenizes it:
        on its own and after a space (Llama-3's BPE: "red" and "Ġred"; sentencepiece adds its
        "▁" to both, one form). No form for a word that is only spaces."""
        if not word.strip():
            return []
        forms = [tuple(self.tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False)) for prefix in ("", " ")]
        return [ids for ids in dict.fromkeys(forms) if ids]


def load_tokenizer(path: str | Path, vocab_size: int | None = None):
    """AutoTokenizer over the folder: vicuna's sentencepiece (CogVLM-17B, shipped separately)
    or Llama-3's tokenizer.json (CogVLM2, shipped in the checkpoint). With the model's vocab_size,
    a tokenizer that cannot belong to the model is refused."""
    from transformers import AutoTokenizer  # heavy import, only where a tokenizer is needed

    path = Path(path)
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if not any((path / name).is_file() for name in names):
        raise PromptError(
            f"{path}: no tokenizer files ({', '.join(names)}); CogVLM-17B ships none, pass "
            "--tokenizer with a vicuna-7b-v1.5 tokenizer folder"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if vocab_size is not None:
        size = len(tokenizer)
        # A folder with tokenizer_config.json but no tokenizer.model loads as a 3-token tokenizer that
        # encodes every prompt as BOS: silent nonsense. Past the vocabulary, ids index past the
        # embedding. The checkpoints' own tokenizers fill their vocabulary exactly (32000, 128256).
        if size > vocab_size or size < vocab_size // 2:
            raise PromptError(
                f"{path}: the tokenizer has {size} tokens but the model's vocabulary is {vocab_size}; "
                "a wrong or incomplete tokenizer folder (tokenizer.model or tokenizer.json missing?)"
            )
    return tokenizer
