"""HTTP surfaces of the generative models, mounted on the server's FastAPI app:

- V2 generate extension: POST /v2/models/{name}/generate and .../generate_stream (SSE);
- OpenAI-compatible: POST /v1/chat/completions, /v1/completions (`stream: true` is SSE ending
  with `data: [DONE]`), GET /v1/models;
- the verify call: POST /v2/models/{name}/verify;
- GET /v2/models/{name}/generation/stats: live sequences, sessions, decode steps.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tandem.cloud.server.errors import InvalidInputError, ModelUnavailableError
from tandem.errors import CloudServerError

from .engine import SHUTTING_DOWN, Done
from .service import GenerationService, GenerativeModel

FINISH = {"stop": "stop", "length": "length"}


def _status(exc: Exception) -> int:
    from tandem.cloud.server.http_api import http_status_of

    return http_status_of(exc)


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"request body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidInputError("request body must be a JSON object")
    return body


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def mount(app: FastAPI, service: GenerationService, draining: Callable[[], bool]) -> None:
    def openai_error(exc: Exception) -> JSONResponse:
        status = _status(exc)
        kind = "invalid_request_error" if status in (400, 404) else "server_error"
        if status == 429:
            kind = "rate_limit_error"
        return JSONResponse(
            {"error": {"message": str(exc), "type": kind, "code": status}}, status_code=status
        )

    def v2_error(exc: Exception) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=_status(exc))

    def check_serving() -> None:
        if draining():
            raise ModelUnavailableError(SHUTTING_DOWN)

    # --- V2 generate ---------------------------------------------------------------------------
    async def v2_start(name: str, request: Request) -> tuple[GenerativeModel, AsyncIterator[Any]]:
        check_serving()
        model = service.get(name)
        body = await _body(request)
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInputError("parameters must be an object")
        sampling = model.params({**params, **{k: body[k] for k in ("max_tokens",) if k in body}})
        ids = body.get("input_ids")
        if ids is not None:
            if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                raise InvalidInputError("input_ids must be a list of token ids")
            return model, model.generate(ids, sampling)
        return model, model.generate(model.encode(body.get("text_input")), sampling)

    async def v2_open(name: str, request: Request) -> AsyncIterator[Any]:
        try:
            return (await v2_start(name, request))[1]
        except CloudServerError as exc:
            service.rejected(name, "generate", exc)
            raise

    @app.post("/v2/models/{name}/generate")
    async def v2_generate(name: str, request: Request) -> Response:
        try:
            tokens = await v2_open(name, request)
            text, ids, reason = [], [], "length"
            async for item in tokens:
                if isinstance(item, Done):
                    reason = item.reason
                    break
                ids.append(item[0])
                text.append(item[1])
        except CloudServerError as exc:
            return v2_error(exc)
        return JSONResponse(
            {
                "model_name": name,
                "text_output": "".join(text),
                "token_ids": ids,
                "finish_reason": reason,
            }
        )

    @app.post("/v2/models/{name}/generate_stream")
    async def v2_generate_stream(name: str, request: Request) -> Response:
        try:
            tokens = await v2_open(name, request)
        except CloudServerError as exc:
            return v2_error(exc)

        async def events() -> AsyncIterator[str]:
            try:
                async for item in tokens:
                    if isinstance(item, Done):
                        yield _sse(
                            {"model_name": name, "text_output": "", "finish_reason": item.reason}
                        )
                        return
                    yield _sse({"model_name": name, "text_output": item[1], "token_id": item[0]})
            except CloudServerError as exc:
                yield _sse({"error": str(exc)})
            finally:
                await tokens.aclose()  # type: ignore[attr-defined]

        return StreamingResponse(events(), media_type="text/event-stream")

    # --- OpenAI-compatible ------------------------------------------------------------------------
    async def openai_call(request: Request, chat: bool) -> Response:
        body: dict[str, Any] = {}
        try:
            check_serving()
            body = await _body(request)
            model = service.default(body.get("model"))
            if chat:
                if "messages" not in body:
                    raise InvalidInputError("'messages' is required")
                prompt = model.encode_chat(body["messages"])
            else:
                raw = body.get("prompt")
                if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
                    raw = raw[0]
                prompt = model.encode(raw)
            if body.get("n", 1) != 1:
                raise InvalidInputError("only n=1 is served")
            sampling = model.params(body)
            tokens = model.generate(prompt, sampling, kind="openai")
        except CloudServerError as exc:
            named = body.get("model")
            if not named and len(service.models) == 1:
                named = next(iter(service.models))
            service.rejected(named if isinstance(named, str) else None, "openai", exc)
            return openai_error(exc)
        created = int(time.time())
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        name = model.config.name
        obj = "chat.completion" if chat else "text_completion"

        def choice(text: str, reason: str | None, first: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {"content": text}
                if first:
                    delta["role"] = "assistant"
                return {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            return {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}

        if body.get("stream"):

            async def events() -> AsyncIterator[str]:
                first = True
                try:
                    async for item in tokens:
                        head = {"id": ident, "created": created, "model": name}
                        head["object"] = obj + (".chunk" if chat else "")
                        if isinstance(item, Done):
                            yield _sse({**head, "choices": [choice("", FINISH[item.reason])]})
                            break
                        yield _sse({**head, "choices": [choice(item[1], None, first)]})
                        first = False
                except CloudServerError as exc:
                    yield _sse({"error": {"message": str(exc), "type": "server_error"}})
                finally:
                    await tokens.aclose()  # type: ignore[attr-defined]
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        parts: list[str] = []
        reason = "length"
        count = 0
        try:
            async for item in tokens:
                if isinstance(item, Done):
                    reason = item.reason
                    break
                parts.append(item[1])
                count += 1
        except CloudServerError as exc:
            return openai_error(exc)
        text = "".join(parts)
        if chat:
            result = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            result = {"index": 0, "text": text, "logprobs": None}
        result["finish_reason"] = FINISH[reason]
        usage = {
            "prompt_tokens": len(prompt),
            "completion_tokens": count,
            "total_tokens": len(prompt) + count,
        }
        return JSONResponse(
            {
                "id": ident,
                "object": obj,
                "created": created,
                "model": name,
                "choices": [result],
                "usage": usage,
            }
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await openai_call(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await openai_call(request, chat=False)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "created": 0, "owned_by": "tandem"}
                for n in sorted(service.models)
            ],
        }

    # --- verify and stats -----------------------------------------------------------------------
    @app.post("/v2/models/{name}/verify")
    async def verify(name: str, request: Request) -> Response:
        try:
            # no check_serving(): while draining, a live session may go on to its end (the
            # engine refuses new sessions)
            model = service.get(name)
            body = await _body(request)
            draft = body.get("draft_ids", [])
            prompt = body.get("prompt_ids", [])
            if not isinstance(draft, list) or not isinstance(prompt, list):
                raise InvalidInputError("draft_ids and prompt_ids must be lists of token ids")
            if not all(isinstance(t, int) for t in [*draft, *prompt]):
                raise InvalidInputError("token ids must be integers")
            result = await model.verify(
                str(body.get("sequence_id", "")),
                draft,
                start=bool(body.get("sequence_start", False)),
                prompt=prompt,
                end=bool(body.get("sequence_end", False)),
            )
        except CloudServerError as exc:
            service.rejected(name, "verify", exc)
            return v2_error(exc)
        return JSONResponse(
            {"accepted": result.accepted, "next_token": result.next_token, "length": result.length}
        )

    @app.get("/v2/models/{name}/generation/stats")
    async def stats(name: str) -> Response:
        try:
            model = service.get(name)
        except CloudServerError as exc:
            return v2_error(exc)
        return JSONResponse(model.engine.stats())
