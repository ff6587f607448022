"""What herd costs on the wire: direct-to-node vs through herd, side by side in one run.

    python bench/proxy_overhead.py            # < 90 s, prints a table
    python bench/proxy_overhead.py --profile  # also cProfile the herd process, top functions

Processes (2 cores here, so keep the client's CPU away from the servers'):

* node A: tests/fake_ollama.FakeOllama, tokens_per_s=0, 12-token answers, many slots;
* node B: the same fake with 20,000-token answers, for the long NDJSON stream;
* node C: a "blaster" node (below) that streams a prebuilt NDJSON body in 64 KiB writes, so
  the relay figure measures herd, not the fake's ~20 µs per line;
* herd: ``herd.Router`` with all three as static nodes, uvloop;
* the floor: a bare h11 relay to node A (``run_relay``: no routing, pool, limits or
  traces), measured in the same interleaved blocks, so the table shows what the h11 hop
  itself costs on this machine and how much herd adds on top of it;
* this process: the load generator, a raw asyncio + h11 keep-alive client on uvloop.

Figures and targets (the script exits 1 when one is missed): herd's CPU per request ≤ 1.5x
the bare relay's at c=1 and at c=64 (issue 16; CPU figures are noisy on a shared machine),
requests/s at concurrency 16 and 64 through herd as % of direct (≥ 15 % at 64), NDJSON
lines/s on one long stream (≥ 50,000) and time to first byte; added latency p50/p99 at c=1
(shown, no target: the bare relay itself adds about 0.5 ms). Also (issue 16):

* saturation: a third herd told the node has 8 slots, 64 clients back to back, so 56
  always wait: herd's p99 ≤ 3x its p50 (FIFO admission: no request starves);
* /fleet/status with 20 agent nodes (heartbeats with full hardware and model lists):
  p50 ≤ 2 ms, and the document's size.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pstats
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h11

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.lib import common as _common  # noqa: E402
from bench.lib.common import (  # noqa: E402
    cpu_s,
    next_event,
    ready_line,
    relay_request,
    serve_until_signal,
    use_uvloop,
)

SMALL_MODEL = "llama3.2:3b"
LONG_MODEL = "longstream:1b"
BLAST_MODEL = "blast:1b"
LONG_TOKENS = 20_000
BLAST_LINES = 400_000


# =======================================================================================
# Server roles (each runs in its own subprocess)
# =======================================================================================


NODE_SLOTS = 32  # node A's real parallel slots, told to herd (scoring.Policy.max_slots is 32)
SATURATION_SLOTS = 8  # what the saturation herd is told node A has
SATURATION_CLIENTS = 64
STATUS_NODES = 20


async def run_fake(model: str, response_tokens: int) -> None:
    from tests.fake_ollama import FakeModel, FakeOllama

    fake = FakeOllama(
        [FakeModel(model)],
        tokens_per_s=0,
        prompt_tokens_per_s=0,
        load_delay_s=0,
        num_parallel=NODE_SLOTS,
        max_queue=100_000,
        response_tokens=response_tokens,
    )
    await fake.start()
    await serve_until_signal(fake.port, fake.stop)


def blast_body(lines: int) -> bytes:
    line = json.dumps(
        {
            "model": BLAST_MODEL,
            "created_at": "2025-01-01T00:00:00.000000000Z",
            "response": " token",
            "done": False,
        },
        separators=(",", ":"),
    ).encode()
    final = json.dumps(
        {
            "model": BLAST_MODEL,
            "created_at": "2025-01-01T00:00:01.000000000Z",
            "response": "",
            "done": True,
            "done_reason": "stop",
            "eval_count": lines,
            "eval_duration": 1_000_000,
        },
        separators=(",", ":"),
    ).encode()
    return (line + b"\n") * (lines - 1) + final + b"\n"


async def run_blaster() -> None:
    """A minimal Ollama node: answers herd's polls and streams one prebuilt NDJSON body in
    64 KiB chunked writes (the bytes are cut anywhere, as a real TCP stream would be)."""
    body = blast_body(BLAST_LINES)
    tags = json.dumps(
        {
            "models": [
                {
                    "name": BLAST_MODEL,
                    "model": BLAST_MODEL,
                    "size": 1_000_000,
                    "digest": "0" * 64,
                    "details": {"family": "llama", "parameter_size": "1B"},
                }
            ]
        }
    ).encode()
    answers = {
        b"/api/tags": tags,
        b"/api/ps": b'{"models":[]}',
        b"/api/version": b'{"version":"0.12.6"}',
        b"/": b"Ollama is running",
    }

    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        h = h11.Connection(h11.SERVER)
        try:
            while True:
                ev = h.next_event()
                if ev is h11.NEED_DATA:
                    data = await reader.read(65536)
                    if not data:
                        return
                    h.receive_data(data)
                    continue
                if isinstance(ev, h11.Request):
                    target = ev.target.split(b"?")[0]
                    while True:
                        nxt = h.next_event()
                        if isinstance(nxt, h11.EndOfMessage):
                            break
                        if nxt is h11.NEED_DATA:
                            data = await reader.read(65536)
                            if not data:
                                return
                            h.receive_data(data)
                    if target == b"/api/generate":
                        writer.write(
                            h.send(
                                h11.Response(
                                    status_code=200,
                                    headers=[
                                        (b"content-type", b"application/x-ndjson"),
                                        (b"transfer-encoding", b"chunked"),
                                    ],
                                )
                            )
                        )
                        view = memoryview(body)
                        for i in range(0, len(body), 65536):
                            writer.write(h.send(h11.Data(data=bytes(view[i : i + 65536]))))
                            await writer.drain()
                        writer.write(h.send(h11.EndOfMessage()))
                    else:
                        out = answers.get(target, b'{"error":"not found"}')
                        status = 200 if target in answers else 404
                        writer.write(
                            h.send(
                                h11.Response(
                                    status_code=status,
                                    headers=[
                                        (b"content-type", b"application/json"),
                                        (b"content-length", str(len(out)).encode()),
                                    ],
                                )
                            )
                        )
                        writer.write(h.send(h11.Data(data=out)))
                        writer.write(h.send(h11.EndOfMessage()))
                    await writer.drain()
                    h.start_next_cycle()
                else:
                    return
        except (ConnectionError, h11.ProtocolError, asyncio.CancelledError):
            return
        finally:
            writer.close()

    server = await asyncio.start_server(conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def stop() -> None:
        server.close()

    await serve_until_signal(port, stop)


async def run_herd(
    nodes: list[str], data_dir: str, profile: str | None, slots: dict[str, int]
) -> None:
    import logging

    import herd

    logging.basicConfig(level=logging.WARNING)
    cfg = herd.Config(
        host="127.0.0.1",
        port=0,
        nodes=nodes,
        data_dir=Path(data_dir),
        local_ollama=None,
        mdns=False,
        poll_interval_s=2.0,
        log_level="WARNING",
        slots=slots,
    )
    router = herd.Router(cfg)
    _, port = await router.start()
    herd.tune_gc()  # as ``python herd.py`` does once started
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()

        def toggle() -> None:
            assert prof is not None
            prof.enable()

        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, toggle)

    async def stop() -> None:
        if prof is not None and profile:
            prof.disable()
            prof.dump_stats(profile)
        await router.stop()

    await serve_until_signal(port, stop)


async def run_relay(node_url: str) -> None:
    """The floor: the least an h11 proxy can do per request. One upstream connection per
    client connection, no routing, no pool, no limits, no traces; each response is read
    whole and sent back with one write. Whatever herd adds beyond this relay is herd's
    own work; what this relay adds over going direct is the h11-on-both-sides hop itself."""
    up_host, _, up_port = node_url.removeprefix("http://").partition(":")
    host_header = f"{up_host}:{up_port}".encode()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server = h11.Connection(h11.SERVER)
        up_reader, up_writer = await asyncio.open_connection(up_host, int(up_port))
        client = h11.Connection(h11.CLIENT)
        try:
            while True:
                if not await relay_request(server, reader, client, up_writer, host_header):
                    return
                resp = await next_event(client, up_reader)
                out = bytearray()
                while isinstance(ev := await next_event(client, up_reader), h11.Data):
                    out += ev.data
                client.start_next_cycle()
                resp_headers = [(k, v) for k, v in resp.headers if k != b"content-length"]
                resp_headers.append((b"content-length", str(len(out)).encode()))
                writer.write(b"".join((
                    server.send(h11.Response(status_code=resp.status_code,
                                             headers=resp_headers)) or b"",
                    server.send(h11.Data(data=bytes(out))) or b"",
                    server.send(h11.EndOfMessage()) or b"",
                )))
                server.start_next_cycle()
        except (ConnectionError, h11.ProtocolError):
            return
        finally:
            up_writer.close()
            writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)

    async def stop() -> None:
        srv.close()

    await serve_until_signal(srv.sockets[0].getsockname()[1], stop)


def role_main(args: argparse.Namespace) -> None:
    use_uvloop()
    if args.role == "node":
        asyncio.run(run_fake(SMALL_MODEL, 12))
    elif args.role == "longnode":
        asyncio.run(run_fake(LONG_MODEL, LONG_TOKENS))
    elif args.role == "blaster":
        asyncio.run(run_blaster())
    elif args.role == "relay":
        asyncio.run(run_relay(args.node[0]))
    elif args.role == "herd":
        slots = {}
        for spec in args.slots:
            node_id, _, n = spec.partition("=")
            slots[node_id] = int(n)
        asyncio.run(run_herd(args.node, args.data_dir, args.profile_out, slots))


# =======================================================================================
# Load generator: raw asyncio + h11 keep-alive client
# =======================================================================================


class Client:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter
        self.conn = h11.Connection(h11.CLIENT)

    async def open(self) -> Client:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self

    async def _event(self) -> Any:
        while True:
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA:
                self.conn.receive_data(await self.reader.read(262144))
                continue
            return ev

    async def post(
        self, path: str, body: bytes, on_data: Callable[[bytes], None] | None = None,
        method: str = "POST",
    ) -> tuple[int, bytes, float]:
        """Returns (status, body or b"" when on_data consumes it, time to first body byte)."""
        t0 = time.perf_counter()
        data = self.conn.send(
            h11.Request(
                method=method,
                target=path,
                headers=[
                    ("host", f"127.0.0.1:{self.port}"),
                    ("content-type", "application/json"),
                    ("content-length", str(len(body))),
                ],
            )
        )
        data += self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage())
        self.writer.write(data)
        resp = await self._event()
        if not isinstance(resp, h11.Response):
            raise RuntimeError(f"unexpected {resp!r}")
        parts: list[bytes] = []
        ttfb = 0.0
        while True:
            ev = await self._event()
            if isinstance(ev, h11.Data):
                if not ttfb:
                    ttfb = time.perf_counter() - t0
                if on_data is not None:
                    on_data(ev.data)
                else:
                    parts.append(bytes(ev.data))
            elif isinstance(ev, h11.EndOfMessage):
                break
            else:
                raise RuntimeError(f"unexpected {ev!r}")
        self.conn.start_next_cycle()
        return resp.status_code, b"".join(parts), ttfb

    def close(self) -> None:
        self.writer.close()


def small_body(i: int) -> bytes:
    # a handful of distinct prompts; small request and a 12-token answer
    return json.dumps(
        {"model": SMALL_MODEL, "prompt": f"why is the sky blue {i % 8}", "stream": False}
    ).encode()


async def latency_run(port: int, n: int) -> list[float]:
    c = await Client(port).open()
    out = []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            status, body, _ = await c.post("/api/generate", small_body(i))
            out.append(time.perf_counter() - t0)
            if status != 200:
                raise RuntimeError(f"status {status}: {body[:200]!r}")
    finally:
        c.close()
    return out


async def closed_loop(
    port: int, concurrency: int, total: int
) -> tuple[list[float], float, list[str]]:
    """``concurrency`` keep-alive clients send ``total`` small /api/generate requests back
    to back. Returns each latency (s), the elapsed time (s) and a line per non-200 answer."""
    clients = [await Client(port).open() for _ in range(concurrency)]
    counter = iter(range(total))
    lat: list[float] = []
    errors: list[str] = []

    async def worker(c: Client) -> None:
        for i in counter:
            t0 = time.perf_counter()
            status, body, _ = await c.post("/api/generate", small_body(i))
            lat.append(time.perf_counter() - t0)
            if status != 200:
                errors.append(f"status {status}: {body[:200]!r}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in clients))
    elapsed = time.perf_counter() - t0
    for c in clients:
        c.close()
    return lat, elapsed, errors


async def throughput_run(port: int, concurrency: int, total: int) -> tuple[float, int]:
    _, elapsed, errors = await closed_loop(port, concurrency, total)
    return total / elapsed, len(errors)


async def stream_run(port: int, model: str, num_predict: int) -> tuple[float, int, float]:
    """One long stream; returns (lines/s, lines, ttfb s)."""
    c = await Client(port).open()
    lines = 0
    last = b""

    def count(data: bytes) -> None:
        nonlocal lines, last
        lines += data.count(b"\n")
        last = (last + bytes(data))[-4096:]

    body = json.dumps(
        {
            "model": model,
            "prompt": "tell me a long story",
            "raw": True,  # no context array in the final line
            "stream": True,
            "options": {"num_predict": num_predict},
        }
    ).encode()
    t0 = time.perf_counter()
    status, _, ttfb = await c.post("/api/generate", body, on_data=count)
    elapsed = time.perf_counter() - t0
    c.close()
    if status != 200 or b'"done":true' not in last:
        raise RuntimeError(f"stream failed: {status} {last[-200:]!r}")
    return lines / elapsed, lines, ttfb


def agent_beat(i: int, models: int = 8, loaded: int = 2) -> bytes:
    return _common.agent_beat(i, models=models, loaded=loaded)


async def fleet_status_run(port: int, nodes: int, n: int) -> tuple[list[float], int]:
    """``nodes`` agents beat once, then GET /fleet/status ``n`` times on one keep-alive
    connection. Returns each latency (s) and the document's size (bytes)."""
    c = await Client(port).open()
    try:
        for i in range(nodes):
            status, body, _ = await c.post("/heartbeat", agent_beat(i))
            if status != 200:
                raise RuntimeError(f"heartbeat {status}: {body[:200]!r}")
        lat: list[float] = []
        size = 0
        for _ in range(n):
            t0 = time.perf_counter()
            status, body, _ = await c.post("/fleet/status", b"", method="GET")
            lat.append(time.perf_counter() - t0)
            if status != 200 or body.count(b'"bench-gpu-') < nodes:
                raise RuntimeError(f"/fleet/status {status}: {body[:200]!r}")
            size = len(body)
    finally:
        c.close()
    return lat, size


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# =======================================================================================
# Orchestration
# =======================================================================================


class Proc(_common.Proc):
    """One of this file's roles (``--role ...``) in its own process, up once it prints
    ``READY <port>``."""

    def __init__(self, *args: str, stderr: Any = None) -> None:
        super().__init__([sys.executable, __file__, *args], ready_line, stderr=stderr,
                         start_s=20, stop_s=10)
        self.port = int(self.ready)
        self.url = f"http://127.0.0.1:{self.port}"

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.p.send_signal(sig)


async def wait_routable(port: int, models: list[str], timeout: float = 15.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(OSError, RuntimeError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /api/tags HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = await reader.read(-1)
            writer.close()
            if all(m.encode() in data for m in models):
                return
        await asyncio.sleep(0.1)
    raise RuntimeError("herd never listed the models")


def progress(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def measure(
    herd: Proc, herd1: Proc, herd8: Proc, node: Proc, longnode: Proc, blaster: Proc,
    relay: Proc, quick: bool,
) -> dict[str, Any]:
    res: dict[str, Any] = {}
    n_lat = 600 if quick else 2000
    n_tp = 1000 if quick else 4000
    await wait_routable(herd.port, [SMALL_MODEL, LONG_MODEL, BLAST_MODEL])
    progress("herd routable")
    # warm up: connections, model load, pools, JIT-less caches
    await latency_run(node.port, 100)
    await latency_run(relay.port, 100)
    await latency_run(herd.port, 200)
    await throughput_run(herd.port, 64, 500)
    # (a) latency at concurrency 1, interleaved in blocks so drift hits all three alike
    direct: list[float] = []
    via: list[float] = []
    floor: list[float] = []
    herd_cpu = relay_cpu = 0.0
    for _ in range(8):
        direct += await latency_run(node.port, n_lat // 8)
        c0 = cpu_s(relay.p.pid)
        floor += await latency_run(relay.port, n_lat // 8)
        relay_cpu += cpu_s(relay.p.pid) - c0
        c0 = cpu_s(herd.p.pid)
        via += await latency_run(herd.port, n_lat // 8)
        herd_cpu += cpu_s(herd.p.pid) - c0
    res["lat"] = (direct, via)
    res["floor"] = floor
    res["herd_cpu_per_req"] = herd_cpu / len(via)
    res["relay_cpu_per_req"] = relay_cpu / len(floor)
    progress("latency done")
    # (b) throughput at concurrency 16 and 64 (at 64 also CPU per request, herd vs relay)
    for conc in (16, 64):
        d_rps, d_err = await throughput_run(node.port, conc, n_tp)
        c0 = cpu_s(herd.p.pid)
        h_rps, h_err = await throughput_run(herd.port, conc, n_tp)
        h_cpu = (cpu_s(herd.p.pid) - c0) / n_tp
        res[f"rps{conc}"] = (d_rps, h_rps, d_err + h_err)
        if conc == 64:
            c0 = cpu_s(relay.p.pid)
            await throughput_run(relay.port, conc, n_tp)
            res["cpu64"] = (h_cpu, (cpu_s(relay.p.pid) - c0) / n_tp)
        progress(f"throughput c={conc} done")
    await wait_routable(herd1.port, [SMALL_MODEL])
    await throughput_run(herd1.port, 8, 100)
    res["rps64_default"] = await throughput_run(herd1.port, 64, n_tp // 4)
    progress("throughput c=64 (default slots) done")
    # (c) long NDJSON stream: the fake (end to end) and the blaster (herd's relay capacity)
    res["stream_fake"] = (
        await stream_run(longnode.port, LONG_MODEL, LONG_TOKENS),
        await stream_run(herd.port, LONG_MODEL, LONG_TOKENS),
    )
    progress("fake stream done")
    res["stream_blast"] = (
        await stream_run(blaster.port, BLAST_MODEL, BLAST_LINES),
        await stream_run(herd.port, BLAST_MODEL, BLAST_LINES),
    )
    progress("blaster stream done")
    # (d) saturation: 64 clients on a node herd believes has 8 slots (56 always queued);
    # the bare relay (no queue) under the same load, interleaved, shows the machine's own
    # p99/p50. Each block's first 64 answers (the ramp: 64 fresh connections at once) are
    # left out.
    await wait_routable(herd8.port, [SMALL_MODEL])
    await closed_loop(herd8.port, SATURATION_CLIENTS, 300)
    sat: list[float] = []
    sat_relay: list[float] = []
    sat_errors: list[str] = []
    sat_elapsed = 0.0
    for _ in range(2):
        lat, _, errors = await closed_loop(relay.port, SATURATION_CLIENTS, n_tp // 4)
        sat_relay += lat[SATURATION_CLIENTS:]
        sat_errors += errors
        lat, elapsed, errors = await closed_loop(herd8.port, SATURATION_CLIENTS, n_tp // 4)
        sat += lat[SATURATION_CLIENTS:]
        sat_errors += errors
        sat_elapsed += elapsed
    res["saturation"] = (sat, sat_elapsed, sat_errors, sat_relay)
    progress("saturation done")
    # (e) /fleet/status with 20 agent nodes (on herd1, after its own runs)
    res["fleet_status"] = await fleet_status_run(herd1.port, STATUS_NODES, 100 if quick else 400)
    progress("fleet status done")
    return res


def report(res: dict[str, Any], loop_name: str, elapsed: float) -> bool:
    ms = 1000.0
    direct, via = res["lat"]
    d50, d99 = pct(direct, 0.5) * ms, pct(direct, 0.99) * ms
    h50, h99 = pct(via, 0.5) * ms, pct(via, 0.99) * ms
    add50, add99 = h50 - d50, h99 - d99
    rows: list[tuple[str, str, str, str, str]] = []
    rows.append(
        (
            "c=1 latency p50 (ms)",
            f"{d50:.3f}",
            f"{h50:.3f}",
            f"+{add50:.3f} ms",
            "(no target: the bare relay adds about as much)",
        )
    )
    rows.append(("c=1 latency p99 (ms)", f"{d99:.3f}", f"{h99:.3f}", f"+{add99:.3f} ms", ""))
    f50 = pct(res["floor"], 0.5) * ms
    rows.append(
        (
            "  the floor: bare h11 relay, p50 (ms)",
            f"{d50:.3f}",
            f"{f50:.3f}",
            f"+{f50 - d50:.3f} ms",
            f"herd adds {h50 - f50:+.3f} ms over the relay",
        )
    )
    ok = True
    for label, (h_cpu, r_cpu) in (
        ("c=1", (res["herd_cpu_per_req"], res["relay_cpu_per_req"])),
        ("c=64", res["cpu64"]),
    ):
        ratio = h_cpu / r_cpu if r_cpu > 0 else float("inf")
        ok = ok and ratio <= 1.5
        rows.append(
            (
                f"CPU per request at {label} (ms), relay | herd",
                f"{r_cpu * ms:.3f}",
                f"{h_cpu * ms:.3f}",
                f"{ratio:.2f}x relay",
                f"≤ 1.5x relay: {'PASS' if ratio <= 1.5 else 'MISS'} (user+sys; noisy "
                "when other processes share the cores)",
            )
        )
    rows.append(
        (
            "c=1 requests/s",
            f"{1 / statistics.mean(direct):.0f}",
            f"{1 / statistics.mean(via):.0f}",
            f"{statistics.mean(direct) / statistics.mean(via) * 100:.0f} %",
            "",
        )
    )
    for conc in (16, 64):
        d, h, errs = res[f"rps{conc}"]
        ratio = h / d * 100
        verdict = f"≥ 15 %: {'PASS' if ratio >= 15 else 'MISS'}" if conc == 64 else ""
        if conc == 64:
            ok = ok and ratio >= 15
        rows.append(
            (
                f"c={conc} requests/s",
                f"{d:.0f}",
                f"{h:.0f}",
                f"{ratio:.0f} %",
                verdict + (f" ({errs} non-200)" if errs else ""),
            )
        )
    d = res["rps64"][0]
    h, errs = res["rps64_default"]
    rows.append(
        (
            "c=64 requests/s, herd default slots=1",
            f"{d:.0f}",
            f"{h:.0f}",
            f"{h / d * 100:.0f} %",
            "(node's slots unknown to herd)" + (f" ({errs} non-200)" if errs else ""),
        )
    )
    for key, label in (("stream_fake", "fake node"), ("stream_blast", "blaster node")):
        (dls, _dn, dttfb), (hls, hn, httfb) = res[key]
        verdict = f"≥ 50k: {'PASS' if hls >= 50_000 else 'MISS'}"
        if key == "stream_blast":
            ok = ok and hls >= 50_000
        rows.append(
            (
                f"NDJSON lines/s, {label} ({hn} lines)",
                f"{dls:,.0f}",
                f"{hls:,.0f}",
                f"{hls / dls * 100:.0f} %",
                verdict,
            )
        )
        rows.append(
            (
                f"  time to first byte, {label} (ms)",
                f"{dttfb * ms:.2f}",
                f"{httfb * ms:.2f}",
                f"+{(httfb - dttfb) * ms:.2f} ms",
                "",
            )
        )
    lat, elapsed, errors, relay_lat = res["saturation"]
    s50, s99 = pct(lat, 0.5) * ms, pct(lat, 0.99) * ms
    ok = ok and s99 <= 3 * s50 and not errors
    rows.append(
        (
            f"saturated c={SATURATION_CLIENTS}, {SATURATION_SLOTS} slots: p50 | p99 (ms)",
            f"{s50:.1f}",
            f"{s99:.1f}",
            f"p99 = {s99 / s50:.2f}x p50",
            f"≤ 3x: {'PASS' if s99 <= 3 * s50 else 'MISS'}, max {max(lat) * ms:.0f} ms, "
            f"{len(lat) / elapsed:.0f} req/s" + (f" ({len(errors)} non-200)" if errors else ""),
        )
    )
    r50, r99 = pct(relay_lat, 0.5) * ms, pct(relay_lat, 0.99) * ms
    rows.append(
        (
            f"  bare relay, same c={SATURATION_CLIENTS} load (no queue)",
            f"{r50:.1f}",
            f"{r99:.1f}",
            f"p99 = {r99 / r50:.2f}x p50",
            "the machine's own tail (no target)",
        )
    )
    st_lat, st_size = res["fleet_status"]
    st50 = pct(st_lat, 0.5) * ms
    ok = ok and st50 <= 2.0
    rows.append(
        (
            f"/fleet/status, {STATUS_NODES} agent nodes: p50 | p99 (ms)",
            f"{st50:.2f}",
            f"{pct(st_lat, 0.99) * ms:.2f}",
            f"{st_size / 1000:.0f} KB",
            f"p50 ≤ 2 ms: {'PASS' if st50 <= 2.0 else 'MISS'}",
        )
    )
    w = [max(len(r[i]) for r in rows) for i in range(5)]
    head = ("measure", "direct", "via herd", "herd/direct", "target")
    w = [max(w[i], len(head[i])) for i in range(5)]
    print()
    print(
        f"proxy overhead: herd vs direct, {os.cpu_count()} cores, {loop_name} everywhere, "
        f"client in its own process ({elapsed:.0f} s)"
    )
    print("  ".join(h.ljust(w[i]) for i, h in enumerate(head)))
    print("  ".join("-" * w[i] for i in range(5)))
    for r in rows:
        print(
            "  ".join(
                c.ljust(w[i]) if i == 0 else c.rjust(w[i]) if i < 4 else c for i, c in enumerate(r)
            )
        )
    print(
        "(the 'fake node' stream is bounded by the Python fake's per-line cost; the blaster "
        "streams a prebuilt body in 64 KiB writes, so its row is herd's relay capacity)"
    )
    return ok


def print_profile(path: str, top: int = 30) -> None:
    st = pstats.Stats(path)
    st.sort_stats("tottime")
    print(f"\nherd process profile during the runs (top {top} by own time):")
    stats = st.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values())
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    print(f"{'own s':>8} {'own %':>6} {'cum s':>8} {'calls':>9}  function")
    for (file, line, fn), (_cc, nc, tt, ct, _) in rows:
        short = os.path.relpath(file, ROOT) if file.startswith(str(ROOT)) else Path(file).name
        print(f"{tt:8.3f} {tt / total * 100:6.1f} {ct:8.3f} {nc:9d}  {short}:{line} {fn}")
    print("\nherd.py functions by cumulative time:")
    herd_rows = [kv for kv in stats.items() if kv[0][0].endswith("herd.py")]
    herd_rows.sort(key=lambda kv: kv[1][3], reverse=True)
    for (_, line, fn), (_cc, nc, tt, ct, _) in herd_rows[:20]:
        print(f"{ct:8.3f} s cum {tt:8.3f} s own {nc:9d} calls  herd.py:{line} {fn}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", choices=["node", "longnode", "blaster", "herd", "relay"])
    ap.add_argument("--node", action="append", default=[])
    ap.add_argument("--data-dir")
    ap.add_argument("--slots", action="append", default=[])
    ap.add_argument("--profile-out")
    ap.add_argument("--profile", action="store_true", help="cProfile the herd process")
    ap.add_argument(
        "--profile-path",
        default=os.path.join(tempfile.gettempdir(), "herd-proxy-overhead.prof"),
        help="where --profile keeps the pstats file (for snakeviz / pstats)",
    )
    ap.add_argument("--quick", action="store_true", help="fewer requests (smoke test)")
    args = ap.parse_args()
    if args.role:
        role_main(args)
        return 0
    loop_name = use_uvloop()
    t0 = time.time()
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="herd-bench-") as tmp:
        prof_path = args.profile_path if args.profile else None
        try:
            node = Proc("--role", "node")
            procs.append(node)
            longnode = Proc("--role", "longnode")
            procs.append(longnode)
            blaster = Proc("--role", "blaster")
            procs.append(blaster)
            import herd as herd_mod

            herd_args = ["--role", "herd", "--data-dir", tmp]
            herd_args += ["--slots", f"{herd_mod.node_id_from_url(node.url)}={NODE_SLOTS}"]
            for p in (node, longnode, blaster):
                herd_args += ["--node", p.url]
            if prof_path:
                herd_args += ["--profile-out", prof_path]
            herd = Proc(*herd_args)
            procs.append(herd)
            # a second herd with the defaults: no slot count known for a static node (→ 1)
            herd1 = Proc(
                "--role", "herd", "--data-dir", os.path.join(tmp, "h1"), "--node", node.url
            )
            procs.append(herd1)
            relay = Proc("--role", "relay", "--node", node.url)
            procs.append(relay)
            # a third herd told node A has 8 slots: 64 clients saturate it (FIFO admission)
            herd8 = Proc(
                "--role", "herd", "--data-dir", os.path.join(tmp, "h8"), "--node", node.url,
                "--slots", f"{herd_mod.node_id_from_url(node.url)}={SATURATION_SLOTS}",
            )
            procs.append(herd8)
            if prof_path:
                herd.signal(signal.SIGUSR1)  # start profiling
            res = asyncio.run(
                measure(herd, herd1, herd8, node, longnode, blaster, relay, args.quick)
            )
        finally:
            for p in reversed(procs):
                p.stop()
        ok = report(res, loop_name, time.time() - t0)
        if prof_path and os.path.exists(prof_path):
            print_profile(prof_path)
            print(f"\n(pstats file: {prof_path})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
