"""What parsing node reports at the edge costs (issue 14 item 3), side by side with a baseline.

    python bench/node_reports.py                      # baseline: git ref e77612f (before)
    python bench/node_reports.py --baseline <ref>     # any other commit of this repository

Both versions run in their own child process (this file with ``--measure <dir>``; the
baseline's herd.py / scoring.py / store.py come from ``git show <ref>:<file>``), interleaved
three times (A B A B A B), medians compared. Each child starts a ``herd.Router`` (loopback,
port 0, no mDNS), then 20 agent nodes beat (full hardware, 30 models, 3 loaded; the model
list in full on the first beat, ``null`` = unchanged afterwards, as herd_node sends it) and:

* beat: ``Fleet.apply_heartbeat`` per beat, JSON decoding excluded (µs);
* snapshot: ``Fleet._snapshots`` of the 20-node fleet, what every routing decision reads (µs);
* status: ``Node.public`` + ``Node.available_json`` of the 20 nodes, the bulk of /fleet/status
  (µs).

Target: no regression — each figure ≤ 1.15x the baseline's (the margin is this shared
2-core machine's noise; ratios, not absolute times, are the point). Exit 1 when one is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.lib import common as _common  # noqa: E402

NODES = 20
ROUNDS = 200
TARGET = 1.15
DEFAULT_BASELINE = "e77612f"  # main before the report types (issue 14 item 3)


def agent_beat(i: int, full: bool, models: int = 30, loaded: int = 3) -> bytes:
    return _common.agent_beat(
        i, models=models, loaded=loaded, full=full, tag_capabilities=["completion", "tools"],
        capabilities={"image": [{"name": "sdxl", "backend": "command"}], "stt": [],
                      "service_url": f"http://127.0.0.1:{31000 + i}"})


def measure(src: str) -> dict[str, float]:
    sys.path.insert(0, src)
    import herd  # from ``src``: this version or the baseline's

    assert Path(herd.__file__).resolve().parent == Path(src).resolve(), herd.__file__
    return asyncio.run(fleet(herd))


async def fleet(herd: Any) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-reports-") as tmp:
        cfg = herd.Config(host="127.0.0.1", port=0, nodes=[], data_dir=Path(tmp),
                          local_ollama=None, mdns=False, heartbeat_interval_s=300.0)
        router = herd.Router(cfg)
        fleet_ = getattr(router, "fleet", router)  # the baseline predates Router.fleet
        await router.start()
        try:
            first = [agent_beat(i, True) for i in range(NODES)]
            later = [agent_beat(i, False) for i in range(NODES)]
            beat_s = snap_s = status_s = 0.0
            for r in range(ROUNDS):
                beats = [json.loads(b) for b in (first if r == 0 else later)]
                now = time.time()
                t0 = time.perf_counter()
                for beat in beats:
                    fleet_.apply_heartbeat(beat, "127.0.0.1", now, signed=False)
                t1 = time.perf_counter()
                for _ in range(5):
                    fleet_._snapshots(now)
                t2 = time.perf_counter()
                for node in fleet_.nodes.values():
                    node.public(now)
                    node.available_json()
                t3 = time.perf_counter()
                if r:  # the first round (full lists, joins) is not steady state
                    beat_s += t1 - t0
                    snap_s += t2 - t1
                    status_s += t3 - t2
            assert len(router.nodes) == NODES
            n = ROUNDS - 1
            return {"beat": beat_s / (n * NODES) * 1e6, "snapshot": snap_s / (n * 5) * 1e6,
                    "status": status_s / n * 1e6}
        finally:
            await router.stop()


def run_child(src: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--measure", str(src)], check=True,
                         capture_output=True, text=True, timeout=300).stdout
    figures: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default=DEFAULT_BASELINE, help="git ref to compare with")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-reports-base-") as base:
        for name in ("herd.py", "scoring.py", "store.py"):
            text = subprocess.run(["git", "-C", str(ROOT), "show", f"{args.baseline}:{name}"],
                                  check=True, capture_output=True, text=True).stdout
            (Path(base) / name).write_text(text)
        runs: dict[str, list[dict[str, float]]] = {"baseline": [], "this": []}
        for _ in range(3):
            runs["baseline"].append(run_child(Path(base)))
            runs["this"].append(run_child(ROOT))
    print(f"node reports: {NODES} agent nodes, {ROUNDS} beats each; medians of 3 interleaved "
          f"runs; baseline {args.baseline}; target each ratio <= {TARGET}")
    print(f"{'figure':<10}{'baseline µs':>14}{'this µs':>12}{'ratio':>8}")
    missed = []
    for key in ("beat", "snapshot", "status"):
        old = statistics.median(r[key] for r in runs["baseline"])
        new = statistics.median(r[key] for r in runs["this"])
        ratio = new / old
        print(f"{key:<10}{old:>14.1f}{new:>12.1f}{ratio:>8.2f}")
        if ratio > TARGET:
            missed.append(key)
    if missed:
        print(f"MISSED (ratio > {TARGET}): {', '.join(missed)}")
        return 1
    print("ok: no figure above the target")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
