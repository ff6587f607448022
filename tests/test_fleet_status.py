"""/fleet/status: each node's hardware appears once (memory, cpu, disk at the node's top
level, as the dashboard reads them; the rest under ``hardware``)."""

from __future__ import annotations

import json
import time
from typing import Any

from tests.conftest import RouterFactory
from tests.test_router import raw_request


def _beat(i: int) -> dict[str, Any]:
    return {
        "node_id": f"gpu{i}",
        "agent_version": "test",
        "timestamp": time.time(),
        "interval_s": 5.0,
        "ollama_url": f"http://127.0.0.1:{20000 + i}",
        "hardware": {
            "arch": "x86_64",
            "chip": "Threadripper",
            "cpu": {"cores": 32, "utilization_pct": 12.5, "load_1m": 1.5},
            "memory": {"total_bytes": 987_000_000_000 + i, "available_bytes": 5 << 30,
                       "pressure": "normal"},
            "gpu": {"vendor": "nvidia", "unified": False,
                    "devices": [{"name": "RTX", "memory_total_bytes": 24 << 30,
                                 "memory_used_bytes": 1 << 30}]},
            "disk": {"total_bytes": 2 << 40, "free_bytes": 1 << 40},
            "thermal": None,
        },
        "ollama": {"reachable": True, "version": "0.12.6", "num_parallel": 4,
                   "loaded": [], "available": [], "available_hash": "x"},
    }


async def test_each_nodes_hardware_appears_once(make_router: RouterFactory) -> None:
    r = await make_router([])
    for i in range(3):
        status, _, body = await raw_request(
            r.port, "POST", "/heartbeat", json.dumps(_beat(i)).encode())
        assert status == 200, body
    status, _, raw = await raw_request(r.port, "GET", "/fleet/status")
    assert status == 200
    for i in range(3):  # the unique memory total of each node, once in the whole document
        assert raw.count(str(987_000_000_000 + i).encode()) == 1
    node = next(n for n in json.loads(raw)["nodes"] if n["node_id"] == "gpu1")
    assert node["memory"]["total_bytes"] == 987_000_000_001
    assert node["cpu"]["cores"] == 32 and node["disk"]["free_bytes"] == 1 << 40
    assert node["hardware"]["gpu"]["devices"][0]["name"] == "RTX"
    assert node["hardware"]["arch"] == "x86_64"
    assert not {"memory", "cpu", "disk"} & set(node["hardware"])


async def test_status_document_is_exactly_the_status_and_follows_new_model_lists(
    make_router: RouterFactory,
) -> None:
    """/fleet/status splices each node's model list in pre-encoded: the bytes must decode
    to the very same document, and a newly reported list must show at once."""
    r = await make_router([])
    router = r.router
    for i in range(3):
        beat = _beat(i)
        beat["ollama"]["available"] = [
            {"name": f"m{i}-{k}:7b", "size": k, "details": {"parameter_size": "7B"}}
            for k in range(4)
        ]
        status, _, body = await raw_request(
            r.port, "POST", "/heartbeat", json.dumps(beat).encode())
        assert status == 200, body
    doc = router.fleet.fleet_status(time.time())
    assert json.loads(router.fleet.status_json(doc)) == json.loads(json.dumps(doc))
    beat = _beat(1)
    beat["ollama"]["available"] = [{"name": "fresh:1b", "size": 1, "details": {}}]
    status, _, _ = await raw_request(r.port, "POST", "/heartbeat", json.dumps(beat).encode())
    assert status == 200
    _, _, raw = await raw_request(r.port, "GET", "/fleet/status")
    nodes = {n["node_id"]: n for n in json.loads(raw)["nodes"]}
    assert [m["name"] for m in nodes["gpu1"]["available_models"]] == ["fresh:1b"]
    untouched = [m["name"] for m in nodes["gpu2"]["available_models"]]
    assert untouched == [f"m2-{k}:7b" for k in range(4)]
    doc = router.fleet.fleet_status(time.time())
    assert json.loads(router.fleet.status_json(doc)) == json.loads(json.dumps(doc))
