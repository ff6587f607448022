"""HTTP/1.1 pieces the tests and the fakes share: one small h11 client, one h11 server loop,
and the request builders (heartbeat, multipart) and the wait helper several test files need.

Independent of herd.py: the fakes (tests/fake_ollama.py, tests/real_node.py, the fake agent
service in tests/test_multimodal_router.py) run on these, so nothing here may import the
router.

Client: ``raw_request`` writes the request bytes exactly as given on a fresh connection
(``Connection: close``), reads to EOF and lets h11 parse the response (chunk boundaries kept);
``client_conn`` + ``next_event`` read a response incrementally. Server: ``serve_h11`` runs one
connection's request/response cycles and hands each request to a handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h11

# ---------------------------------------------------------------------------------- both


async def next_event(
    conn: h11.Connection,
    reader: asyncio.StreamReader,
    *,
    continue_via: asyncio.StreamWriter | None = None,
) -> Any:
    """The next h11 event, reading from ``reader`` as needed (EOF becomes ConnectionClosed).
    A server passes its writer as ``continue_via`` to answer ``Expect: 100-continue``."""
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            if continue_via is not None and conn.they_are_waiting_for_100_continue:
                continue_via.write(
                    conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                )
            conn.receive_data(await reader.read(65536))
            continue
        return ev


# -------------------------------------------------------------------------------- client


def request_bytes(
    method: str, target: str, headers: list[tuple[str, str]], body: bytes = b""
) -> bytes:
    """A request head with exactly these header lines (in this order and case), then ``body``."""
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    return head.encode("latin-1") + b"\r\n" + body


def client_conn(method: str) -> h11.Connection:
    """An h11 client connection ready to read the response to a ``method`` request whose
    bytes the caller writes itself (h11 needs only the method: HEAD has no body)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    return conn


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]  # as sent: names in their case, repeats kept
    chunks: list[bytes] = field(default_factory=list)  # chunked transfer only, as framed
    body: bytes = b""
    complete: bool = True  # the whole body arrived (its last chunk / all its bytes)

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def header_map(self) -> dict[str, str]:
        """Lower-case names; the last of repeated headers wins."""
        return {k.lower(): v for k, v in self.headers}

    def json(self) -> Any:
        return json.loads(self.body)


def parse_response(data: bytes, method: str) -> Response:
    """The response to a ``method`` request in ``data`` (all bytes up to EOF). A body cut
    short is kept with ``complete=False``; no status line at all raises ValueError."""
    conn = client_conn(method)
    conn.receive_data(data)
    conn.receive_data(b"")
    resp: Response | None = None
    body = bytearray()
    try:
        while True:
            ev = conn.next_event()
            if isinstance(ev, h11.InformationalResponse):
                continue
            if isinstance(ev, h11.Response):
                resp = Response(
                    ev.status_code,
                    [(k.decode("latin-1"), v.decode("latin-1")) for k, v in ev.headers.raw_items()],
                )
            elif isinstance(ev, h11.Data):
                assert resp is not None
                body += ev.data
                if (resp.header("transfer-encoding") or "").lower() == "chunked":
                    if ev.chunk_start:
                        resp.chunks.append(b"")
                    resp.chunks[-1] += bytes(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                break
            else:  # ConnectionClosed or NEED_DATA: nothing more came
                if resp is not None:
                    resp.complete = False
                break
    except h11.RemoteProtocolError as e:
        if resp is None:
            raise ValueError(f"no HTTP response in {data[:200]!r}") from e
        resp.complete = False
    if resp is None:
        raise ValueError(f"no HTTP response in {data[:200]!r}")
    resp.body = bytes(body)
    return resp


async def fetch(
    port: int,
    request: bytes,
    method: str,
    *,
    timeout: float = 10.0,
    local_addr: tuple[str, int] | None = None,
) -> Response:
    """Write ``request`` on a fresh loopback connection, read to EOF, parse the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=local_addr)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(timeout):
            data = await reader.read(-1)
    finally:
        writer.close()
    return parse_response(data, method)


async def raw_request(
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    read_timeout: float = 10.0,
    local_addr: tuple[str, int] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection (``Connection: close``) to see exact bytes: status,
    headers (lower-case names) and the body, de-chunked; ``local_addr`` picks the source."""
    hdrs = {"host": f"127.0.0.1:{port}", "connection": "close", **(headers or {})}
    if body or method in ("POST", "PUT", "DELETE"):
        hdrs.setdefault("content-length", str(len(body)))
        hdrs.setdefault("content-type", "application/json")
    resp = await fetch(
        port,
        request_bytes(method, path, list(hdrs.items()), body),
        method,
        timeout=read_timeout,
        local_addr=local_addr,
    )
    return resp.status, resp.header_map(), resp.body


# -------------------------------------------------------------------------------- server

Handler = Callable[[h11.Connection, h11.Request], Awaitable[bool]]


async def read_body(conn: h11.Connection, reader: asyncio.StreamReader) -> bytes:
    """The whole request body; ConnectionError if the client leaves before its end."""
    body = bytearray()
    while not isinstance(ev := await next_event(conn, reader), h11.EndOfMessage):
        if isinstance(ev, h11.Data):
            body += ev.data
        else:
            raise ConnectionError("client closed the connection during the body")
    return bytes(body)


async def serve_h11(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handle: Handler,
    *,
    quiet: tuple[type[BaseException], ...] = (),
) -> None:
    """Serve one connection: each request head goes to ``handle``, which reads the body and
    answers through ``conn`` and says whether the connection may carry another request.
    A request h11 cannot parse gets h11's status with the reason as text, and the end;
    ``quiet`` names the handler's own exceptions that just end the connection."""
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            ev = await next_event(conn, reader)
            if not isinstance(ev, h11.Request):
                break
            keep = await handle(conn, ev)
            if not keep or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                break
            conn.start_next_cycle()
    except h11.RemoteProtocolError as e:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(Exception):
                body = str(e).encode()
                writer.write(
                    conn.send(
                        h11.Response(
                            status_code=e.error_status_hint,
                            headers=[
                                ("Content-Length", str(len(body))),
                                ("Connection", "close"),
                            ],
                        )
                    )
                    or b""
                )
                writer.write(conn.send(h11.Data(data=body)) or b"")
                writer.write(conn.send(h11.EndOfMessage()) or b"")
                await writer.drain()
    except (ConnectionError, OSError, h11.LocalProtocolError, *quiet):
        pass
    except asyncio.CancelledError:
        # the server stops: end quietly (3.11's start_server callback chokes on cancelled tasks)
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)


# ------------------------------------------------------------------------- request bodies


def beat(node_id: str = "studio", url: str = "http://127.0.0.1:9", **extra: Any) -> dict[str, Any]:
    """A heartbeat body as herd_node.py sends it, the smallest valid one: nothing loaded,
    nothing available. ``extra`` replaces or adds top-level fields."""
    return {
        "node_id": node_id,
        "agent_version": "test",
        "timestamp": time.time(),
        "interval_s": 5.0,
        "ollama_url": url,
        "hardware": {},
        "ollama": {"reachable": True, "loaded": [], "available": []},
        **extra,
    }


def multipart(
    fields: dict[str, str],
    audio: bytes,
    *,
    name: str = "audio",
    ctype: str = "audio/wav",
    boundary: str = "herdBoundary7",
) -> bytes:
    """A multipart/form-data body: ``fields`` as text parts, then ``audio`` as file ``name``."""
    out = b""
    for k, v in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
    out += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="a.wav"\r\n'
        f"Content-Type: {ctype}\r\n\r\n"
    ).encode()
    return out + audio + f"\r\n--{boundary}--\r\n".encode()


# ---------------------------------------------------------------------------------- wait


async def wait_until(
    check: Callable[[], bool], timeout: float = 5.0, what: str = "the condition"
) -> float:
    """Poll ``check`` every 10 ms; the seconds it took, or an AssertionError naming ``what``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start
