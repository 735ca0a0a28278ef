"""The slice of the OpenAI HTTP protocol the router, the fake engine and the replay client share.

Requests: ``POST /v1/completions`` (``prompt``: text or token ids) and ``POST /v1/chat/completions``
(``messages``), streaming as server-sent events (``data: {json}`` lines, ending with ``data: [DONE]``) or not.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from httpx_sse import EventSource, SSEError

from tropical_sched.core.errors import ConfigError

__all__ = [
    "DONE",
    "BadRequest",
    "StreamDelta",
    "chunk_delta",
    "error_body",
    "iter_sse",
    "prompt_token_count",
    "sse",
]

DONE = b"data: [DONE]\n\n"


class BadRequest(ConfigError):
    """A client request is malformed; the message names the field and the value (sent back with HTTP 400)."""


def sse(data: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``data`` as JSON."""
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def error_body(message: str, kind: str, code: int) -> dict[str, Any]:
    """An OpenAI-style error object."""
    return {"error": {"message": message, "type": kind, "code": code}}


def prompt_token_count(body: dict[str, Any], *, chat: bool, chars_per_token: float) -> tuple[int, bool]:
    """Tokens in a request's prompt: exact for token-id prompts, else estimated from characters.

    Args:
        body: the request body.
        chat: whether it is a chat request (``messages``) rather than a completion (``prompt``).
        chars_per_token: characters per token for text.

    Returns:
        ``(tokens, exact)``; at least 1.

    Raises:
        BadRequest: the prompt or messages are missing or malformed (names the field).
    """
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest(f"field 'messages' must be a non-empty list, got {type(messages).__name__}")
        characters = 0
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise BadRequest(f"field 'messages[{index}]' must be an object with a 'role'")
            content = message.get("content", "")
            if isinstance(content, list):  # content parts
                content = " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
            characters += len(str(content)) + 16  # role markers of the chat template
        return max(1, math.ceil(characters / chars_per_token)), False
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        if not prompt:
            raise BadRequest("field 'prompt' is empty")
        return max(1, math.ceil(len(prompt) / chars_per_token)), False
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return len(prompt), True
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str) and prompt[0]:
        return max(1, math.ceil(len(prompt[0]) / chars_per_token)), False
    raise BadRequest(
        "field 'prompt' must be a non-empty string or a list of token ids (one prompt per request), "
        f"got {type(prompt).__name__}"
    )


@dataclass(frozen=True, slots=True)
class StreamDelta:
    """What one streamed chunk carried.

    Attributes:
        text: generated text in the chunk ("" if none).
        num_tokens: tokens in the chunk (from ``usage.completion_tokens`` when the engine reports it
            continuously, else 1 per chunk with text).
        completion_tokens: the running total the engine reported, if it did.
        finish_reason: set on the last token's chunk.
        usage_only: the chunk carries only usage (the final ``include_usage`` chunk).
    """

    text: str
    num_tokens: int
    completion_tokens: int | None
    finish_reason: str | None
    usage_only: bool


def chunk_delta(chunk: dict[str, Any], tokens_so_far: int) -> StreamDelta:
    """Read a completion or chat-completion stream chunk."""
    choices = chunk.get("choices") or []
    text = ""
    finish = None
    if choices:
        choice = choices[0]
        if "delta" in choice:
            text = (choice.get("delta") or {}).get("content") or ""
        else:
            text = choice.get("text") or ""
        finish = choice.get("finish_reason")
    usage = chunk.get("usage") or None
    completion_tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if completion_tokens is not None:
        num_tokens = max(completion_tokens - tokens_so_far, 0)
    else:
        num_tokens = 1 if text else 0
    return StreamDelta(text, num_tokens, completion_tokens, finish, not choices and usage is not None)


async def iter_sse(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of a server-sent-event stream, until ``[DONE]``.

    Lines are split as the SSE specification says (CR, LF or CRLF only, by ``httpx-sse``): httpx's own
    ``aiter_lines`` also splits on U+2028, U+0085 and other Unicode line breaks, which engines send unescaped
    inside generated text, and would cut such an event in two. The body is read to its end even after ``[DONE]``,
    so that the connection goes back to the pool (a response closed before its end closes its connection).

    Raises:
        ValueError: the response is not an event stream, or an event is not JSON.
    """
    done = False
    try:
        async for event in EventSource(response).aiter_sse():
            if done or not event.data:
                continue
            if event.data == "[DONE]":
                done = True
                continue
            yield json.loads(event.data)
    except SSEError as exc:  # a wrong content type: the engine answered, so not a transport failure
        raise ValueError(str(exc)) from None


def now_unix_s() -> int:
    """Seconds since the epoch, for the ``created`` field."""
    return int(time.time())
