"""Streams at scale (issue 16): herd vs a bare streaming h11 relay, side by side.

    python bench/streams_scale.py              # ~1 min, prints a table, exit 1 on a miss
    python bench/streams_scale.py --profile    # also cProfile herd (slower; no targets)

Processes (each its own; 2 cores here, so the figures are noisy — read the ratios):

* nodes: one process serving 20 minimal Ollama nodes (20 ports), each with 8 models all
  loaded. A stream answers 100 token lines, one every 50 ms, from one shared ticker (so the
  fake costs little per line), then the final ``done`` line with Ollama's metrics: the ideal
  time for a stream is 100 x 50 ms = 5 s. The ``blast`` model streams a prebuilt body of
  200,000 lines in 64 KiB writes instead: that measures a relay's lines/s, not the fake's.
* herd: the real ``python herd.py`` with the 20 nodes (``--node``) and their slots
  (``--slots NODE=8``: 8 per node:model, 1,280 in all), no mDNS, no local Ollama.
* relay: the floor, a bare streaming h11 relay (no routing, pool, limits, timers or
  traces; one upstream connection per client connection, each body chunk passed on as it
  arrives); it spreads its connections over the 20 nodes round-robin.
* this process: 1,000 raw keep-alive clients (one connection each, cheap byte counting).

Scenarios, in interleaved blocks (relay, herd, relay, herd):

1. 1,000 concurrent streams, model i % 8: the time until the last one completes, the
   router's CPU (from /proc) per delivered line, and its peak RSS (VmHWM).
2. One long stream (the blast model): lines/s through the relay and through herd.

Targets (exit 1 when one is missed): herd completes the 1,000 streams in ≤ 6 s with every
stream whole (101 lines), herd's peak RSS ≤ 150 MB, herd's lines/s on one long stream
≥ 0.9x the bare relay's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import h11

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.lib.common import (  # noqa: E402
    Proc,
    cpu_s,
    herd_ready,
    next_event,
    ready_line,
    relay_request,
    serve_until_signal,
    use_uvloop,
)

NODES = 20
MODELS = [f"m{i}:1b" for i in range(8)]
BLAST_MODEL = "blast:1b"
STREAMS = 1000
TOKENS = 100
TICK_S = 0.05
SLOTS = 8
BLAST_LINES = 200_000
TARGET_S = 6.0
TARGET_RSS_MB = 150.0
TARGET_LINES_RATIO = 0.9


# =======================================================================================
# The nodes: 20 minimal Ollama servers in one process, one shared 50 ms ticker
# =======================================================================================


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def token_line(model: str) -> bytes:
    return json.dumps(
        {"model": model, "created_at": "2025-01-01T00:00:00.000000000Z", "response": " tok",
         "done": False}, separators=(",", ":"),
    ).encode() + b"\n"


def final_line(model: str, tokens: int) -> bytes:
    return json.dumps(
        {"model": model, "created_at": "2025-01-01T00:00:05.000000000Z", "response": "",
         "done": True, "done_reason": "stop", "total_duration": 5_000_000_000,
         "load_duration": 1_000_000, "prompt_eval_count": 10,
         "prompt_eval_duration": 1_000_000, "eval_count": tokens,
         "eval_duration": 5_000_000_000}, separators=(",", ":"),
    ).encode() + b"\n"


STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")


def json_answer(body: bytes, status: int = 200) -> bytes:
    reason = b"OK" if status == 200 else b"Not Found"
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json; charset=utf-8\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (status, reason, len(body), body))


async def run_nodes() -> None:
    expires = "2099-01-01T00:00:00Z"
    all_models = [*MODELS, BLAST_MODEL]
    tags = json.dumps({"models": [
        {"name": m, "model": m, "size": 1_000_000_000, "digest": "0" * 64,
         "details": {"family": "llama", "parameter_size": "1B", "quantization_level": "Q4"}}
        for m in all_models]}).encode()
    ps = json.dumps({"models": [
        {"name": m, "model": m, "size": 1_000_000_000, "size_vram": 1_000_000_000,
         "digest": "0" * 64, "expires_at": expires, "context_length": 4096}
        for m in all_models]}).encode()
    answers = {
        b"/api/tags": json_answer(tags),
        b"/api/ps": json_answer(ps),
        b"/api/version": json_answer(b'{"version":"0.12.6"}'),
        b"/": json_answer(b"Ollama is running"),
    }
    tokens = {m: chunk(token_line(m)) for m in MODELS}
    finals = {m: chunk(final_line(m, TOKENS)) + b"0\r\n\r\n" for m in MODELS}
    blast_line = token_line(BLAST_MODEL)
    # the blast's final line claims the token models' speed: a node that served it must not
    # look 400x faster to herd's learning (which would then queue for that node)
    blast = (blast_line * (BLAST_LINES - 1)) + final_line(BLAST_MODEL, TOKENS)
    # active streams: [writer, model, tokens left, done future]
    active: list[list[Any]] = []

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += TICK_S
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            keep = []
            for entry in active:
                writer, model, left, fut = entry
                if writer.is_closing():
                    if not fut.done():
                        fut.set_result(None)
                    continue
                if left > 0:
                    writer.write(tokens[model])
                    entry[2] = left - 1
                    keep.append(entry)
                else:
                    writer.write(finals[model])
                    if not fut.done():
                        fut.set_result(None)
            active[:] = keep

    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, _, rest = head.partition(b"\r\n")
                method, target, _ = line.split(b" ", 2)
                length = 0
                for h in rest.split(b"\r\n"):
                    k, _, v = h.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v)
                body = await reader.readexactly(length) if length else b""
                path = target.split(b"?")[0]
                if method == b"POST" and path in (b"/api/generate", b"/api/chat"):
                    model = json.loads(body).get("model", "")
                    if model == BLAST_MODEL:
                        writer.write(STREAM_HEAD)
                        view = memoryview(blast)
                        for i in range(0, len(blast), 65536):
                            writer.write(chunk(bytes(view[i : i + 65536])))
                            await writer.drain()
                        writer.write(b"0\r\n\r\n")
                    elif model in tokens:
                        writer.write(STREAM_HEAD)
                        fut = asyncio.get_running_loop().create_future()
                        active.append([writer, model, TOKENS, fut])
                        await fut
                    else:
                        writer.write(json_answer(b'{"error":"model not found"}', 404))
                else:
                    writer.write(answers.get(path) or json_answer(b'{"error":"no"}', 404))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError):
            return
        finally:
            writer.close()

    servers = [await asyncio.start_server(conn, "127.0.0.1", 0, backlog=1024)
               for _ in range(NODES)]
    tick = asyncio.ensure_future(ticker())
    ports = " ".join(str(s.sockets[0].getsockname()[1]) for s in servers)

    async def stop() -> None:
        tick.cancel()
        for s in servers:
            s.close()

    await serve_until_signal(ports, stop)


# =======================================================================================
# The floor: a bare streaming h11 relay
# =======================================================================================


async def run_relay(ports: list[int]) -> None:
    """One upstream connection per client connection, round-robin over the nodes; each
    upstream body chunk goes to the client as it arrives. No routing, pool, limits, timers,
    traces: whatever herd costs beyond this is herd's own work."""
    counter = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal counter
        port = ports[counter % len(ports)]
        counter += 1
        server = h11.Connection(h11.SERVER)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        client = h11.Connection(h11.CLIENT)
        host = f"127.0.0.1:{port}".encode()
        try:
            while True:
                if not await relay_request(server, reader, client, up_writer, host):
                    return
                resp = await next_event(client, up_reader)
                writer.write(server.send(h11.Response(
                    status_code=resp.status_code,
                    headers=[(k, v) for k, v in resp.headers if k != b"content-length"
                             and k != b"transfer-encoding"],
                )) or b"")
                while isinstance(ev := await next_event(client, up_reader), h11.Data):
                    writer.write(server.send(ev) or b"")
                    await writer.drain()
                writer.write(server.send(h11.EndOfMessage()) or b"")
                client.start_next_cycle()
                server.start_next_cycle()
        except (ConnectionError, h11.ProtocolError):
            return
        finally:
            up_writer.close()
            writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=2048)

    async def stop() -> None:
        srv.close()

    await serve_until_signal(str(srv.sockets[0].getsockname()[1]), stop)


# =======================================================================================
# Load: raw keep-alive clients that count whole NDJSON lines
# =======================================================================================


async def one_stream(port: int, model: str, prompt: str = "hi") -> tuple[int, bool, float]:
    """(lines, saw the final done line, seconds to the response head). Counts ``}\\n`` (a
    line's end; chunk framing holds no ``}``) and stops at the chunked terminator."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"model": model, "prompt": prompt, "stream": True}).encode()
    writer.write(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    lines = 0
    done = False
    tail = b""
    last = 0  # the previous read's last byte: a "}\n" may straddle two reads
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        ttfb = time.perf_counter() - t0
        if not head.startswith(b"HTTP/1.1 200"):
            return 0, False, ttfb
        while True:
            data = await reader.read(262144)
            if not data:
                break
            lines += data.count(b"}\n") + (last == 0x7D and data[0] == 0x0A)
            last = data[-1]
            if b'"done":true' in data:
                done = True
            tail = (tail + data)[-7:]
            if tail.endswith(b"\r\n0\r\n\r\n") or tail == b"0\r\n\r\n":
                break
    finally:
        writer.close()
    return lines, done, ttfb


async def many_streams(port: int, n: int) -> tuple[float, int, int, float]:
    """(seconds until the last completes, lines delivered, whole streams, slowest head)."""
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(one_stream(port, MODELS[i % len(MODELS)]) for i in range(n)), return_exceptions=True
    )
    elapsed = time.perf_counter() - t0
    lines = whole = 0
    head = 0.0
    for r in results:
        if isinstance(r, tuple):
            lines += r[0]
            whole += r[0] == TOKENS + 1 and r[1]
            head = max(head, r[2])
    return elapsed, lines, whole, head


def rss_mb(pid: int, field: str = "VmHWM") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def wait_routable(port: int, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(OSError):
            lines, done, _ = await one_stream(port, BLAST_MODEL)
            if done and lines == BLAST_LINES:
                return
        await asyncio.sleep(0.2)
    raise RuntimeError("herd never served the blast model")


async def measure(herd_port: int, herd_pid: int, relay_port: int, relay_pid: int,
                  blocks: int) -> dict[str, list[tuple[float, ...]]]:
    await wait_routable(herd_port)
    await many_streams(relay_port, 50)
    await many_streams(herd_port, 200)  # warm: pool connections, first-use caches
    res: dict[str, list[tuple[float, ...]]] = {"relay": [], "herd": [],
                                                 "relay_blast": [], "herd_blast": []}
    for b in range(blocks):
        for name, port, pid in (("relay", relay_port, relay_pid),
                                ("herd", herd_port, herd_pid)):
            c0 = cpu_s(pid)
            elapsed, lines, whole, head = await many_streams(port, STREAMS)
            cpu = cpu_s(pid) - c0
            res[name].append((elapsed, lines, whole, cpu, rss_mb(pid)))
            print(f"  block {b + 1}: {name:5} {STREAMS} streams in {elapsed:.2f} s, "
                  f"{whole} whole, {cpu / max(lines, 1) * 1e6:.1f} µs CPU/line, "
                  f"slowest response head {head:.2f} s",
                  file=sys.stderr, flush=True)
            await asyncio.sleep(0.5)
        for name, port in (("relay", relay_port), ("herd", herd_port)):
            t0 = time.perf_counter()
            lines, done, _ = await one_stream(port, BLAST_MODEL)
            res[name + "_blast"].append((lines / (time.perf_counter() - t0), lines, done))
    return res


def report(res: dict[str, list[tuple[float, ...]]], herd_rss: float, relay_rss: float) -> bool:
    def row(name: str) -> tuple[float, float, float, float]:
        runs = res[name]
        worst = max(r[0] for r in runs)
        whole = min(r[2] for r in runs)
        cpu_line = sum(r[3] for r in runs) / max(1.0, sum(r[1] for r in runs))
        return worst, whole, cpu_line, sum(r[0] for r in runs) / len(runs)

    r_worst, r_whole, r_cpu, r_mean = row("relay")
    h_worst, h_whole, h_cpu, h_mean = row("herd")
    r_ls = max(r[0] for r in res["relay_blast"])
    h_ls = max(r[0] for r in res["herd_blast"])
    blast_ok = all(r[2] and r[1] == BLAST_LINES for r in res["herd_blast"])
    ok_time = h_worst <= TARGET_S and h_whole == STREAMS
    ok_rss = herd_rss <= TARGET_RSS_MB
    ok_ls = h_ls >= TARGET_LINES_RATIO * r_ls and blast_ok

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    print(f"\nstreams at scale: {STREAMS} streams over {NODES} nodes x {len(MODELS)} models, "
          f"{TOKENS} tokens at {TICK_S * 1000:.0f} ms (ideal {TOKENS * TICK_S:.1f} s), "
          f"{len(res['herd'])} interleaved blocks, {os.cpu_count()} cores")
    rows = [
        ("measure", "bare relay", "herd", "herd/relay", "target"),
        (f"{STREAMS} streams: slowest block (s)", f"{r_worst:.2f}", f"{h_worst:.2f}",
         f"{h_worst / r_worst:.2f}x", f"herd ≤ {TARGET_S:g} s, all whole: {verdict(ok_time)}"),
        ("  mean block (s)", f"{r_mean:.2f}", f"{h_mean:.2f}", f"{h_mean / r_mean:.2f}x", ""),
        ("  whole streams (min of blocks)", f"{r_whole:.0f}", f"{h_whole:.0f}", "", ""),
        ("  CPU per delivered line (µs)", f"{r_cpu * 1e6:.1f}", f"{h_cpu * 1e6:.1f}",
         f"{h_cpu / r_cpu:.2f}x" if r_cpu else "-", "(no target)"),
        ("  peak RSS (MB)", f"{relay_rss:.0f}", f"{herd_rss:.0f}", "",
         f"herd ≤ {TARGET_RSS_MB:g} MB: {verdict(ok_rss)}"),
        (f"one long stream, lines/s ({BLAST_LINES:,} lines)", f"{r_ls:,.0f}", f"{h_ls:,.0f}",
         f"{h_ls / r_ls:.2f}x", f"≥ {TARGET_LINES_RATIO}x relay: {verdict(ok_ls)}"),
    ]
    w = [max(len(r[i]) for r in rows) for i in range(5)]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w[j]) if j in (0, 4) else c.rjust(w[j]) for j, c in enumerate(r)))
        if i == 0:
            print("  ".join("-" * x for x in w))
    print("(CPU from /proc; the machine is shared, so absolute figures are noisy: compare "
          "the columns, which ran in the same interleaved blocks)")
    return ok_time and ok_rss and ok_ls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", choices=["nodes", "relay"])
    ap.add_argument("--ports", default="")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--profile", action="store_true",
                    help="run herd under cProfile and print its top functions (no targets)")
    args = ap.parse_args()
    if args.role:
        use_uvloop()
        if args.role == "nodes":
            asyncio.run(run_nodes())
        else:
            asyncio.run(run_relay([int(p) for p in args.ports.split(",")]))
        return 0
    loop = use_uvloop()
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    procs: list[Proc] = []
    me = [sys.executable, __file__]
    with tempfile.TemporaryDirectory(prefix="herd-streams-") as tmp:
        try:
            nodes = Proc([*me, "--role", "nodes"], ready_line)
            procs.append(nodes)
            ports = [int(p) for p in nodes.ready.split()]
            relay = Proc([*me, "--role", "relay", "--ports", ",".join(map(str, ports))],
                         ready_line)
            procs.append(relay)
            prof = os.path.join(tempfile.gettempdir(), "herd-streams-scale.prof")
            herd_argv = [sys.executable]
            if args.profile:
                herd_argv += ["-m", "cProfile", "-o", prof]
            herd_argv += [str(ROOT / "herd.py"), "--host", "127.0.0.1", "--port", "0",
                          "--data-dir", tmp, "--local-ollama", "off", "--no-mdns",
                          "--log-level", "WARNING"]
            import herd as herd_mod

            for p in ports:
                url = f"http://127.0.0.1:{p}"
                herd_argv += ["--node", url, "--slots",
                              f"{herd_mod.node_id_from_url(url)}={SLOTS}"]
            herd = Proc(herd_argv, herd_ready)
            procs.append(herd)
            print(f"  nodes, relay and herd up ({loop}); measuring", file=sys.stderr)
            res = asyncio.run(measure(int(herd.ready), herd.p.pid, int(relay.ready),
                                      relay.p.pid, args.blocks))
            herd_rss = rss_mb(herd.p.pid)
            relay_rss = rss_mb(relay.p.pid)
        finally:
            for proc in reversed(procs):
                proc.stop()
        ok = report(res, herd_rss, relay_rss)
        if args.profile and os.path.exists(prof):
            import pstats

            print("\nherd under cProfile (top 30 by own time):")
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)
            print("herd.py by cumulative time:")
            pstats.Stats(prof).sort_stats("cumulative").print_stats("herd.py", 25)
            print(f"(pstats file: {prof})")
            return 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
