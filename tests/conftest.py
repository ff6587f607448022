"""Shared fixtures: a router in-process on a loopback port, fake Ollama nodes, loop choice.

Every router test runs twice, under asyncio's own loop and under uvloop (when installed),
through pytest-asyncio's loop-factory hook; mark a test ``@pytest.mark.both_loops`` to opt in.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import pytest

import herd
import scoring
from tests.fake_ollama import FakeOllama

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the test extra
    uvloop = None  # type: ignore[assignment]


def in_ci() -> bool:
    """CI runs with CI=true after .ci/run installed everything the tests need."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(why: str) -> NoReturn:
    """Skip a test whose prerequisite is missing on this machine, but fail it under CI,
    where a silent skip would hide a missing install step."""
    if in_ci():
        pytest.fail(f"prerequisite missing in CI: {why}")
    pytest.skip(why)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "both_loops: run under asyncio and uvloop")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.get_closest_marker("both_loops") is None or uvloop is None:
        return {"asyncio": asyncio.new_event_loop}
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def router_config(tmp_path: Path, nodes: list[str], **overrides: Any) -> herd.Config:
    policy_overrides = overrides.pop("policy", {})
    limit_overrides = overrides.pop("limits", {})
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "nodes": list(nodes),
        "data_dir": tmp_path / "herd-data",
        "local_ollama": None,
        "poll_interval_s": 0.2,
        "poll_timeout_s": 2.0,
        "heartbeat_interval_s": 0.5,
        "mdns": False,
        "grace_s": 2.0,
    }
    settings.update(overrides)
    cfg = herd.Config(**settings)
    cfg.policy = dataclasses.replace(cfg.policy, **policy_overrides)
    cfg.limits = dataclasses.replace(cfg.limits, **limit_overrides)
    return cfg


@dataclasses.dataclass
class RunningRouter:
    router: herd.Router
    url: str

    @property
    def port(self) -> int:
        return self.router.address[1]

    async def wait_ready(self, models: int = 1, nodes: int = 1, timeout: float = 10.0) -> None:
        """Until ``nodes`` nodes are online and the merged tags hold ``models`` models."""
        async with asyncio.timeout(timeout):
            while True:
                online = [n for n in self.router.fleet.nodes.values() if n.status == "online"]
                if len(online) >= nodes and len(self.router.merged_tags()) >= models:
                    return
                await asyncio.sleep(0.02)


RouterFactory = Callable[..., Awaitable[RunningRouter]]
FakeFactory = Callable[..., Awaitable[FakeOllama]]


@pytest.fixture
async def make_fake() -> AsyncIterator[FakeFactory]:
    """Started fake Ollama nodes (``FakeOllama`` arguments), stopped after the test."""
    started: list[FakeOllama] = []

    async def factory(*args: Any, **kwargs: Any) -> FakeOllama:
        fake = FakeOllama(*args, **kwargs)
        await fake.start()
        started.append(fake)
        return fake

    yield factory
    for fake in started:
        with contextlib.suppress(Exception):
            await fake.stop()


@pytest.fixture
async def make_router(tmp_path: Path) -> AsyncIterator[RouterFactory]:
    started: list[herd.Router] = []

    async def factory(nodes: list[str], **overrides: Any) -> RunningRouter:
        cfg = router_config(tmp_path / f"r{len(started)}", nodes, **overrides)
        router = herd.Router(cfg)
        await router.start()
        started.append(router)
        host, port = router.address
        return RunningRouter(router, f"http://{host}:{port}")

    yield factory
    for router in started:
        with contextlib.suppress(Exception):
            await router.stop()


__all__ = [
    "FakeFactory",
    "RouterFactory",
    "RunningRouter",
    "in_ci",
    "router_config",
    "scoring",
    "skip_or_fail",
]


@pytest.fixture(autouse=True)
def collect_leaks_here() -> Iterator[None]:
    """A full collection as each test ends: a socket or transport it left open is reported
    (warnings are errors) by the test that leaked it, not by whichever later test happens
    to run when the collector does."""
    yield
    gc.collect()
