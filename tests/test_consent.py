"""Nodes join with consent (issue 18): an unsigned beat from another machine is held
(pending, or rejected) and never routed to until an operator approves the node id at that
address and Ollama URL; agents on the router's machine, signed beats and --open-fleet join
without a click.

The first half runs in-process on loopback: a beat "from another machine" is handed to
``Router.apply_heartbeat`` with that source address (the HTTP path cannot fake one on
loopback). The second half runs real agents, routers and fake Ollamas as processes in
network namespaces this test creates, so the addresses are real.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

import herd
import herd_node
from tests import http_helpers
from tests import test_dashboard as dash
from tests.child_process import help_text, start_herd, stop
from tests.conftest import RouterFactory, RunningRouter
from tests.fake_ollama import FakeModel, FakeOllama
from tests.http_helpers import raw_request
from tests.test_node_agent import NsProcess

ROOT = Path(__file__).resolve().parent.parent
JSON = dict[str, Any]
TOKEN = "consent-admin-token"
ADMIN = {"x-herd-admin-token": TOKEN}
STRANGER = "10.77.0.7"  # a source address that is not this machine's


def beat(node_id: str, url: str, **extra: Any) -> JSON:
    """A heartbeat from a machine with a GPU and one model available."""
    gpu = {"vendor": "nvidia", "devices": [{"name": "RTX Test", "memory_total_bytes": 1}]}
    memory = {"total_bytes": 32 << 30, "available_bytes": 20 << 30}
    available = [{"name": "llama3.2:3b", "size": 2_000_000_000}]
    return http_helpers.beat(
        node_id,
        url,
        **{
            "interval_s": 30.0,
            "hardware": {"chip": "Test Chip", "cpu": {"cores": 12}, "memory": memory, "gpu": gpu},
            "ollama": {
                "reachable": True,
                "version": "0.12.6",
                "loaded": [],
                "available": available,
                "available_hash": "h1",
            },
            **extra,
        },
    )


async def status(r: RunningRouter) -> JSON:
    code, _, raw = await raw_request(r.port, "GET", "/fleet/status")
    assert code == 200
    result: JSON = json.loads(raw)
    return result


async def admin(r: RunningRouter, action: str, body: JSON, token: bool = True) -> tuple[int, JSON]:
    code, _, raw = await raw_request(
        r.port,
        "POST",
        f"/dashboard/api/nodes/{action}",
        json.dumps(body).encode(),
        ADMIN if token else None,
    )
    return code, json.loads(raw)


async def generate(r: RunningRouter) -> tuple[int, str]:
    body = json.dumps({"model": "llama3.2:3b", "prompt": "hi", "stream": False}).encode()
    code, headers, _ = await raw_request(r.port, "POST", "/api/generate", body)
    return code, headers.get("x-herd-node", "")


# =======================================================================================
# in-process
# =======================================================================================


async def test_stranger_is_pending_and_gets_nothing_until_approved(
    make_router: RouterFactory,
) -> None:
    r = await make_router([], admin_token=TOKEN)
    async with (
        FakeOllama([FakeModel("llama3.2:3b")]) as fake,
        FakeOllama([FakeModel("llama3.2:3b")]) as other,
    ):
        reply = r.router.fleet.apply_heartbeat(
            beat("studio", fake.url), STRANGER, time.time(), signed=False
        )
        assert reply["ok"] is True and reply["admission"] == "pending"
        assert "approve" in reply["admission_reason"]
        assert "studio" not in r.router.fleet.nodes
        st = await status(r)
        assert st["nodes"] == [] and st["fleet"]["nodes_pending"] == 1
        (held,) = st["pending_nodes"]
        assert held["node_id"] == "studio" and held["state"] == "pending"
        assert (held["addr"], held["ollama_url"]) == (STRANGER, fake.url)
        assert held["models"] == ["llama3.2:3b"] and held["hardware"]["gpus"] == ["RTX Test"]
        assert held["hardware"]["cpu"]["cores"] == 12 and held["first_seen"] > 0
        assert await generate(r) == (404, "")
        assert fake.requests_to("/api/generate") == []

        # the admin API is protected like the others, and approves only what was seen
        code, _ = await admin(r, "approve", {"node_id": "studio"}, token=False)
        assert code == 401
        code, err = await admin(r, "approve", {"node_id": "studio"})
        assert code == 400 and "addr is required" in err["error"]
        code, err = await admin(
            r, "approve", {"node_id": "studio", "addr": "10.77.0.66", "ollama_url": fake.url}
        )
        assert code == 409 and STRANGER in err["error"]
        code, err = await admin(r, "approve", {"node_id": "nobody", "addr": "", "ollama_url": ""})
        assert code == 404
        code, err = await admin(r, "approve", {"node_id": "bad id!"})
        assert code == 400
        assert "studio" not in r.router.fleet.nodes

        code, ok = await admin(
            r, "approve", {"node_id": "studio", "addr": STRANGER, "ollama_url": fake.url}
        )
        assert code == 200 and ok["joined"] is True, ok
        assert r.router.fleet.nodes["studio"].status == "online"
        assert await generate(r) == (200, "studio")
        assert len(fake.requests_to("/api/generate")) == 1
        reply = r.router.fleet.apply_heartbeat(
            beat("studio", fake.url), STRANGER, time.time(), signed=False
        )
        assert reply["admission"] == "approved"
        assert (await status(r))["pending_nodes"] == []

        # a changed Ollama URL (or address) sends it back to pending, out of routing at once
        reply = r.router.fleet.apply_heartbeat(
            beat("studio", other.url), STRANGER, time.time(), signed=False
        )
        assert reply["admission"] == "pending" and "URL changed" in reply["admission_reason"]
        assert "studio" not in r.router.fleet.nodes
        assert await generate(r) == (404, "")
        assert other.requests_to("/api/generate") == []
        reply = r.router.fleet.apply_heartbeat(
            beat("studio", fake.url), "10.77.0.8", time.time(), signed=False
        )
        assert reply["admission"] == "pending" and "address changed" in reply["admission_reason"]
        # back at what was approved: in again
        reply = r.router.fleet.apply_heartbeat(
            beat("studio", fake.url), STRANGER, time.time(), signed=False
        )
        assert reply["admission"] == "approved" and "studio" in r.router.fleet.nodes
        await r.router.store.flush()
        kinds = [e["kind"] for e in await r.router.store.events(50, node_id="studio")]
        assert {"node_pending", "node_approved", "node_left"} <= set(kinds)


async def test_rejection_persists_across_restart(
    make_router: RouterFactory, tmp_path: Path
) -> None:
    data = tmp_path / "shared-data"
    r = await make_router([], data_dir=data)
    r.router.fleet.apply_heartbeat(
        beat("intruder", "http://10.77.0.9:11434"), "10.77.0.9", time.time(), signed=False
    )
    code, ok = await admin(r, "reject", {"node_id": "intruder"}, token=False)
    assert code == 200 and ok["admission"] == "rejected"
    reply = r.router.fleet.apply_heartbeat(
        beat("intruder", "http://10.77.0.9:11434"), "10.77.0.9", time.time(), signed=False
    )
    assert reply["admission"] == "rejected"
    (held,) = (await status(r))["pending_nodes"]
    assert held["state"] == "rejected" and (await status(r))["fleet"]["nodes_pending"] == 0
    await r.router.stop()

    r2 = await make_router([], data_dir=data)
    (held,) = (await status(r2))["pending_nodes"]  # listed before it beats again
    assert (held["node_id"], held["state"], held["addr"]) == ("intruder", "rejected", "10.77.0.9")
    reply = r2.router.fleet.apply_heartbeat(
        beat("intruder", "http://10.77.0.9:11434"), "10.77.0.9", time.time(), signed=False
    )
    assert reply["admission"] == "rejected" and "intruder" not in r2.router.fleet.nodes
    # an operator may change their mind
    code, ok = await admin(
        r2,
        "approve",
        {"node_id": "intruder", "addr": "10.77.0.9", "ollama_url": "http://10.77.0.9:11434"},
    )
    assert code == 200 and ok["joined"] is True
    assert "intruder" in r2.router.fleet.nodes


async def test_reject_takes_an_approved_node_out_but_not_a_trusted_one(
    make_router: RouterFactory,
) -> None:
    r = await make_router([])
    url = "http://10.77.0.7:11434"
    r.router.fleet.apply_heartbeat(beat("studio", url), STRANGER, time.time(), signed=False)
    assert (await admin(r, "approve", {"node_id": "studio", "addr": STRANGER, "ollama_url": url}))[
        0
    ] == 200
    assert "studio" in r.router.fleet.nodes
    code, _ = await admin(r, "reject", {"node_id": "studio"})
    assert code == 200 and "studio" not in r.router.fleet.nodes
    assert r.router.fleet.consent.held_nodes["studio"].status == "rejected"
    # a loopback agent joined by trust: rejecting it would not hold, so it is refused
    code, _, _ = await raw_request(
        r.port, "POST", "/heartbeat", herd.dumps(beat("local", "http://127.0.0.1:9"))
    )
    assert code == 200 and "local" in r.router.fleet.nodes
    code, err = await admin(r, "reject", {"node_id": "local"})
    assert code == 409 and "stop its agent" in err["error"]


async def test_a_node_taken_out_leaves_no_idle_queue_blob_pin_or_pull_job_behind(
    make_router: RouterFactory,
) -> None:
    r = await make_router([])
    url = "http://10.77.0.7:11434"
    r.router.fleet.apply_heartbeat(beat("studio", url), STRANGER, time.time(), signed=False)
    code, _ = await admin(r, "approve", {"node_id": "studio", "addr": STRANGER, "ollama_url": url})
    assert code == 200 and "studio" in r.router.fleet.nodes
    r.router.admission.queue_for("studio", "llama3.2:3b", "text")
    busy = r.router.admission.queue_for("studio", "qwen2.5:7b", "text")
    busy.take()  # a request still in flight there: its queue stays until it is idle
    r.router.model_admin.blob_pins["sha256:" + "ab" * 32] = "studio"
    r.router.model_admin.blob_pins["sha256:" + "cd" * 32] = "elsewhere"
    jobs = r.router.model_admin.pull_jobs
    jobs["studio:a"] = {"id": "studio:a", "node_id": "studio", "status": "done"}
    jobs["studio:b"] = {"id": "studio:b", "node_id": "studio", "status": "pulling"}
    code, _ = await admin(r, "reject", {"node_id": "studio"})
    assert code == 200 and "studio" not in r.router.fleet.nodes
    assert set(r.router.admission.queues) == {("studio", "qwen2.5:7b")}
    assert list(r.router.model_admin.blob_pins.values()) == ["elsewhere"]
    assert list(jobs) == ["studio:b"]  # the finished pull goes, the running one stays


async def test_open_fleet_lets_everyone_in_with_one_warning(
    make_router: RouterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="herd"):
        r = await make_router([], open_fleet=True)
    warnings = [rec.getMessage() for rec in caplog.records if "open fleet" in rec.getMessage()]
    assert len(warnings) == 1 and "without approval" in warnings[0]
    reply = r.router.fleet.apply_heartbeat(
        beat("studio", "http://10.77.0.7:11434"), STRANGER, time.time(), signed=False
    )
    assert reply["admission"] == "approved" and r.router.fleet.nodes["studio"].status == "online"
    settings = json.loads((await raw_request(r.port, "GET", "/dashboard/api/settings"))[2])
    assert settings["config"]["open_fleet"] is True


async def test_fleet_key_router_admits_an_unsigned_local_agent_only(
    make_router: RouterFactory,
) -> None:
    r = await make_router([], fleet_key="k")
    local = herd.dumps(beat("here", "http://127.0.0.1:9"))
    code, _, raw = await raw_request(r.port, "POST", "/heartbeat", local)
    assert code == 200 and json.loads(raw)["admission"] == "approved"
    # an Ollama elsewhere is not this machine's agent: without the key, 401 as before
    elsewhere = herd.dumps(beat("there", "http://10.77.0.7:11434"))
    code, _, _ = await raw_request(r.port, "POST", "/heartbeat", elsewhere)
    assert code == 401 and "there" not in r.router.fleet.nodes and not r.router.fleet.consent.held_nodes
    # a signature, if given, must be right even for a local agent
    bad = {"x-herd-signature": herd.sign("wrong", int(time.time()), local)}
    code, _, _ = await raw_request(r.port, "POST", "/heartbeat", local, bad)
    assert code == 401


async def test_pending_nodes_are_bounded(make_router: RouterFactory) -> None:
    r = await make_router([])
    now = time.time()
    for i in range(herd.MAX_HELD_NODES + 20):
        r.router.fleet.apply_heartbeat(
            beat(f"n{i}", f"http://10.78.{i // 250}.{i % 250}:1"),
            f"10.78.{i // 250}.{i % 250}",
            now + i,
            signed=False,
        )
    assert len(r.router.fleet.consent.held_nodes) == herd.MAX_HELD_NODES
    held = r.router.fleet.consent.held_nodes
    assert "n0" not in held and f"n{herd.MAX_HELD_NODES + 19}" in held


async def test_health_card_lists_nodes_waiting(make_router: RouterFactory) -> None:
    r = await make_router([])
    r.router.fleet.apply_heartbeat(
        beat("studio", "http://10.77.0.7:11434"), STRANGER, time.time(), signed=False
    )
    code, _, raw = await raw_request(r.port, "GET", "/dashboard/api/health")
    assert code == 200
    (card,) = [c for c in json.loads(raw)["checks"] if c["id"] == "nodes_pending"]
    assert card["severity"] == "warning" and "studio from 10.77.0.7" in card["reason"]


async def test_agent_logs_its_admission_once_per_change(
    make_router: RouterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The agent's side, against a real router: pending is said once, not every beat."""
    r = await make_router([])
    async with FakeOllama([FakeModel("llama3.2:3b")]) as fake:
        config = herd_node.AgentConfig(
            router_urls=(r.url,),
            ollama_url=fake.url,
            node_id="quiet",
            interval_s=0.3,
            port=0,
            advertise_url="http://10.77.0.7:11434",  # an Ollama elsewhere: not a local agent
        )
        agent = herd_node.Agent(config)
        try:
            with caplog.at_level(logging.INFO, logger="herd.node"):
                for _ in range(3):
                    await agent.beat_once(r.url)
                code, _ = await admin(
                    r,
                    "approve",
                    {
                        "node_id": "quiet",
                        "addr": "127.0.0.1",
                        "ollama_url": "http://10.77.0.7:11434",
                    },
                )
                assert code == 200
                for _ in range(2):
                    await agent.beat_once(r.url)
            lines = [rec.getMessage() for rec in caplog.records]
            waiting = [line for line in lines if "WAITING FOR APPROVAL" in line]
            assert len(waiting) == 1 and "--fleet-key" in waiting[0], lines
            assert len([line for line in lines if "was approved" in line]) == 1, lines
            assert agent.admission == {r.url: "approved"}
        finally:
            await agent.stop()


async def test_help_and_env_twin(tmp_path: Path) -> None:
    text = await help_text("herd_node.py")
    for way in ("approve", "fleet key", "open fleet", "--open-fleet", "/dashboard/api/nodes"):
        assert way in text
    proc, _ = await start_herd(["--no-mdns", "--data-dir", str(tmp_path)],
                               env={"HERD_OPEN_FLEET": "1"})
    _, err = await stop(proc)
    assert err.count("open fleet") == 1, err


# =======================================================================================
# network namespaces: real addresses, real processes
# =======================================================================================

PY = sys.executable
BEAT = 0.3  # agent heartbeat interval here (seconds)
RPORT = 11435  # the router's port inside its own namespace (nothing else listens there)


def _netns_usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass
class Net:
    """Two namespaces: ``router_ns`` (the router's machine) and ``far_ns`` (another machine
    on its LAN); the test process reaches the router over a third link."""

    router_ns: str
    far_ns: str
    router_ip: str  # the router, as the test process sees it
    router_lan_ip: str  # the router, as the other machine sees it
    far_ip: str
    tmp: Path
    procs: list[NsProcess]

    @property
    def url(self) -> str:
        return f"http://{self.router_ip}:{RPORT}"

    async def spawn(self, ns: str, argv: list[str], name: str) -> NsProcess:
        proc = await NsProcess(ns, argv, self.tmp / f"{name}.log").start()
        self.procs.append(proc)
        return proc

    async def router(self, name: str, *flags: str) -> NsProcess:
        argv = [PY, "herd.py", "--host", "0.0.0.0", "--port", str(RPORT), "--local-ollama",
                "off", "--no-mdns", "--heartbeat-interval", str(BEAT), "--data-dir",
                str(self.tmp / "router-data"), *flags]  # fmt: skip
        return await self.spawn(self.router_ns, argv, name)

    async def fake(self, ns: str, name: str, model: str) -> NsProcess:
        argv = [PY, "-m", "tests.fake_ollama", "--host", "0.0.0.0", "--port", "0", "--model",
                model, "--no-host-check"]  # fmt: skip
        return await self.spawn(ns, argv, name)

    async def agent(self, ns: str, node_id: str, fake: NsProcess, *flags: str) -> NsProcess:
        router = self.router_lan_ip if ns == self.far_ns else "127.0.0.1"
        argv = [PY, "herd_node.py", "--router-url", f"http://{router}:{RPORT}", "--ollama-url",
                f"http://127.0.0.1:{fake.port}", "--node-id", node_id, "--port", "0",
                "--interval", str(BEAT), "--data-dir", str(self.tmp / f"agent-{node_id}"),
                *flags]  # fmt: skip
        return await self.spawn(ns, argv, f"agent-{node_id}")

    async def status(self) -> JSON:
        async with httpx.AsyncClient(timeout=5) as client:
            result: JSON = (await client.get(self.url + "/fleet/status")).json()
            return result

    async def until(self, check: Any, what: str, timeout: float = 30.0) -> JSON:
        """Poll /fleet/status until ``check(status)`` holds; the status, or fail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                st = await self.status()
                if check(st):
                    return st
            await asyncio.sleep(0.2)
        pytest.fail(f"timed out after {timeout}s waiting for {what}")

    async def post(self, path: str, body: JSON) -> httpx.Response:
        async with httpx.AsyncClient(timeout=10) as client:
            return await client.post(self.url + path, json=body)

    async def loaded_on(self, ns: str, fake: NsProcess) -> list[str]:
        """Models the fake Ollama has loaded: a request that reached it loads its model."""
        code = (
            "import json, sys, urllib.request; print(json.dumps([m['name'] for m in json.load("
            "urllib.request.urlopen(sys.argv[1], timeout=3))['models']]))"
        )
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", ns, PY, "-c", code, f"http://127.0.0.1:{fake.port}/api/ps",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0
        names: list[str] = json.loads(out)
        return names


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[Net]:
    reason = _netns_usable()
    if reason:
        pytest.skip(reason)
    tag = f"{os.getpid()}{uuid.uuid4().hex[:4]}"
    rns, fns = f"consent{tag}r", f"consent{tag}f"
    link = f"cs{uuid.uuid4().hex[:8]}"  # veth names: unique, at most 15 characters
    a, b = 100 + os.getpid() % 150, int(uuid.uuid4().hex[:2], 16)
    ips = [f"10.{a}.{b}.{i}" for i in (1, 2, 5, 6)]
    made: list[str] = []
    n = Net(rns, fns, ips[1], ips[2], ips[3], tmp_path, [])
    try:
        for ns in (rns, fns):
            await asyncio.to_thread(_ip, "netns", "add", ns)
            made.append(ns)
            await asyncio.to_thread(_ip, "-n", ns, "link", "set", "lo", "up")
        await asyncio.to_thread(_ip, "link", "add", f"{link}t", "type", "veth", "peer", "name",
                                f"{link}r", "netns", rns)  # fmt: skip
        await asyncio.to_thread(_ip, "-n", rns, "link", "add", f"{link}l", "type", "veth",
                                "peer", "name", f"{link}f", "netns", fns)  # fmt: skip
        for inside, dev, ip in ((None, "t", ips[0]), (rns, "r", ips[1]), (rns, "l", ips[2]),
                                (fns, "f", ips[3])):  # fmt: skip
            where = ["-n", inside] if inside else []
            await asyncio.to_thread(_ip, *where, "addr", "add", f"{ip}/30", "dev", link + dev)
            await asyncio.to_thread(_ip, *where, "link", "set", link + dev, "up")
        yield n
    finally:
        for proc in reversed(n.procs):
            with contextlib.suppress(Exception):
                proc.stop()
        for ns in made:
            await asyncio.to_thread(subprocess.run, ["ip", "netns", "del", ns], check=False)
        await asyncio.to_thread(
            subprocess.run, ["ip", "link", "del", f"{link}t"], check=False, capture_output=True
        )


def node_of(st: JSON, node_id: str) -> JSON | None:
    return next((x for x in st.get("nodes", []) if x["node_id"] == node_id), None)


def held_of(st: JSON, node_id: str) -> JSON | None:
    return next((x for x in st.get("pending_nodes", []) if x["node_id"] == node_id), None)


def online(node_id: str) -> Any:
    return lambda st: (node_of(st, node_id) or {}).get("status") == "online"


def held(node_id: str, state: str) -> Any:
    return lambda st: (held_of(st, node_id) or {}).get("state") == state


@pytest.mark.netns
async def test_netns_agent_from_another_machine_needs_approval(net: Net) -> None:
    """Pending and no traffic until approved, then traffic; a changed Ollama URL is pending
    again; a rejected node stays out after a router restart."""
    far_fake = await net.fake(net.far_ns, "far-fake", "far-model:1b")
    router = await net.router("router1")
    far = await net.agent(net.far_ns, "far", far_fake)
    st = await net.until(held("far", "pending"), "far pending")
    entry = held_of(st, "far")
    assert entry is not None and node_of(st, "far") is None
    assert entry["addr"] == net.far_ip
    assert entry["ollama_url"] == f"http://{net.far_ip}:{far_fake.port}"
    assert entry["models"] == ["far-model:1b"] and entry["hardware"]["cpu"]["cores"] >= 1
    assert st["fleet"]["nodes_pending"] == 1

    gen = {"model": "far-model:1b", "prompt": "hi", "stream": False}
    res = await net.post("/api/generate", gen)
    assert res.status_code == 404 and "x-herd-node" not in res.headers
    assert await net.loaded_on(net.far_ns, far_fake) == []  # nothing reached it
    await asyncio.sleep(4 * BEAT)  # more beats: the agent said it once
    assert far.log_path.read_text().count("WAITING FOR APPROVAL") == 1

    res = await net.post(
        "/dashboard/api/nodes/approve",
        {"node_id": "far", "addr": entry["addr"], "ollama_url": entry["ollama_url"]},
    )
    assert res.status_code == 200, res.text
    await net.until(online("far"), "far online after approval", 10)
    res = await net.post("/api/generate", gen)
    assert res.status_code == 200 and res.headers["x-herd-node"] == "far", res.text
    assert await net.loaded_on(net.far_ns, far_fake) == ["far-model:1b"]
    await net.until(lambda st: "was approved" in far.log_path.read_text(), "agent told", 10)

    # the same node id with another Ollama URL: pending again, no traffic to the new one
    moved_fake = await net.fake(net.far_ns, "moved-fake", "far-model:1b")
    far.stop()
    far = await net.agent(net.far_ns, "far", moved_fake)
    st = await net.until(held("far", "pending"), "far pending after its URL changed")
    assert "URL changed" in (held_of(st, "far") or {})["reason"]
    assert node_of(st, "far") is None
    res = await net.post("/api/generate", gen)
    assert res.status_code == 404
    assert await net.loaded_on(net.far_ns, moved_fake) == []

    # a second stranger is rejected; it stays out across a router restart
    bad_fake = await net.fake(net.far_ns, "bad-fake", "bad-model:1b")
    bad = await net.agent(net.far_ns, "bad", bad_fake)
    await net.until(held("bad", "pending"), "bad pending")
    res = await net.post("/dashboard/api/nodes/reject", {"node_id": "bad"})
    assert res.status_code == 200, res.text
    await net.until(lambda st: "REJECTED" in bad.log_path.read_text(), "bad told", 10)
    router.stop()
    await net.router("router2")
    st = await net.until(
        lambda st: (
            held("bad", "rejected")(st)
            and (held_of(st, "bad") or {}).get("last_seen")
            and held("far", "pending")(st)
        ),  # its approval was for the old URL
        "both beating at the restarted router, bad still rejected, far still pending",
    )
    assert node_of(st, "bad") is None and node_of(st, "far") is None
    res = await net.post("/api/generate", {"model": "bad-model:1b", "prompt": "x", "stream": False})
    assert res.status_code == 404
    assert await net.loaded_on(net.far_ns, bad_fake) == []


@pytest.mark.netns
async def test_netns_signed_and_loopback_agents_join_at_once(net: Net) -> None:
    """Router with a fleet key: a signed agent from another machine and an unsigned agent on
    the router's machine both join with no click; an unsigned stranger is refused (401)."""
    far_fake = await net.fake(net.far_ns, "far-fake", "far-model:1b")
    near_fake = await net.fake(net.router_ns, "near-fake", "near-model:1b")
    await net.router("router", "--fleet-key", "fleet-secret")
    signed, near, stranger = await asyncio.gather(
        net.agent(net.far_ns, "signed", far_fake, "--fleet-key", "fleet-secret"),
        net.agent(net.router_ns, "near", near_fake),
        net.agent(net.far_ns, "stranger", far_fake),
    )
    st = await net.until(lambda st: online("signed")(st) and online("near")(st), "both online")
    assert held_of(st, "stranger") is None and node_of(st, "stranger") is None
    for model, node in (("far-model:1b", "signed"), ("near-model:1b", "near")):
        res = await net.post("/api/generate", {"model": model, "prompt": "hi", "stream": False})
        assert res.status_code == 200 and res.headers["x-herd-node"] == node
    assert "unauthorized" in stranger.log_path.read_text()
    assert "WAITING" not in signed.log_path.read_text() + near.log_path.read_text()


@pytest.mark.netns
async def test_netns_open_fleet_lets_everyone_join(net: Net) -> None:
    far_fake = await net.fake(net.far_ns, "far-fake", "far-model:1b")
    router = await net.router("router", "--open-fleet")
    await net.agent(net.far_ns, "far", far_fake)
    st = await net.until(online("far"), "far online in an open fleet")
    assert st["pending_nodes"] == []
    res = await net.post(
        "/api/generate", {"model": "far-model:1b", "prompt": "hi", "stream": False}
    )
    assert res.status_code == 200 and res.headers["x-herd-node"] == "far"
    assert router.log_path.read_text().count("open fleet (--open-fleet)") == 1


# =======================================================================================
# dashboard (real Chromium)
# =======================================================================================


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Debian's Chromium through Playwright, as tests/test_dashboard.py drives it."""
    async_playwright = dash.require_browser()
    async with async_playwright() as p:
        chromium = await p.chromium.launch(
            executable_path=str(dash.CHROMIUM), args=dash.CHROMIUM_ARGS
        )
        yield chromium
        await chromium.close()


@pytest.mark.browser
async def test_dashboard_approve_button_and_health_card(
    make_router: RouterFactory, browser: Any
) -> None:
    r = await make_router([], admin_token=dash.ADMIN_TOKEN)
    async with FakeOllama([FakeModel("llama3.2:3b")]) as fake:
        hostile = beat("studio", fake.url)
        hostile["hardware"]["chip"] = dash.XSS
        r.router.fleet.apply_heartbeat(hostile, STRANGER, time.time(), signed=False)
        page, watch = await dash.open_page(browser, r.url + "/dashboard" + dash.POLL)
        row = '#pending-rows > [data-key="studio"]'
        await page.wait_for_selector(row)
        shown = await dash.text_of(page, row)
        for part in (STRANGER, fake.url, "llama3.2:3b", "12 cores", "RTX Test", dash.XSS):
            assert part in shown, shown  # the chip's markup is text, not HTML
        assert "pending" in shown and await page.locator(f"{row} img").count() == 0
        assert await page.locator("#node-cards > *").count() == 0

        await dash.select_tab(page, "health")
        await page.wait_for_function(
            "() => /Nodes waiting for approval/.test(document.querySelector('#health-checks')"
            ".textContent)"
        )
        health = await dash.text_of(page, "#health-checks")
        assert f"studio from {STRANGER}" in health

        await dash.select_tab(page, "overview")
        await page.click(f'{row} [data-f="approve"]')
        await page.wait_for_selector('#node-cards > [data-key="studio"]')
        await page.wait_for_selector("#pending-wrap", state="hidden")
        kinds = [kind for kind, _ in watch.dialogs]
        assert kinds == ["confirm", "prompt"], watch.dialogs  # are you sure; the admin token
        assert STRANGER in watch.dialogs[0][1] and fake.url in watch.dialogs[0][1]
        assert r.router.fleet.nodes["studio"].status == "online"
        assert r.router.fleet.consent.admissions["studio"]["addr"] == STRANGER
        assert await generate(r) == (200, "studio")
        assert watch.errors == [] and watch.unexpected_dialogs() == []
