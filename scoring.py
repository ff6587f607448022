"""Pure decision logic for herd: which node serves a request, and why.

Rules of this module (enforced by tests/test_purity.py):
  1. No I/O, no asyncio, no clocks, no randomness: the current time comes in as ``now``
     (epoch seconds) and every random choice as a number in [0, 1) passed by the caller.
  2. Inputs are frozen snapshots; outputs are frozen dataclasses that carry their reasons,
     so the router can log, trace and show exactly the object it acted on.
  3. Every constant lives in ``Policy``; the router may override any field from config.

Sections: names, snapshots, policy, scoring (7 signals), selection, service-time
statistics, circuit breaker, retry decisions, context protection, VRAM fallback.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# ---------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/:]*$")


def normalize_model(name: str) -> str:
    """Canonical model key the way Ollama matches names: lower case, default tag ``latest``.

    ``Llama3.2`` and ``llama3.2:latest`` are the same model; a host or namespace prefix is
    kept (``hf.co/org/model:q4``). The tag is whatever follows the last ``:`` after the
    last ``/``.
    """
    n = name.strip().lower()
    last = n.rsplit("/", 1)[-1]
    if ":" not in last:
        n += ":latest"
    return n


def is_valid_model_name(name: str) -> bool:
    return bool(name) and len(name) <= 512 and bool(_NAME_RE.match(name.strip()))


# ---------------------------------------------------------------------------------------
# Snapshots (what the router knows, frozen at decision time)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """One entry of a node's ``/api/ps``."""

    name: str  # normalised
    size: int  # bytes resident (weights + KV)
    size_vram: int
    context_length: int | None
    expires_at: float | None  # epoch seconds; None = unknown / forever


@dataclass(frozen=True, slots=True)
class AvailableModel:
    """One entry of a node's ``/api/tags``."""

    name: str  # normalised
    size: int  # bytes on disk
    family: str = ""
    families: tuple[str, ...] = ()
    parameter_size: str = ""
    capabilities: tuple[str, ...] = ()  # "completion", "vision", "embedding", "tools", ...


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    """Everything scoring needs to know about one node, at one instant."""

    node_id: str
    status: str  # "online" | "degraded" | "offline" | "draining"
    ram_total: int  # bytes; 0 = unknown
    ram_available: int  # bytes; 0 = unknown
    vram_total: int = 0  # bytes of GPU memory (0 = none or unknown; unified memory counts as RAM)
    vram_available: int = 0
    memory_pressure: str = "normal"  # "normal" | "warn" | "critical"
    loaded: Mapping[str, LoadedModel] = field(default_factory=dict)
    available: Mapping[str, AvailableModel] = field(default_factory=dict)
    recently_unloaded: Mapping[str, float] = field(default_factory=dict)  # model -> epoch s
    num_parallel: int | None = None  # OLLAMA_NUM_PARALLEL as reported; None = unknown
    cpu_load: float = 0.0  # 0..1 utilisation
    reachable: bool = True  # the router's own view of the node's Ollama


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    """The router-side queue of one ``node:model``."""

    pending: int = 0
    in_flight: int = 0
    slots: int = 1
