"""End-to-end routing benchmark: the real ``python herd.py`` against client-side balancers,
each in front of its own identical fleet of simulated Ollama nodes (``bench/lib/sim_ollama.py``).

Usage::

    python bench/routing_e2e.py --quick          # 3-node fleet, seed 1, ~90 s
    python bench/routing_e2e.py                  # 3 fleets x 3 seeds, ~20 min
    python bench/routing_e2e.py --fleet mixed --seeds 1 2 --duration 60
    python bench/routing_e2e.py --repeat 3       # each cell 3 times, targets on the medians
    python bench/routing_e2e.py --policies lo herd-node       # fewer processes
    python bench/routing_e2e.py --herd-dir /work/wt-x         # another checkout's herd
    python bench/routing_e2e.py --herd-arg=--max-queue-wait=10  # extra router flags
    python bench/routing_e2e.py --json out.json  # every figure, machine-readable

Exit status 0 when every target below is met, 1 when one is missed, 2 on a setup error.
Reading the output: one table per fleet and seed (``mean/best`` is the ratio to the best
baseline, ``cold`` the sims' own load counters after the warm-up, ``cache%`` the share of
prompt tokens the nodes' prompt caches skipped), the per-node request / load / eviction
counts of every policy, ``MISSED`` lines, then a summary table across the matrix.
Fleets (``--fleet``): ``three`` (32/16/8 GB, 4/2/1 slots; gemma2:27b fits the 32 GB node
only), ``mixed`` (5 nodes: a 64 GB Mac Studio, two 24 GB GPUs, a 16 GB Mac mini, an 8 GB
laptop), ``onebig`` (96/32/16/8 GB; llama3.3:70b fits the 96 GB node only). The first
``--warmup`` seconds of traffic (the fleet starts empty) are sent but not measured.

What runs, per fleet and seed, all at the same time on loopback:

* one ``sim_ollama.py`` process per policy, each serving the same fleet (one port per node),
  starting empty (nothing loaded);
* ``rr``, ``random``, ``lo`` (least outstanding): client-side balancers in this process that
  send each request straight to a node holding the model (nginx-style: the pool of a model
  is the nodes it is pulled on; a node's 503 makes the client try the next node);
* ``herd-node``: ``python herd.py --port 0 --node URL ...`` (no agent, no ``--slots``);
* ``herd-slots``: the same, told each node's parallel slots with ``--slots`` (no target:
  it shows what knowing the slots is worth);
* ``herd-agents``: ``python herd.py`` plus one ``python herd_node.py --router-url ...
  --ollama-url NODE`` per node. The agent finds ``OLLAMA_NUM_PARALLEL`` /
  ``OLLAMA_MAX_LOADED_MODELS`` in its environment (a real agent reads them from the Ollama
  process); herd_node has no flag for the machine's memory, so the agent runs with its
  memory probe pointed at the simulated machine (``/sim/hw``: what psutil would say there)
  instead of this host's RAM. ``--agent-host-memory`` runs it unmodified.

Every policy replays the same requests at the same offsets (seeded): several models,
Poisson arrivals, short and long prompts, single-shot ``/api/generate`` and ``/api/chat``,
and multi-turn chats that resend the growing history (turn k+1 is sent at its planned offset,
or when turn k has finished if that is later). Nothing is told to herd that a real router
would not know: it sees the nodes only through Ollama's API (and the agents' reports).

Time is compressed (~5x): loads take seconds, tokens tens of milliseconds, so herd's
``--poll-interval`` / ``--heartbeat-interval`` and the agents' ``--interval`` default to 1 s
here (5 s in production) to keep the information it gets as fresh, relative to the work,
as in a real fleet. Change with ``--info-interval``.

Figures per policy: mean / p50 / p99 latency (arrival -> last byte, a request that finally
fails counts with its time until failure), TTFT p50 overall and on multi-turn chats (turns
2+), cold loads (the sims' own counters), requests answered by another model than asked,
failures, and ratios against the best baseline.

Targets (issue 15), on every fleet and seed:
  herd-node: mean <= 0.65 x best baseline's mean, p99 <= that baseline's p99, cold loads
             <= half the fewest of any baseline, no request answered by another model;
  herd-agents: mean <= 0.6 x best baseline's mean;
  multi-turn chats: herd's TTFT p50 (turns 2+) >= 30 % below least-outstanding's.

``bench/routing_sim.py`` stays as a fast in-process check of ``scoring.choose``; it gives
herd perfect snapshots, so this file is the one that measures routing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import h11

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.lib.sim_ollama import GB, NodeSpec, SimModel, canonical  # noqa: E402

BASELINES = ("rr", "random", "lo")
POLICIES = (*BASELINES, "herd-node", "herd-slots", "herd-agents")
JSON = dict[str, Any]

TARGET_NODE_MEAN = 0.65
TARGET_AGENT_MEAN = 0.60
TARGET_CHAT_TTFT = 0.70
REQUEST_TIMEOUT_S = 45.0  # a client gives up (~4 min uncompressed)
NUM_CTX = 4096  # every node's OLLAMA_CONTEXT_LENGTH
CLIENT_RETRIES = 3


# ---------------------------------------------------------------------------------------
# Models and fleets
# ---------------------------------------------------------------------------------------


def _m(name: str, gb: float, family: str, params: str) -> SimModel:
    return SimModel(name=name, weights=int(gb * GB), family=family, parameter_size=params)


MODELS: dict[str, SimModel] = {
    m.name: m
    for m in (
        _m("llama3.2:3b", 2.0, "llama", "3.2B"),
        _m("qwen2.5:7b", 4.7, "qwen2", "7.6B"),
        _m("mistral-nemo:12b", 7.1, "llama", "12.2B"),
        _m("qwen2.5-coder:14b", 9.0, "qwen2", "14.8B"),
        _m("gemma2:27b", 16.0, "gemma2", "27.2B"),
        _m("llama3.3:70b", 40.0, "llama", "70.6B"),
    )
}
# share of the traffic per model (a model nobody can hold is dropped from the fleet's mix)
SHARES = {
    "llama3.2:3b": 0.33,
    "qwen2.5:7b": 0.27,
    "mistral-nemo:12b": 0.14,
    "qwen2.5-coder:14b": 0.12,
    "gemma2:27b": 0.08,
    "llama3.3:70b": 0.06,
}


def node(name: str, mem_gb: float, slots: int, bw_gbps: float, prefill_x: float,
         load_gbps: float, keep_alive_s: float, names: Sequence[str]) -> NodeSpec:
    """A node with every model of ``names`` that fits its memory pulled (and only those)."""
    base = NodeSpec(name=name, memory=int(mem_gb * GB), slots=slots, num_ctx=NUM_CTX)
    models = tuple(MODELS[n] for n in names
                   if base.resident(MODELS[n], base.num_ctx) <= base.memory)
    return NodeSpec(
        name=name, memory=int(mem_gb * GB), slots=slots, bandwidth=bw_gbps * GB,
        prefill_x=prefill_x, load_bps=load_gbps * GB, keep_alive_s=keep_alive_s,
        num_ctx=NUM_CTX, models=models,
    )


@dataclass(frozen=True)
class Fleet:
    name: str
    nodes: tuple[NodeSpec, ...]
    rate: float  # single requests per second
    session_rate: float  # new multi-turn chats per second


def fleets(keep_alive_s: float) -> dict[str, Fleet]:
    """Node: memory GB, slots, decode bandwidth GB/s, prefill multiple, load GB/s."""
    ka = keep_alive_s
    small = ("llama3.2:3b", "qwen2.5:7b", "qwen2.5-coder:14b", "gemma2:27b")
    five = (*small, "mistral-nemo:12b")
    no12 = (*small, "llama3.3:70b")
    return {
        # 3 nodes: 32/16/8 GB with 4/2/1 slots; gemma2:27b fits only the 32 GB machine
        "three": Fleet("three", (
            node("big32", 32, 4, 400, 30, 3.0, ka, small),
            node("mid16", 16, 2, 250, 25, 2.0, ka, small),
            node("laptop8", 8, 1, 100, 15, 1.0, ka, small),
        ), rate=0.8, session_rate=0.16),
        # 5 mixed nodes: a Mac Studio, two 24 GB GPUs, a Mac mini, a laptop
        "mixed": Fleet("mixed", (
            node("studio64", 64, 4, 400, 20, 3.0, ka, five),
            node("gpu24a", 24, 2, 600, 40, 2.5, ka, five),
            node("gpu24b", 24, 2, 600, 40, 2.5, ka, five),
            node("mini16", 16, 2, 120, 15, 1.5, ka, five),
            node("laptop8", 8, 1, 100, 15, 1.0, ka, five),
        ), rate=1.2, session_rate=0.2),
        # 4 nodes; llama3.3:70b fits on the 96 GB machine only
        "onebig": Fleet("onebig", (
            node("big96", 96, 4, 500, 25, 3.0, ka, no12),
            node("mid32", 32, 2, 300, 30, 2.0, ka, no12),
            node("small16", 16, 2, 200, 25, 2.0, ka, no12),
            node("laptop8", 8, 1, 100, 15, 1.0, ka, no12),
        ), rate=0.75, session_rate=0.14),
    }


def holders(fleet: Fleet) -> dict[str, list[int]]:
    """model -> indexes of the nodes it is pulled on (the baselines' pools)."""
    out: dict[str, list[int]] = {}
    for i, n in enumerate(fleet.nodes):
        for m in n.models:
            out.setdefault(m.name, []).append(i)
    return out


# ---------------------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------------------

_SYLL = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qu", "do", "be", "fi")


def text_of(rng: random.Random, tokens: int) -> str:
    """About ``tokens`` tokens of text (the sim counts four characters a token)."""
    words = []
    chars = 0
    while chars < tokens * 4:
        w = "".join(rng.choice(_SYLL) for _ in range(rng.randint(1, 3))) + " "
        words.append(w)
        chars += len(w)
    return "".join(words)


@dataclass
class Turn:
    offset: float
    user: str
    predict: int


@dataclass
class Job:
    """One single-shot request or one multi-turn chat."""

    jid: int
    model: str
    offset: float
    api: str  # "generate" | "chat"
    prompt: str = ""  # generate
    system: str = ""  # chat
    turns: list[Turn] = field(default_factory=list)  # chat (one turn for a single chat)
    predict: int = 0  # generate
    long: bool = False


def workload(fleet: Fleet, seed: int, duration: float) -> list[Job]:
    rng = random.Random(seed * 7919 + len(fleet.nodes))
    have = holders(fleet)
    names = [n for n in SHARES if n in have]
    weights = [SHARES[n] for n in names]
    # system prompts (instructions plus retrieved context), shared by many conversations
    systems = [text_of(random.Random(seed * 31 + i), rng.randint(300, 900)) for i in range(4)]
    jobs: list[Job] = []

    def predict() -> int:
        return min(400, max(8, int(rng.lognormvariate(math.log(90), 0.7))))

    t = 0.0
    while True:  # single-shot requests
        t += rng.expovariate(fleet.rate)
        if t > duration:
            break
        model = rng.choices(names, weights)[0]
        long = rng.random() < 0.2
        ptoks = int(rng.uniform(1200, 3000)) if long else int(rng.lognormvariate(math.log(120),
                                                                                  0.7))
        if rng.random() < 0.5:
            jobs.append(Job(len(jobs), model, t, "generate", prompt=text_of(rng, ptoks),
                            predict=predict(), long=long))
        else:
            jobs.append(Job(len(jobs), model, t, "chat", system=rng.choice(systems),
                            turns=[Turn(t, text_of(rng, ptoks), predict())], long=long))
    t = 0.0
    while True:  # multi-turn chats
        t += rng.expovariate(fleet.session_rate)
        if t > duration:
            break
        model = rng.choices(names, weights)[0]
        turns: list[Turn] = []
        at = t
        for _ in range(rng.randint(3, 6)):
            turn = Turn(at, text_of(rng, int(rng.uniform(20, 200))), predict())
            if at <= duration or not turns:  # the run ends: so does the conversation
                turns.append(turn)
            at += rng.uniform(5.0, 12.0)
        jobs.append(Job(len(jobs), model, t, "chat", system=rng.choice(systems), turns=turns))
    jobs.sort(key=lambda j: j.offset)
    return jobs


# ---------------------------------------------------------------------------------------
# A small streaming HTTP client (h11, one connection per request)
# ---------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    first_token_at: float | None  # monotonic
    final: JSON | None
    text: str
    error: str = ""


async def post_stream(url: str, path: str, body: JSON, timeout: float) -> Reply:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    payload = json.dumps(body).encode()
    conn = h11.Connection(h11.CLIENT)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        async with asyncio.timeout(timeout):
            writer.write(conn.send(h11.Request(method="POST", target=path, headers=[
                ("host", f"{host}:{port}"), ("content-type", "application/json"),
                ("content-length", str(len(payload))), ("connection", "close")])) or b"")
            writer.write(conn.send(h11.Data(data=payload)) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()
            status = 0
            headers: dict[str, str] = {}
            buf = b""
            first: float | None = None
            final: JSON | None = None
            pieces: list[str] = []
            error = ""
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    data = await reader.read(65536)
                    conn.receive_data(data)
                    continue
                if isinstance(ev, h11.Response):
                    status = ev.status_code
                    headers = {k.decode().lower(): v.decode() for k, v in ev.headers}
                elif isinstance(ev, h11.Data):
                    buf += ev.data
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if not line.strip():
                            continue
                        try:
                            obj = json.loads(line)
                        except ValueError:
                            error = f"bad line {line[:80]!r}"
                            continue
                        if not isinstance(obj, dict):
                            continue
                        if "error" in obj:
                            error = str(obj["error"])
                            continue
                        piece = (obj.get("message") or {}).get("content") or obj.get("response")
                        if piece and first is None:
                            first = time.monotonic()
                        if piece:
                            pieces.append(str(piece))
                        if obj.get("done"):
                            final = obj
                elif isinstance(ev, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            if buf.strip() and status != 200:
                with contextlib.suppress(ValueError):
                    obj = json.loads(buf)
                    if isinstance(obj, dict) and "error" in obj:
                        error = str(obj["error"])
            return Reply(status, headers, first, final, "".join(pieces), error)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def get_json(url: str, path: str, timeout: float = 5.0) -> Any:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = h11.Connection(h11.CLIENT)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        async with asyncio.timeout(timeout):
            writer.write(conn.send(h11.Request(method="GET", target=path, headers=[
                ("host", f"{host}:{port}"), ("connection", "close")])) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()
            body = b""
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage | h11.ConnectionClosed):
                    return json.loads(body)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


# ---------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------


class Dispatcher:
    """Where a policy sends a request: a node URL (baselines) or the router."""

    def __init__(self, kind: str, urls: list[str], pools: dict[str, list[int]], seed: int,
                 router_url: str = "") -> None:
        self.kind = kind
        self.urls = urls
        self.pools = pools
        self.router_url = router_url
        self.rng = random.Random(seed)
        self.rr: dict[str, int] = {}
        self.outstanding = [0] * len(urls)

    def order(self, model: str) -> list[int]:
        """Node indexes to try, best first (the client moves on after a 503)."""
        pool = self.pools[model]
        if self.kind == "random":
            first = self.rng.choice(pool)
        else:
            start = self.rr.get(model, 0)
            self.rr[model] = start + 1
            ring = [pool[(start + k) % len(pool)] for k in range(len(pool))]
            first = ring[0] if self.kind == "rr" else min(ring, key=lambda i: self.outstanding[i])
        return [first] + [i for i in pool if i != first]


@dataclass
class Result:
    policy: str
    jid: int
    turn: int
    model: str
    long: bool
    multi: bool
    latency: float
    ttft: float | None
    ok: bool
    served_model: str = ""
    node: str = ""
    error: str = ""
    retries: int = 0
    offset: float = 0.0  # planned offset in the workload
    node_ms: float = 0.0  # the node's total_duration (its own queue, load, prefill, decode)
    load_ms: float = 0.0  # the node's load_duration
    hidden_ms: float = 0.0  # total - load - prompt_eval - eval: queued inside the node
    prompt_evaluated: int = 0  # the node's prompt_eval_count (its prompt cache skipped the rest)


async def one_request(disp: Dispatcher, planned: float, job: Job, turn: int, body: JSON,
                      path: str, send_at: float) -> tuple[Result, str]:
    """Send one request (with the client's retries), timed from ``send_at``; ``planned`` is
    its offset in the workload (the same for every policy)."""
    multi = len(job.turns) > 1
    retries = 0
    reply: Reply | None = None
    err = ""
    deadline = send_at + REQUEST_TIMEOUT_S
    node_name = ""
    tried: list[int] = []
    for attempt in range(CLIENT_RETRIES + 1):
        if disp.kind in BASELINES:
            tried = disp.order(job.model) if attempt == 0 else tried[1:] + tried[:1]
            idx = tried[0]
            url = disp.urls[idx]
            disp.outstanding[idx] += 1
        else:
            idx = -1
            url = disp.router_url
        try:
            reply = await post_stream(url, path, body, max(1.0, deadline - time.monotonic()))
            err = reply.error
        except (OSError, TimeoutError, h11.ProtocolError) as exc:
            reply = None
            err = f"{type(exc).__name__}: {exc}"
        finally:
            if idx >= 0:
                disp.outstanding[idx] -= 1
        if reply is not None and reply.status == 503 and time.monotonic() < deadline:
            retries += 1
            if disp.kind not in BASELINES:  # honour the router's Retry-After (bounded)
                with contextlib.suppress(ValueError):
                    await asyncio.sleep(min(5.0, float(reply.headers.get("retry-after", "1"))))
            continue
        break
    done = time.monotonic()
    ok = reply is not None and reply.status == 200 and reply.final is not None and not err
    if reply is not None and reply.status != 200 and not err:
        err = f"HTTP {reply.status}"
    served = ""
    if reply is not None:
        served = reply.headers.get("x-herd-model") or str((reply.final or {}).get("model") or "")
        node_name = reply.headers.get("x-herd-node", "")
    ttft = (reply.first_token_at - send_at) if reply is not None and reply.first_token_at else None
    if not node_name and disp.kind in BASELINES and tried:
        node_name = disp.urls[tried[0]].rsplit(":", 1)[1]
    fin = (reply.final or {}) if reply is not None else {}

    def ms(key: str) -> float:
        v = fin.get(key)
        return float(v) / 1e6 if isinstance(v, (int, float)) else 0.0

    hidden = ms("total_duration") - ms("load_duration") - ms("prompt_eval_duration") \
        - ms("eval_duration")
    pe = fin.get("prompt_eval_count", 0)
    res = Result(disp.kind, job.jid, turn, job.model, job.long, multi, done - send_at, ttft, ok,
                 served, node_name, err, retries, planned, ms("total_duration"),
                 ms("load_duration"), max(0.0, hidden),
                 int(pe) if isinstance(pe, int) else 0)
    return res, (reply.text if reply is not None else "")


async def run_job(disp: Dispatcher, t0: float, job: Job, out: list[Result]) -> None:
    if job.api == "generate":
        await asyncio.sleep(max(0.0, t0 + job.offset - time.monotonic()))
        gen: JSON = {"model": job.model, "prompt": job.prompt,
                     "options": {"num_predict": job.predict}}
        res, _ = await one_request(disp, job.offset, job, 0, gen, "/api/generate",
                                   time.monotonic())
        out.append(res)
        return
    messages: list[JSON] = [{"role": "system", "content": job.system}]
    for k, turn in enumerate(job.turns):
        await asyncio.sleep(max(0.0, t0 + turn.offset - time.monotonic()))
        messages.append({"role": "user", "content": turn.user})
        body: JSON = {"model": job.model, "messages": list(messages),
                "options": {"num_predict": turn.predict}}
        res, text = await one_request(disp, turn.offset, job, k, body, "/api/chat",
                                      time.monotonic())
        out.append(res)
        if not res.ok:
            return  # the user gives up on this conversation
        messages.append({"role": "assistant", "content": text})


# ---------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------


class Procs:
    """Child processes of one run; each is ended by its own pid."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []
        self.tails: dict[int, list[str]] = {}
        self.drains: set[asyncio.Task[None]] = set()

    def warnings(self) -> list[str]:
        """Log lines of the children after they started (they run at WARNING level)."""
        out = []
        for p in self.procs:
            for line in self.tails.get(p.pid, []):
                if " WARNING " in line or " ERROR " in line or "Traceback" in line:
                    out.append(line.rstrip())
        return out

    async def start(self, argv: list[str], pattern: str, count: int = 1,
                    env: dict[str, str] | None = None, timeout: float = 30.0) -> list[str]:
        """Start a child and wait for ``count`` lines matching ``pattern`` (group 1 returned)."""
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **(env or {})}, cwd=ROOT)
        self.procs.append(proc)
        tail: list[str] = []
        self.tails[proc.pid] = tail
        found: list[str] = []
        rx = re.compile(pattern)
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                while len(found) < count:
                    line = await proc.stdout.readline()
                    if not line:
                        raise RuntimeError(f"{argv[1]} exited early:\n" + "".join(tail[-20:]))
                    text = line.decode(errors="replace")
                    tail.append(text)
                    m = rx.search(text)
                    if m:
                        found.append(m.group(1))
        except TimeoutError:
            raise RuntimeError(f"{argv[1]} did not start:\n" + "".join(tail[-20:])) from None
        tail.clear()
        task = asyncio.get_running_loop().create_task(self._drain(proc, tail))
        self.drains.add(task)
        task.add_done_callback(self.drains.discard)
        return found

    @staticmethod
    async def _drain(proc: asyncio.subprocess.Process, tail: list[str]) -> None:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                return
            tail.append(line.decode(errors="replace"))
            del tail[:-50]

    async def stop(self) -> None:
        for p in reversed(self.procs):
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()
        for p in self.procs:
            try:
                async with asyncio.timeout(10):
                    await p.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                await p.wait()


AGENT_SHIM = """
import json, sys, urllib.request
sys.path.insert(0, {root!r})
import herd_node
SIM = {sim!r}
def _memory(self):
    with urllib.request.urlopen(SIM + "/sim/hw", timeout=2) as r:
        hw = json.load(r)
    total, used = int(hw["memory_total"]), int(hw["memory_used"])
    return {{"total_bytes": total, "available_bytes": total - used,
            "pressure": "normal", "swap_total_bytes": 0, "swap_free_bytes": 0}}
herd_node.Collectors._memory = _memory
sys.exit(herd_node.main(sys.argv[1:]))
"""


async def start_sims(procs: Procs, fleet: Fleet) -> list[str]:
    spec = json.dumps([n.to_json() for n in fleet.nodes])
    ports = await procs.start(
        [sys.executable, os.path.join(ROOT, "bench", "lib", "sim_ollama.py"), "--spec", spec],
        r"listening on 127\.0\.0\.1:(\d+)", count=len(fleet.nodes))
    return [f"http://127.0.0.1:{p}" for p in ports]


async def start_herd(procs: Procs, herd_dir: str, tmp: str, tag: str, nodes: list[str],
                     interval: float, extra: Sequence[str]) -> str:
    data = os.path.join(tmp, f"herd-{tag}")
    argv = [sys.executable, os.path.join(herd_dir, "herd.py"), "--host", "127.0.0.1", "--port", "0",
            "--data-dir", data, "--local-ollama", "off", "--no-mdns", "--log-level", "WARNING",
            "--poll-interval", str(interval), "--heartbeat-interval", str(interval)]
    for n in nodes:
        argv += ["--node", n]
    argv += list(extra)
    (addr,) = await procs.start(argv, r"herd listening on (\S+:\d+)")
    return "http://" + addr.replace("0.0.0.0", "127.0.0.1")


async def start_agents(procs: Procs, herd_dir: str, tmp: str, router: str, fleet: Fleet,
                       sims: list[str], interval: float, host_memory: bool,
                       tag: str = "") -> None:
    for spec, url in zip(fleet.nodes, sims, strict=True):
        args = ["--router-url", router, "--ollama-url", url, "--node-id", spec.name,
                "--advertise-url", url, "--port", "0", "--interval", str(interval),
                "--data-dir", os.path.join(tmp, f"agent{tag}-{spec.name}"),
                "--log-level", "WARNING", "--whisper-model", "none"]
        env = {"OLLAMA_NUM_PARALLEL": str(spec.slots),
               "OLLAMA_MAX_LOADED_MODELS": str(spec.max_loaded)}
        if host_memory:
            argv = [sys.executable, os.path.join(herd_dir, "herd_node.py"), *args]
        else:
            argv = [sys.executable, "-c", AGENT_SHIM.format(root=herd_dir, sim=url), *args]
        await procs.start(argv, r"herd-node listening on (\S+)", env=env)


async def wait_fleet(router: str, n: int, timeout: float = 30.0) -> None:
    """Until the router lists ``n`` online nodes (bounded)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(OSError, ValueError, TimeoutError):
            st = await get_json(router, "/fleet/status")
            online = [x for x in st.get("nodes", []) if x.get("status") == "online"]
            if len(online) >= n:
                return
        await asyncio.sleep(0.3)
    raise RuntimeError(f"router {router} never saw {n} online nodes")


# ---------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------


@dataclass
class PolicyFigures:
    policy: str
    n: int
    failed: int
    mean: float
    p50: float
    p99: float
    ttft_p50: float
    chat_ttft_p50: float
    cold_loads: int
    evictions: int
    wrong_model: int
    retries: int
    cached_share: float


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def figures(policy: str, all_results: list[Result], stats: list[JSON],
            warmup: float) -> PolicyFigures:
    results = [r for r in all_results if r.offset >= warmup]
    lats = [r.latency for r in results]
    ttfts = [r.ttft for r in results if r.ttft is not None]
    chat = [r.ttft for r in results if r.ttft is not None and r.multi and r.turn > 0]
    wrong = sum(1 for r in results if r.ok and r.served_model
                and canonical(r.served_model) != canonical(r.model))
    ptoks = sum(int(s.get("prompt_tokens", 0)) for s in stats)
    cached = sum(int(s.get("prompt_cached", 0)) for s in stats)
    return PolicyFigures(
        policy=policy, n=len(results), failed=sum(1 for r in results if not r.ok),
        mean=statistics.fmean(lats) if lats else math.nan, p50=pct(lats, 0.5),
        p99=pct(lats, 0.99), ttft_p50=pct(ttfts, 0.5), chat_ttft_p50=pct(chat, 0.5),
        cold_loads=sum(int(s.get("loads", 0)) for s in stats),
        evictions=sum(int(s.get("evictions", 0)) for s in stats), wrong_model=wrong,
        retries=sum(r.retries for r in results), cached_share=cached / ptoks if ptoks else 0.0)


def median_figures(runs: Sequence[dict[str, PolicyFigures]]) -> dict[str, PolicyFigures]:
    """One cell's repeated runs as one set of figures, field by field the median over the
    runs (the upper median of an even count); failures and wrong-model answers take the
    worst run, so a target that forbids them still sees every one. A single run is
    returned as it is."""
    if len(runs) == 1:
        return dict(runs[0])
    out: dict[str, PolicyFigures] = {}
    for policy in runs[0]:
        rows = [r[policy] for r in runs if policy in r]
        fields: dict[str, Any] = {"policy": policy}
        for fld in dataclasses.fields(PolicyFigures):
            if fld.name == "policy":
                continue
            xs = [getattr(f, fld.name) for f in rows]
            if fld.name in ("failed", "wrong_model"):
                fields[fld.name] = max(xs)
                continue
            known = sorted(x for x in xs if not (isinstance(x, float) and math.isnan(x)))
            value = known[len(known) // 2] if known else math.nan
            fields[fld.name] = value
        out[policy] = PolicyFigures(**fields)
    return out


def spread_line(runs: Sequence[dict[str, PolicyFigures]]) -> str:
    """Each herd policy's mean over the best baseline's, run by run: how far one run can
    be trusted."""
    parts = []
    for policy in runs[0]:
        if not policy.startswith("herd"):
            continue
        ratios = []
        for r in runs:
            best = best_baseline(r)
            if best is not None and policy in r:
                ratios.append(f"{r[policy].mean / best.mean:.2f}")
        parts.append(f"{policy} {' '.join(ratios)}")
    return "   mean/best per run: " + "; ".join(parts)


async def run_one(fleet: Fleet, seed: int, warmup: float, duration: float,
                  policies: Sequence[str],
                  interval: float, herd_args: Sequence[str], host_memory: bool,
                  verbose: bool, herd_dir: str = ROOT,
                  dump: str | None = None,
                  variants: dict[str, list[str]] | None = None,
                  keep: str | None = None) -> dict[str, PolicyFigures]:
    variants = variants or {}
    policies = [*policies, *variants]
    jobs = workload(fleet, seed, warmup + duration)
    pools = holders(fleet)
    n_req = sum(1 if j.api == "generate" else len(j.turns) for j in jobs)
    print(f"\n== fleet {fleet.name} ({', '.join(n.name for n in fleet.nodes)}), seed {seed}: "
          f"{len(jobs)} jobs, {n_req} requests over {warmup:.0f} + {duration:.0f} s (measured "
          f"from {warmup:.0f} s on)", flush=True)
    tmp = tempfile.mkdtemp(prefix="herd-e2e-")
    procs = Procs()
    sims: dict[str, list[str]] = {}
    disps: dict[str, Dispatcher] = {}
    try:
        for p in policies:
            sims[p] = await start_sims(procs, fleet)
        for p in policies:
            if p in BASELINES:
                disps[p] = Dispatcher(p, sims[p], pools, seed)
            elif p == "herd-node":
                router = await start_herd(procs, herd_dir, tmp, p, sims[p], interval, herd_args)
                disps[p] = Dispatcher(p, sims[p], pools, seed, router)
            elif p == "herd-slots":  # --node plus each node's real slot count (--slots)
                told = [f"--slots=127.0.0.1-{u.rsplit(':', 1)[1]}={n.slots}"
                        for u, n in zip(sims[p], fleet.nodes, strict=True)]
                router = await start_herd(procs, herd_dir, tmp, p, sims[p], interval,
                                          [*herd_args, *told])
                disps[p] = Dispatcher(p, sims[p], pools, seed, router)
            elif p.startswith("herd-node["):  # a variant: --node plus its own extra flags
                extra = [a for a in variants[p] if not a.startswith("@dir=")]
                vdir = next((a[5:] for a in variants[p]
                             if a.startswith("@dir=")), herd_dir)
                agents = "@agents" in extra
                extra = [a for a in extra if a != "@agents"]
                router = await start_herd(procs, vdir, tmp, p, [] if agents else sims[p],
                                          interval, [*herd_args, *extra])
                if agents:
                    await start_agents(procs, vdir, tmp, router, fleet, sims[p], interval,
                                       host_memory, tag=p[len("herd-node"):])
                disps[p] = Dispatcher(p, sims[p], pools, seed, router)
            elif p == "herd-agents":
                router = await start_herd(procs, herd_dir, tmp, p, [], interval, herd_args)
                await start_agents(procs, herd_dir, tmp, router, fleet, sims[p], interval,
                                   host_memory)
                disps[p] = Dispatcher(p, sims[p], pools, seed, router)
        for p in policies:
            if p.startswith("herd"):
                await wait_fleet(disps[p].router_url, len(fleet.nodes))
        await asyncio.sleep(interval + 0.5)  # one full poll of the (empty) nodes
        results: dict[str, list[Result]] = {p: [] for p in policies}
        t0 = time.monotonic() + 0.5
        tasks = [asyncio.create_task(run_job(disps[p], t0, j, results[p]))
                 for j in jobs for p in policies]
        ticker = asyncio.create_task(progress(t0, results, n_req, verbose))
        await asyncio.sleep(max(0.0, t0 + warmup - time.monotonic()))
        at_warm = {p: [await get_json(u, "/sim/stats") for u in sims[p]] for p in policies}
        try:
            await asyncio.gather(*tasks)
        finally:
            ticker.cancel()
        if dump:
            lines = "".join(json.dumps({"fleet": fleet.name, "seed": seed,
                                        **dataclasses.asdict(r)}) + "\n"
                            for p in policies for r in results[p])
            await asyncio.to_thread(append_text, dump, lines)
        out: dict[str, PolicyFigures] = {}
        for p in policies:
            stats = [await get_json(u, "/sim/stats") for u in sims[p]]
            delta = [{k: int(v) - int(w.get(k, 0)) for k, v in s.items()}
                     for s, w in zip(stats, at_warm[p], strict=True)]
            out[p] = figures(p, results[p], delta, warmup)
            if verbose:
                per = "  ".join(f"{n.name}: {d['requests']} req {d['loads']} loads "
                                f"{d['evictions']} ev"
                                for n, d in zip(fleet.nodes, delta, strict=True))
                print(f"   {p:<12} {per}")
                errs: dict[str, int] = {}
                for r in results[p]:
                    if not r.ok:
                        errs[r.error[:70]] = errs.get(r.error[:70], 0) + 1
                if errs:
                    print(f"   {p} errors: {errs}")
        if verbose:
            noise = procs.warnings()
            for line in noise[-8:]:
                print(f"   log: {line[:160]}")
            if len(noise) > 8:
                print(f"   log: ... {len(noise)} warning lines in all")
        return out
    finally:
        await procs.stop()
        if keep:  # the routers' data dirs (traces with every decision's scores)
            dest = os.path.join(keep, f"{fleet.name}-s{seed}")
            await asyncio.to_thread(shutil.copytree, tmp, dest, dirs_exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)


def append_text(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


async def progress(t0: float, results: dict[str, list[Result]], n: int, verbose: bool) -> None:
    while verbose:
        await asyncio.sleep(15)
        done = ", ".join(f"{p} {len(r)}/{n}" for p, r in results.items())
        print(f"   t={time.monotonic() - t0:5.0f}s  {done}", flush=True)


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def best_baseline(figs: dict[str, PolicyFigures]) -> PolicyFigures | None:
    bases = [figs[p] for p in BASELINES if p in figs]
    return min(bases, key=lambda f: f.mean) if bases else None


def table(figs: dict[str, PolicyFigures]) -> None:
    best = best_baseline(figs)
    print(f"   {'policy':<16}{'n':>5}{'fail':>5}{'mean s':>8}{'p50 s':>8}{'p99 s':>8}"
          f"{'TTFT50':>8}{'chatTTFT':>9}{'cold':>6}{'evict':>6}{'wrong':>6}{'cache%':>7}"
          f"{'mean/best':>10}{'p99/best':>9}")
    for f in figs.values():
        rm = f.mean / best.mean if best else math.nan
        rp = f.p99 / best.p99 if best else math.nan
        print(f"   {f.policy:<16}{f.n:>5}{f.failed:>5}{f.mean:>8.2f}{f.p50:>8.2f}{f.p99:>8.2f}"
              f"{f.ttft_p50:>8.2f}{f.chat_ttft_p50:>9.2f}{f.cold_loads:>6}{f.evictions:>6}"
              f"{f.wrong_model:>6}{100 * f.cached_share:>7.0f}{rm:>10.2f}{rp:>9.2f}")
    if best:
        print(f"   best baseline: {best.policy}")


def verdict(figs: dict[str, PolicyFigures]) -> list[str]:
    """Missed targets (empty when all met)."""
    missed: list[str] = []
    best = best_baseline(figs)
    if best is None:
        return missed
    fewest = min(figs[p].cold_loads for p in BASELINES if p in figs)
    lo = figs.get("lo")
    for p, limit in (("herd-node", TARGET_NODE_MEAN), ("herd-agents", TARGET_AGENT_MEAN)):
        f = figs.get(p)
        if f is None:
            continue
        ratio = f.mean / best.mean
        if not ratio <= limit:
            missed.append(f"{p}: mean {ratio:.2f}x best baseline ({best.policy}), "
                          f"target <= {limit}")
        if f.failed:
            missed.append(f"{p}: {f.failed} failed requests")
        if (lo is not None and not math.isnan(lo.chat_ttft_p50)
                and not f.chat_ttft_p50 <= TARGET_CHAT_TTFT * lo.chat_ttft_p50):
            missed.append(f"{p}: multi-turn TTFT p50 {f.chat_ttft_p50:.2f}s vs lo "
                          f"{lo.chat_ttft_p50:.2f}s, target <= {TARGET_CHAT_TTFT}x")
        if p == "herd-node":
            if not f.p99 <= best.p99:
                missed.append(f"{p}: p99 {f.p99:.2f}s > {best.policy}'s {best.p99:.2f}s")
            if not f.cold_loads <= fewest / 2:
                missed.append(f"{p}: {f.cold_loads} cold loads, target <= {fewest / 2:g} "
                              f"(half of the fewest baseline's {fewest})")
            if f.wrong_model:
                missed.append(f"{p}: {f.wrong_model} requests answered by another model")
    return missed


def summary(report: list[JSON]) -> None:
    """One line per fleet and seed: herd's mean (and p99) over the best baseline's, cold
    loads against the fewest of any baseline, multi-turn TTFT against least-outstanding."""
    herds = [p for p in POLICIES if p.startswith("herd")]
    print("\n== summary: mean latency / best baseline's mean (p99 / its p99); cold loads "
          "(fewest baseline's); multi-turn TTFT p50 / lo's")
    head = f"   {'fleet, seed':<14}{'best':>7}"
    for p in herds:
        head += f"{p:>26}"
    print(head)
    for run in report:
        figs = run["policies"]
        bases = [figs[p] for p in BASELINES if p in figs]
        if not bases:
            continue
        best = min(bases, key=lambda f: f["mean"])
        fewest = min(f["cold_loads"] for f in bases)
        lo = figs.get("lo")
        line = f"   {run['fleet'] + ' s' + str(run['seed']):<14}{best['policy']:>7}"
        for p in herds:
            f = figs.get(p)
            if f is None:
                line += f"{'-':>26}"
                continue
            chat = f["chat_ttft_p50"] / lo["chat_ttft_p50"] if lo else math.nan
            cell = (f"{f['mean'] / best['mean']:.2f}x ({f['p99'] / best['p99']:.2f}) "
                    f"{f['cold_loads']}({fewest}) {chat:.2f}")
            line += f"{cell:>26}"
        print(line)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3-node fleet, seed 1, 40 s")
    p.add_argument("--fleet", action="append", choices=("three", "mixed", "onebig"),
                   help="fleets to run (repeatable; default all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--repeat", type=int, default=1,
                   help="run every fleet and seed this many times and judge the targets on "
                        "each figure's median over the runs (a cell moves by about +-0.2 "
                        "of lo's mean from one run to the next on a shared 2-core machine)")
    p.add_argument("--duration", type=float, default=60.0,
                   help="seconds of measured arrivals per run (default 60; --quick 40): "
                        "30-odd requests make p99 the maximum and one early placement the "
                        "whole verdict")
    p.add_argument("--warmup", type=float, default=8.0,
                   help="seconds of unmeasured arrivals first (the fleet starts empty)")
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    p.add_argument("--info-interval", type=float, default=1.0,
                   help="herd poll / heartbeat and agent interval, s (time is compressed)")
    p.add_argument("--keep-alive", type=float, default=60.0,
                   help="the nodes' OLLAMA_KEEP_ALIVE, s (compressed 5 min)")
    p.add_argument("--herd-arg", action="append", default=[],
                   help="extra argument for both herd routers (repeatable)")
    p.add_argument("--agent-host-memory", action="store_true",
                   help="agents report this host's memory (unmodified herd_node.py)")
    p.add_argument("--load", type=float, default=1.0,
                   help="multiply every fleet's arrival rates (calibration)")
    p.add_argument("--herd-dir", default=ROOT,
                   help="checkout whose herd.py / herd_node.py run (default: this one)")
    p.add_argument("--json", help="write all figures here")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL:FLAGS",
                   help="also run herd-node[LABEL] with these extra router flags (space "
                        "separated), on its own fleet in the same run: a paired A/B, e.g. "
                        "'hb5:--scoring=hot_bonus=5'; '@dir=PATH' among the flags runs another "
                        "checkout's herd.py, e.g. 'old:@dir=/tmp/old'; '@agents' runs it "
                        "with one agent per node, as herd-agents (repeatable; no target)")
    p.add_argument("--dump-requests", metavar="FILE",
                   help="append every request's result (policy, node, latency, the node's "
                        "own timings) to this JSONL file, for diagnosis")
    p.add_argument("--keep-data", metavar="DIR",
                   help="copy each run's router data dirs (SQLite traces with every "
                        "decision's scores) to DIR/FLEET-sSEED, for diagnosis")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    all_fleets = {k: dataclasses.replace(f, rate=f.rate * args.load,
                                         session_rate=f.session_rate * args.load)
                  for k, f in fleets(args.keep_alive).items()}
    names = args.fleet or (["three"] if args.quick else list(all_fleets))
    seeds = [1] if args.quick else args.seeds
    duration = 40.0 if args.quick and args.duration == 60.0 else args.duration
    herd_dir = os.path.abspath(args.herd_dir)
    variants: dict[str, list[str]] = {}
    for v in args.variant:
        label, _, flags = v.partition(":")
        variants[f"herd-node[{label}]"] = [
            f"@dir={os.path.abspath(a[5:])}" if a.startswith("@dir=") else a
            for a in flags.split()]
    rev = subprocess.run(["git", "-C", herd_dir, "log", "-1", "--format=%h %s"],
                         capture_output=True, text=True, check=False, timeout=10).stdout.strip()
    print(f"herd from {herd_dir} ({rev or 'not a git checkout'})")
    report: list[JSON] = []
    missed_all: list[str] = []
    started = time.monotonic()
    for name in names:
        for seed in seeds:
            runs: list[dict[str, PolicyFigures]] = []
            for attempt in range(max(1, args.repeat)):
                if args.repeat > 1:
                    print(f"   -- run {attempt + 1} of {args.repeat}")
                try:
                    runs.append(asyncio.run(run_one(
                        all_fleets[name], seed, args.warmup, duration, args.policies,
                        args.info_interval, args.herd_arg, args.agent_host_memory,
                        not args.quiet, herd_dir, args.dump_requests, variants,
                        args.keep_data)))
                except RuntimeError as exc:
                    print(f"setup failed: {exc}", file=sys.stderr)
                    return 2
                if args.repeat > 1:
                    table(runs[-1])
            figs = median_figures(runs)
            if len(runs) > 1:
                print(f"   == {name} s{seed}: median of {len(runs)} runs")
                print(spread_line(runs))
            table(figs)
            missed = verdict(figs)
            for m in missed:
                print(f"   MISSED {m}")
            missed_all += [f"{name}/s{seed}: {m}" for m in missed]
            report.append({"fleet": name, "seed": seed, "runs": len(runs),
                           "policies": {k: v.__dict__ for k, v in figs.items()},
                           "each_run": [{k: v.__dict__ for k, v in r.items()} for r in runs],
                           "missed": missed})
    summary(report)
    print(f"\nwall time {time.monotonic() - started:.0f} s")
    print(f"targets: herd-node mean <= {TARGET_NODE_MEAN}x best baseline, p99 <= its p99, cold "
          f"loads <= half the fewest baseline's, no other model; herd-agents mean <= "
          f"{TARGET_AGENT_MEAN}x; multi-turn TTFT p50 <= {TARGET_CHAT_TTFT}x lo's")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if missed_all:
        print(f"VERDICT: {len(missed_all)} target(s) missed")
        return 1
    print("VERDICT: all targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
