"""Attack run against a live herd (loopback only): fuzzers, slowloris, junk, memory.

    python bench/attack.py          # < 120 s, prints a table

1. Relay fuzz (in-process): random NDJSON/SSE streams cut at random byte boundaries through
   ``herd.LineRelay``; output must equal input, no partial record, NDJSON final found.
2. Parser fuzz (over TCP): random and mutated HTTP requests to the herd process, many
   connections at once; each must be answered or closed (never left hanging), no 500.
3. Slowloris: normal clients' latency p50/p99 without, then with 500 connections that
   send a request head one byte at a time (every second, inside the header deadline).
4. The herd process: alive at the end, a normal request still works, no traceback in its
   log, open file descriptors back to baseline, RSS before/after.

Targets (issue 9): ≥ 100,000 malformed inputs, 0 crashes / stuck connections, p99 during
slowloris ≤ 2x without.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import proxy_overhead as po  # noqa: E402

import herd  # noqa: E402
from tests import test_relay_fuzz as rf  # noqa: E402

# each fuzzer stops at its input count or its time cap, whichever comes first
RELAY_INPUTS, RELAY_BUDGET_S = 60_000, 30.0
PARSER_INPUTS, PARSER_BUDGET_S = 45_000, 40.0
PARSER_CONNS = 48
SLOWLORIS = 500
STUCK_AFTER_S = 5.0


# =======================================================================================
# 1. Relay fuzz
# =======================================================================================


def relay_fuzz(target: int, budget_s: float, seed: int = 1) -> tuple[int, int, str]:
    rng = random.Random(seed)
    words = [*rf.TRICKY, "x", "hello world", "é", '{"a":1}']
    inputs = failures = 0
    first = ""
    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline and inputs < target:
        for _ in range(200):
            texts = [rng.choice(words) for _ in range(rng.randrange(0, 25))]
            kind = rng.randrange(4)
            if kind == 0:
                data = rf.ndjson_stream(
                    texts, trailing_newline=rng.random() < 0.8, spaced=rng.random() < 0.3
                )
                framing = "ndjson"
            elif kind == 1:
                data = b"".join(
                    [
                        *rf.sse_events(texts, comments=rng.random() < 0.3),
                        rf.USAGE_EVENT,
                        rf.DONE_EVENT,
                    ]
                )
                framing = "sse"
            elif kind == 2:
                data = rng.randbytes(rng.randrange(0, 600))
                framing = rng.choice(["ndjson", "sse"])
            else:  # junk mixed with newlines
                data = b"".join(
                    rng.choice(
                        [b"\n", b"\n\n", b"data: ", b"{", b"}", b'"done":true', rng.randbytes(5)]
                    )
                    for _ in range(rng.randrange(40))
                )
                framing = rng.choice(["ndjson", "sse"])
            n = len(data)
            if rng.random() < 0.1:
                cuts = list(range(n))  # byte by byte
            else:
                cuts = [rng.randrange(n + 1) for _ in range(rng.randrange(0, 12))]
            inputs += 1
            try:
                final = rf.check_exact(framing, data, rf.split_at(data, cuts))  # type: ignore[arg-type]
                if kind == 0:
                    assert final is not None and final.get("done") is True
            except AssertionError as exc:
                failures += 1
                first = first or f"{framing} {data[:80]!r} cuts={cuts[:5]}: {exc}"
    return inputs, failures, first


# =======================================================================================
# 2. Parser fuzz over TCP
# =======================================================================================

METHODS = [b"GET", b"POST", b"HEAD", b"DELETE", b"PUT", b"OPTIONS", b"BREW", b"get", b""]
# (no /api/delete, /api/pull, /api/copy: a well-formed one would really change the fleet)
PATHS = [
    b"/",
    b"/api/generate",
    b"/api/chat",
    b"/api/tags",
    b"/api/show",
    b"/v1/chat/completions",
    b"/api/blobs/sha256:00",
    b"/%00",
    b"*",
    b"/\xff",
    b"/fleet/status",
    b"/heartbeat",
    b"/metrics",
]
HNAMES = [
    b"Host",
    b"Content-Length",
    b"Transfer-Encoding",
    b"Content-Type",
    b"Connection",
    b"Expect",
    b"Origin",
    b"X-Herd-Node",
    b"Authorization",
    b"X-Request-Id",
]
HVALUES = [
    b"x",
    b"0",
    b"5",
    b"-1",
    b"99999999999999999999",
    b"chunked",
    b"gzip, chunked",
    b"close",
    b"100-continue",
    b"application/json",
    b"\xff\xfe",
    b"a" * 500,
    b"1, 2",
    b"",
]
BODIES = [
    b"",
    b"{",
    b"[]",
    b"null",
    b'{"model": 1}',
    b'{"model": "llama3.2:3b", "prompt": 5}',
    b'{"model": "llama3.2:3b", "messages": "x"}',
    b"0\r\n\r\n",
    b"zz\r\n",
    b"5\r\nhello\r\n0\r\n\r\n",
    b'{"model":"llama3.2:3b","options":[]}',
    b"[" * 5000,
    b'{"model":"llama3.2:3b","prompt":"\xff\xfe"}',
]


def junk_request(rng: random.Random) -> bytes:
    if rng.random() < 0.15:
        return rng.randbytes(rng.randrange(1, 300))
    eol = rng.choice([b"\r\n"] * 6 + [b"\n", b"\r"])
    msg = (
        rng.choice(METHODS)
        + b" "
        + rng.choice(PATHS)
        + b" "
        + rng.choice([b"HTTP/1.1"] * 5 + [b"HTTP/1.0", b"HTTP/2", b"HTTP/9.9", b""])
        + eol
    )
    hdrs = [(b"Host", b"127.0.0.1")] if rng.random() < 0.8 else []
    for _ in range(rng.randrange(0, 6)):
        hdrs.append((rng.choice(HNAMES), rng.choice(HVALUES)))
    if rng.random() < 0.03:
        hdrs += [(b"X-Many-%d" % i, b"v") for i in range(150)]
    body = rng.choice(BODIES)
    if rng.random() < 0.5:
        hdrs.append((b"Content-Length", str(len(body) + rng.choice([0, 0, 0, -1, 1, 7])).encode()))
    msg += b"".join(k + b": " + v + eol for k, v in hdrs) + eol + body
    op = rng.random()
    if op < 0.25:
        msg = msg[: rng.randrange(len(msg) + 1)]
    elif op < 0.45:
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(msg))
            msg = msg[:i] + bytes([rng.randrange(256)]) + msg[i + 1 :]
    elif op < 0.5:
        msg = msg + msg
    return msg


class ParserStats:
    def __init__(self) -> None:
        self.inputs = 0
        self.answered = 0
        self.closed_silently = 0
        self.stuck = 0
        self.status_5xx = 0
        self.statuses: dict[int, int] = {}
        self.example_5xx = b""


async def parser_worker(
    port: int, rng: random.Random, stats: ParserStats, deadline: float, target: int
) -> None:
    while time.monotonic() < deadline and stats.inputs < target:
        data = junk_request(rng)
        stats.inputs += 1
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            stats.stuck += 1
            await asyncio.sleep(0.05)
            continue
        got = b""
        try:
            writer.write(data)
            with contextlib.suppress(OSError):
                await writer.drain()
                writer.write_eof()  # the server sees the end: it must answer or close now
            async with asyncio.timeout(STUCK_AFTER_S):
                while True:
                    try:
                        chunk = await reader.read(65536)
                    except OSError:
                        chunk = b""
                    if not chunk:
                        break
                    got += chunk
        except TimeoutError:
            stats.stuck += 1
        finally:
            writer.close()
        status = po_status(got)
        if status is None:
            stats.closed_silently += 1
        else:
            stats.answered += 1
            stats.statuses[status] = stats.statuses.get(status, 0) + 1
            if status == 500:
                stats.status_5xx += 1
                stats.example_5xx = stats.example_5xx or data[:200] + b" -> " + got[:200]


def po_status(data: bytes) -> int | None:
    if not data.startswith(b"HTTP/1."):
        return None
    try:
        return int(data.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


async def parser_fuzz(port: int, target: int, budget_s: float) -> ParserStats:
    stats = ParserStats()
    deadline = time.monotonic() + budget_s
    await asyncio.gather(
        *(
            parser_worker(port, random.Random(100 + i), stats, deadline, target)
            for i in range(PARSER_CONNS)
        )
    )
    return stats


# =======================================================================================
# 3. Slowloris vs normal clients
# =======================================================================================


async def normal_clients(port: int, n: int, concurrency: int = 4) -> list[float]:
    lat, _, errors = await po.closed_loop(port, concurrency, n)
    if errors:
        raise RuntimeError(f"normal request failed: {errors[0]}")
    return lat


async def slowloris(port: int, count: int, stop: asyncio.Event, opened: list[int]) -> None:
    head = b"GET /api/tags HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 2000

    async def one(i: int) -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.5)
                continue
            opened[0] += 1
            try:
                await asyncio.sleep(random.random())  # spread the bytes out
                for b in head:
                    if stop.is_set() or reader.at_eof():
                        break
                    writer.write(bytes([b]))
                    await writer.drain()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await stop.wait()
            except OSError:
                pass
            finally:
                writer.close()

    await asyncio.gather(*(one(i) for i in range(count)))


# =======================================================================================
# Process helpers
# =======================================================================================


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def main_async(herd_p: subprocess.Popen[str], port: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    pid = herd_p.pid
    await po.wait_routable(port, [po.SMALL_MODEL])
    await normal_clients(port, 300)  # warm up
    res["rss0"] = rss_mb(pid)
    res["fds0"] = open_fds(pid)
    t0 = time.monotonic()
    res["relay"] = relay_fuzz(RELAY_INPUTS, RELAY_BUDGET_S)
    res["relay_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    res["parser"] = await parser_fuzz(port, PARSER_INPUTS, PARSER_BUDGET_S)
    res["parser_s"] = time.monotonic() - t0
    res["rss_after_fuzz"] = rss_mb(pid)
    res["alive_after_fuzz"] = herd_p.poll() is None
    # slowloris
    res["lat_base"] = await normal_clients(port, 1500)
    stop = asyncio.Event()
    opened = [0]
    attack = asyncio.ensure_future(slowloris(port, SLOWLORIS, stop, opened))
    await asyncio.sleep(3.0)  # let the 500 connections open and start dripping
    res["fds_during"] = open_fds(pid)
    res["lat_attack"] = await normal_clients(port, 1500)
    res["rss_during"] = rss_mb(pid)
    stop.set()
    await attack
    res["slow_opened"] = opened[0]
    await asyncio.sleep(1.0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and open_fds(pid) > res["fds0"] + 2:
        await asyncio.sleep(0.2)
    res["fds_end"] = open_fds(pid)
    await normal_clients(port, 50)
    res["alive_end"] = herd_p.poll() is None
    res["rss_end"] = rss_mb(pid)
    return res


def main() -> int:
    po.use_uvloop()
    t_start = time.time()
    procs: list[po.Proc] = []
    with tempfile.TemporaryDirectory(prefix="herd-attack-") as tmp:
        log_path = Path(tmp) / "herd.stderr"
        try:
            # the fake node's own tracebacks (e.g. a junk blob upload cut short) are not herd's
            node = po.Proc("--role", "node", stderr=subprocess.DEVNULL)
            procs.append(node)
            with open(log_path, "w") as log_file:
                # the herd process with production limits (header deadline 30 s, 1024 conns)
                herd_p = subprocess.Popen(
                    [
                        sys.executable,
                        str(ROOT / "bench" / "proxy_overhead.py"),
                        "--role",
                        "herd",
                        "--data-dir",
                        tmp,
                        "--node",
                        node.url,
                        "--slots",
                        f"{herd.node_id_from_url(node.url)}={po.NODE_SLOTS}",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=log_file,
                    text=True,
                    cwd=ROOT,
                )
                assert herd_p.stdout is not None
                line = herd_p.stdout.readline()
                if not line.startswith("READY"):
                    raise RuntimeError("herd did not start")
                port = int(line.split()[1])
                try:
                    res = asyncio.run(main_async(herd_p, port))
                finally:
                    herd_p.terminate()
                    try:
                        herd_p.wait(15)
                    except subprocess.TimeoutExpired:
                        herd_p.kill()
        finally:
            for p in procs:
                p.stop()
        log_text = log_path.read_text(errors="replace")
    return report(res, log_text, time.time() - t_start)


def report(res: dict[str, Any], log_text: str, elapsed: float) -> int:
    r_inputs, r_fail, r_first = res["relay"]
    p: ParserStats = res["parser"]
    total = r_inputs + p.inputs
    tracebacks = log_text.count("Traceback")
    errors = sum(1 for ln in log_text.splitlines() if " ERROR " in ln or ln.startswith("ERROR"))
    crashes = (0 if res["alive_after_fuzz"] and res["alive_end"] else 1) + tracebacks
    base = sorted(res["lat_base"])
    att = sorted(res["lat_attack"])
    b50, b99 = po.pct(base, 0.5) * 1000, po.pct(base, 0.99) * 1000
    a50, a99 = po.pct(att, 0.5) * 1000, po.pct(att, 0.99) * 1000
    ratio = a99 / b99
    rows = [
        ("malformed inputs tried", f"{total:,}", "≥ 100,000", total >= 100_000),
        (
            "  relay fuzz: streams x random splits",
            f"{r_inputs:,} in {res['relay_s']:.0f} s",
            "0 violations",
            r_fail == 0,
        ),
        ("  relay violations", f"{r_fail}", "0", r_fail == 0),
        (
            "  parser fuzz: junk HTTP requests over TCP",
            f"{p.inputs:,} in {res['parser_s']:.0f} s",
            "",
            True,
        ),
        (
            "    answered / closed without answer",
            f"{p.answered:,} / {p.closed_silently:,}",
            "",
            True,
        ),
        ("    answered with 500", f"{p.status_5xx}", "0", p.status_5xx == 0),
        ("crashes (herd died or logged a traceback)", f"{crashes}", "0", crashes == 0),
        ("stuck connections (no answer/close in 5 s)", f"{p.stuck}", "0", p.stuck == 0),
        ("herd log ERROR lines", f"{errors}", "", True),
        ("normal p50 / p99 without attack (ms)", f"{b50:.2f} / {b99:.2f}", "", True),
        (f"normal p50 / p99 during {SLOWLORIS} slowloris (ms)", f"{a50:.2f} / {a99:.2f}", "", True),
        ("p99 ratio during / without", f"{ratio:.2f}x", "≤ 2x", ratio <= 2.0),
        ("slowloris connections opened", f"{res['slow_opened']}", "", True),
        (
            "herd open fds: before / during / after",
            f"{res['fds0']} / {res['fds_during']} / {res['fds_end']}",
            "back to before",
            res["fds_end"] <= res["fds0"] + 2,
        ),
        (
            "herd RSS MB: before / after fuzz / during slowloris / end",
            f"{res['rss0']:.1f} / {res['rss_after_fuzz']:.1f} / {res['rss_during']:.1f} / "
            f"{res['rss_end']:.1f}",
            "",
            True,
        ),
    ]
    print()
    print(f"attack run against herd on loopback ({elapsed:.0f} s, {os.cpu_count()} cores)")
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    for name, value, target, ok in rows:
        verdict = ("PASS" if ok else "MISS") if target else ""
        print(f"{name.ljust(w0)}  {value.rjust(w1)}  {target.ljust(w2)}  {verdict}")
    top = sorted(p.statuses.items(), key=lambda kv: -kv[1])[:10]
    print("parser fuzz statuses:", ", ".join(f"{s}x{n}" for s, n in top))
    if r_first:
        print("first relay violation:", r_first)
    if p.example_5xx:
        print("first 500:", p.example_5xx)
    if tracebacks:
        idx = log_text.find("Traceback")
        print("herd traceback:\n" + log_text[idx : idx + 2000])
    ok = all(r[3] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
