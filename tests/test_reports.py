"""Node reports parsed once, at the edge: ``herd.NodeReport.parse`` is the one validating
constructor of a heartbeat (ARCHITECTURE.md "Heartbeat protocol"); the agent's own beats go
through it here so the two sides cannot drift."""

from __future__ import annotations

import json
import time
from typing import Any

import ollama
import pytest

import herd
import herd_node
from tests.fake_ollama import FakeModel, FakeOllama

JSON = dict[str, Any]
LLAMA = FakeModel(name="llama3.2:3b", size=2_000_000_000)
QWEN = FakeModel(name="qwen2.5:7b", size=4_700_000_000, family="qwen2")


def beat(**extra: Any) -> JSON:
    """The documented example beat (ARCHITECTURE.md), every section filled in."""
    body: JSON = {
        "node_id": "studio",
        "agent_version": "0.1.0",
        "timestamp": 1790000000.0,
        "interval_s": 5.0,
        "ollama_url": "http://192.168.1.20:11434/",
        "draining": False,
        "hardware": {
            "arch": "x86_64",
            "chip": "Xeon",
            "cpu": {"cores": 16, "utilization_pct": 12.5, "load_1m": 1.2},
            "memory": {"total_bytes": 64 << 30, "available_bytes": 40 << 30,
                       "pressure": "warn"},
            "gpu": {"vendor": "nvidia", "unified": False, "devices": [
                {"name": "a", "memory_total_bytes": 24 << 30, "memory_used_bytes": 4 << 30,
                 "temperature_c": 50, "utilization_pct": 3},
                None,
                {"name": "b", "memory_total_bytes": 8 << 30, "memory_used_bytes": 0},
            ]},
            "disk": {"total_bytes": 1 << 40, "free_bytes": 1 << 39},
            "thermal": {"temperature_c": 55.0, "state": "nominal"},
        },
        "ollama": {
            "reachable": True,
            "version": "0.12.3",
            "num_parallel": 4,
            "max_loaded_models": 3,
            "loaded": [{"name": "Llama3.2:3B", "size": 3 << 30, "size_vram": 3 << 30,
                        "context_length": 8192, "expires_at": "2030-01-01T00:00:00Z"}],
            "available": [
                {"name": "llama3.2:3b", "size": 2 << 30, "modified_at": "2025-01-01T00:00:00Z",
                 "details": {"family": "llama", "families": ["llama"],
                             "parameter_size": "3.2B"},
                 "capabilities": ["completion", "tools"]},
                {"model": "nomic-embed-text", "size": 1 << 28},
                None,
            ],
            "available_hash": "abc",
        },
        "capabilities": {"image": [{"name": "SDXL", "backend": "command"}],
                         "stt": [{"name": "whisper-tiny", "backend": "faster-whisper"}, "x"],
                         "service_url": "http://192.168.1.20:11436"},
        "errors": [{"collector": "gpu", "error": "nvidia-smi not found"}, "junk"],
    }
    body.update(extra)
    return body


def test_documented_beat_parses_whole() -> None:
    report = herd.NodeReport.parse(beat())
    assert (report.node_id, report.ollama_url) == ("studio", "http://192.168.1.20:11434")
    assert (report.interval_s, report.agent_version, report.draining) == (5.0, "0.1.0", False)
    hw = report.hardware
    assert (hw.ram_total, hw.ram_available, hw.memory_pressure) == (64 << 30, 40 << 30, "warn")
    assert (hw.vram_total, hw.vram_used, hw.cpu_load) == (32 << 30, 4 << 30, 0.125)
    assert hw.raw == beat()["hardware"]  # as reported: /fleet/status shows it
    o = report.ollama
    assert (o.reachable, o.version, o.num_parallel, o.max_loaded_models, o.available_hash) == (
        True, "0.12.3", 4, 3, "abc")
    assert o.loaded is not None and o.loaded.names == {"llama3.2:3b"}
    lm = o.loaded.models["llama3.2:3b"]
    assert (lm.size, lm.size_vram, lm.context_length) == (3 << 30, 3 << 30, 8192)
    assert lm.expires_at == herd.parse_rfc3339("2030-01-01T00:00:00Z")
    assert o.available is not None
    assert o.available.names == {"llama3.2:3b", "nomic-embed-text:latest"}
    am = o.available.models["llama3.2:3b"]
    assert (am.family, am.families, am.parameter_size, am.capabilities) == (
        "llama", ("llama",), "3.2B", ("completion", "tools"))
    assert len(o.available.entries) == 2  # the null entry is dropped
    assert [e["name"] for e in o.available.public] == ["llama3.2:3b", None]
    assert json.loads(o.available.encoded) == o.available.public
    assert report.capabilities.models == (("image", "sdxl:latest"), ("stt", "whisper-tiny:latest"))
    assert report.capabilities.raw["service_url"] == "http://192.168.1.20:11436"
    assert report.errors == ({"collector": "gpu", "error": "nvidia-smi not found"},)


@pytest.mark.parametrize(
    ("beat_", "check"),
    [
        # an agent of the previous version: no capabilities, errors or interval_s
        (
            {"node_id": "old", "ollama_url": "http://10.0.0.5:11434",
             "hardware": {}, "ollama": {"reachable": True, "loaded": [], "available": []}},
            lambda r: r.interval_s is None and r.capabilities.raw == {} and r.errors == ()
            and r.ollama.available is not None and r.ollama.available.names == frozenset(),
        ),
        # the model list unchanged since the last beat (null), hardware and ollama falsy
        (
            beat(ollama={"available": None, "available_hash": "h"}, hardware=None),
            lambda r: r.ollama.available is None and r.ollama.loaded is None
            and r.ollama.available_hash == "h" and r.hardware.raw == {},
        ),
        # Ollama down: reachable false, no version, limits unknown, gpu null (unified: no vram)
        (
            beat(ollama={"reachable": False, "version": None, "num_parallel": 0,
                         "loaded": []}, hardware={"gpu": {"unified": True, "devices": [
                             {"memory_total_bytes": 1}]}}, draining=True),
            lambda r: not r.ollama.reachable and r.ollama.version == ""
            and r.ollama.num_parallel is None and r.hardware.vram_total == 0 and r.draining,
        ),
        (beat(capabilities=None), lambda r: r.capabilities.models == ()),
        (beat(ollama=[], hardware=0), lambda r: r.ollama.loaded is None),  # falsy: as {}
        (beat(interval_s=0.05), lambda r: r.interval_s == 0.05),
    ],
)
def test_valid_beats(beat_: JSON, check: Any) -> None:
    assert check(herd.NodeReport.parse(beat_))


def test_every_malformed_field_names_itself() -> None:
    table: list[tuple[JSON, str]] = [
        ({"node_id": "bad id!"}, "node_id must match [A-Za-z0-9._-]{1,64}"),
        ({"node_id": "x" * 65}, "node_id must match [A-Za-z0-9._-]{1,64}"),
        ({"node_id": 7}, "node_id must match [A-Za-z0-9._-]{1,64}"),
        ({"ollama_url": None}, "ollama_url is required"),
        ({"ollama_url": "ftp://x"}, "unsupported scheme in 'ftp://x' (nodes speak plain HTTP)"),
        ({"ollama": "up"}, "ollama and hardware must be objects"),
        ({"hardware": ["x"]}, "ollama and hardware must be objects"),
        ({"ollama": {"loaded": "nope"}}, "ollama.loaded must be a list"),
        ({"ollama": {"available": {}}}, "ollama.available must be a list or null"),
        ({"hardware": {"memory": {"total_bytes": "lots"}}},
         "malformed heartbeat: hardware.memory.total_bytes must be a number"),
        ({"hardware": {"memory": {"available_bytes": True}}},
         "malformed heartbeat: hardware.memory.available_bytes must be a number"),
        ({"hardware": {"cpu": "fast"}}, "malformed heartbeat: hardware.cpu must be an object"),
        ({"hardware": {"cpu": {"utilization_pct": "9%"}}},
         "malformed heartbeat: hardware.cpu.utilization_pct must be a number"),
        ({"hardware": {"disk": {"free_bytes": []}}},
         "malformed heartbeat: hardware.disk.free_bytes must be a number"),
        ({"hardware": {"gpu": "rtx"}}, "malformed heartbeat: hardware.gpu must be an object"),
        ({"hardware": {"gpu": {"devices": {}}}},
         "malformed heartbeat: gpu.devices must be a list"),
        ({"hardware": {"gpu": {"devices": [{"memory_total_bytes": "8G"}]}}},
         "malformed heartbeat: gpu.devices[].memory_total_bytes must be a number"),
        ({"hardware": {"gpu": {"devices": ["x"]}}},
         "malformed heartbeat: gpu.devices[] must be an object"),
        ({"ollama": {"loaded": [{"name": "m", "size": "big"}]}},
         "malformed heartbeat: ollama.loaded[].size must be a number"),
        ({"ollama": {"loaded": [{"name": "m", "context_length": "4k"}]}},
         "malformed heartbeat: ollama.loaded[].context_length must be a number"),
        ({"ollama": {"loaded": [3]}}, "malformed heartbeat: ollama.loaded[] must be an object"),
        ({"ollama": {"available": [{"name": "m", "size": "1GB"}]}},
         "malformed heartbeat: ollama.available[].size must be a number"),
        ({"ollama": {"available": [{"name": "m", "details": "x"}]}},
         "malformed heartbeat: ollama.available[].details must be an object"),
        ({"ollama": {"available": [{"name": "m", "capabilities": "tools"}]}},
         "malformed heartbeat: ollama.available[].capabilities must be a list"),
        ({"ollama": {"available": [{"name": "m", "details": {"families": "llama"}}]}},
         "malformed heartbeat: ollama.available[].details.families must be a list"),
        ({"capabilities": ["image"]}, "malformed heartbeat: capabilities: object"),
        ({"capabilities": {"image": "yes"}},
         "malformed heartbeat: capabilities.image must be a list"),
        ({"capabilities": {"stt": {}}}, "malformed heartbeat: capabilities.stt must be a list"),
        ({"interval_s": 0}, "interval_s must be a number between 0.05 and 300"),
        ({"interval_s": 301}, "interval_s must be a number between 0.05 and 300"),
        ({"interval_s": None}, "interval_s must be a number between 0.05 and 300"),
        ({"interval_s": "5"}, "interval_s must be a number between 0.05 and 300"),
    ]
    for change, reason in table:
        with pytest.raises(herd.ReportError) as caught:
            herd.NodeReport.parse(beat(**change))
        assert str(caught.value) == reason, change


def test_reports_are_frozen() -> None:
    report = herd.NodeReport.parse(beat())
    with pytest.raises(AttributeError):
        report.node_id = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        report.hardware.ram_total = 0  # type: ignore[misc]
    assert report.ollama.loaded is not None
    with pytest.raises(TypeError):
        report.ollama.loaded.models["x"] = report.ollama.loaded.models["llama3.2:3b"]  # type: ignore[index]


def test_a_polled_list_keeps_what_it_can_read() -> None:
    """Polls (static nodes) go through the same model-list types: an entry the heartbeat
    contract would refuse is skipped there, it does not break the node's snapshot."""
    node = herd.Node(node_id="n", url="http://127.0.0.1:1", source="static")
    node.available = [{"name": "good:1b", "size": 5}, {"name": "bad:1b", "size": "big"}, "junk"]
    node.set_loaded([{"name": "bad:1b", "size_vram": "all"}, {"name": "good:1b", "size": 5}], 0.0)
    snap = node.snapshot(time.time())
    assert set(snap.available) == {"good:1b"} and set(snap.loaded) == {"good:1b"}
    assert node.available_names() == {"good:1b"} and node.loaded_names() == {"good:1b"}
    assert [m["name"] for m in node.available_public()] == ["good:1b"]


async def test_the_agents_own_beats_parse(tmp_path: Any) -> None:
    """Round trip: what herd_node sends (full list, list unchanged, draining) is what the
    router's constructor accepts, field for field."""
    async with FakeOllama([LLAMA, QWEN]) as fake:
        client = ollama.AsyncClient(host=fake.url)
        await client.generate(model="llama3.2:3b", prompt="hi")  # now in /api/ps
        await client._client.aclose()
        config = herd_node.AgentConfig(
            router_urls=("http://127.0.0.1:9",), ollama_url=fake.url, node_id="roundtrip",
            interval_s=0.3, port=0, data_dir=tmp_path, image_command="true {prompt}",
            stt_command="true {input}")
        agent = herd_node.Agent(config, herd_node.load_psutil())
        agent.jobs.discover()  # the command backends (Agent.start does this)
        try:
            link = agent.link("http://127.0.0.1:9")
            sample = await agent.collect()
            full = json.loads(herd.dumps(agent.payload_for(link, sample)))
            report = herd.NodeReport.parse(full)
            assert (report.node_id, report.interval_s, report.draining) == ("roundtrip", 0.3, False)
            assert report.agent_version == herd_node.__version__
            assert report.ollama_url == herd.normalize_url(full["ollama_url"])
            assert report.ollama.available is not None
            assert report.ollama.available.names == {"llama3.2:3b", "qwen2.5:7b"}
            assert report.ollama.loaded is not None
            assert report.ollama.loaded.names == {"llama3.2:3b"}
            assert report.ollama.available_hash == sample.digest
            assert report.hardware.ram_total > 0 and report.hardware.raw == full["hardware"]
            assert {kind for kind, _ in report.capabilities.models} == {"image", "stt"}
            assert list(report.errors) == full["errors"]

            link.sent_hash, link.need_full = sample.digest, False  # the router has the list
            same = json.loads(herd.dumps(agent.payload_for(link, sample, draining=True)))
            assert same["ollama"]["available"] is None
            again = herd.NodeReport.parse(same)
            assert again.ollama.available is None and again.draining
            assert again.ollama.available_hash == sample.digest
        finally:
            await agent.stop()
