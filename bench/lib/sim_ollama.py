"""A simulated Ollama node for end-to-end routing benchmarks (``bench/routing_e2e.py``).

A test fixture, not a benchmark: it measures nothing and states no target; routing_e2e.py
does, and exits 1 when one is missed. Its behaviour is checked by tests/test_sim_ollama.py.

Real HTTP/1.1 on loopback (asyncio + h11), the part of Ollama's API a router relies on, and
the scheduling mechanics that decide how long a request really takes on a machine:

* **finite memory**: a loaded model costs its weights plus KV cache for ``num_ctx`` x
  ``slots`` tokens; a model that does not fit evicts idle models least-recently-used first,
  and when only busy models hold the memory it waits for the oldest to drain (Ollama's
  scheduler blocks the whole pending queue meanwhile, and so does this one);
  ``OLLAMA_MAX_LOADED_MODELS`` caps the number of resident models;
* **cold loads** take ``load_overhead_s + size / load_bps`` seconds, one load at a time
  per node; a different ``options.num_ctx`` than the loaded runner forces a reload;
* **per-model parallel slots** (``OLLAMA_NUM_PARALLEL``) with a FIFO in front of them;
  more than ``max_queue`` requests waiting on the node get 503 ``server busy``;
* **keep_alive**: the idle timer starts when a model's last request finishes (node default,
  or the request's ``keep_alive``, last writer wins; negative = forever, 0 = unload now);
* **speed per node**: decode ``bandwidth / weights`` tokens/s, prefill ``prefill_x`` times
  that; streams running at once on one node share it (each runs ``1 + contention (k-1)``
  times slower);
* **prompt cache per slot**: each slot remembers the text it processed last (prompt plus
  answer); a new prompt that starts with it only prefills the rest (``prompt_eval_count``
  drops), and a free slot with the longest common prefix is chosen, like llama.cpp;
* **honest final metrics**: ``total_duration`` runs from the request's arrival at the node
  to its end, so it includes time queued for a slot or for memory; ``load_duration`` is the
  time spent waiting for this model to load; ``prompt_eval_*`` and ``eval_*`` as Ollama.

API: ``GET|HEAD /``, ``/api/version``, ``/api/tags``, ``/api/ps`` (``size``,
``size_vram``, ``context_length``, ``expires_at``), ``POST /api/show``, ``/api/generate``,
``/api/chat`` (NDJSON streams, ``stream: false``, load / unload with an empty prompt),
``/api/embed``, ``/v1/chat/completions`` (SSE or one object). Benchmark-only paths, never
used by a router: ``GET /sim/stats`` (loads, evictions, expiries, 503s) and ``GET /sim/hw``
(what the machine's own memory probe would say: total and used).

Generated text is a deterministic function of (model, prompt, token count), so a multi-turn
chat replays the same history on every fleet.

Run::

    python bench/lib/sim_ollama.py --port 0 --memory-gb 16 --slots 2 \\
        --model llama3.2:3b=2.0 --model qwen2.5:7b=4.7
    python bench/lib/sim_ollama.py --spec-file fleet.json   # several nodes, one process

Each node prints ``sim-ollama NAME listening on 127.0.0.1:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import hashlib
import json
import math
import re
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import h11

GB = 1_000_000_000
BUSY_ERROR = "server busy, please try again.  maximum pending requests exceeded"
ASSISTANT_TAG = "<|assistant|>"
MAX_BODY = 64 * 1024 * 1024

JSON = dict[str, Any]


# ---------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimModel:
    name: str  # "qwen2.5:7b"
    weights: int  # bytes
    kv_per_token: int = 0  # bytes of KV cache per context token per slot (0: from weights)
    family: str = "llama"
    parameter_size: str = ""
    quantization: str = "Q4_K_M"
    max_ctx: int = 131072
    embedding: bool = False

    def kv(self) -> int:
        return self.kv_per_token or int(16_384 * self.weights / GB)

    def to_json(self) -> JSON:
        return {
            "name": self.name,
            "weights": self.weights,
            "kv_per_token": self.kv_per_token,
            "family": self.family,
            "parameter_size": self.parameter_size,
            "quantization": self.quantization,
            "max_ctx": self.max_ctx,
            "embedding": self.embedding,
        }

    @staticmethod
    def from_json(d: JSON) -> SimModel:
        return SimModel(
            name=str(d["name"]),
            weights=int(d["weights"]),
            kv_per_token=int(d.get("kv_per_token") or 0),
            family=str(d.get("family") or "llama"),
            parameter_size=str(d.get("parameter_size") or ""),
            quantization=str(d.get("quantization") or "Q4_K_M"),
            max_ctx=int(d.get("max_ctx") or 131072),
            embedding=bool(d.get("embedding")),
        )


@dataclass(frozen=True)
class NodeSpec:
    name: str
    memory: int  # bytes usable for models (VRAM, or unified RAM)
    slots: int = 1  # OLLAMA_NUM_PARALLEL
    bandwidth: float = 200 * GB  # bytes/s: decode tokens/s = bandwidth / weights
    prefill_x: float = 30.0  # prefill tokens/s = prefill_x * decode tokens/s
    load_bps: float = 2 * GB  # cold-load bytes/s
    load_overhead_s: float = 0.2
    num_ctx: int = 8192  # OLLAMA_CONTEXT_LENGTH
    keep_alive_s: float = 300.0  # OLLAMA_KEEP_ALIVE
    max_queue: int = 512  # OLLAMA_MAX_QUEUE
    max_loaded: int = 3  # OLLAMA_MAX_LOADED_MODELS (0: no cap)
    contention: float = 0.3
    default_num_predict: int = 128
    chunk_s: float = 0.05  # stream one NDJSON line per this much decode time (>= 1 token)
    gpu: bool = True  # size_vram == size (False: a CPU-only node, size_vram 0)
    version: str = "0.12.6"
    models: tuple[SimModel, ...] = ()

    def resident(self, model: SimModel, num_ctx: int) -> int:
        slots = 1 if model.embedding else self.slots
        return model.weights + model.kv() * num_ctx * slots

    def to_json(self) -> JSON:
        d: JSON = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "models"}
        d["models"] = [m.to_json() for m in self.models]
        return d

    @staticmethod
    def from_json(d: JSON) -> NodeSpec:
        kw = {k: v for k, v in d.items() if k != "models" and k in NodeSpec.__dataclass_fields__}
        return NodeSpec(**kw, models=tuple(SimModel.from_json(m) for m in d.get("models", [])))


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------

_WORDS = tuple(
    a + b
    for a in ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qu", "do")
    for b in ("ra", "le", "mo", "ni", "su", "ta", "ve", "xo")
)


def token_count(text: str) -> int:
    """Rough tokenizer: four characters a token (what the workload generator assumes too)."""
    return max(1, (len(text) + 3) // 4)


def gen_tokens(model: str, prompt: str, n: int) -> list[str]:
    """Deterministic answer tokens: a function of (model, prompt, n) only."""
    h = int.from_bytes(hashlib.blake2b(f"{model}\0{prompt}".encode(), digest_size=8).digest())
    return [_WORDS[(h + i * 7919) % len(_WORDS)] + " " for i in range(n)]


def common_prefix_len(a: str, b: str) -> int:
    """Length of the common prefix, by bisection on slice equality (C speed)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def render_chat(messages: list[JSON]) -> str:
    parts = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts
            content = "".join(
                str(p.get("text", "")) for p in content if isinstance(p, dict)
            )
        parts.append(f"<|{m.get('role', 'user')}|>{content or ''}\n")
    return "".join(parts) + ASSISTANT_TAG


def rfc3339(wall: float) -> str:
    return _dt.datetime.fromtimestamp(wall, _dt.UTC).isoformat().replace("+00:00", "Z")


def canonical(name: str) -> str:
    name = name.strip().lower()
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


_GO_DURATION = re.compile(r"(-?)((?:\d+(?:\.\d*)?(?:ns|us|µs|ms|s|m|h))+)$")
_GO_PART = re.compile(r"(\d+(?:\.\d*)?)(ns|us|µs|ms|s|m|h)")
_GO_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any, default_s: float) -> float:
    """Seconds; negative = forever. Raises ValueError like Ollama's 400."""
    if value is None:
        return default_s
    if isinstance(value, bool):
        raise ValueError("invalid keep_alive")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        m = _GO_DURATION.match(value.strip())
        if not m:
            raise ValueError(f"time: missing unit in duration \"{value}\"")
        secs = sum(float(n) * _GO_UNIT[u] for n, u in _GO_PART.findall(m.group(2)))
        return -secs if m.group(1) else secs
    raise ValueError("invalid keep_alive")


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------------------------------
# Node mechanics
# ---------------------------------------------------------------------------------------


@dataclass
class Slot:
    index: int
    busy: bool = False
    cache: str = ""  # text this slot processed last (prompt + answer)
    last_used: float = 0.0


@dataclass
class Runner:
    model: SimModel
    num_ctx: int
    size: int
    slots: list[Slot]
    keep_alive_s: float
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    waiters: deque[asyncio.Future[Slot]] = field(default_factory=deque)
    refcount: int = 0
    last_used: float = 0.0
    expires_wall: float = 0.0  # wall clock, for /api/ps
    expiry: asyncio.TimerHandle | None = None
    draining: bool = False  # chosen for eviction: unload when the last request leaves
    loaded_wall: float = 0.0


@dataclass
class Stats:
    requests: int = 0
    completed: int = 0
    loads: int = 0
    evictions: int = 0
    expiries: int = 0
    busy_503: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    prompt_cached: int = 0

    def to_json(self) -> JSON:
        return dict(self.__dict__)


class SimNode:
    """One simulated Ollama machine: scheduling state plus its HTTP handlers."""

    def __init__(self, spec: NodeSpec) -> None:
        self.spec = spec
        self.models = {canonical(m.name): m for m in spec.models}
        self.runners: dict[str, Runner] = {}
        self.sched_lock = asyncio.Lock()  # Ollama's pending queue: one decision at a time
        self.load_lock = asyncio.Lock()  # one model load at a time
        self.changed = asyncio.Event()  # memory or refcounts changed
        self.waiting = 0  # requests on the node not yet holding a slot
        self.active = 0  # streams prefilling or decoding (they share the node's speed)
        self.stats = Stats()
        self.started_wall = time.time()

    # ---- memory / scheduling ----------------------------------------------------------

    def used(self) -> int:
        return sum(r.size for r in self.runners.values())

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def _unload(self, key: str, r: Runner, why: str) -> None:
        if self.runners.get(key) is not r:
            return
        del self.runners[key]
        if r.expiry is not None:
            r.expiry.cancel()
        if why == "evict":
            self.stats.evictions += 1
        elif why == "expire":
            self.stats.expiries += 1
        self._notify()

    def _expire(self, key: str, runner: Runner) -> None:
        if runner.refcount == 0:
            self._unload(key, runner, "expire")

    def _victim(self, exclude: str) -> tuple[str, Runner] | None:
        """Ollama's findRunnerToUnload: an idle model (least recently used) if any, else the
        busy one with the shortest keep_alive, oldest use first."""
        cands = [(k, r) for k, r in self.runners.items() if k != exclude]
        if not cands:
            return None
        idle = [(k, r) for k, r in cands if r.refcount == 0]
        if idle:
            return min(idle, key=lambda kr: kr[1].last_used)
        return min(cands, key=lambda kr: (kr[1].keep_alive_s < 0, kr[1].keep_alive_s,
                                          kr[1].last_used))

    async def acquire_runner(self, key: str, num_ctx: int, keep_alive_s: float) -> tuple[
        Runner, float
    ]:
        """A runner for the model with a reference held; returns (runner, load wait s)."""
        model = self.models[key]
        async with self.sched_lock:
            while True:
                r = self.runners.get(key)
                if r is not None and r.num_ctx == num_ctx and not r.draining:
                    break
                if r is not None:  # different num_ctx: reload once it drains
                    r.draining = True
                    if r.refcount == 0:
                        self._unload(key, r, "evict")
                    else:
                        await self.changed.wait()
                    continue
                need = self.spec.resident(model, num_ctx)
                if need > self.spec.memory:
                    raise HTTPError(
                        500,
                        f"model requires more system memory ({need / 2**30:.1f} GiB) than is "
                        f"available ({self.spec.memory / 2**30:.1f} GiB)",
                    )
                cap = self.spec.max_loaded
                if self.used() + need <= self.spec.memory and (
                    cap <= 0 or len(self.runners) < cap
                ):
                    r = Runner(
                        model=model,
                        num_ctx=num_ctx,
                        size=need,
                        slots=[Slot(i) for i in range(1 if model.embedding else self.spec.slots)],
                        keep_alive_s=keep_alive_s,
                        last_used=time.monotonic(),
                    )
                    self.runners[key] = r
                    self.stats.loads += 1
                    asyncio.get_running_loop().create_task(self._load(r))
                    break
                victim = self._victim(key)
                if victim is None:  # nothing to evict (cannot happen: need <= memory)
                    await self.changed.wait()
                    continue
                vk, vr = victim
                vr.draining = True
                if vr.refcount == 0:
                    self._unload(vk, vr, "evict")
                else:
                    await self.changed.wait()
            r.refcount += 1
            r.keep_alive_s = keep_alive_s  # last writer wins
            if r.expiry is not None:
                r.expiry.cancel()
                r.expiry = None
        if r.ready.is_set():
            return r, 0.0
        t0 = time.monotonic()
        await r.ready.wait()
        return r, time.monotonic() - t0

    async def _load(self, r: Runner) -> None:
        async with self.load_lock:
            await asyncio.sleep(self.spec.load_overhead_s + r.model.weights / self.spec.load_bps)
        r.loaded_wall = time.time()
        r.ready.set()

    def release_runner(self, key: str, r: Runner) -> None:
        r.refcount -= 1
        r.last_used = time.monotonic()
        if r.refcount == 0:
            if r.draining or r.keep_alive_s == 0:
                self._unload(key, r, "evict" if r.draining else "expire")
            elif r.keep_alive_s > 0 and self.runners.get(key) is r:
                r.expires_wall = time.time() + r.keep_alive_s
                r.expiry = asyncio.get_running_loop().call_later(
                    r.keep_alive_s, self._expire, key, r
                )
        self._notify()

    async def acquire_slot(self, r: Runner, text: str) -> Slot:
        free = [s for s in r.slots if not s.busy]
        if free and not r.waiters:
            slot = max(free, key=lambda s: (common_prefix_len(s.cache, text), -s.last_used))
            slot.busy = True
            return slot
        fut: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        r.waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release_slot(r, fut.result())
            with contextlib.suppress(ValueError):
                r.waiters.remove(fut)
            raise

    def release_slot(self, r: Runner, slot: Slot) -> None:
        slot.last_used = time.monotonic()
        while r.waiters:
            fut = r.waiters.popleft()
            if not fut.done():
                fut.set_result(slot)  # FIFO: the oldest waiter gets the slot
                return
        slot.busy = False

    def slowdown(self) -> float:
        return 1.0 + self.spec.contention * max(0, self.active - 1)

    # ---- HTTP handlers ------------------------------------------------------------------

    def tags(self) -> JSON:
        out = []
        for i, m in enumerate(self.spec.models):
            digest = hashlib.sha256(m.name.encode()).hexdigest()
            out.append({
                "name": m.name,
                "model": m.name,
                "modified_at": rfc3339(self.started_wall - 3600 * (i + 1)),
                "size": m.weights,
                "digest": digest,
                "details": self.details(m),
            })
        return {"models": out}

    @staticmethod
    def details(m: SimModel) -> JSON:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": m.family,
            "families": [m.family],
            "parameter_size": m.parameter_size,
            "quantization_level": m.quantization,
        }

    def ps(self) -> JSON:
        out = []
        for r in self.runners.values():
            if r.refcount > 0 or not r.ready.is_set():
                expires = time.time() + max(r.keep_alive_s, 0)
            else:
                expires = r.expires_wall
            if r.keep_alive_s < 0:
                expires = time.time() + 10 * 365 * 86400
            out.append({
                "name": r.model.name,
                "model": r.model.name,
                "size": r.size,
                "size_vram": r.size if self.spec.gpu else 0,
                "digest": hashlib.sha256(r.model.name.encode()).hexdigest(),
                "details": self.details(r.model),
                "expires_at": rfc3339(expires),
                "context_length": r.num_ctx,
            })
        out.sort(key=lambda e: str(e["expires_at"]), reverse=True)
        return {"models": out}

    def show(self, body: JSON) -> JSON:
        key = canonical(str(body.get("model") or body.get("name") or ""))
        m = self.models.get(key)
        if m is None:
            raise HTTPError(404, f"model '{body.get('model') or body.get('name')}' not found")
        caps = ["embedding"] if m.embedding else ["completion"]
        return {
            "modelfile": f"FROM {m.name}\n",
            "parameters": "",
            "template": "{{ .Prompt }}",
            "details": self.details(m),
            "model_info": {
                "general.architecture": m.family,
                f"{m.family}.context_length": m.max_ctx,
            },
            "capabilities": caps,
            "modified_at": rfc3339(self.started_wall),
        }

    def hw(self) -> JSON:
        return {"memory_total": self.spec.memory, "memory_used": self.used(),
                "slots": self.spec.slots}

    def parse_common(self, body: JSON) -> tuple[str, SimModel, int, float, int]:
        raw = body.get("model")
        if not isinstance(raw, str) or not raw:
            raise HTTPError(400, "model is required")
        key = canonical(raw)
        model = self.models.get(key)
        if model is None:
            raise HTTPError(404, f"model '{raw}' not found")
        opts = body.get("options") or {}
        if not isinstance(opts, dict):
            raise HTTPError(400, "options must be an object")
        try:
            keep = parse_keep_alive(body.get("keep_alive"), self.spec.keep_alive_s)
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
        num_ctx = int(opts.get("num_ctx") or self.spec.num_ctx)
        num_ctx = max(256, min(num_ctx, model.max_ctx))
        predict = int(opts.get("num_predict") or self.spec.default_num_predict)
        return key, model, num_ctx, keep, predict

    async def infer(
        self,
        key: str,
        num_ctx: int,
        keep: float,
        text: str,
        predict: int,
        emit: Callable[[str], Awaitable[None]],
    ) -> JSON:
        """Run one completion; ``emit`` receives text pieces (the first one is the first
        token). Returns the final metrics."""
        t0 = time.monotonic()
        self.stats.requests += 1
        if self.waiting >= self.spec.max_queue:
            self.stats.busy_503 += 1
            raise HTTPError(503, BUSY_ERROR)
        self.waiting += 1
        runner: Runner | None = None
        slot: Slot | None = None
        try:
            try:
                runner, load_s = await self.acquire_runner(key, num_ctx, keep)
                slot = await self.acquire_slot(runner, text)
            finally:
                self.waiting -= 1
            prompt_tokens = token_count(text)
            room = max(1, num_ctx - 1)
            if prompt_tokens > room:  # Ollama truncates the front of an over-long prompt
                text = text[-room * 4:]
                prompt_tokens = token_count(text)
            predict = max(1, min(predict, num_ctx - min(prompt_tokens, num_ctx - 1)))
            cached = min(common_prefix_len(slot.cache, text) // 4, prompt_tokens - 1)
            evaluated = prompt_tokens - cached
            self.stats.prompt_tokens += prompt_tokens
            self.stats.prompt_cached += cached
            m = runner.model
            tok_s = self.spec.bandwidth / m.weights
            per_token = 1.0 / tok_s
            self.active += 1
            try:
                t_p = time.monotonic()
                await asyncio.sleep(evaluated / (tok_s * self.spec.prefill_x) * self.slowdown())
                prompt_eval_s = time.monotonic() - t_p
                t_e = time.monotonic()
                tokens = gen_tokens(m.name, text, predict)
                await asyncio.sleep(per_token * self.slowdown())
                await emit(tokens[0])
                i = 1
                per_chunk = max(1, int(self.spec.chunk_s / per_token))
                while i < predict:
                    n = min(per_chunk, predict - i)
                    await asyncio.sleep(n * per_token * self.slowdown())
                    await emit("".join(tokens[i:i + n]))
                    i += n
                eval_s = time.monotonic() - t_e
            finally:
                self.active -= 1
            slot.cache = text + "".join(tokens)
            self.stats.completed += 1
            total = time.monotonic() - t0
            metrics: JSON = {
                "total_duration": int(total * 1e9),
                "prompt_eval_count": evaluated,
                "prompt_eval_duration": max(1, int(prompt_eval_s * 1e9)),
                "eval_count": predict,
                "eval_duration": max(1, int(eval_s * 1e9)),
            }
            if load_s > 0:
                metrics["load_duration"] = int(load_s * 1e9)
            return metrics
        finally:
            if runner is not None:
                if slot is not None:
                    self.release_slot(runner, slot)
                self.release_runner(key, runner)

    async def load_or_unload(self, key: str, num_ctx: int, keep: float) -> str:
        if keep == 0:
            r = self.runners.get(key)
            if r is not None:
                r.keep_alive_s = 0
                if r.refcount == 0:
                    self._unload(key, r, "expire")
            return "unload"
        runner, _ = await self.acquire_runner(key, num_ctx, keep)
        self.release_runner(key, runner)
        return "load"


# ---------------------------------------------------------------------------------------
# HTTP server (h11)
# ---------------------------------------------------------------------------------------


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h = h11.Connection(h11.SERVER)
        self.started = False

    async def next_event(self) -> Any:
        while True:
            ev = self.h.next_event()
            if ev is h11.NEED_DATA:
                data = await self.reader.read(65536)
                self.h.receive_data(data)
                continue
            return ev

    async def send(self, *events: Any) -> None:
        for ev in events:
            data = self.h.send(ev)
            if data:
                self.writer.write(data)
        await self.writer.drain()

    async def start(self, status: int, ctype: str, length: int | None = None) -> None:
        headers = [("content-type", ctype), ("date", _dt.datetime.now(_dt.UTC).strftime(
            "%a, %d %b %Y %H:%M:%S GMT"))]
        if length is not None:
            headers.append(("content-length", str(length)))
        self.started = True
        await self.send(h11.Response(status_code=status, headers=headers))

    async def whole(self, status: int, body: bytes, ctype: str, head: bool = False) -> None:
        await self.start(status, ctype, len(body))
        if not head:
            await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())

    async def json(self, status: int, obj: Any, head: bool = False) -> None:
        await self.whole(status, json.dumps(obj).encode(), "application/json; charset=utf-8",
                         head)


class SimServer:
    """Serves one :class:`SimNode` on a loopback port."""

    def __init__(self, node: SimNode, host: str = "127.0.0.1", port: int = 0) -> None:
        self.node = node
        self.host = host
        self.port = port
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, self.host, self.port)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self.tasks):
            t.cancel()
        for t in list(self.tasks):
            with contextlib.suppress(BaseException):
                await t
        if self.server is not None:
            with contextlib.suppress(Exception):
                await self.server.wait_closed()

    async def __aenter__(self) -> SimServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        conn = _Conn(reader, writer)
        try:
            while True:
                ev = await conn.next_event()
                if isinstance(ev, h11.ConnectionClosed) or ev is h11.PAUSED:
                    break
                if not isinstance(ev, h11.Request):
                    break
                body = b""
                while True:
                    part = await conn.next_event()
                    if isinstance(part, h11.Data):
                        body += part.data
                        if len(body) > MAX_BODY:
                            raise HTTPError(413, "request body too large")
                    elif isinstance(part, h11.EndOfMessage):
                        break
                    else:
                        return
                await self._dispatch(conn, ev.method.decode(), ev.target.decode(), body)
                if conn.h.our_state is h11.DONE and conn.h.their_state is h11.DONE:
                    conn.h.start_next_cycle()
                    conn.started = False
                else:
                    break
        except (ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError, HTTPError):
            pass
        except asyncio.CancelledError:
            pass  # the server is closing: end this connection quietly
        finally:
            self.tasks.discard(task)
            writer.close()

    async def _dispatch(self, conn: _Conn, method: str, target: str, body: bytes) -> None:
        path = target.split("?", 1)[0]
        openai = path.startswith("/v1/")
        try:
            await self._route(conn, method, path, body)
        except HTTPError as exc:
            if conn.started:
                raise
            if exc.status >= 500 and exc.status != 503:
                self.node.stats.errors += 1
            if openai:
                kind = {400: "invalid_request_error", 404: "not_found_error"}.get(
                    exc.status, "api_error")
                await conn.json(exc.status, {"error": {"message": exc.message, "type": kind,
                                                       "param": None, "code": None}})
            else:
                await conn.json(exc.status, {"error": exc.message})

    async def _route(self, conn: _Conn, method: str, path: str, body: bytes) -> None:
        node = self.node
        head = method == "HEAD"
        gets: dict[str, Callable[[], Any]] = {
            "/api/version": lambda: {"version": node.spec.version},
            "/api/tags": node.tags,
            "/api/ps": node.ps,
            "/sim/stats": node.stats.to_json,
            "/sim/hw": node.hw,
        }
        if path == "/":
            if method not in ("GET", "HEAD"):
                raise HTTPError(405, "405 method not allowed")
            await conn.whole(200, b"Ollama is running", "text/plain; charset=utf-8", head)
            return
        if path in gets:
            if method not in ("GET", "HEAD"):
                raise HTTPError(405, "405 method not allowed")
            await conn.json(200, gets[path](), head)
            return
        posts = {"/api/show", "/api/generate", "/api/chat", "/api/embed", "/v1/chat/completions"}
        if path not in posts:
            await conn.whole(404, b"404 page not found", "text/plain")
            return
        if method != "POST":
            raise HTTPError(405, "405 method not allowed")
        try:
            req = json.loads(body) if body else None
        except ValueError:
            raise HTTPError(400, "invalid character in request body") from None
        if not isinstance(req, dict):
            raise HTTPError(400, "missing request body" if not body else "body must be an object")
        if path == "/api/show":
            await conn.json(200, node.show(req))
        elif path == "/api/embed":
            await self._embed(conn, req)
        elif path == "/v1/chat/completions":
            await self._openai_chat(conn, req)
        else:
            await self._native(conn, path == "/api/chat", req)

    async def _native(self, conn: _Conn, chat: bool, req: JSON) -> None:
        node = self.node
        key, model, num_ctx, keep, predict = node.parse_common(req)
        if model.embedding:
            what = "chat" if chat else "generate"
            raise HTTPError(400, f'"{model.name}" does not support {what}')
        if chat:
            msgs = req.get("messages")
            if msgs is None:
                msgs = []
            if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
                raise HTTPError(400, "messages must be a list of objects")
            empty = not msgs
            text = render_chat(msgs)
        else:
            prompt = req.get("prompt") or ""
            if not isinstance(prompt, str):
                raise HTTPError(400, "prompt must be a string")
            empty = not prompt
            system = req.get("system") or ""
            text = (f"<|system|>{system}\n" if system else "") + prompt
        stream = req.get("stream", True) is not False
        base: JSON = {"model": model.name}

        def stamp() -> JSON:
            return {**base, "created_at": rfc3339(time.time())}

        if empty:
            reason = await node.load_or_unload(key, num_ctx, keep)
            obj = {**stamp(), **({"message": {"role": "assistant", "content": ""}} if chat
                                 else {"response": ""}), "done": True, "done_reason": reason}
            await conn.json(200, obj)
            return
        pieces: list[str] = []

        async def emit(piece: str) -> None:
            if not stream:
                pieces.append(piece)
                return
            if not conn.started:
                await conn.start(200, "application/x-ndjson")
            obj = {**stamp(), **({"message": {"role": "assistant", "content": piece}} if chat
                                 else {"response": piece}), "done": False}
            await conn.send(h11.Data(data=json.dumps(obj).encode() + b"\n"))

        metrics = await node.infer(key, num_ctx, keep, text, predict, emit)
        final: JSON = {**stamp()}
        if chat:
            final["message"] = {"role": "assistant", "content": "" if stream else "".join(pieces)}
        else:
            final["response"] = "" if stream else "".join(pieces)
        final["done"] = True
        final["done_reason"] = "length"
        final.update(metrics)
        if not stream:
            await conn.json(200, final)
            return
        await conn.send(h11.Data(data=json.dumps(final).encode() + b"\n"), h11.EndOfMessage())

    async def _embed(self, conn: _Conn, req: JSON) -> None:
        node = self.node
        key, model, num_ctx, keep, _ = node.parse_common(req)
        inp = req.get("input", [])
        items = [inp] if isinstance(inp, str) else inp
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise HTTPError(400, "invalid input type")
        count = 0
        vectors: list[list[float]] = []

        async def emit(_: str) -> None:
            return None

        metrics: JSON = {}
        for text in items or []:
            metrics = await node.infer(key, num_ctx, keep, text, 1, emit)
            count += token_count(text)
            h = hashlib.blake2b(text.encode(), digest_size=16).digest()
            vec = [b / 255.0 - 0.5 for b in h]
            norm = math.sqrt(sum(v * v for v in vec)) or 1.0
            vectors.append([v / norm for v in vec])
        await conn.json(200, {"model": model.name, "embeddings": vectors,
                              "total_duration": metrics.get("total_duration", 0),
                              "load_duration": metrics.get("load_duration", 0),
                              "prompt_eval_count": count})

    async def _openai_chat(self, conn: _Conn, req: JSON) -> None:
        node = self.node
        msgs = req.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise HTTPError(400, "[] is too short - 'messages'")
        native: JSON = {"model": req.get("model"), "messages": msgs}
        if req.get("max_tokens"):
            native["options"] = {"num_predict": req["max_tokens"]}
        key, model, num_ctx, keep, predict = node.parse_common(native)
        text = render_chat([m for m in msgs if isinstance(m, dict)])
        stream = req.get("stream") is True
        cid = f"chatcmpl-{int(time.time() * 1000) % 999}"
        created = int(time.time())
        pieces: list[str] = []
        first = True

        def chunk(delta: JSON, finish: str | None) -> bytes:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created,
                   "model": model.name, "system_fingerprint": "fp_ollama",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        async def emit(piece: str) -> None:
            nonlocal first
            if not stream:
                pieces.append(piece)
                return
            if not conn.started:
                await conn.start(200, "text/event-stream")
            delta: JSON = {"role": "assistant", "content": piece} if first else {"content": piece}
            first = False
            await conn.send(h11.Data(data=chunk(delta, None)))

        metrics = await node.infer(key, num_ctx, keep, text, predict, emit)
        usage = {"prompt_tokens": metrics["prompt_eval_count"],
                 "completion_tokens": metrics["eval_count"],
                 "total_tokens": metrics["prompt_eval_count"] + metrics["eval_count"]}
        if not stream:
            await conn.json(200, {
                "id": cid, "object": "chat.completion", "created": created, "model": model.name,
                "system_fingerprint": "fp_ollama",
                "choices": [{"index": 0, "message": {"role": "assistant",
                                                     "content": "".join(pieces)},
                             "finish_reason": "length"}],
                "usage": usage})
            return
        tail = chunk({}, "length")
        opts = req.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage"):
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created,
                   "model": model.name, "system_fingerprint": "fp_ollama", "choices": [],
                   "usage": usage}
            tail += b"data: " + json.dumps(obj).encode() + b"\n\n"
        await conn.send(h11.Data(data=tail + b"data: [DONE]\n\n"), h11.EndOfMessage())


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def parse_model(spec: str) -> SimModel:
    """``name=GB`` (weights), e.g. ``qwen2.5:7b=4.7``."""
    name, _, size = spec.partition("=")
    if not size:
        raise argparse.ArgumentTypeError(f"--model wants NAME=GB, got {spec!r}")
    return SimModel(name=name, weights=int(float(size) * GB))


async def serve(specs: Iterable[NodeSpec], host: str, port: int) -> None:
    servers = []
    for i, spec in enumerate(specs):
        srv = SimServer(SimNode(spec), host, port if i == 0 else 0)
        await srv.start()
        servers.append(srv)
        print(f"sim-ollama {spec.name} listening on {host}:{srv.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for srv in servers:
        await srv.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--spec-file", help="JSON list of node specs (NodeSpec.to_json())")
    p.add_argument("--spec", help="the same JSON list, inline")
    p.add_argument("--name", default="sim")
    p.add_argument("--memory-gb", type=float, default=16.0)
    p.add_argument("--slots", type=int, default=1)
    p.add_argument("--bandwidth-gbps", type=float, default=200.0)
    p.add_argument("--load-gbps", type=float, default=2.0)
    p.add_argument("--keep-alive", type=float, default=300.0)
    p.add_argument("--max-queue", type=int, default=512)
    p.add_argument("--model", action="append", type=parse_model, default=[])
    args = p.parse_args(argv)
    if args.spec or args.spec_file:
        if args.spec:
            raw = json.loads(args.spec)
        else:
            with open(args.spec_file) as f:
                raw = json.load(f)
        specs = [NodeSpec.from_json(d) for d in raw]
    else:
        specs = [NodeSpec(
            name=args.name, memory=int(args.memory_gb * GB), slots=args.slots,
            bandwidth=args.bandwidth_gbps * GB, load_bps=args.load_gbps * GB,
            keep_alive_s=args.keep_alive, max_queue=args.max_queue,
            models=tuple(args.model) or (SimModel("llama3.2:3b", 2 * GB),))]
    asyncio.run(serve(specs, args.host, args.port))


if __name__ == "__main__":
    main()
