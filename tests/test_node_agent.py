"""Node agent (herd_node.py) against the real router: joining, routing, drain, offline, rejoin,
fleet key, takeover refusal, collectors with and without psutil, mDNS discovery.

Everything runs on loopback or inside network namespaces the tests create (mDNS never goes
near the root namespace's real NIC). Agents run as real subprocesses where signals matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import ollama
import pytest

import herd
import herd_node
from tests import http_helpers
from tests.child_process import ChildProcess
from tests.conftest import RouterFactory, RunningRouter, skip_or_fail
from tests.fake_ollama import FakeModel, FakeOllama
from tests.http_helpers import raw_request, wait_until

ROOT = Path(__file__).resolve().parent.parent
INTERVAL = 0.3  # heartbeat interval in these tests (seconds)
LLAMA = FakeModel(name="llama3.2:3b", size=2_000_000_000)
QWEN = FakeModel(name="qwen2.5:7b", size=4_700_000_000, family="qwen2")


# =======================================================================================
# helpers
# =======================================================================================


def status_of(router: RunningRouter, node_id: str) -> str | None:
    node = router.router.fleet.nodes.get(node_id)
    return node.status if node is not None else None


def beat(node_id: str, url: str, **extra: Any) -> JSON:
    """A heartbeat at this file's interval, with some memory and an available-models hash."""
    return http_helpers.beat(
        node_id,
        url,
        **{
            "interval_s": INTERVAL,
            "hardware": {"memory": {"total_bytes": 8 << 30, "available_bytes": 4 << 30}},
            "ollama": {"reachable": True, "loaded": [], "available": [], "available_hash": "x"},
            **extra,
        },
    )


JSON = dict[str, Any]


class AgentProcess(ChildProcess):
    """``python herd_node.py ...`` as a subprocess; its /healthz port read from stdout."""

    wait_s = 10.0

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        super().__init__()
        self.args = args
        self.log_path = log_path
        self.env = env

    async def start(self, prefix: list[str] | None = None, script: list[str] | None = None) -> None:
        argv = [*(prefix or []), *(script or [sys.executable, "herd_node.py"]), *self.args]
        line = await self.spawn(argv, self.log_path, self.env, first_line_s=15)
        assert line.startswith("herd-node listening on "), (line, self.log())
        self.port = self.port_of(line)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


@pytest.fixture
async def agents(tmp_path: Path) -> AsyncIterator[Callable[..., AgentProcess]]:
    made: list[AgentProcess] = []

    def factory(
        router_url: str | None,
        ollama_url: str,
        node_id: str,
        *extra: str,
        env: dict[str, str] | None = None,
    ) -> AgentProcess:
        args = [
            "--ollama-url",
            ollama_url,
            "--node-id",
            node_id,
            "--port",
            "0",
            "--interval",
            str(INTERVAL),
            "--data-dir",
            str(tmp_path / f"agent-{node_id}"),
        ]
        if router_url:
            args += ["--router-url", router_url]
        agent = AgentProcess(args + list(extra), tmp_path / f"agent-{node_id}.log", env)
        made.append(agent)
        return agent

    yield factory
    for agent in made:
        await agent.close()


def agent_config(
    router: RunningRouter | None, fake: FakeOllama, node_id: str, **overrides: Any
) -> herd_node.AgentConfig:
    settings: dict[str, Any] = {
        "router_urls": (router.url,) if router else (),
        "ollama_url": fake.url,
        "node_id": node_id,
        "interval_s": INTERVAL,
        "port": 0,
    }
    settings.update(overrides)
    return herd_node.AgentConfig(**settings)


# =======================================================================================
# joining, routing, change-only model lists
# =======================================================================================


async def test_agent_joins_and_requests_are_routed_to_it(
    make_router: RouterFactory, agents: Callable[..., AgentProcess]
) -> None:
    router = await make_router([], heartbeat_interval_s=INTERVAL)
    async with FakeOllama([LLAMA]) as fake:
        agent = agents(router.url, fake.url, "studio", env={"OLLAMA_NUM_PARALLEL": "3"})
        await agent.start()
        await wait_until(lambda: status_of(router, "studio") == "online", 10, "agent online")
        _, _, raw = await raw_request(router.port, "GET", "/fleet/status")
        status = json.loads(raw)
        node = next(n for n in status["nodes"] if n["node_id"] == "studio")
        assert node["source"] == "agent"
        assert node["url"] == fake.url
        assert node["num_parallel"] == 3
        assert node["memory"]["total_bytes"] > 0
        assert node["cpu"]["cores"] >= 1
        assert node["disk"]["free_bytes"] > 0
        assert node["version"] == fake.version
        assert [m["name"] for m in node["available_models"]] == ["llama3.2:3b"]
        assert status["fleet"]["nodes_online"] == 1

        served_by: list[str] = []

        async def note(response: Any) -> None:
            served_by.append(response.headers.get("x-herd-node", ""))

        client = ollama.AsyncClient(host=router.url, event_hooks={"response": [note]})
        try:
            reply = await client.chat(
                model="llama3.2:3b", messages=[{"role": "user", "content": "hi"}], stream=False
            )
        finally:
            await client._client.aclose()
        assert reply.message.content
        assert served_by == ["studio"]
        assert len(fake.requests_to("/api/chat")) == 1

        # the agent's own health endpoint
        code, _, raw = await raw_request(agent.port, "GET", "/healthz")
        health = json.loads(raw)
        assert code == 200
        assert health["node_id"] == "studio" and health["connected"] is True
        assert health["router_id"] == router.router.router_id


async def test_available_list_is_sent_only_when_it_changes(make_router: RouterFactory) -> None:
    router = await make_router([], heartbeat_interval_s=INTERVAL)
    async with FakeOllama([LLAMA]) as fake:
        agent = herd_node.Agent(agent_config(router, fake, "lister"), herd_node.load_psutil())
        try:
            sent: list[bool] = []
            for _ in range(4):
                await agent.beat_once(router.url)
                link = agent.link(router.url)
                sent.append(link.sent_hash is not None and link.need_full is False)
            first, *rest = agent.payload_sizes
            assert all(size < first for size in rest), agent.payload_sizes
            assert len(fake.requests_to("/api/tags")) == 4  # one per beat, never more
            assert len(fake.requests_to("/api/ps")) == 4
            assert len(fake.requests_to("/api/version")) == 1  # refreshed once a minute
            node = router.router.fleet.nodes["lister"]
            assert node.available_names() == {"llama3.2:3b"}

            fake.add_model(QWEN)  # a pull on the node: the next beat carries the new list
            await agent.beat_once(router.url)
            assert agent.payload_sizes[-1] > rest[-1]
            assert node.available_names() == {"llama3.2:3b", "qwen2.5:7b"}

            # a router that lost the list (restart) asks for it once: need_full
            del router.router.fleet.nodes["lister"]
            reply = await agent.beat_once(router.url)
            assert reply["need_full"] is True
            await agent.beat_once(router.url)
            assert router.router.fleet.nodes["lister"].available_names() == {
                "llama3.2:3b",
                "qwen2.5:7b",
            }
        finally:
            await agent.stop()


# =======================================================================================
# drain, offline, rejoin (real processes, real signals)
# =======================================================================================


async def test_sigterm_drains_sigkill_goes_offline_restart_rejoins(
    make_router: RouterFactory, agents: Callable[..., AgentProcess]
) -> None:
    router = await make_router([], heartbeat_interval_s=INTERVAL)
    async with FakeOllama([LLAMA]) as fake_a, FakeOllama([LLAMA]) as fake_b:
        a = agents(router.url, fake_a.url, "node-a")
        b = agents(router.url, fake_b.url, "node-b")
        await asyncio.gather(a.start(), b.start())
        await wait_until(
            lambda: status_of(router, "node-a") == status_of(router, "node-b") == "online",
            10,
            "both agents online",
        )

        # SIGTERM: a last beat with draining=true; the router stops routing there at once
        a.signal(signal.SIGTERM)
        drained_in = await wait_until(
            lambda: status_of(router, "node-a") == "draining", 3, "node-a draining"
        )
        assert await a.wait() == 0
        assert "draining" in a.log()
        body = json.dumps({"model": "llama3.2:3b", "prompt": "x", "stream": False}).encode()
        for _ in range(3):
            code, hdrs, _ = await raw_request(router.port, "POST", "/api/generate", body)
            assert code == 200 and hdrs["x-herd-node"] == "node-b"
        assert not fake_a.requests_to("/api/generate")

        # restart: it rejoins
        await a.start()
        await wait_until(lambda: status_of(router, "node-a") == "online", 5, "node-a rejoined")

        # SIGKILL: no goodbye; offline within 3 intervals of silence
        a.signal(signal.SIGKILL)
        killed = time.monotonic()
        await a.wait()
        await wait_until(lambda: status_of(router, "node-a") == "offline", 5, "node-a offline")
        offline_in = time.monotonic() - killed
        assert offline_in <= 3 * INTERVAL + 0.5, offline_in
        print(f"drain visible after {drained_in:.3f}s; offline {offline_in:.3f}s after SIGKILL")


# =======================================================================================
# fleet key, impostors, takeovers, malformed beats
# =======================================================================================


async def test_fleet_key_signs_both_ways(make_router: RouterFactory) -> None:
    key = "s3cret"
    router = await make_router([], heartbeat_interval_s=INTERVAL, fleet_key=key)
    # an Ollama on another machine: not this machine's agent, so it must sign (consent)
    body = herd.dumps(beat("keyed", "http://10.0.0.9:1"))
    code, _, raw = await raw_request(router.port, "POST", "/heartbeat", body)
    assert code == 401, raw
    bad = herd.sign("wrong", int(time.time()), body)
    code, _, _ = await raw_request(
        router.port, "POST", "/heartbeat", body, {"x-herd-signature": bad}
    )
    assert code == 401
    stale = herd.sign(key, int(time.time()) - 600, body)
    code, _, _ = await raw_request(
        router.port, "POST", "/heartbeat", body, {"x-herd-signature": stale}
    )
    assert code == 401
    assert "keyed" not in router.router.fleet.nodes
    good = herd.sign(key, int(time.time()), body)
    code, hdrs, raw = await raw_request(
        router.port, "POST", "/heartbeat", body, {"x-herd-signature": good}
    )
    assert code == 200
    assert herd.verify_signature(key, hdrs.get("x-herd-signature"), raw, time.time())
    assert json.loads(raw)["ok"] is True

    # the agent with the right key joins; with a wrong key it is told so (401)
    async with FakeOllama([LLAMA]) as fake:
        agent = herd_node.Agent(agent_config(router, fake, "keyed-agent", fleet_key=key))
        wrong = herd_node.Agent(agent_config(router, fake, "wrong-agent", fleet_key="nope"))
        try:
            await agent.beat_once(router.url)
            assert status_of(router, "keyed-agent") == "online"
            with pytest.raises(herd_node.BeatFailed) as info:
                await wrong.beat_once(router.url)
            assert info.value.kind == "unauthorized"
            assert "wrong-agent" not in router.router.fleet.nodes
        finally:
            await agent.stop()
            await wrong.stop()


async def test_agent_refuses_router_without_our_key(make_router: RouterFactory) -> None:
    """A router that does not hold the fleet key (it answers unsigned, or signs with another
    key) is an impostor: the agent does not count the beat as delivered."""
    open_router = await make_router([], heartbeat_interval_s=INTERVAL)
    other_key = await make_router([], heartbeat_interval_s=INTERVAL, fleet_key="other")
    async with FakeOllama([LLAMA]) as fake:
        agent = herd_node.Agent(agent_config(open_router, fake, "careful", fleet_key="mine"))
        try:
            with pytest.raises(herd_node.BeatFailed) as info:
                await agent.beat_once(open_router.url)
            assert info.value.kind == "impostor"
            assert agent.health()["connected"] is False
            assert "fleet key" in (agent.health()["last_error"] or "")
            with pytest.raises(herd_node.BeatFailed) as info:
                await agent.beat_once(other_key.url)
            assert info.value.kind == "unauthorized"
        finally:
            await agent.stop()


async def test_takeover_from_another_address_is_refused(make_router: RouterFactory) -> None:
    router = await make_router([], heartbeat_interval_s=INTERVAL)
    body = herd.dumps(beat("victim", "http://127.0.0.1:11111"))
    code, _, _ = await raw_request(router.port, "POST", "/heartbeat", body)
    assert code == 200
    thief = herd.dumps(beat("victim", "http://127.0.0.2:6666"))
    code, _, raw = await raw_request(
        router.port, "POST", "/heartbeat", thief, local_addr=("127.0.0.2", 0)
    )
    assert code == 409, raw
    assert router.router.fleet.nodes["victim"].url == "http://127.0.0.1:11111"
    # once the real node is offline, the id may be reused from elsewhere
    router.router.fleet.nodes["victim"].status = "offline"
    code, _, _ = await raw_request(
        router.port, "POST", "/heartbeat", thief, local_addr=("127.0.0.2", 0)
    )
    assert code == 200
    assert router.router.fleet.nodes["victim"].url == "http://127.0.0.2:6666"


async def test_signed_beat_may_move_a_node(make_router: RouterFactory) -> None:
    router = await make_router([], heartbeat_interval_s=INTERVAL, fleet_key="k")
    body = herd.dumps(beat("mover", "http://127.0.0.1:11111"))
    sig = {"x-herd-signature": herd.sign("k", int(time.time()), body)}
    assert (await raw_request(router.port, "POST", "/heartbeat", body, sig))[0] == 200
    moved = herd.dumps(beat("mover", "http://127.0.0.2:11111"))
    sig = {"x-herd-signature": herd.sign("k", int(time.time()), moved)}
    code, _, _ = await raw_request(
        router.port, "POST", "/heartbeat", moved, sig, local_addr=("127.0.0.2", 0)
    )
    assert code == 200
    assert router.router.fleet.nodes["mover"].url == "http://127.0.0.2:11111"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"node_id": "bad id!"}, "node_id"),
        ({"ollama_url": None}, "ollama_url"),
        ({"hardware": {"memory": {"total_bytes": "lots"}}}, "hardware.memory.total_bytes"),
        ({"hardware": {"cpu": "fast"}}, "hardware.cpu"),
        ({"hardware": {"gpu": {"devices": [{"memory_total_bytes": "8G"}]}}}, "gpu.devices"),
        ({"ollama": {"loaded": [{"name": "m", "size": "big"}]}}, "ollama.loaded[].size"),
        ({"ollama": {"available": [{"name": "m", "details": "x"}]}}, "details"),
        ({"capabilities": {"image": "yes"}}, "capabilities.image"),
        ({"interval_s": 0}, "interval_s"),
    ],
)
async def test_malformed_beat_is_400_and_changes_nothing(
    make_router: RouterFactory, change: JSON, reason: str
) -> None:
    router = await make_router([], heartbeat_interval_s=INTERVAL)
    good = beat("steady", "http://127.0.0.1:11111")
    assert (await raw_request(router.port, "POST", "/heartbeat", herd.dumps(good)))[0] == 200
    before = router.router.fleet.nodes["steady"].public(0.0)
    broken = {**good, "node_id": "steady", **change}
    code, _, raw = await raw_request(router.port, "POST", "/heartbeat", herd.dumps(broken))
    assert code == 400, raw
    assert reason in json.loads(raw)["error"]
    assert router.router.fleet.nodes["steady"].public(0.0) == before
    router.router.fleet._snapshots(time.time())  # the fleet model still snapshots cleanly


# =======================================================================================
# collectors
# =======================================================================================

MEMINFO = """MemTotal:       16303428 kB
MemFree:          512000 kB
MemAvailable:    1630342 kB
Buffers:          200000 kB
Cached:          3000000 kB
SwapTotal:       2097148 kB
SwapFree:        2097148 kB
"""
MEMINFO_OLD_KERNEL = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 10 kB\nCached: 40 kB\n"
NVIDIA = """NVIDIA GeForce RTX 4090, 24564, 1021, 45, 3
NVIDIA A100-SXM4-80GB, 81920, 0, [N/A], [Not Supported]
"""
PROC_STAT_1 = "cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 50 0 50 350 50 0 0 0 0 0\n"
PROC_STAT_2 = "cpu  300 0 300 1100 100 0 0 0 0 0\ncpu0 100 0 100 650 50 0 0 0 0 0\n"
CPUINFO = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) 8375C\n"


def test_proc_and_nvidia_parsers() -> None:
    mem = herd_node.memory_from_meminfo(MEMINFO)
    assert mem["total_bytes"] == 16303428 * 1024
    assert mem["available_bytes"] == 1630342 * 1024
    assert mem["pressure"] == "warn"  # 90 % used
    old = herd_node.memory_from_meminfo(MEMINFO_OLD_KERNEL)
    assert old["available_bytes"] == 150 * 1024 and old["pressure"] == "warn"  # 85 % used
    with pytest.raises(ValueError, match="MemTotal"):
        herd_node.memory_from_meminfo("garbage")
    assert [herd_node.memory_pressure(100, a) for a in (50, 15, 5, 0)] == [
        "normal",
        "warn",
        "critical",
        "critical",
    ]
    devices = herd_node.parse_nvidia_smi(NVIDIA)
    assert devices[0] == {
        "name": "NVIDIA GeForce RTX 4090",
        "memory_total_bytes": 24564 * 2**20,
        "memory_used_bytes": 1021 * 2**20,
        "temperature_c": 45.0,
        "utilization_pct": 3.0,
    }
    assert devices[1]["temperature_c"] is None and devices[1]["utilization_pct"] is None
    with pytest.raises(ValueError):
        herd_node.parse_nvidia_smi("No devices were found, or so")
    first = herd_node.parse_proc_stat(PROC_STAT_1)
    second = herd_node.parse_proc_stat(PROC_STAT_2)
    assert herd_node.cpu_utilization(None, first) is None
    assert herd_node.cpu_utilization(first, second) == 50.0
    assert herd_node.parse_loadavg("0.52 0.40 0.31 1/234 5678\n") == (0.52, 0.40, 0.31)
    assert herd_node.parse_cpuinfo_model(CPUINFO) == "Intel(R) Xeon(R) 8375C"
    assert herd_node.parse_environ(b"A=1\0OLLAMA_NUM_PARALLEL=4\0junk\0") == {
        "A": "1",
        "OLLAMA_NUM_PARALLEL": "4",
    }
    assert [herd_node.thermal_state(t) for t in (None, 50, 85, 99)] == [
        "unknown",
        "nominal",
        "warning",
        "critical",
    ]


def test_num_parallel_precedence_and_urls() -> None:
    limits = herd_node.ollama_limits
    assert limits({"OLLAMA_NUM_PARALLEL": "2"}, {"OLLAMA_NUM_PARALLEL": "8"}, 5, None) == (2, None)
    assert limits({}, {"OLLAMA_NUM_PARALLEL": "8", "OLLAMA_MAX_LOADED_MODELS": "3"}, 5, 1) == (8, 3)
    assert limits({"OLLAMA_NUM_PARALLEL": "zero"}, None, 5, None) == (5, None)
    assert limits({}, None, None, None) == (None, None)
    url = herd_node.advertise_url_for
    assert url("http://127.0.0.1:11434", "192.168.1.20") == "http://192.168.1.20:11434"
    assert url("http://0.0.0.0:11434", "10.0.0.2") == "http://10.0.0.2:11434"
    assert url("http://gpu-box:11434", "10.0.0.2") == "http://gpu-box:11434"
    assert herd_node.source_address_towards("127.0.0.1", 1) == "127.0.0.1"
    delays = [herd_node.backoff_delay(5.0, n) for n in range(12)]
    assert delays[:3] == [5.0, 5.0, 10.0] and max(delays) == 30.0
    assert herd_node.rank_addresses(["127.0.0.1", "10.0.0.9"]) == ["10.0.0.9", "127.0.0.1"]
    assert herd_node.models_digest([{"a": 1, "b": 2}]) == herd_node.models_digest(
        [{"b": 2, "a": 1}]
    )


async def test_failing_collectors_report_null_and_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    smi = fake_bin / "nvidia-smi"
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    async with FakeOllama([LLAMA]) as fake:
        config = agent_config(None, fake, "probe", models_dir=tmp_path / "missing")
        pool = herd.Pool()
        collectors = herd_node.Collectors(config, pool, herd_node.load_psutil())
        try:
            # a working nvidia-smi: devices parsed from its CSV
            smi.write_text("#!/bin/sh\ncat <<'EOF'\n" + NVIDIA + "EOF\n")
            smi.chmod(0o755)
            errors: list[JSON] = []
            gpu = await collectors.gpu(errors)
            assert gpu is not None and len(gpu["devices"]) == 2 and errors == []

            # a broken one (driver mismatch): null + an error, and the beat goes on
            smi.write_text("#!/bin/sh\necho 'Failed to initialize NVML' >&2\nexit 9\n")
            assert await collectors.gpu(errors) is None
            assert errors[0]["collector"] == "gpu" and "NVML" in errors[0]["error"]

            # a hung one: bounded by the timeout
            smi.write_text("#!/bin/sh\nexec sleep 30\n")
            errors.clear()
            started = time.monotonic()
            hurried = herd_node.Collectors(
                dataclasses.replace(config, command_timeout_s=0.5), pool, None
            )
            assert await hurried.gpu(errors) is None
            assert time.monotonic() - started < 3 and "did not answer" in errors[0]["error"]

            # disk of a directory that does not exist: null + error, others still reported
            errors.clear()
            hw = await asyncio.to_thread(collectors.hardware_sync, errors)
            assert hw["disk"] is None and hw["memory"]["total_bytes"] > 0
            assert [e["collector"] for e in errors] == ["disk"]

            # Ollama down: reachable false, loaded [], errors name the calls
            fake.refuse_connections()
            errors.clear()
            section, available = await collectors.ollama(errors)
            assert section["reachable"] is False and section["loaded"] == [] and available is None
            assert {"ollama.ps", "ollama.tags"} <= {e["collector"] for e in errors}
        finally:
            pool.close()


async def test_without_psutil_memory_comes_from_proc(
    make_router: RouterFactory, agents: Callable[..., AgentProcess]
) -> None:
    router = await make_router([], heartbeat_interval_s=INTERVAL)
    no_psutil = [
        sys.executable,
        "-c",
        "import runpy, sys; sys.modules['psutil'] = None; sys.argv[0] = 'herd_node.py'; "
        "runpy.run_path('herd_node.py', run_name='__main__')",
    ]
    async with FakeOllama([LLAMA]) as fake:
        agent = agents(router.url, fake.url, "bare")
        await agent.start(script=no_psutil)
        await wait_until(lambda: status_of(router, "bare") == "online", 10, "psutil-less agent")
        await asyncio.sleep(INTERVAL * 2.5)  # a second sample gives CPU utilisation
        hw = router.router.fleet.nodes["bare"].hardware
        meminfo = herd_node.parse_meminfo(await asyncio.to_thread(Path("/proc/meminfo").read_text))
        assert hw["memory"]["total_bytes"] == meminfo["MemTotal"]
        assert 0 < hw["memory"]["available_bytes"] <= meminfo["MemTotal"]
        assert hw["cpu"]["cores"] == os.cpu_count()
        assert hw["cpu"]["utilization_pct"] is not None
        assert hw["disk"]["free_bytes"] > 0
        assert router.router.fleet.nodes["bare"].errors == []
        agent.signal(signal.SIGTERM)
        assert await agent.wait() == 0
        assert agent.log().count("psutil is not installed") == 1


# =======================================================================================
# discovery (mDNS)
# =======================================================================================


async def test_discovery_on_loopback_follows_a_new_router(
    make_router: RouterFactory, tmp_path: Path
) -> None:
    """Root namespace, mDNS bound to 127.0.0.1 only (never the real NIC)."""
    fleet = f"t-{uuid.uuid4().hex[:8]}"
    first = await make_router([], heartbeat_interval_s=INTERVAL, mdns=True, fleet_id=fleet)
    async with FakeOllama([LLAMA]) as fake:
        config = agent_config(None, fake, "finder", fleet_id=fleet, mdns_interfaces=("127.0.0.1",))
        agent = herd_node.Agent(config)
        await agent.start()
        run = asyncio.ensure_future(agent.run())
        try:
            found = await wait_until(
                lambda: status_of(first, "finder") == "online", 15, "agent found router 1"
            )
            await first.router.stop()  # clean stop: mDNS goodbye
            second = await make_router([], heartbeat_interval_s=INTERVAL, mdns=True, fleet_id=fleet)
            assert second.port != first.port
            moved = await wait_until(
                lambda: status_of(second, "finder") == "online", 15, "agent followed router 2"
            )
            print(f"found router in {found:.2f}s, followed the new one in {moved:.2f}s")
        finally:
            agent.stopping.set()
            await asyncio.wait_for(run, 10)
            await agent.stop()


def _netns_usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    probe = f"herdprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False)
    return None


class NsProcess:
    """A process inside a namespace; its listening port read from its first stdout line."""

    def __init__(self, ns: str, argv: list[str], log_path: Path) -> None:
        self.ns, self.argv, self.log_path = ns, argv, log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    async def start(self) -> NsProcess:
        with self.log_path.open("ab") as log_file:
            self.proc = await asyncio.to_thread(
                subprocess.Popen,
                ["ip", "netns", "exec", self.ns, *self.argv],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=log_file,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 20)
        assert b"listening on" in line, (line, self.log_path.read_text())
        self.port = int(line.decode().rsplit(":", 1)[1])
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


async def ns_fleet_status(ns: str, port: int) -> JSON:
    code = (
        "import sys, urllib.request; "
        "print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())"
    )
    proc = await asyncio.create_subprocess_exec(
        "ip",
        "netns",
        "exec",
        ns,
        sys.executable,
        "-c",
        code,
        f"http://127.0.0.1:{port}/fleet/status",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 10)
    return json.loads(out) if proc.returncode == 0 else {}


async def wait_node_in_ns(ns: str, port: int, node_id: str, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        status = await ns_fleet_status(ns, port)
        if any(
            n["node_id"] == node_id and n["status"] == "online" for n in status.get("nodes", [])
        ):
            return time.monotonic() - start
        await asyncio.sleep(0.2)
    pytest.fail(f"{node_id} did not join the router on port {port} within {timeout}s")


@pytest.mark.netns
async def test_discovery_in_network_namespace_follows_router(tmp_path: Path) -> None:
    reason = _netns_usable()
    if reason:
        skip_or_fail(reason)
    ns = f"herdt{os.getpid()}{uuid.uuid4().hex[:4]}"
    fleet = f"ns-{uuid.uuid4().hex[:6]}"
    procs: list[NsProcess] = []
    await asyncio.to_thread(subprocess.run, ["ip", "netns", "add", ns], check=True)
    try:
        lo_up = ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"]
        await asyncio.to_thread(subprocess.run, lo_up, check=True)
        py = sys.executable

        def router_argv(n: int) -> list[str]:
            return [
                py,
                "herd.py",
                "--port",
                "0",
                "--local-ollama",
                "off",
                "--fleet-id",
                fleet,
                "--heartbeat-interval",
                str(INTERVAL),
                "--data-dir",
                str(tmp_path / f"r{n}"),
            ]

        fake = await NsProcess(
            ns, [py, "-m", "tests.fake_ollama", "--port", "0"], tmp_path / "fake.log"
        ).start()
        procs.append(fake)
        router1 = await NsProcess(ns, router_argv(1), tmp_path / "router1.log").start()
        procs.append(router1)
        agent = await NsProcess(
            ns,
            [
                py,
                "herd_node.py",
                "--ollama-url",
                f"http://127.0.0.1:{fake.port}",
                "--port",
                "0",
                "--node-id",
                "nsnode",
                "--fleet-id",
                fleet,
                "--interval",
                str(INTERVAL),
                "--data-dir",
                str(tmp_path / "agent"),
            ],
            tmp_path / "agent.log",
        ).start()
        procs.append(agent)
        joined = await wait_node_in_ns(ns, router1.port, "nsnode", 20)

        # a clean restart on another port: goodbye + new advertisement, the agent follows
        router1.stop()
        router2 = await NsProcess(ns, router_argv(2), tmp_path / "router2.log").start()
        procs.append(router2)
        assert router2.port != router1.port
        followed = await wait_node_in_ns(ns, router2.port, "nsnode", 20)

        # kill -9: no goodbye, the stale record lingers; the newest router still wins
        router2.stop(signal.SIGKILL)
        router3 = await NsProcess(ns, router_argv(3), tmp_path / "router3.log").start()
        procs.append(router3)
        after_kill = await wait_node_in_ns(ns, router3.port, "nsnode", 20)
        print(
            f"netns: joined {joined:.2f}s, followed restart {followed:.2f}s, "
            f"after kill -9 {after_kill:.2f}s"
        )
        log_text = (tmp_path / "agent.log").read_text()
        assert "found by mDNS" in log_text
    finally:
        for proc in reversed(procs):
            with contextlib.suppress(Exception):
                proc.stop()
        await asyncio.to_thread(subprocess.run, ["ip", "netns", "del", ns], check=False)


async def test_no_zeroconf_and_no_router_url_exits_2(tmp_path: Path) -> None:
    code = (
        "import runpy, sys; sys.modules['zeroconf'] = None; sys.argv[0] = 'herd_node.py'; "
        "runpy.run_path('herd_node.py', run_name='__main__')"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        "--port",
        "0",
        "--data-dir",
        str(tmp_path),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert b"zeroconf is not installed" in err and b"--router-url" in err
