"""A minimal OpenAI-compatible engine that answers at once (raw ASGI, no framework): for overhead benchmarks.

Streams ``max_tokens`` one-word chunks (default 8) with usage, then ``[DONE]``; honours vLLM's P/D
``kv_transfer_params`` (``do_remote_decode``: one token and transfer parameters back). ``/health`` and
``/metrics`` answer 200; ``/v1/tropical/state`` reports an engine that holds nothing (it answers at once).
Usage: python benchmarks/instant_engine.py PORT
"""

from __future__ import annotations

import json
import sys

import uvicorn

_HEADERS_SSE = [(b"content-type", b"text/event-stream")]
_HEADERS_JSON = [(b"content-type", b"application/json")]
_GET_PAYLOADS = {
    "/v1/models": b'{"object":"list","data":[{"id":"fake-model","object":"model"}]}',
    "/v1/tropical/state": b'{"schema_version":1,"num_kv_tokens_capacity":1000000}',
}


async def _body(receive) -> bytes:  # type: ignore[no-untyped-def]
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    if scope["method"] == "GET":
        payload = _GET_PAYLOADS.get(path, b"")
        await send({"type": "http.response.start", "status": 200, "headers": _HEADERS_JSON})
        await send({"type": "http.response.body", "body": payload})
        return
    body = json.loads(await _body(receive) or b"{}")
    kv = body.get("kv_transfer_params") or {}
    n = 1 if kv.get("do_remote_decode") else int(body.get("max_tokens") or 8)
    if not body.get("stream"):
        response = {
            "id": "x",
            "object": "text_completion",
            "model": "fake-model",
            "choices": [{"index": 0, "text": " w" * n, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1},
            "kv_transfer_params": {"do_remote_prefill": True, "remote_engine_id": "x"} if n == 1 else None,
        }
        await send({"type": "http.response.start", "status": 200, "headers": _HEADERS_JSON})
        await send({"type": "http.response.body", "body": json.dumps(response).encode()})
        return
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS_SSE})
    for i in range(n):
        chunk = {
            "id": "x",
            "object": "text_completion",
            "model": "fake-model",
            "choices": [{"index": 0, "text": " w", "finish_reason": "length" if i == n - 1 else None}],
            "usage": {"prompt_tokens": 1, "completion_tokens": i + 1, "total_tokens": i + 2},
        }
        await send(
            {"type": "http.response.body", "body": b"data: " + json.dumps(chunk).encode() + b"\n\n", "more_body": True}
        )
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
