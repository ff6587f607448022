"""What the trace store costs the router under load: p99 with the store on vs off.

    python bench/store_overhead.py [--requests 3000] [--concurrency 8] [--rounds 2]

A fake node (bench/proxy_overhead.py's node role) and herd run in their own processes; this
process is the load generator. Herd runs alternately with its real store and with a null
store (``record_trace``/``record_event`` do nothing), ``--rounds`` times each, and the table
compares latency percentiles and the traces the store committed per second of load
(issue 6 target: p99 with the store at most 5 % worse than without).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import proxy_overhead as po  # noqa: E402


def null_store_class() -> type:
    import store

    class NullStore(store.Store):
        """The real store, except that traces and events are dropped on the floor."""

        def record_trace(self, rec: store.TraceRecord) -> None:
            return None

        def record_event(self, kind: str, node_id: str, detail: dict[str, Any],
                         *, timestamp: float | None = None) -> None:
            return None

    return NullStore


def NullStore(data_dir: Path) -> Any:
    return null_store_class()(data_dir)


async def run_herd(node: str, data_dir: str, store_on: bool) -> None:
    import logging

    import herd

    logging.basicConfig(level=logging.WARNING)
    cfg = herd.Config(host="127.0.0.1", port=0, nodes=[node], data_dir=Path(data_dir),
                      local_ollama=None, mdns=False, poll_interval_s=2.0, log_level="WARNING")
    cfg.slots = {herd.node_id_from_url(node): 64}
    router = herd.Router(cfg)
    if not store_on:
        router.store = NullStore(Path(data_dir))
    _, port = await router.start()
    started = time.monotonic()

    async def stop() -> None:
        await router.store.flush()
        stats = router.store.stats().to_json()
        stats["uptime_s"] = time.monotonic() - started
        print("STATS " + json.dumps(stats), flush=True)
        await router.stop()

    await po.serve_until_signal(port, stop)


class Herd:
    def __init__(self, node: str, data_dir: str, store_on: bool) -> None:
        self.p = subprocess.Popen(
            [sys.executable, __file__, "--role", "herd", "--node", node, "--data-dir", data_dir,
             "--store", "on" if store_on else "off"],
            stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        if not line.startswith("READY"):
            self.p.kill()
            raise RuntimeError("herd did not start")
        self.port = int(line.split()[1])

    def stop(self) -> dict[str, Any]:
        self.p.send_signal(signal.SIGTERM)
        out, _ = self.p.communicate(timeout=30)
        for line in out.splitlines():
            if line.startswith("STATS "):
                stats: dict[str, Any] = json.loads(line[6:])
                return stats
        return {}


async def load(port: int, concurrency: int, total: int) -> tuple[list[float], float]:
    clients = [await po.Client(port).open() for _ in range(concurrency)]
    counter = iter(range(total))
    lat: list[float] = []

    async def worker(c: po.Client) -> None:
        for i in counter:
            t0 = time.perf_counter()
            status, body, _ = await c.post("/api/generate", po.small_body(i))
            lat.append(time.perf_counter() - t0)
            if status != 200:
                raise RuntimeError(f"status {status}: {body[:200]!r}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in clients))
    elapsed = time.perf_counter() - t0
    for c in clients:
        c.close()
    return lat, elapsed


async def bench(args: argparse.Namespace) -> int:
    node = po.Proc("--role", "node")
    rows: dict[str, list[tuple[list[float], float, dict[str, Any]]]] = {"on": [], "off": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                for mode in ("on", "off"):
                    h = Herd(node.url, f"{tmp}/{mode}{r}", mode == "on")
                    try:
                        await po.wait_routable(h.port, [po.SMALL_MODEL])
                        await load(h.port, args.concurrency, 200)  # warm-up
                        lat, elapsed = await load(h.port, args.concurrency, args.requests)
                    finally:
                        stats = h.stop()
                    rows[mode].append((lat, elapsed, stats))
                    print(f"  round {r + 1} store {mode}: done", file=sys.stderr, flush=True)
    finally:
        node.stop()

    def summary(mode: str) -> tuple[float, float, float, float]:
        lat = [x for run in rows[mode] for x in run[0]]
        rps = statistics.mean(args.requests / run[1] for run in rows[mode])
        return po.pct(lat, 0.5) * 1000, po.pct(lat, 0.99) * 1000, rps, float(len(lat))

    on, off = summary("on"), summary("off")
    written = [run[2].get("records_written", 0) for run in rows["on"]]
    secs = [run[1] for run in rows["on"]]
    print(f"\ntrace store on vs off: {args.rounds} rounds each, {args.requests} requests per "
          f"round at concurrency {args.concurrency}, fake node with 64 slots, 2 shared cores")
    print(f"{'store':<6} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
    print(f"{'off':<6} {off[0]:>8.2f} {off[1]:>8.2f} {off[2]:>8.0f}")
    print(f"{'on':<6} {on[0]:>8.2f} {on[1]:>8.2f} {on[2]:>8.0f}")
    ratio = on[1] / off[1]
    verdict = "PASS" if ratio <= 1.05 else "MISS"
    print(f"\np99 with store / without: {ratio:.3f}x (target <= 1.05x: {verdict})")
    print(f"traces committed while serving: {sum(written)} in {sum(secs):.1f} s of load "
          f"= {sum(written) / sum(secs):.0f} traces/s (every request: one row; warm-up included)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", choices=["herd"])
    ap.add_argument("--node")
    ap.add_argument("--data-dir")
    ap.add_argument("--store", choices=["on", "off"], default="on")
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    po.use_uvloop()
    if args.role == "herd":
        asyncio.run(run_herd(args.node, args.data_dir, args.store == "on"))
        return 0
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
