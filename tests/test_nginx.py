"""Several routers behind Debian's nginx and HAProxy, with the README's recipes (issue 17).

Three real ``python herd.py`` routers, one real ``herd_node.py`` agent reporting to all of
them (``HERD_ROUTER_URL`` as a comma-separated list), a fake Ollama behind the agent, and
Debian's ``nginx`` (or ``haproxy``) in front running the ``nginx-recipe`` (``haproxy-recipe``)
block of README.md: only the upstream addresses, the listen address and the temp paths are
replaced; a header naming the upstream (and HAProxy's request log) are added for the test's
bookkeeping.

Under a bounded load (streams and whole answers, native and OpenAI): a cold-load pause
holds requests before their first byte, router A is SIGKILLed with requests in it, router B
is SIGTERMed while its streams are answering. Nothing is lost: what A had accepted the
balancer replays on another router, what B was streaming finishes. A restarted A is fed by
the agent within 2 beats. (A stream already answering on a router that is killed cannot be
saved by any proxy, so A is killed only once none of its streams is answering; the README
says so.)

``@pytest.mark.nginx`` / ``haproxy``: skipped when the balancer is missing, a failure under
``CI=true`` (tests/setup.sh installs both).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.child_process import ChildProcess
from tests.fake_ollama import FakeModel, FakeOllama
from tests.http_helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
BEAT = 0.5  # the agent's heartbeat interval here (seconds)
MODEL = "llama3.2:3b"
TOTAL_MAX = 240  # hard bound on the requests this test sends
WORKERS = 6
JSON = dict[str, Any]


def lb_binary(name: str = "nginx") -> str:
    """Debian's nginx / haproxy, or skip (locally) / fail (CI=true: tests/setup.sh installs
    both)."""
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/local/sbin/{name}") if os.access(p, os.X_OK)),
        None,
    )
    if found is None:
        why = f"{name} is not installed (tests/setup.sh installs Debian's {name})"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{name} tests must run in CI: {why}")
        pytest.skip(why)
    return found


def nginx_binary() -> str:
    return lb_binary("nginx")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def readme_recipe(lb: str = "nginx") -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {lb}-recipe -->\s*```{lb}\n(.*?)```", text, re.S)
    assert match, f"README.md lost its {lb}-recipe block"
    return match.group(1)


def nginx_conf(recipe: str, tmp: Path, listen: int, routers: list[int]) -> str:
    """The README block, pointed at our routers, inside a self-contained main config."""
    servers = re.findall(r"^\s*server 10\.0\.0\.\d+:11435 .*$", recipe, re.M)
    assert len(servers) == len(routers), servers
    for line, port in zip(servers, routers, strict=True):
        recipe = recipe.replace(line, re.sub(r"10\.0\.0\.\d+:11435", f"127.0.0.1:{port}", line))
    recipe = recipe.replace("listen 11434;", f"listen 127.0.0.1:{listen};")
    recipe = recipe.replace(
        "proxy_pass http://herd;",
        "proxy_pass http://herd;\n        add_header X-Test-Upstream $upstream_addr always;",
    )
    temp = "\n".join(
        f"    {kind}_temp_path {tmp / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"daemon off;\nworker_processes 1;\npid {tmp / 'nginx.pid'};\n"
        f"error_log {tmp / 'error.log'} info;\n"
        "events { worker_connections 512; }\n"
        f"http {{\n    access_log {tmp / 'access.log'};\n{temp}\n{recipe}}}\n"
    )


def haproxy_conf(recipe: str, listen: int, routers: list[int]) -> str:
    """The README block, pointed at our routers; one header names the server for the test."""
    servers = re.findall(r"10\.0\.0\.\d+:11435", recipe)
    assert len(servers) == len(routers), servers
    for addr, port in zip(servers, routers, strict=True):
        recipe = recipe.replace(addr, f"127.0.0.1:{port}", 1)
    recipe = recipe.replace("bind :11434", f"bind 127.0.0.1:{listen}")
    recipe = recipe.replace(
        "backend herd\n", "backend herd\n    http-response set-header X-Test-Upstream %si:%sp\n"
    )
    # its request log (retries per request) on stderr, for the test's bookkeeping
    recipe = recipe.replace("defaults\n", "defaults\n    log global\n    option httplog\n", 1)
    return "global\n    log stderr format raw local0\n" + recipe


class Proc(ChildProcess):
    """A subprocess whose first stdout line (``... listening on HOST:PORT``) means ready."""

    def __init__(
        self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None
    ) -> None:
        super().__init__()
        self.name, self.argv, self.log, self.env = name, argv, log, env or {}

    async def start(self, ready_line: bool = True) -> Proc:
        line = await self.spawn(self.argv, self.log, self.env,
                                first_line_s=30 if ready_line else None)
        if ready_line:
            assert "listening on" in line, (self.name, line, self.log.read_text()[-2000:])
            self.port = self.port_of(line)
        return self

    async def close(self) -> None:
        """SIGTERM (nginx's master then stops its workers), SIGKILL after 5 s."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await self.wait(5)
            except TimeoutError:
                self.proc.kill()
                await self.wait(5)


@dataclass
class Outcome:
    """One client request through nginx."""

    n: int
    kind: str
    upstreams: list[int] = field(default_factory=list)  # router ports nginx tried, in order
    answering_at: float | None = None  # monotonic: response head received
    done_at: float | None = None
    status: int = 0
    ok: bool = False
    error: str = ""

    @property
    def router(self) -> int | None:
        return self.upstreams[-1] if self.upstreams else None

    def answering_on(self, port: int) -> bool:
        return self.router == port and self.answering_at is not None and self.done_at is None


REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("native-stream", "/api/generate", {"model": MODEL, "prompt": "hi", "stream": True}),
    ("openai-stream", "/v1/chat/completions",
     {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}),
    ("native-whole", "/api/chat",
     {"model": MODEL, "stream": False, "messages": [{"role": "user", "content": "hi"}]}),
]


async def one_request(client: httpx.AsyncClient, out: Outcome, path: str, body: JSON) -> None:
    try:
        async with client.stream("POST", path, json=body) as resp:
            out.status = resp.status_code
            out.answering_at = time.monotonic()
            out.upstreams = [
                int(a.rsplit(":", 1)[1])
                for a in re.split(r"[,:]\s+", resp.headers.get("x-test-upstream", ""))
                if a.strip() and a.rsplit(":", 1)[-1].isdigit()
            ]
            raw = b"".join([chunk async for chunk in resp.aiter_bytes()])
        text = raw.decode()
        if out.status != 200:
            out.error = f"HTTP {out.status}: {text[:200]}"
        elif out.kind == "openai-stream":
            events = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
            out.ok = events[-1:] == ["[DONE]"] and all('"error"' not in e for e in events)
            out.error = "" if out.ok else f"broken SSE stream: {text[-200:]!r}"
        else:
            lines = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
            out.ok = bool(lines) and lines[-1].get("done") is True and not any(
                "error" in ln for ln in lines
            )
            out.error = "" if out.ok else f"incomplete answer: {text[-200:]!r}"
    except (httpx.HTTPError, ValueError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        out.done_at = time.monotonic()


async def agent_links(port: int) -> dict[str, JSON]:
    async with httpx.AsyncClient(timeout=5) as client:
        health = (await client.get(f"http://127.0.0.1:{port}/healthz")).json()
    return {r["url"]: r for r in health["routers"]}


async def node_online(port: int, node_id: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            status = (await client.get(f"http://127.0.0.1:{port}/fleet/status")).json()
    except (httpx.HTTPError, ValueError):
        return False
    return any(n["node_id"] == node_id and n["status"] == "online" for n in status["nodes"])


@contextlib.asynccontextmanager
async def processes() -> AsyncIterator[list[Proc]]:
    started: list[Proc] = []
    try:
        yield started
    finally:
        for p in reversed(started):
            with contextlib.suppress(Exception):
                await p.close()


@pytest.mark.parametrize(
    "lb",
    [
        pytest.param("nginx", marks=pytest.mark.nginx),
        pytest.param("haproxy", marks=pytest.mark.haproxy),
    ],
)
async def test_three_routers_behind_a_load_balancer_lose_nothing(lb: str, tmp_path: Path) -> None:
    binary = lb_binary(lb)
    r_ports = free_ports(4)
    lb_port, r_ports = r_ports[0], r_ports[1:]
    a_port, b_port, c_port = r_ports
    urls = [f"http://127.0.0.1:{p}" for p in r_ports]
    fake = FakeOllama(
        [FakeModel(MODEL)], num_parallel=32, tokens_per_s=30, response_tokens=30
    )  # each answer streams for about a second
    await fake.start()

    def router(port: int, n: int) -> Proc:
        return Proc(
            f"router-{port}",
            [sys.executable, "herd.py", "--host", "127.0.0.1", "--port", str(port),
             "--local-ollama", "off", "--no-mdns", "--heartbeat-interval", str(BEAT),
             "--grace", "30", "--drain-delay", "1", "--data-dir", str(tmp_path / f"r{n}")],
            tmp_path / f"router-{port}.log",
        )

    try:
        async with processes() as procs:
            routers = {p: router(p, i) for i, p in enumerate(r_ports)}
            await asyncio.gather(*(r.start() for r in routers.values()))
            procs.extend(routers.values())

            conf = tmp_path / f"{lb}.conf"
            if lb == "nginx":
                conf.write_text(nginx_conf(readme_recipe(lb), tmp_path, lb_port, r_ports))
                check_argv = [binary, "-t", "-p", str(tmp_path), "-c", str(conf)]
                run_argv = [binary, "-p", str(tmp_path), "-c", str(conf)]
            else:
                conf.write_text(haproxy_conf(readme_recipe(lb), lb_port, r_ports))
                check_argv = [binary, "-c", "-f", str(conf)]
                run_argv = [binary, "-db", "-f", str(conf)]
            check = await asyncio.create_subprocess_exec(
                *check_argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
            out, _ = await check.communicate()
            assert check.returncode == 0, out.decode()
            balancer = Proc(lb, run_argv, tmp_path / f"{lb}.out")
            await balancer.start(ready_line=False)
            procs.append(balancer)

            agent = await Proc(
                "agent",
                [sys.executable, "herd_node.py", "--ollama-url", fake.url, "--node-id", "lb-node",
                 "--port", "0", "--interval", str(BEAT), "--data-dir", str(tmp_path / "agent")],
                tmp_path / "agent.log",
                {"HERD_ROUTER_URL": ",".join(urls), "OLLAMA_NUM_PARALLEL": "16"},
            ).start()
            procs.append(agent)

            # the node is online on every router within 2 beats of the agent starting
            # (the agent's count is read after, so it can only over-count)
            async with asyncio.timeout(15):
                while True:
                    online = await asyncio.gather(*(node_online(p, "lb-node") for p in r_ports))
                    if all(online):
                        break
                    await asyncio.sleep(0.05)
            links = await agent_links(agent.port)
            for url in urls:
                tries = links[url]["beats_ok"] + links[url]["beats_failed"]
                assert links[url]["connected"] and tries <= 2, links[url]

            # the balancer answers once it listens
            async with asyncio.timeout(10):
                while True:
                    with contextlib.suppress(OSError):
                        _, w = await asyncio.open_connection("127.0.0.1", lb_port)
                        w.close()
                        break
                    await asyncio.sleep(0.05)

            outcomes: list[Outcome] = []
            stop = asyncio.Event()
            client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{lb_port}", timeout=60)

            async def worker() -> None:
                while not stop.is_set() and len(outcomes) < TOTAL_MAX:
                    kind, path, body = REQUESTS[len(outcomes) % len(REQUESTS)]
                    out = Outcome(len(outcomes), kind)
                    outcomes.append(out)
                    await one_request(client, out, path, body)

            def finished() -> int:
                return sum(1 for o in outcomes if o.done_at is not None)

            workers = [asyncio.ensure_future(worker()) for _ in range(WORKERS)]
            try:
                await wait_until(lambda: finished() >= 2 * WORKERS, 30, "a first wave of answers")
                served_by = {o.router for o in outcomes if o.ok}
                assert served_by == set(r_ports), served_by  # spread over all three

                # a cold-load pause: new requests wait for their first byte; once none of A's
                # streams is answering, A holds only requests it has not answered yet
                fake.stall_s = 3.0
                stalled_at = time.monotonic()
                await asyncio.sleep(0.3)  # what was already under way at the fake shows
                await wait_until(
                    lambda: not any(o.answering_on(a_port) for o in outcomes), 10,
                    "A's streams to finish",
                )
                await asyncio.sleep(0.4)  # new requests reach A and wait there
                assert not any(o.answering_on(a_port) for o in outcomes)
                assert time.monotonic() - stalled_at < 2.8, "A's streams took too long"
                killed_at = time.monotonic()
                routers[a_port].signal(signal.SIGKILL)
                await routers[a_port].wait(5)
                fake.stall_s = 0.0

                # B is SIGTERMed while it is streaming
                await wait_until(
                    lambda: sum(o.answering_on(b_port) for o in outcomes) >= 2, 15,
                    "streams answering on B",
                )
                drained_at = time.monotonic()
                on_b = [o for o in outcomes if o.answering_on(b_port)]
                routers[b_port].signal(signal.SIGTERM)
                assert await routers[b_port].wait(40) == 0  # drain delay, then the grace
                at_exit = finished()
                await wait_until(lambda: finished() >= at_exit + 2 * WORKERS, 30, "answers after")
            finally:
                stop.set()
                await asyncio.gather(*workers)
                await client.aclose()

            lost = [o for o in outcomes if not o.ok]
            assert not lost, [(o.n, o.kind, o.upstreams, o.error) for o in lost][:10]
            assert len(outcomes) <= TOTAL_MAX
            # A held requests when it died: the balancer replayed them on another router
            if lb == "nginx":  # $upstream_addr lists every router tried
                replayed = sum(
                    1 for o in outcomes
                    if a_port in o.upstreams[:-1] and o.answering_at and o.answering_at > killed_at
                )
            else:  # HAProxy's request log: retries are the last of the five connection counts
                log = (tmp_path / "haproxy.out").read_text()
                replayed = len(re.findall(r" \d+/\d+/\d+/\d+/\+?[1-9]\d* \d+/\d+ ", log))
            assert replayed, "no request was caught in A when it was killed"
            # every stream answering on B at SIGTERM, and every one B took during its drain
            # delay, completed
            streams_on_b = on_b + [
                o for o in outcomes
                if o.router == b_port and o.answering_at and o.answering_at > drained_at
            ]
            assert on_b and all(o.ok for o in streams_on_b)
            # C goes on serving; B's listener closes 1 s (--drain-delay) after SIGTERM, so a
            # request that first answers on B well after that was sent there after the
            # balancer should have stopped. "Well after" allows for a loaded 2-core machine,
            # where a request B took during its delay can take seconds to answer (seen at
            # +3 s in a full run).
            def answering_after(s: float) -> set[int]:
                return {o.router for o in outcomes
                        if o.answering_at and o.answering_at > drained_at + s}

            assert c_port in answering_after(3)
            assert answering_after(6) <= {c_port}

            # A comes back on its port: the agent feeds it within 2 beats
            restarted = router(a_port, 9)
            await restarted.start()  # back once it prints that it listens
            procs.append(restarted)
            before = (await agent_links(agent.port))[urls[0]]
            base = before["beats_ok"] + before["beats_failed"]
            async with asyncio.timeout(10):
                while not await node_online(a_port, "lb-node"):
                    await asyncio.sleep(0.05)
            after = (await agent_links(agent.port))[urls[0]]
            assert after["beats_ok"] + after["beats_failed"] - base <= 2, (before, after)

            print(
                f"{lb} + 3 routers: {len(outcomes)} requests, 0 lost, "
                f"{replayed} replayed from the killed router, "
                f"{len(streams_on_b)} streams on the draining router completed"
            )
    finally:
        await fake.stop()


def test_missing_nginx_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """The nginx test skips on a machine without nginx, but CI installs it: there, fail."""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="must run in CI"):
        nginx_binary()
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        nginx_binary()
