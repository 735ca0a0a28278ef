"""The slice of the OpenAI HTTP protocol the router, the fake engine and the replay client share.

Requests: ``POST /v1/completions`` (``prompt``: text or token ids) and ``POST /v1/chat/completions``
(``messages``), streaming as server-sent events (``data: {json}`` lines, ending with ``data: [DONE]``) or not.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from tropical_sched.core.errors import ConfigError
from tropical_sched.core.locate import validation_message

__all__ = [
    "DONE",
    "BadRequest",
    "ChatCompletionBody",
    "CompletionBody",
    "GenerationBody",
    "PayloadTooLarge",
    "StreamDelta",
    "StreamEvent",
    "UnknownModel",
    "aggregate_events",
    "check_event_stream",
    "chunk_delta",
    "error_body",
    "iter_sse",
    "parse_json_body",
    "parse_sse",
    "prompt_token_count",
    "sse",
    "sse_payload_batches",
    "validate_body",
]

DONE = b"data: [DONE]\n\n"


class BadRequest(ConfigError):
    """A client request is malformed; the message names the field and the value (sent back with HTTP 400).

    Subclasses answer with another 4xx status (``status``) and OpenAI error type (``kind``).
    """

    status: ClassVar[int] = 400
    kind: ClassVar[str] = "BadRequestError"


class PayloadTooLarge(BadRequest):
    """The body (413) or the headers (431) exceed the router's limits."""

    status: ClassVar[int] = 413

    def __init__(self, message: str, status: int = 413) -> None:
        super().__init__(message)
        self.status = status  # type: ignore[misc]


class UnknownModel(BadRequest):
    """The request names a model no instance serves (404, as vLLM answers)."""

    status: ClassVar[int] = 404
    kind: ClassVar[str] = "NotFoundError"


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """Decode a request body: strict UTF-8, then JSON, which must be an object.

    Raises:
        BadRequest: the bytes are not UTF-8 (the offset is named), not JSON, nested too deeply for the parser,
            or not an object.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the request body is not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not JSON: {exc}") from None
    except RecursionError:  # CPython's decoder recurses once per nesting level
        raise BadRequest("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


_XargValue = StrictStr | StrictInt | StrictFloat | StrictBool | list[StrictStr | StrictInt | StrictFloat]
_ROUTER_FIELDS = ("kv_transfer_params", "bootstrap_host", "bootstrap_port", "bootstrap_room")


class StreamOptions(BaseModel):
    """``stream_options`` (OpenAI, plus vLLM's ``continuous_usage_stats``); other keys are ignored (the router sets
    the upstream stream's options itself)."""

    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool | None = None
    continuous_usage_stats: StrictBool | None = None


class GenerationBody(BaseModel):
    """The fields of a completion or chat request that the router reads or rewrites, typed; other fields (sampling
    parameters) pass through to the engine, which validates them."""

    model_config = ConfigDict(extra="allow")

    model: Annotated[StrictStr, Field(min_length=1, max_length=1024)] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    n: Annotated[StrictInt, Field(ge=1, le=1)] | None = None
    best_of: Annotated[StrictInt, Field(ge=1, le=1)] | None = None
    vllm_xargs: dict[str, _XargValue] | None = None
    custom_params: dict[str, Any] | None = None

    @property
    def num_max_tokens(self) -> int | None:
        """``max_tokens`` or, failing that, ``max_completion_tokens``."""
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens


class CompletionBody(GenerationBody):
    """``POST /v1/completions``: ``prompt`` is text or token ids (validated by :func:`prompt_token_count`)."""

    prompt: Any = None


class ChatMessage(BaseModel):
    """One chat message: a role and text (or content parts)."""

    model_config = ConfigDict(extra="allow")

    role: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    content: StrictStr | list[dict[str, Any]] | None = None


class ChatCompletionBody(GenerationBody):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]


def validate_body(body: dict[str, Any], *, chat: bool) -> GenerationBody:
    """Check a client's request body against the typed subset of the OpenAI protocol the router accepts.

    Returns:
        The typed body (the router still forwards the client's own dict, with the fields it does not read).

    Raises:
        BadRequest: a field has the wrong type or value, a feature the router does not serve is asked for
            (``n`` or ``best_of`` above 1), a router-owned field is set (``kv_transfer_params``, SGLang's
            ``bootstrap_*``), or ``stream_options`` comes without ``stream``; the message names the field and
            the value.
    """
    for name in _ROUTER_FIELDS:
        if name in body:
            raise BadRequest(f"field '{name}' is set by the router (P/D disaggregation); clients must not send it")
    model = ChatCompletionBody if chat else CompletionBody
    try:
        typed = model.model_validate(body)
    except ValidationError as exc:
        _, message = validation_message(exc.errors(), exc.error_count())  # type: ignore[arg-type]
        if any(e["loc"][:1] in (("n",), ("best_of",)) for e in exc.errors()):
            message += " (the router serves one choice per request: n=1, best_of=1)"
        raise BadRequest(message) from None
    if typed.stream_options is not None and not typed.stream:
        raise BadRequest("field stream_options is only allowed with stream=true")
    return typed


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
        negative = next((i for i, t in enumerate(prompt) if t < 0), None)
        if negative is not None:
            raise BadRequest(f"field 'prompt[{negative}]' = {prompt[negative]}: token ids must be >= 0")
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


_END_OF_LINE = re.compile(rb"\r\n|\r|\n")


class _EventReader:
    """Events from the lines of an event stream (the SSE specification's rules, data only)."""

    __slots__ = ("data", "done")

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.done = False  # [DONE] was read: nothing after it is an event

    def events(self, lines: list[bytes]) -> list[bytes]:
        batch: list[bytes] = []
        for line in lines:
            if line:
                if line.startswith(b"data:"):
                    self.data.append(line[6:] if line[5:6] == b" " else line[5:])
                elif line == b"data":
                    self.data.append(b"")
                continue
            payload = b"\n".join(self.data)
            self.data = []
            if self.done or not payload:
                continue
            if payload == b"[DONE]":
                self.done = True
                continue
            batch.append(payload)
        return batch


async def sse_payload_batches(chunks: AsyncIterable[bytes]) -> AsyncIterator[list[bytes]]:
    """The data of a server-sent-event stream's events, given its body in chunks: one list per chunk, of the events
    that chunk completed (none is held back to fill a list), until ``[DONE]``.

    Lines end at CR, LF or CRLF only (the SSE specification), also across chunks: engines send generated text
    unescaped in JSON, and U+2028, U+0085 or U+001C, line breaks for ``str.splitlines`` (and httpx's
    ``aiter_lines``), must not cut an event in two. ``data`` lines are joined with a newline and an empty line
    dispatches the event; other fields and comments are ignored, events without data are skipped, and an event
    left without its empty line at the end of the stream is discarded. The body is read to its end even after
    ``[DONE]``, so that the connection goes back to the pool (a response closed before its end closes its
    connection).
    """
    reader = _EventReader()
    rest = b""
    async for chunk in chunks:
        rest += chunk
        end = len(rest) - 1 if rest.endswith(b"\r") else len(rest)  # a CR may be half of a CRLF
        *lines, tail = _END_OF_LINE.split(rest[:end])
        rest = tail + rest[end:]
        if lines and not reader.done:
            batch = reader.events(lines)
            if batch:
                yield batch
    if rest and not reader.done:  # the last line, if it ended with a CR
        batch = reader.events(_END_OF_LINE.split(rest)[:-1])
        if batch:
            yield batch


async def parse_sse(chunks: AsyncIterable[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of a server-sent-event stream, given its body in chunks, until ``[DONE]``
    (:func:`sse_payload_batches`, each event parsed).

    Raises:
        ValueError: an event is not JSON.
    """
    async for batch in sse_payload_batches(chunks):
        for payload in batch:
            yield json.loads(payload)


# Byte patterns of the members of a stream chunk that the router reads. In JSON text a quote inside a string is
# always escaped (\"), so ``"name"`` followed by a colon is a member name, never a piece of generated text.
_STRING = rb'"(?:[^"\\]|\\.)*"'
_FLAT_OBJECT = rb"\{(?:[^{}\"]|" + _STRING + rb")*\}"
_USAGE_MEMBER = re.compile(rb'"usage"\s*:\s*(null|\{(?:[^{}"]|' + _STRING + rb"|" + _FLAT_OBJECT + rb")*\})")
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_NO_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_WHITESPACE = b" \t\r\n"


class StreamEvent:
    """One event of an engine's stream, kept as the bytes it came in: the router counts its tokens and relays it
    without decoding and encoding it again.

    An engine chunk with continuous usage (``usage.completion_tokens``, which the router asks vLLM and SGLang
    for) is read by scanning its bytes for the members the router needs (``usage``, ``choices``); any other
    event (no usage, an ``error`` member, a ``usage`` name that occurs more than once) is parsed as JSON, and
    reads the same (``test_stream_event_scan_equals_the_json_reading``).

    Args:
        payload: the event's data, a JSON object (UTF-8).

    Raises:
        ValueError: ``payload`` is not a JSON object (on the scanned path: it does not start with ``{`` and end
            with ``}``; its members are not checked further).
    """

    __slots__ = ("_json", "_usage_span", "has_choices", "is_error", "num_completion_tokens", "payload")

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self._json: dict[str, Any] | None = None
        self._usage_span: tuple[int, int] | None = None
        self.is_error = False
        """The event reports an error (an ``error`` member)."""
        self.num_completion_tokens: int | None = None
        """``usage.completion_tokens``: tokens generated so far, or ``None`` if the event has no usage."""
        self.has_choices = True
        """The event carries a choice (``False``: the final usage-only chunk of ``include_usage``)."""
        body = payload.strip(_WHITESPACE)
        if not (body.startswith(b"{") and body.endswith(b"}")):
            raise ValueError(f"stream event is not a JSON object: {payload[:80]!r}")
        if b'"error"' not in payload and payload.count(b'"usage"') == 1:
            usage = _USAGE_MEMBER.search(payload)
            if usage is not None:
                count = _COMPLETION_TOKENS.search(payload, usage.start(1), usage.end(1))
                if count is not None:
                    self._usage_span = usage.span()
                    self.num_completion_tokens = int(count.group(1))
                    self.has_choices = b'"choices"' in payload and _NO_CHOICES.search(payload) is None
                    return
        self._read(self.json())

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StreamEvent:
        """The event carrying ``data`` (an object the router makes, such as an error)."""
        event = cls.__new__(cls)
        event.payload = json.dumps(data, separators=(",", ":")).encode()
        event._json = data
        event._usage_span = None
        event._read(data)
        return event

    def _read(self, data: dict[str, Any]) -> None:
        usage = data.get("usage")
        count = usage.get("completion_tokens") if isinstance(usage, dict) else None
        self.is_error = "error" in data
        self.num_completion_tokens = count if isinstance(count, int) else None
        self.has_choices = bool(data.get("choices"))

    def json(self) -> dict[str, Any]:
        """The event as a JSON object (parsed once, on first use).

        Raises:
            ValueError: the payload is not a JSON object.
        """
        if self._json is None:
            data = json.loads(self.payload)
            if not isinstance(data, dict):
                raise ValueError(f"stream event is not a JSON object: {self.payload[:80]!r}")
            self._json = data
        return self._json

    def num_new_tokens(self, num_tokens_so_far: int) -> int:
        """Tokens this event adds to a stream that had ``num_tokens_so_far``: from ``usage.completion_tokens``,
        else one for a chunk with text (:func:`chunk_delta`)."""
        if self.num_completion_tokens is not None:
            return max(self.num_completion_tokens - num_tokens_so_far, 0)
        return chunk_delta(self.json(), num_tokens_so_far).num_tokens

    def without_usage(self) -> bytes:
        """The payload without its ``usage`` member (for a client that did not ask for continuous usage)."""
        span = self._usage_span
        if span is None:
            data = self.json()
            if "usage" not in data:
                return self.payload
            return json.dumps({k: v for k, v in data.items() if k != "usage"}, separators=(",", ":")).encode()
        payload = self.payload
        start, end = span
        after = end
        while after < len(payload) and payload[after] in _WHITESPACE:
            after += 1
        if payload[after : after + 1] == b",":  # a member follows: take the comma after
            return payload[:start] + payload[after + 1 :]
        before = start
        while before > 0 and payload[before - 1] in _WHITESPACE:
            before -= 1
        if payload[before - 1 : before] == b",":  # the last member: take the comma before
            return payload[: before - 1] + payload[end:]
        return payload[:start] + payload[end:]  # the only member


def check_event_stream(content_type: str) -> None:
    """Raise ``ValueError`` unless a response's ``Content-Type`` is ``text/event-stream`` (an engine that answered
    a stream with something else answered: not a transport failure)."""
    if "text/event-stream" not in content_type:
        raise ValueError(f"expected Content-Type text/event-stream, got {content_type!r}")


async def iter_sse(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of an httpx response's event stream (:func:`parse_sse`).

    Raises:
        ValueError: the response is not an event stream, or an event is not JSON.
    """
    check_event_stream(response.headers.get("content-type", ""))
    async for event in parse_sse(response.aiter_bytes()):
        yield event


async def aggregate_events(
    first: list[StreamEvent], batches: AsyncIterator[list[StreamEvent]], chat: bool
) -> tuple[int, dict[str, Any]]:
    """Collect a stream's events (``first``, then ``batches``) into one completion body: ``(200, body)``, or the
    status and body of the first error event."""
    parts: list[str] = []
    finish = None
    usage = None
    head: dict[str, Any] = {}

    async def consume() -> AsyncIterator[dict[str, Any]]:
        for event in first:
            yield event.json()
        async for batch in batches:
            for event in batch:
                yield event.json()

    async for event in consume():
        if "error" in event:
            return event["error"].get("code", 502), event
        head = head or event
        delta = chunk_delta(event, 0)
        parts.append(delta.text)
        finish = delta.finish_reason or finish
        if isinstance(event.get("usage"), dict):
            usage = event["usage"]
    text = "".join(parts)
    choice: dict[str, Any] = (
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        if chat
        else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    )
    return 200, {
        "id": head.get("id", ""),
        "object": "chat.completion" if chat else "text_completion",
        "created": head.get("created", int(time.time())),
        "model": head.get("model", ""),
        "choices": [choice],
        "usage": usage,
    }


def now_unix_s() -> int:
    """Seconds since the epoch, for the ``created`` field."""
    return int(time.time())
