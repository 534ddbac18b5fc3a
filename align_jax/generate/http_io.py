"""The server's request I/O: a bounded body read (413), client-disconnect watching, and JSON
for long id lists rendered without holding the GIL for long (the event loop stays live)."""

import asyncio

import fastapi

from align_jax.generate.openai_api import APIError

# Default body limit: 16 bytes per token of the longest accepted prompt (ids as JSON, escaped
# text), at least 1 MiB. A larger body cannot hold a prompt this server accepts.
BODY_BYTES_PER_TOKEN = 16
MIN_BODY_BYTES = 2**20


async def read_body(request: fastapi.Request, limit: int) -> bytes:
    """The request body, or APIError(413) once it passes `limit` bytes (before reading it
    all when the client declares its length)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {int(declared)} bytes exceeds this server's "
                       f"limit of {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds this server's limit of {limit} bytes",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def json_ints(ids, piece: int = 2**15) -> str:
    """A JSON list of ints (a list or a 1-D integer array), built in pieces so that other
    threads run in between."""
    return "[" + ",".join(",".join(map(str, _as_list(ids[i:i + piece])))
                          for i in range(0, len(ids), piece)) + "]"


def _as_list(ids) -> list[int]:
    return ids.tolist() if hasattr(ids, "tolist") else ids


async def cancel_on_disconnect(request: fastapi.Request, task: asyncio.Future) -> None:
    """Cancels `task` as soon as the client of `request` disconnects.

    Call it once the body is read: the server's next ASGI message is then the disconnect
    (uvicorn sends it when the connection is lost), so this waits on it instead of polling.
    """
    while not task.done():
        message = await request.receive()
        if message["type"] == "http.disconnect":
            task.cancel()
            return
        await asyncio.sleep(0.05)  # not expected after the body; never spin on it
