"""Pieces the benchmarks share: the event loop choice, a role subprocess that prints one
ready line, the READY handshake, /proc CPU seconds, the h11 relay's request hop, and an
agent heartbeat as herd_node sends it.

A library, not a benchmark: it states no target; the scripts that import it do, and exit 1
when they miss one."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h11

ROOT = Path(__file__).resolve().parent.parent


def use_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc); NaN once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def serve_until_signal(ready: int | str, stop: Callable[[], Any]) -> None:
    """Print ``READY <ready>``, serve until SIGTERM/SIGINT, then await ``stop()``."""
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    print(f"READY {ready}", flush=True)
    await done.wait()
    await stop()


def ready_line(line: str) -> str | None:
    """What follows ``READY`` (see serve_until_signal), else None."""
    return line.split(None, 1)[1].strip() if line.startswith("READY ") else None


def herd_ready(line: str) -> str | None:
    """The port from herd's ``herd listening on ...:PORT`` line, else None."""
    return line.rsplit(":", 1)[1].strip() if line.startswith("herd listening on") else None


class Proc:
    """A subprocess whose stdout announces it is up: ``ready(line)`` returns the payload
    of that line (kept in ``self.ready``) or None for any other line."""

    def __init__(self, argv: list[str], ready: Callable[[str], str | None], *,
                 stderr: Any = None, start_s: float = 30.0, stop_s: float = 15.0) -> None:
        self.stop_s = stop_s
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                  cwd=ROOT)
        assert self.p.stdout is not None
        deadline = time.time() + start_s
        self.ready = ""
        while time.time() < deadline:
            line = self.p.stdout.readline()
            got = ready(line)
            if got is not None:
                self.ready = got
                break
            if not line and self.p.poll() is not None:
                break
        if not self.ready:
            self.stop()
            raise RuntimeError(f"{argv[1:4]} did not start")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(self.stop_s)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


async def next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(262144))


async def relay_request(server: h11.Connection, reader: asyncio.StreamReader,
                        client: h11.Connection, up_writer: asyncio.StreamWriter,
                        host: bytes) -> bool:
    """The relays' request hop: read one whole request from the client side and write it
    upstream as a JSON POST to ``host``. False when the client side has no more requests."""
    req = await next_event(server, reader)
    if not isinstance(req, h11.Request):
        return False
    body = bytearray()
    while isinstance(ev := await next_event(server, reader), h11.Data):
        body += ev.data
    headers = [(b"host", host), (b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    up_writer.write(b"".join((
        client.send(h11.Request(method=req.method, target=req.target,
                                headers=headers)) or b"",
        client.send(h11.Data(data=bytes(body))) or b"",
        client.send(h11.EndOfMessage()) or b"",
    )))
    return True


def agent_beat(i: int, *, models: int, loaded: int, full: bool = True,
               tag_capabilities: list[str] | None = None,
               capabilities: dict[str, Any] | None = None) -> bytes:
    """A heartbeat as herd_node sends it: full hardware, Ollama's /api/tags and /api/ps
    entries (distinct model names, so a bench's routing is not affected). ``full=False``
    leaves out the tags (an unchanged list, as the agent sends between changes)."""

    def tag(m: int) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": f"bench-model-{m}:7b",
            "model": f"bench-model-{m}:7b",
            "modified_at": "2025-06-01T12:00:00.000000000Z",
            "size": 4_700_000_000 + m,
            "digest": f"{m:064x}",
            "details": {"parent_model": "", "format": "gguf", "family": "qwen2",
                        "families": ["qwen2"], "parameter_size": "7.6B",
                        "quantization_level": "Q4_K_M"},
        }
        if tag_capabilities is not None:
            entry["capabilities"] = tag_capabilities
        return entry

    ps = [{**tag(m), "expires_at": "2099-01-01T00:00:00Z", "size_vram": 5_000_000_000,
           "context_length": 4096} for m in range(loaded)]
    return json.dumps({
        "node_id": f"bench-gpu-{i}",
        "agent_version": "bench",
        "timestamp": time.time(),
        "interval_s": 300.0,
        "ollama_url": f"http://127.0.0.1:{30000 + i}",
        "draining": False,
        "hardware": {
            "arch": "x86_64", "chip": "AMD Ryzen 9 7950X",
            "cpu": {"cores": 16, "utilization_pct": 12.5, "load_1m": 1.2},
            "memory": {"total_bytes": 128 << 30, "available_bytes": 96 << 30,
                       "pressure": "normal"},
            "gpu": {"vendor": "nvidia", "unified": False,
                    "devices": [{"name": "NVIDIA GeForce RTX 4090",
                                 "memory_total_bytes": 24 << 30,
                                 "memory_used_bytes": 10 << 30,
                                 "temperature_c": 50, "utilization_pct": 3}]},
            "disk": {"total_bytes": 2 << 40, "free_bytes": 1 << 40},
            "thermal": {"temperature_c": 55.0, "state": "nominal"},
        },
        "ollama": {"reachable": True, "version": "0.12.6", "num_parallel": 4,
                   "max_loaded_models": 3, "loaded": ps,
                   "available": [tag(m) for m in range(models)] if full else None,
                   "available_hash": f"h{i}"},
        "capabilities": capabilities or {},
        "errors": [],
    }).encode()
