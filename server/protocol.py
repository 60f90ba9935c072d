"""The HTTP request surface (pydantic: at this boundary only). Responses are built as plain
dicts in openai_format.py: cheaper per streamed token than model serialisation."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ImageURL(BaseModel):
    url: str
    detail: str | None = None  # accepted and ignored: CogVLM sees one fixed resolution


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk carries the usage so far


class SamplingRequest(BaseModel):
    """The fields chat and text completions share: the model, sampling, stops, structured output."""

    model_config = ConfigDict(extra="ignore")  # unknown fields are ignored, as vLLM does

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's logprob and the K best there
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None  # token id (a string, as JSON keys are) -> bias
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    stop_token_ids: list[int] | None = None
    return_tokens_as_token_ids: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # False: special tokens (<s>, ...) the model writes appear in the text
    truncate_prompt_tokens: int | None = None  # chat: only where it cuts nothing; completions: keeps the last N
    # structured outputs (server/grammars.py), checked by sampling.output_constraint: OpenAI's
    # response_format, vLLM's structured_outputs and its older guided_* names
    response_format: dict | None = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    # refused explicitly rather than silently ignored: each would change what comes back
    use_beam_search: bool = False
    best_of: int | None = None  # up to n: the same as n; more: sampling best_of and keeping n


class ChatCompletionRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # CogVLM's prompt template; default: the checkpoint's template_version
    template: Literal["chat", "vqa", "base"] | None = None
    # refused explicitly rather than silently ignored: each would change what comes back
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    echo: bool = False  # vLLM's chat echo repeats an assistant-last message, which the templates refuse
    chat_template: str | None = None  # vLLM's Jinja templates: CogVLM's prompts are `template`'s
    chat_template_kwargs: dict | None = None
    add_generation_prompt: bool = True  # False: the prompt would stop before "Answer:"
    continue_final_message: bool = False  # True: the last assistant message would be continued


class CompletionRequest(SamplingRequest):
    """POST /v1/completions: text in, text out, no template and no image (vLLM's shape: a prompt is
    a string or token ids, or a list of either for one completion set each)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's completions default (chat's is "the context left")
    logprobs: int | None = None  # the legacy API's: the sampled token's logprob and the K best
    echo: bool = False  # the prompt before the completion (its logprobs too, with logprobs)
    add_special_tokens: bool = True  # vLLM's: False leaves BOS off a text prompt
    suffix: str | None = None  # insertion: refused (CogVLM has no fill-in-the-middle)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    # one of: a chat's messages (with its template), or a completions prompt (vLLM's two forms)
    messages: list[Message] | None = Field(default=None, min_length=1)
    template: Literal["chat", "vqa", "base"] | None = None
    prompt: str | None = None
    add_special_tokens: bool = True
