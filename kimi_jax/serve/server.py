"""The OpenAI-compatible HTTP server over the serving Engine (Starlette, run with uvicorn).

Routes: POST /v1/chat/completions, POST /v1/completions (both streamed as server-sent events with
`"stream": true`), GET /v1/models, GET /health. With an API key every /v1 route needs
`Authorization: Bearer KEY`. Errors are OpenAI error bodies; a client that goes away cancels its request, and
the engine returns its pages at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from kimi_jax.serve import openai_api as api
from kimi_jax.serve.engine import Engine, QueueFull, Request, RequestError, RequestHandle
from kimi_jax.serve.openai_api import APIError
from kimi_jax.serve.reply import ReplyStream, read_reply

log = logging.getLogger(__name__)


def create_app(engine: Engine, *, model_name: str, api_key: str | None = None,
               manage_engine: bool = True) -> Starlette:
    """The ASGI app. With `manage_engine`, the app's lifespan starts the engine's scheduler thread and stops it
    at shutdown (an Engine cannot be started again after `stop()`)."""
    if engine.tokenizer is None:
        raise ValueError("the OpenAI server needs an Engine with a tokenizer (chat rendering, text prompts)")
    routes = _Routes(engine, model_name, api_key)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                engine.stop()

    return Starlette(
        routes=[Route("/health", routes.health, methods=["GET"]),
                Route("/v1/models", routes.models, methods=["GET"]),
                Route("/v1/chat/completions", routes.chat_completions, methods=["POST"]),
                Route("/v1/completions", routes.completions, methods=["POST"])],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
        lifespan=lifespan)


async def _http_error(request, exc: HTTPException) -> JSONResponse:
    code = "not_found" if exc.status_code == 404 else None
    return _error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code))


async def _server_error(request, exc: Exception) -> JSONResponse:
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return _error_response(APIError(500, f"internal server error: {type(exc).__name__}: {exc}"))


def _error_response(error: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events of one request; however the response ends (client gone, server stopping), the
    request is cancelled if it is still running."""

    def __init__(self, events: AsyncIterator[str], handle: RequestHandle):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.handle = handle

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.handle.done:
                self.handle.cancel()


class _Routes:
    def __init__(self, engine: Engine, model_name: str, api_key: str | None):
        self.engine, self.tokenizer, self.model_name, self.api_key = engine, engine.tokenizer, model_name, api_key
        self.created = int(time.time())

    # ------------------------------------------------------------------------------------------------ routes

    async def health(self, request: HTTPRequest) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": self.model_name, "running": self.engine.active,
                             "waiting": self.engine.waiting})

    async def models(self, request: HTTPRequest) -> JSONResponse:
        try:
            self._authorize(request)
        except APIError as e:
            return _error_response(e)
        return JSONResponse(api.model_list(self.model_name, self.created))

    async def chat_completions(self, request: HTTPRequest):
        return await self._serve(request, api.chat_prompt, "messages", "chatcmpl", self._chat_events,
                                 self._chat_response)

    async def completions(self, request: HTTPRequest):
        return await self._serve(request, api.completion_prompt, "prompt", "cmpl", self._completion_events,
                                 self._completion_response)

    async def _serve(self, request: HTTPRequest, make_prompt, prompt_param: str, id_kind: str, events, respond):
        """The shared route: read and check the body, render the prompt, submit; then stream `events` or
        collect the whole reply for `respond`. Every failure is an OpenAI error body."""
        try:
            body = await self._body(request)
            prompt = make_prompt(body, self.tokenizer)
            handle, stream, include_usage = self._submit(body, prompt, prompt_param)
        except APIError as e:
            return _error_response(e)
        id_ = api.new_id(id_kind)
        if stream:
            return _EventStream(events(handle, id_, include_usage), handle)
        try:
            ids, text, finish = await self._collect(handle, request)
        except APIError as e:
            return _error_response(e)
        return respond(id_, prompt, handle, ids, text, finish)

    def _chat_response(self, id_, prompt, handle, ids, text, finish) -> JSONResponse:
        reply = read_reply(prompt, ids, text, self.tokenizer, handle.request.stop_ids)
        if reply.parse_error:
            log.warning("%s: the reply does not follow the chat format (%s); sent as raw text", id_, reply.parse_error)
        message: dict[str, Any] = {"role": "assistant", "content": reply.content,
                                   "reasoning_content": reply.reasoning}
        if reply.tool_calls:
            message["tool_calls"] = reply.tool_calls
            finish = "tool_calls" if finish == "stop" else finish
        return JSONResponse(api.chat_completion(id_, self.model_name, message, finish,
                                                api.usage(len(prompt), len(ids))))

    def _completion_response(self, id_, prompt, handle, ids, text, finish) -> JSONResponse:
        return JSONResponse(api.completion(id_, self.model_name, text, finish, api.usage(len(prompt), len(ids))))

    # ------------------------------------------------------------------------------------------------ helpers

    def _authorize(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def _body(self, request: HTTPRequest) -> dict[str, Any]:
        self._authorize(request)
        body = api.read_body(await request.body())
        api.check_model(body, self.model_name)
        return body

    def _submit(self, body, prompt: list[int], prompt_param: str) -> tuple[RequestHandle, bool, bool]:
        stream, include_usage = api.stream_options(body)
        request: Request = api.engine_request(body, prompt, self.tokenizer, max_context=self.engine.config.max_context,
                                              prompt_param=prompt_param)
        try:
            handle = self.engine.submit(request, loop=asyncio.get_running_loop())
        except RequestError as e:
            raise api.request_error(e, prompt_param) from None
        except QueueFull as e:
            raise APIError(429, f"the server is busy ({e}); retry later", code="rate_limit_exceeded") from None
        return handle, stream, include_usage

    async def _collect(self, handle: RequestHandle, request: HTTPRequest) -> tuple[list[int], str, str]:
        """(ids, text, finish reason) of a whole request; cancelled if the client disconnects meanwhile."""
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request, handle))
        ids: list[int] = []
        text: list[str] = []
        try:
            async for event in handle.stream():
                ids += event.token_ids
                text.append(event.text)
                if event.finish_reason is not None:
                    if (error := _failure(event)) is not None:
                        raise error
                    return ids, "".join(text), event.finish_reason
        finally:
            watcher.cancel()
            if not handle.done:
                handle.cancel()
        raise APIError(500, "the request ended without a finish reason")

    async def _chat_events(self, handle: RequestHandle, id_: str, include_usage: bool) -> AsyncIterator[str]:
        created, prompt = int(time.time()), handle.request.prompt
        reply = ReplyStream(prompt, self.tokenizer, handle.request.stop_ids)

        def chunk(delta, finish=None):
            return _sse(api.chat_chunk(id_, self.model_name, created, delta, finish, include_usage=include_usage))

        yield chunk({"role": "assistant", "content": ""})
        generated = 0
        async for event in handle.stream():
            generated += len(event.token_ids)
            if (error := _failure(event)) is not None:
                yield _sse(error.body())
                break
            for delta in reply.feed(event.token_ids, event.text):
                yield chunk(delta)
            if event.finish_reason is not None:
                for delta in reply.finish():
                    yield chunk(delta)
                finish = "tool_calls" if reply.tool_calls and event.finish_reason == "stop" else event.finish_reason
                yield chunk({}, finish)
                if include_usage:
                    yield _sse(api.chat_chunk(id_, self.model_name, created, None,
                                              usage_=api.usage(len(prompt), generated), include_usage=True))
        yield _sse("[DONE]")

    async def _completion_events(self, handle: RequestHandle, id_: str, include_usage: bool) -> AsyncIterator[str]:
        created, prompt = int(time.time()), handle.request.prompt
        generated = 0
        async for event in handle.stream():
            generated += len(event.token_ids)
            if (error := _failure(event)) is not None:
                yield _sse(error.body())
                break
            if event.text or event.finish_reason is not None:
                yield _sse(api.completion_chunk(id_, self.model_name, created, event.text, event.finish_reason,
                                                include_usage=include_usage))
            if event.finish_reason is not None and include_usage:
                yield _sse(api.completion_chunk(id_, self.model_name, created, None,
                                                usage_=api.usage(len(prompt), generated), include_usage=True))
        yield _sse("[DONE]")


async def _cancel_on_disconnect(request: HTTPRequest, handle: RequestHandle) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    handle.cancel()


def _failure(event) -> APIError | None:
    """The error to answer for a request that ended without a completion."""
    if event.finish_reason == "error":
        return APIError(500, f"generation failed: {event.error}")
    if event.finish_reason == "cancelled":
        return APIError(503, "the request was cancelled (the server is shutting down)")
    return None


def serve(engine: Engine, *, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, log_level: str = "info") -> None:
    """Serves until interrupted (Ctrl-C): starts the engine, runs uvicorn, stops the engine."""
    import uvicorn

    uvicorn.run(create_app(engine, model_name=model_name, api_key=api_key), host=host, port=port,
                log_level=log_level, timeout_graceful_shutdown=10)
