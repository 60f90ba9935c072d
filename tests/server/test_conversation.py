import pytest
from PIL import Image

from model.processor import PromptError
from server.conversation import decode_data_uri, messages_to_conversation


def loader(url):
    return Image.new("RGB", (4, 4), url)


def test_turns_pair_into_history_and_last_user_message_is_the_query():
    conv = messages_to_conversation(
        [
            {"role": "system", "content": "S1"},
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2a"},
            {"role": "user", "content": [{"type": "text", "text": "q2b"}]},
            {"role": "assistant", "content": "a2"},
            {"role": "user", "content": "q3"},
        ],
        loader,
    )
    assert conv.history == (("q1", "a1"), ("q2a\nq2b", "a2"))
    assert conv.query == "q3" and conv.system == "S1" and conv.image is None


def test_image_from_an_earlier_message_is_kept():
    conv = messages_to_conversation(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "red"}},
                    {"type": "text", "text": "?"},
                ],
            },
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "sure?"},
        ],
        loader,
    )
    assert conv.image.getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize(
    "messages, words",
    [
        ([], "non-empty"),
        ([{"role": "assistant", "content": "x"}], "last message"),
        ([{"role": "tool", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "messages[0].content[0]"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
    ],
)
def test_bad_messages_name_the_field(messages, words):
    with pytest.raises(PromptError, match=words.replace("[", r"\[").replace("]", r"\]")):
        messages_to_conversation(messages, loader)


def test_data_uri_decoding():
    assert decode_data_uri("data:image/png;base64,aGVsbG8=") == b"hello"
    with pytest.raises(PromptError, match="base64"):
        decode_data_uri("data:image/png;base64,@@@")
    with pytest.raises(PromptError, match="data URI"):
        decode_data_uri("data:image/png,raw")
