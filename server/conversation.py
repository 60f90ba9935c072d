"""OpenAI-style messages -> one CogVLM conversation (history, query, system text, one image).

Rules: system messages (and developer messages, OpenAI's newer name for them) are joined and
kept as the prompt's first line; user/assistant turns pair up into history; consecutive
messages of one role are joined with newlines; the last message must be the user's; at most
one image in the whole conversation, wherever it was sent (CogVLM puts it right after BOS
either way).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from PIL import Image

from model.processor import Conversation, PromptError, open_image

ImageLoader = Callable[[str], Image.Image]


def messages_to_conversation(messages: list[dict], load_image: ImageLoader) -> Conversation:
    conversation, image_url = parse_messages(messages)
    return replace(conversation, image=load_image(image_url)) if image_url else conversation


def parse_messages(messages: list[dict]) -> tuple[Conversation, str | None]:
    """The conversation without its image, and the image's URL (None for a text-only chat)."""
    if not isinstance(messages, list) or not messages:
        raise PromptError("messages must be a non-empty list")
    system: list[str] = []
    turns: list[tuple[str, list[str]]] = []  # (role, texts), consecutive roles merged
    image_urls: list[str] = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise PromptError(f"messages[{i}].role must be system, developer, user or assistant, got {role!r}")
        texts = _message_texts(message.get("content"), f"messages[{i}].content", image_urls)
        if role in ("system", "developer"):
            system.extend(texts)
        elif turns and turns[-1][0] == role:
            turns[-1][1].extend(texts)
        else:
            turns.append((role, list(texts)))
    if not turns or turns[-1][0] != "user":
        raise PromptError("the last message must have role 'user'")
    if len(image_urls) > 1:
        raise PromptError(f"at most one image per conversation (CogVLM was trained that way), got {len(image_urls)}")
    history, question = [], None
    for role, texts in turns[:-1]:
        if role == "user":
            question = "\n".join(texts)
        else:
            history.append((question or "", "\n".join(texts)))
            question = None
    if question is not None:  # a user turn with no answer before the last one
        history.append((question, ""))
    conversation = Conversation(query="\n".join(turns[-1][1]), history=tuple(history), system="\n".join(system))
    return conversation, (image_urls[0] if image_urls else None)


def _message_texts(content, where: str, image_urls: list[str]) -> list[str]:
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise PromptError(f"{where} must be a string or a list of parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and isinstance(part.get("image_url"), dict | str):
            url = part["image_url"]["url"] if isinstance(part["image_url"], dict) else part["image_url"]
            image_urls.append(url)
        else:
            raise PromptError(f"{where}[{j}] must be a text part or an image_url part")
    return texts


def decode_data_uri(uri: str) -> bytes:
    """data:[<mediatype>][;base64],<data>; any format Pillow reads is accepted later."""
    header, sep, payload = uri.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise PromptError("image data URI must look like data:<mediatype>;base64,<data>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise PromptError(f"image data URI is not valid base64: {err}") from err


def local_image_loader(max_pixels: int) -> ImageLoader:
    """For the CLI: data: URIs and local file paths (file:// or plain)."""

    def load(url: str) -> Image.Image:
        if url.startswith("data:"):
            return open_image(decode_data_uri(url), max_pixels)
        path = Path(url.removeprefix("file://"))
        if not path.is_file():
            raise PromptError(f"image file not found: {path}")
        return open_image(path, max_pixels)

    return load
