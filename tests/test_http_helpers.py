"""The shared HTTP test pieces: the h11 response parser and the h11 server loop."""

from __future__ import annotations

import asyncio

import h11
import pytest

from tests.http_helpers import parse_response, raw_request, read_body, serve_h11

TE = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\nx-a: 2\r\n\r\n"


@pytest.mark.parametrize(
    ("data", "method", "status", "chunks", "body", "complete"),
    [
        (TE + b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n", "GET", 200, [b"abc", b"de"], b"abcde", True),
        (TE + b"3\r\nabc\r\n4\r\nde", "GET", 200, [b"abc", b"de"], b"abcde", False),
        (TE + b"3\r\nabc\r\nzz\r\n", "GET", 200, [b"abc"], b"abc", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", "GET", 200, [], b"hello", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", "GET", 200, [], b"hel", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "HEAD", 200, [], b"", True),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n\r\n", "POST", 201, [], b"", True),
        (b"HTTP/1.0 404 Not Found\r\n\r\nnope", "GET", 404, [], b"nope", True),
    ],
)
def test_parse_response_table(
    data: bytes, method: str, status: int, chunks: list[bytes], body: bytes, complete: bool
) -> None:
    r = parse_response(data, method)
    assert (r.status, r.chunks, r.body, r.complete) == (status, chunks, body, complete)


def test_parse_response_headers_and_garbage() -> None:
    r = parse_response(TE + b"0\r\n\r\n", "GET")
    assert r.header("x-a") == "1" and r.header_map()["x-a"] == "2"
    assert ("X-A", "1") in r.headers  # names as sent
    for garbage in (b"", b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 abc\r\n\r\n"):
        with pytest.raises(ValueError, match="no HTTP response"):
            parse_response(garbage, "GET")


async def test_serve_h11_keeps_alive_echoes_and_refuses_garbage() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def one(conn: h11.Connection, req: h11.Request) -> bool:
            body = req.target + b" " + await read_body(conn, reader)
            headers = [("Content-Length", str(len(body)))]
            for ev in (h11.Response(status_code=200, headers=headers), h11.Data(data=body)):
                writer.write(conn.send(ev) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()
            return True

        await serve_h11(reader, writer, one)

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        status, _, body = await raw_request(port, "POST", "/a", b"xyz")
        assert (status, body) == (200, b"/a xyz")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        two = b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n"
        writer.write(two + b"NOT HTTP AT ALL\r\n\r\n")
        async with asyncio.timeout(5):
            data = await reader.read(-1)  # the loop ends the connection after the garbage
        writer.close()
        first, _, rest = data.partition(b"/1 ")
        assert first.startswith(b"HTTP/1.1 200") and b"/2 " in rest
        assert rest.split(b"/2 ", 1)[1].startswith(b"HTTP/1.1 400")
    finally:
        server.close()
        await server.wait_closed()
