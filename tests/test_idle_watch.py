"""The stall bound on a node's stream (``UpstreamResponse.chunks`` with ``idle_timeout``):
one timer per response, not one per chunk, with the same semantics as a timeout around
every read. Real loopback sockets; a tiny node whose chunks the test releases one by one."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

import herd

pytestmark = pytest.mark.both_loops

HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n")


class Node:
    """Answers one request with a chunked head, then one chunk per ``send()``."""

    def __init__(self) -> None:
        self.out: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.port = 0
        self.server: asyncio.Server | None = None
        self.handlers: list[asyncio.Task[None]] = []

    async def start(self) -> Node:
        async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self.handlers.append(task)
            await reader.readuntil(b"\r\n\r\n")
            writer.write(HEAD)
            while (line := await self.out.get()) is not None:
                writer.write(b"%x\r\n%s\r\n" % (len(line), line))
            writer.write(b"0\r\n\r\n")
            writer.close()

        self.server = await asyncio.start_server(conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def send(self, line: bytes | None) -> None:
        self.out.put_nowait(line)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for _ in self.handlers:
            self.send(None)
        await asyncio.gather(*self.handlers, return_exceptions=True)


@contextlib.asynccontextmanager
async def node_and_pool() -> AsyncIterator[tuple[Node, herd.Pool]]:
    node = await Node().start()
    pool = herd.Pool()
    try:
        yield node, pool
    finally:
        pool.close()
        await node.close()


async def open_stream(node: Node, pool: herd.Pool) -> herd.UpstreamResponse:
    return await pool.request(f"http://127.0.0.1:{node.port}", "GET", "/")


async def test_one_timer_for_a_whole_stream() -> None:
    """500 chunks under a 30 s idle bound arm one timer after the first chunk, not 500."""
    node = await Node().start()
    pool = herd.Pool()
    loop = asyncio.get_running_loop()
    armed: list[float] = []
    real_call_at = loop.call_at

    def counting_call_at(when: float, cb, *args):  # type: ignore[no-untyped-def]
        armed.append(when)
        return real_call_at(when, cb, *args)

    try:
        up = await open_stream(node, pool)
        chunks = up.chunks(30.0, first_timeout=30.0)
        node.send(b'{"n":0}\n')
        assert await anext(chunks) == b'{"n":0}\n'
        loop.call_at = counting_call_at  # type: ignore[method-assign]
        got = 1
        for i in range(1, 500):
            node.send(b'{"n":%d}\n' % i)
            await anext(chunks)
            got += 1
        node.send(None)
        assert [c async for c in chunks] == []
        assert got == 500
        assert len(armed) <= 2, f"{len(armed)} timers armed for 499 chunks"
    finally:
        loop.call_at = real_call_at  # type: ignore[method-assign]
        pool.close()
        await node.close()


async def test_a_stalled_wait_times_out_at_its_own_deadline() -> None:
    """Chunks keep arriving faster than the bound for longer than the bound (the one timer
    fires early and re-arms), then the node goes quiet: TimeoutError one bound later."""
    async with node_and_pool() as (node, pool):
        up = await open_stream(node, pool)
        chunks = up.chunks(0.3)
        t0 = time.monotonic()
        for i in range(8):  # 8 x 0.1 s: well past the 0.3 s bound in total
            node.send(b'{"n":%d}\n' % i)
            await anext(chunks)
            await asyncio.sleep(0.1)
        assert time.monotonic() - t0 > 0.6
        stalled_at = time.monotonic()
        with pytest.raises(TimeoutError):
            await anext(chunks)
        waited = time.monotonic() - stalled_at
        assert 0.29 <= waited < 2.0, waited


async def test_time_spent_on_the_client_does_not_count() -> None:
    """Between two chunks the consumer is busy (a slow client) for 3x the bound: no
    timeout, as only waiting on the node counts."""
    async with node_and_pool() as (node, pool):
        up = await open_stream(node, pool)
        chunks = up.chunks(0.2)
        node.send(b'{"n":0}\n')
        await anext(chunks)
        await asyncio.sleep(0.6)  # the consumer, not the node, is slow
        node.send(b'{"n":1}\n')
        assert await anext(chunks) == b'{"n":1}\n'
        await asyncio.sleep(0.6)
        node.send(None)
        assert [c async for c in chunks] == []


async def test_an_outside_cancellation_stays_a_cancellation() -> None:
    """The reading task cancelled from outside (the client hung up) while the node is
    quiet: CancelledError, not a reap, and the task is not left un-cancelled."""
    async with node_and_pool() as (node, pool):
        up = await open_stream(node, pool)
        chunks = up.chunks(0.2)
        node.send(b'{"n":0}\n')
        await anext(chunks)

        async def read_rest() -> list[bytes]:
            return [c async for c in chunks]

        task = asyncio.ensure_future(read_rest())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()


async def first_of(chunks: AsyncIterator[bytes]) -> bytes:
    return await anext(chunks)


async def test_first_timeout_bounds_the_first_chunk() -> None:
    async with node_and_pool() as (node, pool):
        up = await open_stream(node, pool)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await first_of(up.chunks(30.0, first_timeout=0.2))
        assert time.monotonic() - t0 < 2.0
