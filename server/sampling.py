"""A request's sampling fields (OpenAI's and vLLM's) -> SamplingParams and its output constraint;
shared by chat and text completions. Every refusal is a 400 naming the field."""

from __future__ import annotations

import json

from model.generation_config import GenerationDefaults
from model.sampling_params import CONSTRAINT_KINDS, OutputConstraint, ParamError, SamplingParams
from server.errors import bad_request
from server.protocol import SamplingRequest

# structured output's request forms: vLLM's structured_outputs keys and its older guided_* fields
CONSTRAINT_KEYS = ("json", "regex", "choice", "grammar", "json_object")
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def sampling_params(body: SamplingRequest, max_n: int, defaults: GenerationDefaults, *, logprobs: int | None,
                    max_tokens: int | None, max_tokens_field: str = "max_tokens") -> SamplingParams:  # fmt: skip
    """The request's sampling; a field it leaves unset takes the checkpoint's default (`defaults`,
    model/generation_config.py) and then OpenAI's. `logprobs` (top K per sampled token, or None)
    and `max_tokens` come from the endpoint's own fields, which differ between chat and
    completions. A default max_tokens is applied by Handler.check_request, which can cap it to
    the context left."""
    if not 1 <= body.n <= max_n:
        raise bad_request(f"n must be between 1 and {max_n}, got {body.n}", "n")
    if body.prompt_logprobs is not None and body.stream:  # vLLM's stream chunks have no place for them
        raise bad_request("prompt_logprobs is not supported with stream", "prompt_logprobs", "unsupported")
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options can only be set when stream is true", "stream_options")
    if body.use_beam_search:
        raise bad_request("use_beam_search is not supported by cogserve", "use_beam_search", "unsupported")
    if body.best_of is not None and body.best_of > body.n:
        raise bad_request(f"best_of ({body.best_of}) above n ({body.n}) is not supported by cogserve", "best_of",
                          "unsupported")  # fmt: skip
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    logit_bias = []
    for key, bias in (body.logit_bias or {}).items():
        if not (key.isascii() and key.isdigit()):  # also refuses "-1", "1.5" and "²"
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
        logit_bias.append((int(key), bias))
    try:
        return SamplingParams(
            n=body.n,
            temperature=first_set(body.temperature, defaults.temperature, 1.0),
            top_p=first_set(body.top_p, defaults.top_p, 1.0),
            top_k=first_set(body.top_k, defaults.top_k, 0),
            min_p=first_set(body.min_p, defaults.min_p, 0.0),
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=first_set(body.repetition_penalty, defaults.repetition_penalty, 1.0),
            seed=body.seed,
            max_tokens=max_tokens,
            min_tokens=body.min_tokens,
            stop=stop,
            include_stop_str_in_output=body.include_stop_str_in_output,
            skip_special_tokens=body.skip_special_tokens,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=body.prompt_logprobs,
            logit_bias=tuple(logit_bias),
            allowed_token_ids=None if body.allowed_token_ids is None else tuple(body.allowed_token_ids),
        )
    except ParamError as err:
        raise bad_request(str(err), max_tokens_field if err.field == "max_tokens" else err.field) from err


def output_constraint(body: SamplingRequest) -> OutputConstraint | None:
    """Structured output, from whichever one of its request forms is set: OpenAI's response_format
    (json_object, json_schema), vLLM's structured_outputs, or vLLM's older guided_* fields."""
    found: list[OutputConstraint] = []
    if body.response_format is not None:
        kind = body.response_format.get("type", "text")
        if kind == "json_object":
            found.append(OutputConstraint("json_object", "", "response_format"))
        elif kind == "json_schema":
            spec = body.response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict | bool):
                raise bad_request("response_format of type json_schema needs json_schema.schema, a JSON schema "
                                  "object", "response_format")  # fmt: skip
            found.append(_constraint("json", schema, "response_format"))
        elif kind != "text":
            raise bad_request(f"response_format type must be text, json_object or json_schema, got {kind!r}",
                              "response_format")  # fmt: skip
    for name, kind in GUIDED_FIELDS.items():
        if (value := getattr(body, name)) is not None:
            found.append(_constraint(kind, value, name))
    if body.structured_outputs is not None:
        spec = body.structured_outputs
        keys = [k for k in CONSTRAINT_KEYS if isinstance(spec, dict) and spec.get(k) not in (None, False)]
        if not isinstance(spec, dict) or len(keys) != 1:
            raise bad_request(f"structured_outputs must set exactly one of {', '.join(CONSTRAINT_KEYS)}",
                              "structured_outputs")  # fmt: skip
        found.append(_constraint(keys[0], spec[keys[0]], "structured_outputs"))
    if len(found) > 1:
        raise bad_request(f"only one structured output may be asked for; got {found[0].field} and {found[1].field}",
                          found[1].field)  # fmt: skip
    return found[0] if found else None


def _constraint(kind: str, value, name: str) -> OutputConstraint:
    if kind == "json" and isinstance(value, dict | bool):
        value = json.dumps(value)
    elif kind == "json_object":
        value = ""
    elif kind == "choice":
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise bad_request(f"{name} must be a list of strings", name)
        value = tuple(value)
    elif not isinstance(value, str):
        raise bad_request(f"{name} must be {CONSTRAINT_KINDS[kind]}", name)
    return OutputConstraint(kind, value, name)  # validated with the SamplingParams it joins


def first_set(*values):
    return next(v for v in values if v is not None)
