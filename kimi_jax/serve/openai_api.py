"""The OpenAI API's shapes: reading and checking request bodies into engine Requests, errors as OpenAI error
bodies, and the response and stream-chunk objects. No HTTP here (that is `server.py`).

Sampling fields: temperature (default 1), top_p, top_k (not OpenAI's; 0 or -1: off), max_completion_tokens or
max_tokens (default: up to the context limit), stop (a string or a list; a stop that names a special token,
such as "<|im_end|>", stops on that token), seed. `n` and `best_of` must be 1; fields that would change the
output in ways this server cannot honour (logprobs, echo, penalties, logit_bias, ...) are refused with 400
rather than silently ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

from kimi_jax.chat import ChatFormatError, render_chat
from kimi_jax.serve.engine import Request, RequestError
from kimi_jax.tokenizer import Tokenizer

MAX_STOPS = 16
# Fields that must keep their neutral value (the server cannot honour anything else).
UNSUPPORTED = {
    "logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,), "suffix": ("",), "logit_bias": ({},),
    "presence_penalty": (0,), "frequency_penalty": (0,), "best_of": (1,), "response_format": ({"type": "text"},),
}


class APIError(Exception):
    """An error answered with an OpenAI error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


_ERROR_TYPES = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error",
                500: "server_error", 503: "server_error"}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------------- requests

def read_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def check_model(body: Mapping[str, Any], served: str) -> None:
    model = body.get("model", served)
    if not isinstance(model, str):
        raise APIError(400, f"model: expected a string, got {_show(model)}", param="model")
    if model != served:
        raise APIError(404, f"The model {model!r} does not exist; this server serves {served!r}", param="model",
                       code="model_not_found")


def chat_prompt(body: Mapping[str, Any], tokenizer: Tokenizer) -> list[int]:
    """The rendered conversation (messages, tools, thinking on/off) as prompt ids."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, f"messages: expected a non-empty list of messages, got {_show(messages)}",
                       param="messages")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise APIError(400, f"tools: expected a list of tools, got {_show(tools)}", param="tools")
    if body.get("tool_choice") not in (None, "auto", "none"):
        raise APIError(400, f"tool_choice: only \"auto\" and \"none\" are supported, got {_show(body['tool_choice'])}",
                       param="tool_choice")
    if body.get("tool_choice") == "none":
        tools = None
    options = _template_options(body)
    try:
        return render_chat(messages, tokenizer, tools=tools or None, **options)
    except ChatFormatError as e:
        message = str(e)
        raise APIError(400, message, param="tools" if message.startswith("tools") else "messages") from None


def _template_options(body: Mapping[str, Any]) -> dict[str, bool]:
    """Thinking on or off: `chat_template_kwargs: {"thinking": bool}` (vLLM, SGLang) or Moonshot's
    `thinking: {"type": "enabled" | "disabled"}`; also `preserve_thinking` in chat_template_kwargs."""
    options: dict[str, bool] = {}
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise APIError(400, f"chat_template_kwargs: expected an object, got {_show(kwargs)}",
                       param="chat_template_kwargs")
    for name in ("thinking", "preserve_thinking"):
        if name in kwargs:
            if not isinstance(kwargs[name], bool):
                raise APIError(400, f"chat_template_kwargs.{name}: expected true or false, got {_show(kwargs[name])}",
                               param=f"chat_template_kwargs.{name}")
            options[name] = kwargs[name]
    thinking = body.get("thinking")
    if thinking is not None:
        kind = thinking.get("type") if isinstance(thinking, dict) else None
        if kind not in ("enabled", "disabled"):
            raise APIError(400, f"thinking: expected {{\"type\": \"enabled\" | \"disabled\"}}, got {_show(thinking)}",
                           param="thinking")
        options["thinking"] = kind == "enabled"
    return options


def completion_prompt(body: Mapping[str, Any], tokenizer: Tokenizer) -> list[int]:
    """`prompt`: a string (encoded as plain text: special-token names stay text) or a list of token ids;
    a list holding one of those is accepted too (one prompt per request)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise APIError(400, f"prompt: expected a string or a list of token ids (one prompt per request), got "
                        f"{_show(prompt)}", param="prompt")


def engine_request(body: Mapping[str, Any], prompt: list[int], tokenizer: Tokenizer, *, max_context: int,
                   prompt_param: str) -> Request:
    """The engine Request for a prompt and the body's sampling fields (checked here where the engine would
    not name the field the client sent)."""
    for name, neutral in UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in neutral:
            raise APIError(400, f"{name}: not supported by this server (got {_show(body[name])})", param=name)
    if _number(body, "n", 1, integer=True) != 1:
        raise APIError(400, f"n: only n=1 is supported, got {body['n']}", param="n")
    if len(prompt) >= max_context:
        raise APIError(400, f"{prompt_param}: the prompt is {len(prompt)} tokens, but this server's context limit is "
                            f"{max_context} tokens (prompt and completion together)", param=prompt_param,
                       code="context_length_exceeded")
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, max_name, None, integer=True)
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"{max_name}: must be >= 1, got {max_tokens}", param=max_name)
    top_k = _number(body, "top_k", 0, integer=True)
    seed = _number(body, "seed", None, integer=True)
    stop_ids, stop_strings = _stops(body.get("stop"), tokenizer)
    return Request(tuple(prompt), max_tokens=max_tokens,
                   temperature=float(_number(body, "temperature", 1.0)),
                   top_k=min(0 if top_k == -1 else top_k, tokenizer.vocab_size),
                   top_p=float(_number(body, "top_p", 1.0)),
                   seed=None if seed is None else seed % 2**32,
                   stop_ids=tuple(dict.fromkeys((*tokenizer.stop_ids, *stop_ids))),
                   stop_strings=stop_strings)


def _stops(stop, tokenizer: Tokenizer) -> tuple[tuple[int, ...], tuple[str, ...]]:
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, f"stop: expected a non-empty string or a list of up to {MAX_STOPS} of them, got "
                            f"{_show(stop)}", param="stop")
    ids = tuple(tokenizer.special_ids[s] for s in stops if s in tokenizer.special_ids)
    return ids, tuple(s for s in stops if s not in tokenizer.special_ids)


def stream_options(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise APIError(400, f"stream: expected true or false, got {_show(stream)}", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, f"stream_options: expected an object, got {_show(options)}", param="stream_options")
    return bool(stream), bool(options.get("include_usage"))


def request_error(e: RequestError, prompt_param: str) -> APIError:
    """An engine RequestError ("field: what is wrong") as a 400 naming the client's field."""
    field = str(e).split(":", 1)[0]
    param = prompt_param if field == "prompt" else field
    return APIError(400, str(e) if field != "prompt" else f"{prompt_param}{str(e)[len(field):]}", param=param)


def _number(body: Mapping[str, Any], name: str, default, *, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise APIError(400, f"{name}: expected {'an integer' if integer else 'a number'}, got {_show(value)}",
                       param=name)
    return value


def _show(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(id: str, model: str, message: dict[str, Any], finish_reason: str,
                    usage_: dict[str, int]) -> dict[str, Any]:
    return {"id": id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage_}


def chat_chunk(id: str, model: str, created: int, delta: dict[str, Any] | None, finish_reason: str | None = None,
               usage_: dict[str, int] | None = None, include_usage: bool = False) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                         "logprobs": None}]
    chunk = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if include_usage:
        chunk["usage"] = usage_
    return chunk


def completion(id: str, model: str, text: str, finish_reason: str, usage_: dict[str, int]) -> dict[str, Any]:
    return {"id": id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage_}


def completion_chunk(id: str, model: str, created: int, text: str | None, finish_reason: str | None = None,
                     usage_: dict[str, int] | None = None, include_usage: bool = False) -> dict[str, Any]:
    choices = [] if text is None else [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]
    chunk = {"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if include_usage:
        chunk["usage"] = usage_
    return chunk


def model_list(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "kimi-jax"}]}
