"""A chaos scenario shared by tests/test_chaos.py and bench/chaos.py.

Six nodes behind one router under a bounded mixed load (native streams, non-streaming
generates, OpenAI streams). Midway: one node is SIGKILLed, one SIGSTOPped, one answers 500s,
one stalls before its first byte. Two stay healthy. Every client request is checked against
what the client must see: a complete answer, or a stream that ends with an error record.
Nothing may be lost (no answer, a broken body, or a silent truncation).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import herd
from tests.fake_ollama import FakeModel, FakeOllama
from tests.http_helpers import fetch, request_bytes

ROOT = Path(__file__).resolve().parent.parent
MODEL = "llama3.2:3b"


@dataclass
class Outcome:
    kind: str  # "generate" | "stream" | "sse"
    status: int
    ok: bool  # complete answer
    clean_error: bool  # ended with an error record in the client's dialect
    latency_s: float
    request_id: str = ""
    detail: str = ""


@dataclass
class ChaosResult:
    outcomes: list[Outcome] = field(default_factory=list)
    traces: list[dict[str, Any]] = field(default_factory=list)
    tasks_before: int = 0
    tasks_after: int = 0
    rss_before: int = 0
    rss_after: int = 0
    in_flight_after: int = 0
    pending_after: int = 0

    @property
    def lost(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok and not o.clean_error]

    def p99(self) -> float:
        lat = sorted(o.latency_s for o in self.outcomes)
        return lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else 0.0

    def p50(self) -> float:
        return statistics.median(o.latency_s for o in self.outcomes) if self.outcomes else 0.0


def router_tasks() -> int:
    """Tasks running herd code (the fakes share the loop; their tasks are not counted)."""
    count = 0
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        if code is not None and code.co_filename.endswith("herd.py"):
            count += 1
    return count


def rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@contextlib.asynccontextmanager
async def subprocess_node(
    tokens_per_s: float,
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.fake_ollama",
        "--port",
        "0",
        "--model",
        MODEL,
        "--num-parallel",
        "2",
        "--tokens-per-s",
        str(tokens_per_s),
        stdout=asyncio.subprocess.PIPE,
        cwd=str(ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    async with asyncio.timeout(20):
        line = (await proc.stdout.readline()).decode().strip()
    url = "http://" + line.rsplit(" ", 1)[1]
    try:
        yield proc, url
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            await proc.wait()


async def one_request(port: int, kind: str, i: int) -> Outcome:
    started = time.monotonic()
    if kind == "generate":
        path, body = "/api/generate", {"model": MODEL, "prompt": f"q{i}", "stream": False}
    elif kind == "stream":
        path, body = (
            "/api/chat",
            {"model": MODEL, "messages": [{"role": "user", "content": f"q{i}"}]},
        )
    else:
        path, body = (
            "/v1/chat/completions",
            {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": f"q{i}"}]},
        )
    raw = json.dumps(body).encode()
    rid = f"chaos-{kind}-{i}"
    hdrs = [("host", "x"), ("connection", "close"), ("content-type", "application/json")]
    hdrs += [("x-request-id", rid), ("content-length", str(len(raw)))]
    try:
        resp = await fetch(port, request_bytes("POST", path, hdrs, raw), "POST", timeout=60)
    except (OSError, TimeoutError) as exc:
        return Outcome(kind, 0, False, False, time.monotonic() - started, rid, repr(exc))
    except ValueError:
        return Outcome(kind, 0, False, False, time.monotonic() - started, rid, "no response")
    return judge(kind, resp.status, resp.body, time.monotonic() - started, rid)


def judge(kind: str, status: int, body: bytes, latency: float, rid: str) -> Outcome:
    """Is this what a client may see? A complete answer, or a clean error in its dialect."""
    try:
        if status != 200:
            err = json.loads(body)["error"]
            return Outcome(kind, status, False, bool(err), latency, rid, str(err)[:120])
        if kind == "generate":
            obj = json.loads(body)
            return Outcome(kind, status, obj.get("done") is True, False, latency, rid)
        if kind == "stream":
            lines = [json.loads(x) for x in body.split(b"\n") if x]
            last = lines[-1] if lines else {}
            return Outcome(
                kind,
                status,
                last.get("done") is True,
                "error" in last,
                latency,
                rid,
                str(last.get("error", ""))[:120],
            )
        events = [e for e in body.split(b"\n\n") if e]
        if events and events[-1] == b"data: [DONE]":
            return Outcome(kind, status, True, False, latency, rid)
        last_event = json.loads(events[-1][6:]) if events else {}
        return Outcome(
            kind,
            status,
            False,
            "error" in last_event,
            latency,
            rid,
            str(last_event.get("error", ""))[:120],
        )
    except (ValueError, KeyError, IndexError) as exc:
        return Outcome(kind, status, False, False, latency, rid, f"unparsable: {exc!r}")


async def run_scenario(
    tmp: Path,
    *,
    requests: int = 120,
    concurrency: int = 12,
    faults: bool = True,
    tokens_per_s: float = 60.0,
) -> ChaosResult:
    """Run the load; with ``faults`` the four failures start a third of the way in."""
    result = ChaosResult()
    healthy = [FakeOllama([FakeModel(MODEL)], tokens_per_s=tokens_per_s) for _ in range(2)]
    failing = FakeOllama([FakeModel(MODEL)], tokens_per_s=tokens_per_s)
    stalling = FakeOllama([FakeModel(MODEL)], tokens_per_s=tokens_per_s)
    in_process = [*healthy, failing, stalling]
    for fake in in_process:
        await fake.start()
    cfg_nodes = [f.url for f in in_process]
    async with (
        subprocess_node(tokens_per_s) as (killed, killed_url),
        subprocess_node(tokens_per_s) as (stopped, stopped_url),
    ):
        cfg = herd.Config(
            host="127.0.0.1",
            port=0,
            nodes=[*cfg_nodes, killed_url, stopped_url],
            data_dir=tmp / "chaos-data",
            local_ollama=None,
            poll_interval_s=0.5,
            mdns=False,
            first_byte_timeout_s=1.5,
            stall_timeout_s=2.0,
            grace_s=2,
        )
        router = herd.Router(cfg)
        await router.start()
        try:
            async with asyncio.timeout(15):
                while sum(n.status == "online" for n in router.fleet.nodes.values()) < 6:
                    await asyncio.sleep(0.05)
            port = router.address[1]
            await asyncio.sleep(0.2)
            result.tasks_before = router_tasks()
            result.rss_before = rss_bytes()
            sem = asyncio.Semaphore(concurrency)
            kinds = ("generate", "stream", "sse")

            async def worker(i: int) -> Outcome:
                async with sem:
                    return await one_request(port, kinds[i % 3], i)

            async def chaos() -> None:
                while sum(1 for t in tasks if t.done()) < requests // 3:
                    await asyncio.sleep(0.02)
                killed.send_signal(signal.SIGKILL)
                stopped.send_signal(signal.SIGSTOP)
                failing.fail_next(500, count=10_000, path=None)
                stalling.stall_s = 30.0

            tasks = [asyncio.ensure_future(worker(i)) for i in range(requests)]
            chaos_task = asyncio.ensure_future(chaos()) if faults else None
            result.outcomes = list(await asyncio.gather(*tasks))
            if chaos_task is not None:
                await chaos_task
            with contextlib.suppress(ProcessLookupError):
                stopped.send_signal(signal.SIGCONT)
            await router.store.flush()
            result.traces = await router.store.traces(limit=100_000)
            with contextlib.suppress(TimeoutError):  # let finished connections wind down
                async with asyncio.timeout(5):
                    while router_tasks() > result.tasks_before:
                        await asyncio.sleep(0.05)
            result.in_flight_after = sum(q.in_flight for q in router.admission.queues.values())
            result.pending_after = sum(q.pending for q in router.admission.queues.values())
            result.tasks_after = router_tasks()
            if os.environ.get("CHAOS_DEBUG"):
                for t in asyncio.all_tasks():
                    code = getattr(t.get_coro(), "cr_code", None)
                    if code is not None and code.co_filename.endswith("herd.py"):
                        print("TASK", t.get_name(), code.co_name, t.get_stack(limit=3))
            result.rss_after = rss_bytes()
        finally:
            await router.stop()
            stalling.stall_s = 0.0
            for fake in in_process:
                await fake.stop()
    return result
