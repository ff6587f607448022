"""herd-node — the node agent: tells the herd router, every few seconds, what this machine has.

``python herd_node.py`` (or ``herd-node``) on each Ollama machine. It collects the machine's
facts (psutil, or ``/proc`` without it; ``nvidia-smi``; Apple unified memory) and Ollama's
state (``/api/ps``, ``/api/tags``, ``/api/version``: at most one call of each per beat), and
pushes them to the router as the heartbeat of ARCHITECTURE.md ("Heartbeat protocol"), signed
when a fleet key is set. It finds the router by mDNS (``_herd._tcp.local.``) unless
``--router-url`` is given, and keeps browsing so it follows a router that moves. SIGTERM /
Ctrl-C send a last beat with ``draining: true`` so the router stops routing here at once.
It serves ``GET /healthz`` on its own small port and can relay a loopback-only Ollama onto
the LAN (``--relay``).

Never: routing decisions (the router owns them), HTTP byte handling of its own (requests go
through ``herd.Pool`` / ``herd.HttpStream``), crashing because one collector failed (a failed
collector reports ``null`` plus an entry in ``errors``).

Sections: pure parsers · configuration · collectors · router discovery · heartbeats ·
agent (healthz, relay, lifecycle) · CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib
import ipaddress
import json
import logging
import os
import platform
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import herd
import store

__version__ = herd.__version__
log = logging.getLogger("herd.node")
VER = __version__.encode()

JSON = dict[str, Any]
MiB = 1024 * 1024
VERSION_REFRESH_S = 60.0  # /api/version changes only when Ollama is upgraded
OLLAMA_ENV_REFRESH_S = 60.0  # scanning processes for Ollama's environment is not free
NVIDIA_QUERY = [
    "nvidia-smi",
    "--query-gpu=name,memory.total,memory.used,temperature.gpu,utilization.gpu",
    "--format=csv,noheader,nounits",
]


# =======================================================================================
# Pure parsers (tested against sample text in tests/)
# =======================================================================================


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` → {field: bytes}."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            unit = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
            out[name.strip()] = int(parts[0]) * unit
    return out


def memory_pressure(total: int, available: int) -> str:
    """normal / warn (≥ 85 % used) / critical (≥ 95 % used), as the anchor's Linux rule."""
    if total <= 0:
        return "normal"
    used_pct = 100.0 * (1.0 - available / total)
    if used_pct >= 95.0:
        return "critical"
    if used_pct >= 85.0:
        return "warn"
    return "normal"


def memory_from_meminfo(text: str) -> JSON:
    info = parse_meminfo(text)
    if "MemTotal" not in info:
        raise ValueError("no MemTotal in /proc/meminfo")
    total = info["MemTotal"]
    available = info.get("MemAvailable")
    if available is None:  # kernels before 3.14
        available = info.get("MemFree", 0) + info.get("Buffers", 0) + info.get("Cached", 0)
    return {
        "total_bytes": total,
        "available_bytes": available,
        "pressure": memory_pressure(total, available),
        "swap_total_bytes": info.get("SwapTotal"),
        "swap_free_bytes": info.get("SwapFree"),
    }


def parse_loadavg(text: str) -> tuple[float, float, float]:
    parts = text.split()
    return float(parts[0]), float(parts[1]), float(parts[2])


def parse_proc_stat(text: str) -> tuple[int, int]:
    """``/proc/stat`` → (idle jiffies incl. iowait, total jiffies) of the aggregate cpu line."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            return idle, sum(values[:8])
    raise ValueError("no aggregate cpu line in /proc/stat")


def cpu_utilization(before: tuple[int, int] | None, after: tuple[int, int]) -> float | None:
    """Busy percentage between two ``parse_proc_stat`` samples; None without a previous one."""
    if before is None:
        return None
    idle = after[0] - before[0]
    total = after[1] - before[1]
    if total <= 0:
        return None
    return round(100.0 * (1.0 - idle / total), 1)


def parse_cpuinfo_model(text: str) -> str:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
            return value.strip()
    return ""


def thermal_state(temperature_c: float | None) -> str:
    if temperature_c is None:
        return "unknown"
    if temperature_c >= 95.0:
        return "critical"
    if temperature_c >= 85.0:
        return "warning"
    return "nominal"


def _number(text: str) -> float | None:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


def parse_nvidia_smi(text: str) -> list[JSON]:
    """CSV from ``NVIDIA_QUERY`` (MiB, °C, %) → device dicts in the heartbeat's units."""
    devices: list[JSON] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 5:
            raise ValueError(f"unexpected nvidia-smi line: {line!r}")
        name, total, used, temp, util = fields
        total_mib, used_mib = _number(total), _number(used)
        if total_mib is None:
            raise ValueError(f"no memory.total in nvidia-smi line: {line!r}")
        devices.append(
            {
                "name": name,
                "memory_total_bytes": int(total_mib * MiB),
                "memory_used_bytes": int(used_mib * MiB) if used_mib is not None else None,
                "temperature_c": _number(temp),
                "utilization_pct": _number(util),
            }
        )
    return devices


def parse_environ(data: bytes) -> dict[str, str]:
    """``/proc/<pid>/environ`` (NUL-separated ``KEY=value``) → dict."""
    out: dict[str, str] = {}
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def positive_int(value: object) -> int | None:
    try:
        n = int(str(value).strip())
    except ValueError:
        return None
    return n if n > 0 else None


def ollama_limits(
    own_env: Mapping[str, str],
    ollama_env: Mapping[str, str] | None,
    flag_parallel: int | None,
    flag_max_loaded: int | None,
) -> tuple[int | None, int | None]:
    """(num_parallel, max_loaded_models): our environment, else the running Ollama's, else
    the flags, else None (the router then learns the node's real parallelism itself)."""

    def pick(name: str, flag: int | None) -> int | None:
        for env in (own_env, ollama_env or {}):
            value = positive_int(env.get(name, ""))
            if value is not None:
                return value
        return flag

    return (
        pick("OLLAMA_NUM_PARALLEL", flag_parallel),
        pick("OLLAMA_MAX_LOADED_MODELS", flag_max_loaded),
    )


def models_digest(models: Sequence[JSON]) -> str:
    canonical = json.dumps(list(models), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def is_local_only(host: str) -> bool:
    """True for hosts a router on another machine cannot use as given."""
    if host in ("localhost", "", "0.0.0.0", "::"):
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


def source_address_towards(host: str, port: int) -> str:
    """The local IPv4 address the kernel would use to reach ``host`` (no packet is sent)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port or 1))
        return str(s.getsockname()[0])
    return "127.0.0.1"


def advertise_url_for(ollama_url: str, local_ip: str) -> str:
    """How the router should reach this node's Ollama, seen from ``local_ip``'s network."""
    host, port, _ = herd.split_url(ollama_url)
    if is_local_only(host):
        return herd.normalize_url(f"http://{local_ip}:{port}")
    return herd.normalize_url(ollama_url)


def backoff_delay(interval_s: float, failures: int) -> float:
    """Seconds to the next beat after ``failures`` failures in a row: doubling, bounded."""
    if failures <= 1:
        return interval_s
    cap = max(interval_s, min(30.0, 6.0 * interval_s))
    return float(min(cap, interval_s * 2 ** (failures - 1)))


# =======================================================================================
# Configuration
# =======================================================================================


@dataclass(frozen=True, slots=True)
class AgentConfig:
    router_url: str | None = None  # None: discover by mDNS
    ollama_url: str = "http://127.0.0.1:11434"
    node_id: str = field(default_factory=lambda: socket.gethostname().split(".")[0] or "node")
    advertise_url: str | None = None  # None: derived from the route to the router
    interval_s: float = 5.0
    fleet_key: str | None = None
    fleet_id: str = "default"
    host: str = "127.0.0.1"  # /healthz listener
    port: int = 11433
    mdns_interfaces: tuple[str, ...] | None = None  # None: all interfaces
    num_parallel: int | None = None
    max_loaded_models: int | None = None
    relay: bool = False
    data_dir: Path = field(default_factory=lambda: Path.home() / ".fleet-manager")
    log_level: str = "INFO"
    ollama_timeout_s: float = 3.0
    router_timeout_s: float = 10.0
    command_timeout_s: float = 5.0  # nvidia-smi / sysctl
    models_dir: Path | None = None  # disk free is measured here; default OLLAMA_MODELS


# =======================================================================================
# Collectors
# =======================================================================================


class Collectors:
    """Gathers one beat's facts. Every collector failure becomes ``null`` + an ``errors`` entry."""

    def __init__(self, config: AgentConfig, pool: herd.Pool, psutil_mod: ModuleType | None) -> None:
        self.config = config
        self.pool = pool
        self.psutil = psutil_mod
        self.prev_stat: tuple[int, int] | None = None
        self.version = ""
        self.version_at = 0.0
        self.ollama_env: dict[str, str] | None = None
        self.ollama_env_at = -OLLAMA_ENV_REFRESH_S
        self.static = self._static_facts()
        if psutil_mod is not None:
            with contextlib.suppress(Exception):
                psutil_mod.cpu_percent(interval=None)  # primes the non-blocking counter

    # ---- helpers ------------------------------------------------------------------

    @staticmethod
    def _guard(name: str, fn: Callable[[], Any], errors: list[JSON]) -> Any:
        try:
            return fn()
        except Exception as exc:  # a collector must never take the agent down
            log.debug("collector %s failed", name, exc_info=True)
            errors.append({"collector": name, "error": f"{type(exc).__name__}: {exc}"})
            return None

    def _static_facts(self) -> JSON:
        arch = platform.machine() or "unknown"
        chip = ""
        if platform.system() == "Darwin":
            arch = "apple_silicon" if arch == "arm64" else arch
        else:
            with contextlib.suppress(OSError):
                chip = parse_cpuinfo_model(Path("/proc/cpuinfo").read_text())
        return {"arch": arch, "chip": chip or platform.processor() or arch}

    def models_dir(self) -> Path:
        if self.config.models_dir is not None:
            return self.config.models_dir
        env = os.environ.get("OLLAMA_MODELS")
        if env:
            return Path(env).expanduser()
        default = Path.home() / ".ollama" / "models"
        return default if default.exists() else Path.home()

    # ---- hardware (blocking: runs in a thread) --------------------------------------

    def hardware_sync(self, errors: list[JSON]) -> JSON:
        hw: JSON = dict(self.static)
        hw["memory"] = self._guard("memory", self._memory, errors)
        hw["cpu"] = self._guard("cpu", self._cpu, errors)
        hw["disk"] = self._guard("disk", self._disk, errors)
        hw["thermal"] = self._guard("thermal", self._thermal, errors)
        return hw

    def _memory(self) -> JSON:
        if self.psutil is None:
            return memory_from_meminfo(Path("/proc/meminfo").read_text())
        vm = self.psutil.virtual_memory()
        swap = self.psutil.swap_memory()
        total, available = int(vm.total), int(vm.available)
        return {
            "total_bytes": total,
            "available_bytes": available,
            "pressure": self._darwin_pressure() or memory_pressure(total, available),
            "swap_total_bytes": int(swap.total),
            "swap_free_bytes": int(swap.free),
        }

    @staticmethod
    def _darwin_pressure() -> str | None:
        if platform.system() != "Darwin":
            return None
        import subprocess  # only on macOS, once per beat, bounded

        out = subprocess.run(
            ["sysctl", "-n", "kern.memorystatus_vm_pressure_level"],
            capture_output=True,
            text=True,
            timeout=2,
            check=False,
        )
        return {"1": "normal", "2": "warn", "4": "critical"}.get(out.stdout.strip())

    def _cpu(self) -> JSON:
        cores = os.cpu_count() or 1
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        if self.psutil is None:
            if load is None:
                load = parse_loadavg(Path("/proc/loadavg").read_text())[0]
            sample = parse_proc_stat(Path("/proc/stat").read_text())
            util = cpu_utilization(self.prev_stat, sample)
            self.prev_stat = sample
            physical = None
        else:
            util = float(self.psutil.cpu_percent(interval=None))
            physical = self.psutil.cpu_count(logical=False)
        return {
            "cores": cores,
            "cores_physical": physical,
            "utilization_pct": util,
            "load_1m": round(load, 2) if load is not None else None,
        }

    def _disk(self) -> JSON:
        path = self.models_dir()
        usage = self.psutil.disk_usage(str(path)) if self.psutil else shutil.disk_usage(path)
        return {"path": str(path), "total_bytes": int(usage.total), "free_bytes": int(usage.free)}

    def _thermal(self) -> JSON | None:
        temps: list[float] = []
        if self.psutil is not None and hasattr(self.psutil, "sensors_temperatures"):
            for entries in (self.psutil.sensors_temperatures() or {}).values():
                temps += [float(e.current) for e in entries if e.current]
        elif Path("/sys/class/thermal").is_dir():
            for zone in Path("/sys/class/thermal").glob("thermal_zone*/temp"):
                with contextlib.suppress(OSError, ValueError):
                    temps.append(int(zone.read_text().strip()) / 1000.0)
        if not temps:
            return None  # no sensors here (VMs, containers): not an error
        hottest = max(temps)
        return {"temperature_c": round(hottest, 1), "state": thermal_state(hottest)}

    # ---- GPU ----------------------------------------------------------------------------

    async def gpu(self, errors: list[JSON]) -> JSON | None:
        try:
            if shutil.which("nvidia-smi"):
                out = await run_command(NVIDIA_QUERY, self.config.command_timeout_s)
                return {"vendor": "nvidia", "unified": False, "devices": parse_nvidia_smi(out)}
            if platform.system() == "Darwin" and platform.machine() == "arm64":
                out = await run_command(
                    ["sysctl", "-n", "hw.memsize"], self.config.command_timeout_s
                )
                return {
                    "vendor": "apple",
                    "unified": True,  # GPU memory is the system RAM reported above
                    "devices": [
                        {
                            "name": self.static["chip"],
                            "memory_total_bytes": int(out.strip()),
                            "memory_used_bytes": None,
                            "temperature_c": None,
                            "utilization_pct": None,
                        }
                    ],
                }
        except (OSError, ValueError, TimeoutError, CommandFailed) as exc:
            errors.append({"collector": "gpu", "error": f"{type(exc).__name__}: {exc}"})
        return None  # no GPU (or it failed: see errors)

    # ---- Ollama ---------------------------------------------------------------------

    def _find_ollama_env(self) -> dict[str, str] | None:
        """The environment of the running ``ollama`` process, where this user may read it."""
        if self.psutil is not None:
            for proc in self.psutil.process_iter(["name", "cmdline"]):
                cmd = proc.info.get("cmdline") or []
                name = proc.info.get("name") or ""
                if name == "ollama" or (cmd and Path(cmd[0]).name == "ollama" and "serve" in cmd):
                    with contextlib.suppress(Exception):
                        return dict(proc.environ())
            return None
        for comm in Path("/proc").glob("[0-9]*/comm"):
            with contextlib.suppress(OSError):
                if comm.read_text().strip() == "ollama":
                    return parse_environ((comm.parent / "environ").read_bytes())
        return None

    async def ollama_limits(self, errors: list[JSON]) -> tuple[int | None, int | None]:
        now = time.monotonic()
        if now - self.ollama_env_at >= OLLAMA_ENV_REFRESH_S:
            self.ollama_env_at = now
            self.ollama_env = await asyncio.to_thread(
                self._guard, "ollama_env", self._find_ollama_env, errors
            )
        return ollama_limits(
            os.environ, self.ollama_env, self.config.num_parallel, self.config.max_loaded_models
        )

    async def _get(self, path: str) -> Any:
        return await self.pool.get_json(self.config.ollama_url, path, self.config.ollama_timeout_s)

    async def ollama(self, errors: list[JSON]) -> tuple[JSON, list[JSON] | None]:
        """Ollama's section of the beat, plus the full /api/tags list (None if unknown)."""
        fresh_version = time.monotonic() - self.version_at < VERSION_REFRESH_S and self.version
        calls = [self._get("/api/ps"), self._get("/api/tags")]
        if not fresh_version:
            calls.append(self._get("/api/version"))
        results = await asyncio.gather(*calls, return_exceptions=True)
        loaded: list[JSON] | None = None
        available: list[JSON] | None = None
        for name, result in zip(("ps", "tags", "version"), results, strict=False):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                msg = getattr(result, "message", "") or str(result) or type(result).__name__
                errors.append({"collector": f"ollama.{name}", "error": msg})
                continue
            if not isinstance(result, dict):
                errors.append({"collector": f"ollama.{name}", "error": "not a JSON object"})
            elif name == "version":
                self.version = str(result.get("version") or "")
                self.version_at = time.monotonic()
            elif isinstance(result.get("models"), list):
                models = [m for m in result["models"] if isinstance(m, dict)]
                if name == "ps":
                    loaded = models
                else:
                    available = models
            else:
                errors.append({"collector": f"ollama.{name}", "error": "no models list"})
        reachable = loaded is not None or available is not None
        num_parallel, max_loaded = await self.ollama_limits(errors)
        section: JSON = {
            "reachable": reachable,
            "version": self.version or None,
            "num_parallel": num_parallel,
            "max_loaded_models": max_loaded,
            "loaded": loaded if loaded is not None else ([] if not reachable else None),
            "available": None,  # filled by the heartbeat sender (only when changed)
            "available_hash": models_digest(available) if available is not None else None,
        }
        return section, available


class CommandFailed(Exception):
    pass


async def run_command(argv: Sequence[str], timeout: float) -> str:
    """Run a helper program; its stdout, or CommandFailed / TimeoutError. Never blocks."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise TimeoutError(f"{argv[0]} did not answer within {timeout:g}s") from None
    if proc.returncode != 0:
        detail = (err or out).decode(errors="replace").strip().splitlines()
        raise CommandFailed(f"{argv[0]} exited {proc.returncode}: {' '.join(detail[:2])}")
    return out.decode(errors="replace")


def load_psutil() -> ModuleType | None:
    try:
        psutil = importlib.import_module("psutil")
    except ImportError:
        log.warning(
            "psutil is not installed: reading /proc instead (no temperatures, no Ollama "
            "process environment on other platforms); pip install psutil for full facts"
        )
        return None
    return psutil


# =======================================================================================
# Router discovery (zeroconf)
# =======================================================================================


@dataclass(slots=True)
class RouterCandidate:
    name: str
    urls: list[str]
    router_id: str
    seen: float  # monotonic time of the last Added/Updated
    failures: int = 0

    @property
    def url(self) -> str:
        """Rotates through the advertised addresses as failures accumulate."""
        return self.urls[(self.failures // 2) % len(self.urls)]


def rank_addresses(addresses: Sequence[str]) -> list[str]:
    """LAN addresses first; loopback last (it only works when the router is on this host)."""
    return sorted(addresses, key=lambda a: (a.startswith("127."), a))


class RouterFinder:
    """Browses ``_herd._tcp.local.`` for routers of our fleet and keeps doing so."""

    def __init__(self, fleet_id: str, interfaces: Sequence[str] | None) -> None:
        self.fleet_id = fleet_id
        self.interfaces = list(interfaces) if interfaces else None
        self.candidates: dict[str, RouterCandidate] = {}
        self.changed = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.azc: Any = None
        self.browser: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        from zeroconf import InterfaceChoice, IPVersion
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

        self.loop = asyncio.get_running_loop()
        interfaces: Any = self.interfaces or InterfaceChoice.All
        self.azc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        self.browser = AsyncServiceBrowser(
            self.azc.zeroconf, herd.MDNS_TYPE, handlers=[self._on_service_change]
        )

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.browser is not None:
            with contextlib.suppress(Exception):
                await self.browser.async_cancel()
        if self.azc is not None:
            with contextlib.suppress(Exception):
                await self.azc.async_close()

    def _on_service_change(self, **kwargs: Any) -> None:
        name = str(kwargs["name"])
        state = str(getattr(kwargs["state_change"], "name", kwargs["state_change"]))
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._schedule, name, state)

    def _schedule(self, name: str, state: str) -> None:
        if state == "Removed":
            gone = self.candidates.pop(name, None)
            if gone is not None:
                log.info("router %s (%s) left (mDNS goodbye)", gone.router_id, gone.url)
                self.changed.set()
            return
        task = asyncio.ensure_future(self._resolve(name))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _resolve(self, name: str) -> None:
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncServiceInfo

        info = AsyncServiceInfo(herd.MDNS_TYPE, name)
        if not await info.async_request(self.azc.zeroconf, 3000):
            log.debug("mDNS: could not resolve %s", name)
            return
        props = {
            k.decode(errors="replace"): (v or b"").decode(errors="replace")
            for k, v in info.properties.items()
        }
        if props.get("fleet_id", "default") != self.fleet_id:
            log.debug("mDNS: ignoring %s of fleet %r", name, props.get("fleet_id"))
            return
        addresses = rank_addresses(info.parsed_addresses(IPVersion.V4Only))
        if not addresses or not info.port:
            return
        urls = [f"http://{a}:{info.port}" for a in addresses]
        old = self.candidates.get(name)
        if old is None or old.urls != urls:
            self.candidates[name] = RouterCandidate(
                name, urls, props.get("router_id", ""), time.monotonic()
            )
            log.info("router %s found by mDNS at %s", props.get("router_id", "?"), urls[0])
            self.changed.set()

    def best(self) -> RouterCandidate | None:
        """The newest router that is not failing; a restarted router is the newest one."""
        if not self.candidates:
            return None
        return min(self.candidates.values(), key=lambda c: (c.failures >= 3, -c.seen))


# =======================================================================================
# Heartbeats
# =======================================================================================


class BeatFailed(Exception):
    """A heartbeat did not land. ``kind``: unreachable, refused, unauthorized, impostor,
    bad_reply."""

    def __init__(self, kind: str, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status


async def post_heartbeat(
    pool: herd.Pool, router_url: str, payload: JSON, key: str | None, timeout: float
) -> JSON:
    """POST one beat; the router's reply, verified against the fleet key when there is one."""
    body = herd.dumps(payload)
    headers = [(b"content-type", b"application/json"), (b"user-agent", b"herd-node/" + VER)]
    if key:
        headers.append((b"x-herd-signature", herd.sign(key, int(time.time()), body).encode()))
    try:
        async with asyncio.timeout(timeout):
            resp = await pool.request(router_url, "POST", "/heartbeat", headers, body)
            data = await resp.read(limit=MiB, idle_timeout=timeout)
    except (herd.UpstreamFailure, herd.ConnectionClosed, TimeoutError, OSError) as exc:
        raise BeatFailed("unreachable", str(exc) or type(exc).__name__) from None
    if resp.status != 200:
        try:
            reason = str(json.loads(data).get("error", ""))
        except (ValueError, AttributeError):
            reason = data[:200].decode(errors="replace")
        kind = {401: "unauthorized", 409: "refused", 400: "refused"}.get(resp.status, "refused")
        if resp.status >= 500:
            kind = "unreachable"
        raise BeatFailed(kind, f"router answered {resp.status}: {reason}", resp.status)
    if key and not herd.verify_signature(key, resp.header("x-herd-signature"), data, time.time()):
        raise BeatFailed("impostor", "reply not signed with our fleet key")
    try:
        reply = json.loads(data)
    except ValueError:
        reply = None
    if not isinstance(reply, dict) or reply.get("ok") is not True:
        raise BeatFailed("bad_reply", f"unexpected reply: {data[:200]!r}")
    return reply


class Agent:
    """The node agent: beat loop, discovery, /healthz, optional relay, drain on stop."""

    def __init__(self, config: AgentConfig, psutil_mod: ModuleType | None = None) -> None:
        self.config = config
        self.pool = herd.Pool(connect_timeout_s=3.0)
        self.collectors = Collectors(config, self.pool, psutil_mod)
        self.finder: RouterFinder | None = None
        self.server = herd.HttpServer(self.dispatch, herd.Limits(max_connections=64), self.on_error)
        self.address: tuple[str, int] = ("", 0)
        self.stopping = asyncio.Event()
        self.router_url: str | None = config.router_url
        self.router_id = ""
        self.sent_hash: str | None = None  # available list the router has
        self.need_full = True
        self.failures = 0
        self.beats_ok = 0
        self.beats_failed = 0
        self.last_ok_at: float | None = None
        self.last_error = ""
        self.link_state = ""  # logged on change only
        self.advertised = ""  # advertise URL logged on change only
        self.last_payload_bytes = 0
        self.payload_sizes: list[int] = []
        self.relay_server: asyncio.Server | None = None
        self.started_at = time.time()

    # ---- target selection -------------------------------------------------------------

    def current_candidate(self) -> RouterCandidate | None:
        return self.finder.best() if self.finder is not None else None

    def target(self) -> str | None:
        if self.config.router_url:
            return herd.normalize_url(self.config.router_url)
        candidate = self.current_candidate()
        return candidate.url if candidate is not None else None

    def advertise_url(self, router_url: str) -> str:
        if self.config.advertise_url:
            return herd.normalize_url(self.config.advertise_url)
        host, port, _ = herd.split_url(router_url)
        return advertise_url_for(self.config.ollama_url, source_address_towards(host, port))

    # ---- one beat ---------------------------------------------------------------------

    async def build_payload(self, router_url: str, *, draining: bool = False) -> tuple[JSON, str]:
        errors: list[JSON] = []
        hardware, gpu, (ollama, available) = await asyncio.gather(
            asyncio.to_thread(self.collectors.hardware_sync, errors),
            self.collectors.gpu(errors),
            self.collectors.ollama(errors),
        )
        hardware["gpu"] = gpu
        digest = ollama["available_hash"]
        if available is not None and (self.need_full or digest != self.sent_hash):
            ollama["available"] = available
        elif available is None:
            ollama["available_hash"] = self.sent_hash  # unknown this beat: keep the router's
        payload: JSON = {
            "node_id": self.config.node_id,
            "agent_version": __version__,
            "timestamp": time.time(),
            "interval_s": self.config.interval_s,
            "ollama_url": self.advertise_url(router_url),
            "draining": draining,
            "hardware": hardware,
            "ollama": ollama,
            "capabilities": {"image": [], "stt": [], "service_url": None},
            "errors": errors,
        }
        return payload, str(digest or "")

    async def beat_once(self, router_url: str, *, draining: bool = False) -> JSON:
        payload, digest = await self.build_payload(router_url, draining=draining)
        self._note_advertise(payload["ollama_url"], router_url)
        self.last_payload_bytes = len(herd.dumps(payload))
        self.payload_sizes.append(self.last_payload_bytes)
        del self.payload_sizes[:-100]
        try:
            reply = await post_heartbeat(
                self.pool, router_url, payload, self.config.fleet_key, self.config.router_timeout_s
            )
        except BeatFailed:
            self.need_full = True  # the router may have restarted meanwhile
            raise
        if payload["ollama"]["available"] is not None:
            self.sent_hash = digest
        self.need_full = bool(reply.get("need_full"))
        if self.router_id and reply.get("router_id") != self.router_id:
            log.info("router changed identity (%s -> %s)", self.router_id, reply.get("router_id"))
        self.router_id = str(reply.get("router_id") or "")
        return reply

    def _note_advertise(self, url: str, router_url: str) -> None:
        if url == self.advertised:
            return
        self.advertised = url
        host, _, _ = herd.split_url(self.config.ollama_url)
        log.info("the router at %s will reach this node's Ollama at %s", router_url, url)
        if is_local_only(host) and not is_local_only(herd.split_url(url)[0]):
            hint = (
                "relayed by this agent (--relay)"
                if self.config.relay
                else (
                    "this works only if Ollama listens there too (OLLAMA_HOST=0.0.0.0), "
                    "else pass --relay or --advertise-url"
                )
            )
            log.info("Ollama is configured at %s (loopback): %s", self.config.ollama_url, hint)

    def _set_link(self, state: str, message: str, level: int = logging.INFO) -> None:
        if state != self.link_state:
            self.link_state = state
            log.log(level, "%s", message)

    # ---- loop -------------------------------------------------------------------------

    async def beat_loop(self) -> None:
        waiting_logged = False
        while not self.stopping.is_set():
            started = time.monotonic()
            router_url = self.target()
            if router_url is None:
                if not waiting_logged:
                    waiting_logged = True
                    ifaces = ",".join(self.config.mdns_interfaces or ()) or "all interfaces"
                    log.info(
                        "looking for a herd router of fleet %r by mDNS (%s on %s)",
                        self.config.fleet_id,
                        herd.MDNS_TYPE,
                        ifaces,
                    )
                await self._sleep(self.config.interval_s, started)
                continue
            waiting_logged = False
            self.router_url = router_url
            try:
                await self.beat_once(router_url)
            except BeatFailed as exc:
                self._on_failure(router_url, exc)
            else:
                self._on_success(router_url)
            await self._sleep(backoff_delay(self.config.interval_s, self.failures), started)

    def _on_success(self, router_url: str) -> None:
        self.failures = 0
        self.beats_ok += 1
        self.last_ok_at = time.time()
        self.last_error = ""
        candidate = self.current_candidate()
        if candidate is not None:
            candidate.failures = 0
        self._set_link(
            f"ok:{router_url}",
            f"node {self.config.node_id} joined the router at {router_url} "
            f"(router {self.router_id}, beat every {self.config.interval_s:g}s)",
        )

    def _on_failure(self, router_url: str, exc: BeatFailed) -> None:
        self.failures += 1
        self.beats_failed += 1
        self.last_error = exc.message
        candidate = self.current_candidate()
        if candidate is not None:
            candidate.failures += 3 if exc.kind == "impostor" else 1
        advice = {
            "unreachable": "retrying with back-off",
            "unauthorized": "check that --fleet-key / HERD_FLEET_KEY match on both sides",
            "refused": "fix the cause; retrying with back-off",
            "impostor": "NOT following it: it does not hold our fleet key",
            "bad_reply": "retrying with back-off",
        }[exc.kind]
        level = logging.ERROR if exc.kind in ("impostor", "unauthorized") else logging.WARNING
        self._set_link(
            f"{exc.kind}:{router_url}",
            f"heartbeat to {router_url} failed ({exc.kind}): {exc.message}; {advice}",
            level,
        )

    async def _sleep(self, delay: float, started: float) -> None:
        """Until the next beat is due, the router moved (mDNS), or we are stopping."""
        remaining = delay - (time.monotonic() - started)
        if remaining <= 0:
            return
        waits = [asyncio.ensure_future(self.stopping.wait())]
        if self.finder is not None:
            self.finder.changed.clear()
            waits.append(asyncio.ensure_future(self.finder.changed.wait()))
        try:
            await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def drain(self) -> None:
        """The last beat: ``draining: true``, so the router stops routing here at once."""
        router_url = self.target() or self.router_url
        if router_url is None:
            return
        try:
            async with asyncio.timeout(5.0):
                await self.beat_once(router_url, draining=True)
        except (BeatFailed, TimeoutError) as exc:
            log.warning("could not tell %s that this node is draining: %s", router_url, exc)
        else:
            log.info(
                "told the router at %s that node %s is draining", router_url, self.config.node_id
            )

    # ---- /healthz ---------------------------------------------------------------------

    def health(self) -> JSON:
        return {
            "ok": True,
            "node_id": self.config.node_id,
            "agent_version": __version__,
            "router_url": self.router_url,
            "router_id": self.router_id or None,
            "connected": self.failures == 0 and self.last_ok_at is not None,
            "last_beat_ok_at": self.last_ok_at,
            "beats_ok": self.beats_ok,
            "beats_failed": self.beats_failed,
            "last_error": self.last_error or None,
            "ollama_url": self.config.ollama_url,
            "advertise_url": self.advertised or None,
            "last_payload_bytes": self.last_payload_bytes,
            "uptime_s": round(time.time() - self.started_at, 1),
        }

    async def dispatch(self, request: herd.Request, response: herd.Response) -> None:
        if request.path == "/healthz" and request.method in ("GET", "HEAD"):
            await response.json(self.health())
            return
        raise herd.HttpError(404, f"no route for {request.method} {request.path}")

    async def on_error(
        self, request: herd.Request | None, response: herd.Response | None, exc: herd.HttpError
    ) -> None:
        if response is not None:
            await response.json({"error": exc.message}, exc.status)

    # ---- relay (loopback-only Ollama onto the LAN) ------------------------------------

    async def start_relay(self, lan_ip: str) -> None:
        """Expose a loopback-only Ollama on ``lan_ip`` at the same port (byte pipe, no HTTP)."""
        target_host, target_port, _ = herd.split_url(self.config.ollama_url)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(256 * 1024):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_r, up_w = await asyncio.open_connection(target_host, target_port)
            except OSError:
                writer.close()
                return
            await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

        self.relay_server = await asyncio.start_server(on_client, lan_ip, target_port)
        log.info(
            "relaying %s:%d -> %s (Ollama listens on loopback only)",
            lan_ip,
            target_port,
            self.config.ollama_url,
        )

    # ---- lifecycle --------------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        if not self.config.router_url:
            self.finder = RouterFinder(self.config.fleet_id, self.config.mdns_interfaces)
            await self.finder.start()
        self.address = await self.server.start(self.config.host, self.config.port)
        if self.config.relay:
            host, _, _ = herd.split_url(self.config.ollama_url)
            lan = source_address_towards("10.255.255.255", 1)
            if is_local_only(host) and not is_local_only(lan):
                await self.start_relay(lan)
            else:
                log.info(
                    "--relay: nothing to relay (Ollama at %s, LAN address %s)",
                    self.config.ollama_url,
                    lan,
                )
        return self.address

    async def stop(self) -> None:
        if self.relay_server is not None:
            self.relay_server.close()
        await self.server.stop(1.0)
        if self.finder is not None:
            await self.finder.close()
        self.pool.close()

    async def run(self) -> None:
        """Beat until ``stopping`` is set, then send the draining beat."""
        beats = asyncio.ensure_future(self.beat_loop())
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({beats, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            beats.cancel()
            stop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats
        await self.drain()


# =======================================================================================
# CLI
# =======================================================================================


def env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="herd-node",
        description="herd node agent: reports this machine and its Ollama to the herd router. "
        "Every flag has an environment twin, shown in brackets.",
    )
    p.add_argument(
        "--router-url",
        default=env("HERD_ROUTER_URL"),
        help="router to report to; unset = find it by mDNS [HERD_ROUTER_URL]",
    )
    p.add_argument(
        "--ollama-url",
        default=env("HERD_OLLAMA_URL", "http://127.0.0.1:11434"),
        help="this node's Ollama [HERD_OLLAMA_URL] (default http://127.0.0.1:11434)",
    )
    p.add_argument(
        "--node-id",
        default=env("HERD_NODE_ID"),
        help="node name [HERD_NODE_ID] (default: the short hostname)",
    )
    p.add_argument(
        "--advertise-url",
        default=env("HERD_ADVERTISE_URL"),
        help="Ollama URL the router should use [HERD_ADVERTISE_URL] (default: the "
        "Ollama URL, its host replaced by the local address that routes to the "
        "router when it is loopback)",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=float(env("HERD_HEARTBEAT_INTERVAL", "5") or 5),
        help="seconds between heartbeats [HERD_HEARTBEAT_INTERVAL] (default 5)",
    )
    p.add_argument(
        "--fleet-key",
        default=env("HERD_FLEET_KEY"),
        help="shared secret signing heartbeats and replies [HERD_FLEET_KEY]",
    )
    p.add_argument(
        "--fleet-id",
        default=env("HERD_FLEET_ID", "default"),
        help="only follow routers of this fleet (mDNS TXT) [HERD_FLEET_ID]",
    )
    p.add_argument(
        "--host",
        default=env("HERD_NODE_HOST", "127.0.0.1"),
        help="address for /healthz [HERD_NODE_HOST] (default 127.0.0.1)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=int(env("HERD_NODE_PORT", "11433") or 11433),
        help="port for /healthz; 0 picks a free one [HERD_NODE_PORT] (default 11433)",
    )
    p.add_argument(
        "--mdns-interfaces",
        default=env("HERD_MDNS_INTERFACES"),
        help="comma-separated addresses to browse on [HERD_MDNS_INTERFACES] (default: all)",
    )
    p.add_argument(
        "--num-parallel",
        type=int,
        default=positive_int(env("HERD_NUM_PARALLEL", "")),
        help="Ollama's parallel slots when neither OLLAMA_NUM_PARALLEL nor the "
        "running Ollama's environment says [HERD_NUM_PARALLEL]",
    )
    p.add_argument(
        "--max-loaded-models",
        type=int,
        default=positive_int(env("HERD_MAX_LOADED_MODELS", "")),
        help="likewise for OLLAMA_MAX_LOADED_MODELS [HERD_MAX_LOADED_MODELS]",
    )
    p.add_argument(
        "--relay",
        action="store_true",
        default=env("HERD_RELAY", "0") in ("1", "true", "on"),
        help="relay a loopback-only Ollama onto the LAN address [HERD_RELAY=1]",
    )
    p.add_argument(
        "--data-dir",
        default=env("HERD_DATA_DIR", str(Path.home() / ".fleet-manager")),
        help="logs go to DATA_DIR/logs/herd-node.jsonl [HERD_DATA_DIR]",
    )
    p.add_argument(
        "--log-level",
        default=env("HERD_LOG_LEVEL", "INFO"),
        help="console log level [HERD_LOG_LEVEL]",
    )
    return p


def config_from_args(argv: Sequence[str] | None = None) -> AgentConfig:
    args = build_parser().parse_args(argv)
    ifaces = tuple(i.strip() for i in (args.mdns_interfaces or "").split(",") if i.strip())
    node_id = args.node_id or socket.gethostname().split(".")[0] or "node"
    if not herd.valid_node_id(node_id):
        raise SystemExit(f"herd-node: node id {node_id!r} must match [A-Za-z0-9._-]{{1,64}}")
    if args.interval < 0.05 or args.interval > 300:
        raise SystemExit("herd-node: --interval must be between 0.05 and 300 seconds")
    return AgentConfig(
        router_url=args.router_url or None,
        ollama_url=herd.normalize_url(args.ollama_url),
        node_id=node_id,
        advertise_url=args.advertise_url or None,
        interval_s=args.interval,
        fleet_key=args.fleet_key or None,
        fleet_id=args.fleet_id,
        host=args.host,
        port=args.port,
        mdns_interfaces=ifaces or None,
        num_parallel=args.num_parallel,
        max_loaded_models=args.max_loaded_models,
        relay=args.relay,
        data_dir=Path(args.data_dir).expanduser(),
        log_level=args.log_level,
    )


def setup_logging(config: AgentConfig) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(config.log_level.upper())
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root.addHandler(console)
    try:
        handler = store.setup_jsonl_logging(
            config.data_dir / "logs" / "herd-node.jsonl", logger_name="herd.node"
        )
        handler.setLevel(logging.INFO)
    except OSError as exc:
        log.warning("JSONL log disabled: %s", exc)


def zeroconf_available() -> bool:
    try:
        import zeroconf  # noqa: F401
    except ImportError:
        return False
    return True


async def serve(config: AgentConfig, psutil_mod: ModuleType | None) -> None:
    agent = Agent(config, psutil_mod)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, agent.stopping.set)
    host, port = await agent.start()
    print(f"herd-node listening on {host}:{port}", flush=True)
    try:
        await agent.run()
    finally:
        await agent.stop()


def main(argv: Sequence[str] | None = None) -> int:
    config = config_from_args(argv)
    setup_logging(config)
    if not config.router_url and not zeroconf_available():
        log.error(
            "zeroconf is not installed, so the router cannot be found by mDNS: "
            "pass --router-url http://ROUTER:11435 (or pip install zeroconf)"
        )
        return 2
    psutil_mod = load_psutil()
    herd.install_uvloop()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config, psutil_mod))
    return 0


if __name__ == "__main__":
    sys.exit(main())
