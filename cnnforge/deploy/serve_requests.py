"""What one ``/predict`` request may be, for :mod:`cnnforge.deploy.server`: its body read
within the limits (size, bytes in memory, a timeout between reads), its content type, its
images and its ``top_k``; every refusal a :class:`RequestError` with its HTTP status."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cnnforge.deploy.serve_service import Service

RETRY_AFTER_S = 1
TOP_K_DIGITS = 9  # top_k past the classes gives them all; longer numbers are refused
RAW_TYPES = ("application/octet-stream",)  # and every image/* type


class RequestError(Exception):
    """A request the server refuses: its HTTP status, a metrics reason and one line."""

    def __init__(self, status: int, reason: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.reason, self.headers = status, reason, headers or {}


def overloaded() -> RequestError:
    return RequestError(
        503,
        "overloaded",
        "the server's queue is full; retry after a second",
        {"Retry-After": str(RETRY_AFTER_S)},
    )


async def read_body(request: Any, service: Service) -> bytes:
    """The request body, its bytes held in ``service`` (the caller releases them): refused
    (413) as soon as it passes ``max_body`` bytes, (503) when bodies fill their memory bound,
    and (408, the connection closed) when ``body_timeout`` seconds pass without a byte of it, as
    nginx's ``client_body_timeout`` does, so a stalled upload does not hold its connection."""
    limit = service.max_body
    # a length that is no number is left to the stream's count below
    declared = _whole_number(request.headers.get("content-length", ""), 18)
    if declared is not None and declared > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    stream = request.stream()
    service.receiving += 1
    idle = _IdleTimeout(service.body_timeout)
    try:
        while (chunk := await _next_chunk(stream, idle)) is not None:
            if size + len(chunk) > limit:
                raise _too_large(limit)
            service.hold(len(chunk))
            size += len(chunk)
            chunks.append(chunk)
    except BaseException:
        service.release(size)
        raise
    finally:
        idle.close()
        service.receiving -= 1
    return b"".join(chunks)


class _IdleTimeout:
    """Cancels the task that made it once ``seconds`` pass without :meth:`touch`: one timer a
    body, re-armed only when it fires early, where ``asyncio.wait_for`` a chunk made a task
    and a timer for every chunk (``asyncio.timeout`` is Python 3.11+)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.expired = seconds, False
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.last = self.loop.time()
        self.handle = self.loop.call_at(self.last + seconds, self._check)

    def touch(self) -> None:
        self.last = self.loop.time()

    def close(self) -> None:
        self.handle.cancel()

    def _check(self) -> None:
        due = self.last + self.seconds
        if self.loop.time() < due:
            self.handle = self.loop.call_at(due, self._check)
        elif self.task is not None:
            self.expired = True
            self.task.cancel()


async def _next_chunk(stream: AsyncIterator[bytes], idle: _IdleTimeout) -> bytes | None:
    """The body's next chunk, None at its end."""
    from starlette.requests import ClientDisconnect

    try:
        chunk = await anext(stream)
    except StopAsyncIteration:
        return None
    except asyncio.CancelledError:
        if not idle.expired:  # the server stopping, not the body timeout
            raise
        if hasattr(idle.task, "uncancel"):  # Python 3.11+: the cancel was ours, and is done
            idle.task.uncancel()
        raise RequestError(
            408,
            "body_timeout",
            f"no body byte for {idle.seconds:g} s; send the request body right after its headers",
            {"Connection": "close"},
        ) from None
    except ClientDisconnect:
        raise RequestError(400, "disconnected", "the client left before sending its body") from None
    idle.touch()
    return chunk


def _too_large(limit: int) -> RequestError:
    return RequestError(
        413, "body_too_large", f"request body over {limit:,} bytes; send smaller or fewer images"
    )


def content_kind(request: Any) -> str:
    """The request's content type, if /predict accepts it (else 415)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data" and not (kind.startswith("image/") or kind in RAW_TYPES):
        raise RequestError(
            415,
            "content_type",
            f"content type {kind or 'none'!r} is not accepted; send multipart/form-data with "
            "image files, or one image's bytes as image/* or application/octet-stream",
        )
    return kind


async def request_images(
    request: Any, kind: str, body: bytes, max_images: int
) -> list[tuple[str, bytes]]:
    """(name, encoded bytes) of each image in ``body``: form files, or the raw body."""
    if kind != "multipart/form-data":
        if not body:
            raise RequestError(400, "no_image", "the request body is empty; send an image")
        return [("body", body)]
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def once() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(request.headers, once()).parse()
    except MultiPartException as exc:
        raise RequestError(400, "bad_form", f"malformed multipart body ({exc})") from None
    files = [(n, v) for n, v in form.multi_items() if not isinstance(v, str)]
    if not files:
        raise RequestError(400, "no_image", "the form holds no file; send images as form files")
    if len(files) > max_images:
        raise RequestError(
            413, "too_many_images", f"{len(files)} images in one request; send at most {max_images}"
        )
    try:
        return [(f.filename or field, await f.read()) for field, f in files]
    finally:
        await form.close()


def _whole_number(raw: str, most_digits: int) -> int | None:
    """``raw`` as a whole number if it is one written in at most ``most_digits`` ASCII digits,
    else None. ``str.isdigit`` alone lets through superscripts (``²``, which ``int`` refuses)
    and other scripts' digits, and ``int`` refuses strings of over 4,300 digits."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > most_digits:
        return None
    return int(raw)


def top_k_of(request: Any) -> int:
    raw = request.query_params.get("top_k", "5")
    top_k = _whole_number(raw, TOP_K_DIGITS)
    if top_k is None or top_k < 1:
        shown = raw if len(raw) <= 20 else f"{raw[:20]}… ({len(raw):,} characters)"
        raise RequestError(
            400,
            "bad_top_k",
            f"top_k must be a whole number from 1 to {10**TOP_K_DIGITS - 1:,}, got {shown!r}",
        )
    return top_k
