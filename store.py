"""SQLite persistence for herd: request traces, rollups, events, settings, benchmark runs, logs.

Responsibilities:
  * ``<data_dir>/latency.db`` (WAL); schema migrations by ``PRAGMA user_version``
    (``MIGRATIONS`` is an ordered tuple of steps, each applied in its own transaction).
  * One writer thread owns the only write connection. The event loop hands it work through
    a queue and never waits for it: ``record_trace``/``record_event`` append to a list on
    the loop, which goes to the writer as one batch after ``flush_interval_s`` (or at
    ``batch_max`` rows) and is committed in one transaction. So a burst of thousands of
    traces costs a few commits, and the writer thread wakes (and takes the GIL from the
    loop) a few times a second rather than once per request. Records made on another
    thread are queued one by one. Pruning runs periodically on the writer thread.
  * Hourly and daily rollups (counters, sums and log-bucket latency/TTFT histograms per
    bucket x node x model x tag) are summed on the writer and merged into their rows once
    per ``rollup_interval_s``, in a transaction that also moves ``rollup_watermark`` (the
    last trace counted); open folds any trace above it (a crash), so they never disagree
    with the traces, but reads lag them by up to that interval (``flush()`` merges first).
    Analytics read a few hundred rollup rows instead of scanning traces, and
    rollups outlive the pruning of raw traces. ``fleet_rollups`` holds one more hourly row
    per bucket for the whole fleet (every node x model row of that hour summed), so trends
    over a week merge 168 histograms instead of 168 x nodes x models.
  * A reader thread with its own read-only connection answers queries (WAL lets it read
    while the writer commits); the loop awaits it through ``run_in_executor``.
  * Learned facts (``learned_facts``): what the router learned about its nodes, saved
    as changed rows (``save_learned``) and read once at start (``load_learned``), aged out.
  * ``setup_jsonl_logging``: a rotated JSON-lines log file, written off the event loop.

Never: import herd/scoring, run SQL on the event loop thread, or hold a transaction across
an ``await`` (every public method is one atomic unit on one thread: a cancelled caller's
work still runs to completion, curio's "zombie" caveat). This is the only module of the
project that imports ``sqlite3``.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import contextlib
import copy
import itertools
import json
import logging
import logging.handlers
import math
import operator
import os
import queue
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import TypeVar

log = logging.getLogger("herd.store")

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)
_TupleKey = TypeVar("_TupleKey", bound=tuple[object, ...])

DB_FILENAME = "latency.db"
HOUR = 3600
DAY = 86400
HOURLY_KEEP_DAYS = 35  # hourly rollups: trends and sliding-window analytics up to a month
DAILY_KEEP_DAYS = 400  # daily rollups: usage history long after raw traces are pruned
SLIDING_MAX_DAYS = 2  # analytics windows up to this read hourly rollups, longer ones daily
MAX_QUEUE = 200_000  # pending writes; beyond this record_trace drops rather than grow memory
PRUNE_CHUNK = 20_000  # rows per DELETE transaction, so pruning never stalls writes for long
TRACE_LIMIT_MAX = 10_000
MAX_TAGS = 32
MAX_TAG_LEN = 200
COLD_LOAD_MS = 500.0  # Ollama load_duration above this means the model was (re)loaded
HIST_GAMMA = 1.02  # histogram bucket ratio: percentiles are exact to within ~1 %
_LOG_GAMMA = math.log(HIST_GAMMA)

STATUSES = (
    "completed",
    "failed",
    "retried",
    "incomplete",
    "client_disconnected",
    "reaped",
    "rejected",
    "client_error",  # the node refused the request itself (a 4xx): not the node's failure
)

# ---------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class TraceRecord:
    """One request attempt, as the router saw it (ARCHITECTURE.md, "Trace record").

    Mutable so the router can fill it in as the attempt progresses; ``record_trace`` copies
    it, so reusing the object for the next attempt is safe.
    """

    request_id: str
    timestamp: float
    kind: str = "text"
    endpoint: str = ""
    model: str = ""
    original_model: str = ""
    node_id: str = ""
    score: float | None = None
    # a dict, or a callable returning one or its JSON text: the router passes its frozen
    # choice's breakdown unevaluated, so building it happens on the writer thread
    scores_breakdown: (dict[str, object] | Callable[[], dict[str, object] | str] | None) = None
    status: str = "completed"
    http_status: int = 0
    error_message: str = ""
    latency_ms: float = 0.0
    time_to_first_token_ms: float | None = None
    queue_ms: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    load_ms: float | None = None
    prompt_eval_ms: float | None = None
    eval_ms: float | None = None
    retry_count: int = 0
    fallback_used: bool = False
    tags: list[str] = field(default_factory=list)
    client_ip: str = ""


_snapshot = operator.attrgetter(*TraceRecord.__dataclass_fields__)


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Counters for ``/metrics`` and the health page."""

    queue_depth: int
    dropped: int
    batches_written: int
    records_written: int
    events_written: int
    write_errors: int
    db_bytes: int
    last_prune_at: float | None
    pruned_total: int
    writer_cpu_s: float = 0.0  # CPU time the writer thread has used

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class _Event:
    timestamp: float
    kind: str
    node_id: str
    detail: Mapping[str, object]


@dataclass(frozen=True, slots=True)
class _Task:
    """Work for the writer thread; ``run`` delivers its own result to a future."""

    run: Callable[[sqlite3.Connection], None]


@dataclass(frozen=True, slots=True)
class _Shutdown:
    done: concurrent.futures.Future[None]


@dataclass(frozen=True, slots=True)
class _Batch:
    """Records gathered on the event loop for one ``flush_interval_s``, handed over whole:
    the writer thread wakes once per batch instead of once per request."""

    records: list[TraceRecord | _Event]


_Item = TraceRecord | _Event | _Batch | _Task | _Shutdown


class _State(Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


# ---------------------------------------------------------------------------------------
# Schema and migrations
# ---------------------------------------------------------------------------------------

TRACE_COLUMNS = (
    "id",
    "request_id",
    "timestamp",
    "kind",
    "endpoint",
    "model",
    "original_model",
    "node_id",
    "score",
    "scores_breakdown",
    "status",
    "http_status",
    "error_message",
    "latency_ms",
    "time_to_first_token_ms",
    "queue_ms",
    "prompt_tokens",
    "completion_tokens",
    "load_ms",
    "prompt_eval_ms",
    "eval_ms",
    "retry_count",
    "fallback_used",
    "tags",
    "client_ip",
)

_SCHEMA_V1 = (
    """CREATE TABLE request_traces (
        id INTEGER PRIMARY KEY,
        request_id TEXT NOT NULL,
        timestamp REAL NOT NULL,
        kind TEXT NOT NULL DEFAULT '',
        endpoint TEXT NOT NULL DEFAULT '',
        model TEXT NOT NULL DEFAULT '',
        original_model TEXT NOT NULL DEFAULT '',
        node_id TEXT NOT NULL DEFAULT '',
        score REAL,
        scores_breakdown TEXT,
        status TEXT NOT NULL,
        http_status INTEGER NOT NULL DEFAULT 0,
        error_message TEXT NOT NULL DEFAULT '',
        latency_ms REAL NOT NULL DEFAULT 0,
        time_to_first_token_ms REAL,
        queue_ms REAL NOT NULL DEFAULT 0,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        load_ms REAL,
        prompt_eval_ms REAL,
        eval_ms REAL,
        retry_count INTEGER NOT NULL DEFAULT 0,
        fallback_used INTEGER NOT NULL DEFAULT 0,
        tags TEXT NOT NULL DEFAULT '[]',
        client_ip TEXT NOT NULL DEFAULT ''
    )""",
    "CREATE INDEX idx_traces_timestamp ON request_traces(timestamp)",
    "CREATE INDEX idx_traces_model ON request_traces(model, timestamp)",
    "CREATE INDEX idx_traces_node ON request_traces(node_id, timestamp)",
    "CREATE INDEX idx_traces_status ON request_traces(status, timestamp)",
    "CREATE INDEX idx_traces_request_id ON request_traces(request_id)",
    # No foreign key to request_traces: pruning deletes both tables by timestamp, and an
    # FK would make every deleted trace scan for children (or cost another index).
    """CREATE TABLE trace_tags (
        tag TEXT NOT NULL,
        timestamp REAL NOT NULL,
        request_rowid INTEGER NOT NULL,
        PRIMARY KEY (tag, timestamp, request_rowid)
    ) WITHOUT ROWID""",
    "CREATE INDEX idx_trace_tags_timestamp ON trace_tags(timestamp)",
    """CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        timestamp REAL NOT NULL,
        kind TEXT NOT NULL,
        node_id TEXT NOT NULL DEFAULT '',
        detail TEXT NOT NULL DEFAULT '{}'
    )""",
    "CREATE INDEX idx_events_timestamp ON events(timestamp)",
    "CREATE INDEX idx_events_node ON events(node_id, timestamp)",
    """CREATE TABLE settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        updated_at REAL NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE benchmark_runs (
        run_id INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending',
        params TEXT NOT NULL DEFAULT '{}',
        progress REAL NOT NULL DEFAULT 0,
        started_at REAL,
        finished_at REAL,
        duration_s REAL,
        requests INTEGER,
        failures INTEGER,
        rps REAL,
        tokens_per_s REAL,
        latency_p50_ms REAL,
        latency_p95_ms REAL,
        latency_p99_ms REAL,
        ttft_p50_ms REAL,
        ttft_p95_ms REAL,
        ttft_p99_ms REAL,
        results TEXT,
        error TEXT NOT NULL DEFAULT ''
    )""",
)

# Additive rollup columns, in the order of _Agg.sums.
ROLLUP_SUMS = (
    "completed",
    "failed",
    "retried",
    "incomplete",
    "disconnected",
    "reaped",
    "rejected",
    "prompt_tokens",
    "completion_tokens",
    "latency_sum",
    "latency_n",
    "ttft_sum",
    "ttft_n",
    "eval_tokens",
    "eval_ms",
    "load_ms_sum",
    "load_n",
    "cold_loads",
    "queue_ms_sum",
    "fallbacks",
    "client_errors",  # since schema v6
)
_I = {name: i for i, name in enumerate(ROLLUP_SUMS)}
_STATUS_INDEX = {
    "completed": _I["completed"],
    "failed": _I["failed"],
    "retried": _I["retried"],
    "incomplete": _I["incomplete"],
    "client_disconnected": _I["disconnected"],
    "reaped": _I["reaped"],
    "rejected": _I["rejected"],
    "client_error": _I["client_errors"],
}
_ROLLUP_KEY = ("span", "bucket", "node_id", "model", "tag")
_Key = tuple[object, ...]
_RollupKey = tuple[int, int, str, str, str]  # span, bucket, node_id, model, tag

_SCHEMA_V2 = (
    # One row per bucket of `span` seconds and either (node, model) with tag '' (every
    # request) or a tag with node and model '' (the requests carrying that tag).
    # Histograms are JSON {"bin": count}; since v3 mostly [lo, count_lo, ...] (_Hist).
    "CREATE TABLE rollups (\n"
    "    span INTEGER NOT NULL, bucket INTEGER NOT NULL,\n"
    "    node_id TEXT NOT NULL, model TEXT NOT NULL, tag TEXT NOT NULL,\n"
    + "".join(f"    {c} REAL NOT NULL DEFAULT 0,\n" for c in ROLLUP_SUMS)
    + "    first_ts REAL NOT NULL, last_ts REAL NOT NULL,\n"
    "    latency_hist TEXT NOT NULL DEFAULT '{}', ttft_hist TEXT NOT NULL DEFAULT '{}',\n"
    "    PRIMARY KEY (span, bucket, node_id, model, tag)\n"
    ") WITHOUT ROWID",
)


_FLEET_KEY = ("span", "bucket")
_FleetKey = tuple[int, int]  # span, bucket

_SCHEMA_V4 = (
    # Per bucket, the sum of every tag = '' rollups row of that bucket (all nodes and
    # models, rejected requests included): what trends reads. A table of its own, so no
    # query of ``rollups`` (by node, model or tag) can ever count it. Hourly rows only.
    "CREATE TABLE fleet_rollups (\n"
    "    span INTEGER NOT NULL, bucket INTEGER NOT NULL,\n"
    + "".join(f"    {c} REAL NOT NULL DEFAULT 0,\n" for c in ROLLUP_SUMS)
    + "    first_ts REAL NOT NULL, last_ts REAL NOT NULL,\n"
    "    latency_hist TEXT NOT NULL DEFAULT '{}', ttft_hist TEXT NOT NULL DEFAULT '{}',\n"
    "    PRIMARY KEY (span, bucket)\n"
    ") WITHOUT ROWID",
)


def _create_schema_v1(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V1:
        conn.execute(statement)


def _create_rollups_v2(conn: sqlite3.Connection) -> None:
    """Add rollups and backfill them from the traces already stored."""
    for statement in _SCHEMA_V2:
        conn.execute(statement)
    last_id = 0
    while True:
        rows = conn.execute(
            "SELECT * FROM request_traces WHERE id > ? ORDER BY id LIMIT 10000", (last_id,)
        ).fetchall()
        if not rows:
            return
        records = [_record_from_row(row) for row in rows]
        _add_to_rollups(conn, records, [r.tags for r in records])
        last_id = rows[-1]["id"]


def _dense_hists_v3(conn: sqlite3.Connection) -> None:
    """Re-encode rollup histograms from ``{"bin": count}`` to the dense form where that is
    smaller (see ``_Hist``): analytics then parse them without per-bin Python work."""
    after: tuple[object, ...] = (-1, -1, "", "", "")
    while True:
        rows = conn.execute(
            f"SELECT {', '.join(_ROLLUP_KEY)}, latency_hist, ttft_hist FROM rollups "
            f"WHERE ({', '.join(_ROLLUP_KEY)}) > (?, ?, ?, ?, ?) "
            f"ORDER BY {', '.join(_ROLLUP_KEY)} LIMIT 10000",
            after,
        ).fetchall()
        if not rows:
            return
        updates = []
        for row in rows:
            latency, ttft = (
                _Hist.from_json(row[c]).to_json() for c in ("latency_hist", "ttft_hist")
            )
            if (latency, ttft) != (row["latency_hist"], row["ttft_hist"]):
                updates.append((latency, ttft, *row[: len(_ROLLUP_KEY)]))
        conn.executemany(
            "UPDATE rollups SET latency_hist = ?, ttft_hist = ? WHERE "
            + " AND ".join(f"{c} = ?" for c in _ROLLUP_KEY),
            updates,
        )
        after = tuple(rows[-1][: len(_ROLLUP_KEY)])


def _fleet_rollups_v4(conn: sqlite3.Connection, chunk_hours: int = 1000) -> None:
    """Add ``fleet_rollups`` and backfill its hourly rows from the hourly ``rollups`` rows,
    summed exactly as trends summed them before (``_aggregate`` by bucket), a chunk of
    buckets at a time so memory stays bounded whatever the hourly retention."""
    for statement in _SCHEMA_V4:
        conn.execute(statement)
    lo, hi = conn.execute(
        "SELECT MIN(bucket), MAX(bucket) FROM rollups WHERE span = ? AND tag = ''", (HOUR,)
    ).fetchone()
    if lo is None:
        return
    step = chunk_hours * HOUR
    for first in range(int(lo), int(hi) + 1, step):
        groups = _aggregate(conn, HOUR, first, first + step - HOUR, tagged=False, by=("bucket",))
        conn.executemany(
            _FLEET.insert,
            [_rollup_params((HOUR, int(_num(b))), agg) for (b,), agg in groups.items()],
        )


_SCHEMA_V5 = (
    # The operator's decision per agent node id (issue 18, nodes join with consent):
    # 'approved' binds the id to the source address and Ollama URL that were approved;
    # 'rejected' keeps the id out. Pending nodes are not stored (they beat again).
    """CREATE TABLE node_admissions (
        node_id TEXT PRIMARY KEY,
        decision TEXT NOT NULL CHECK (decision IN ('approved', 'rejected')),
        addr TEXT NOT NULL DEFAULT '',
        ollama_url TEXT NOT NULL DEFAULT '',
        decided_at REAL NOT NULL
    ) WITHOUT ROWID""",
)


def _node_admissions_v5(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V5:
        conn.execute(statement)


def _client_errors_v6(conn: sqlite3.Connection) -> None:
    """Add the ``client_errors`` counter (trace status ``client_error``: a 4xx the request
    caused) to both rollup tables; tables created by v2/v4 since then already have it."""
    for table in ("rollups", "fleet_rollups"):
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if "client_errors" not in have:
            conn.execute(
                f"ALTER TABLE {table} ADD COLUMN client_errors REAL NOT NULL DEFAULT 0"
            )


_SCHEMA_V7 = (
    # What the router learned about its nodes (issue 15: slot and memory bounds, service
    # statistics, prompt-cache affinity), so a restart does not route blind. One row per
    # fact: ``kind`` (the router's name for the table it came from) and ``key`` identify it,
    # ``value`` is the JSON of the fact's fields, ``updated_at`` the last time it changed
    # (rows older than the router's age limit are dropped).
    """CREATE TABLE learned_facts (
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        node_id TEXT NOT NULL,
        value TEXT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (kind, key)
    ) WITHOUT ROWID""",
    "CREATE INDEX idx_learned_age ON learned_facts(kind, updated_at)",
)


def _learned_facts_v7(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V7:
        conn.execute(statement)


_SCHEMA_V8 = (
    # The rollups' watermark (issue 16): every trace with id <= trace_id is counted in
    # ``rollups`` and ``fleet_rollups``. The writer merges the rollup sums of committed
    # traces once per ``rollup_interval_s``, moving the watermark in that same transaction,
    # and at open folds the traces above it (committed, not yet summed: a crash), so usage
    # and traces never disagree. One row.
    """CREATE TABLE rollup_watermark (
        one INTEGER PRIMARY KEY CHECK (one = 1),
        trace_id INTEGER NOT NULL
    )""",
)


def _rollup_watermark_v8(conn: sqlite3.Connection) -> None:
    """Add ``rollup_watermark`` at the newest trace: before v8 every trace's rollups were
    written in its own transaction."""
    for statement in _SCHEMA_V8:
        conn.execute(statement)
    conn.execute(
        "INSERT INTO rollup_watermark (one, trace_id) "
        "SELECT 1, COALESCE(MAX(id), 0) FROM request_traces"
    )


Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: tuple[Migration, ...] = (
    _create_schema_v1,
    _create_rollups_v2,
    _dense_hists_v3,
    _fleet_rollups_v4,
    _node_admissions_v5,
    _client_errors_v6,
    _learned_facts_v7,
    _rollup_watermark_v8,
)


def _migrate(conn: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Apply the missing steps, one transaction each; return the resulting user_version."""
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(migrations):
        raise RuntimeError(
            f"latency.db has schema version {version}, newer than this herd "
            f"({len(migrations)}); upgrade herd or use another --data-dir"
        )
    for number, step in enumerate(migrations[version:], start=version + 1):
        with _atomic(conn):
            step(conn)
            conn.execute(f"PRAGMA user_version = {number:d}")
    if version < len(migrations):  # one line for the whole upgrade, saying what it did
        log.info(
            "store.migrated: schema v%d -> v%d",
            version,
            len(migrations),
            extra={"schema_from": version, "schema_version": len(migrations)},
        )
    return max(version, len(migrations))


# ---------------------------------------------------------------------------------------
# Connections and transactions (sync, run on the store threads)
# ---------------------------------------------------------------------------------------


def _connect_writer(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode survives a process crash; only an OS crash can lose the last
    # commits, which for traces is the right trade against an fsync per batch.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def _connect_reader(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path.resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None, timeout=30.0
    )
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


@contextlib.contextmanager
def _atomic(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any exception (sqlite-utils' ``atomic``)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        # Roll back even on KeyboardInterrupt: half a batch must never be committed, and
        # the connection must be usable for the next batch.
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _db_bytes(conn: sqlite3.Connection) -> int:
    pages: int = conn.execute("PRAGMA page_count").fetchone()[0]
    size: int = conn.execute("PRAGMA page_size").fetchone()[0]
    return pages * size


# ---------------------------------------------------------------------------------------
# Writes
# ---------------------------------------------------------------------------------------

_INSERT_TRACE = f"INSERT INTO request_traces ({', '.join(TRACE_COLUMNS)}) VALUES "
_INSERT_TAG = "INSERT OR IGNORE INTO trace_tags (tag, timestamp, request_rowid) VALUES "
_MAX_PARAMS = 999  # SQLITE_MAX_VARIABLE_NUMBER before SQLite 3.32 (32766 since)
_INSERT_EVENT = "INSERT INTO events (timestamp, kind, node_id, detail) VALUES (?, ?, ?, ?)"


@dataclass(frozen=True, slots=True)
class _RollupTable:
    """A table of rollup rows (``rollups``, ``fleet_rollups``) and the SQL that merges into it."""

    name: str
    key: tuple[str, ...]
    select_hists: str  # the stored histograms of one key
    insert: str  # one new row: key, sums, first_ts, last_ts, histograms
    upsert: str  # the same, or add to the stored row (histograms: the caller merged them)

    @classmethod
    def of(cls, name: str, key: tuple[str, ...]) -> _RollupTable:
        insert = (
            f"INSERT INTO {name} ({', '.join((*key, *ROLLUP_SUMS))}, "
            "first_ts, last_ts, latency_hist, ttft_hist) "
            f"VALUES ({', '.join('?' * (len(key) + len(ROLLUP_SUMS) + 4))})"
        )
        return cls(
            name,
            key,
            select_hists=(
                f"SELECT latency_hist, ttft_hist FROM {name} WHERE "
                + " AND ".join(f"{c} = ?" for c in key)
            ),
            insert=insert,
            upsert=(
                f"{insert} ON CONFLICT ({', '.join(key)}) DO UPDATE SET "
                + "".join(f"{c} = {c} + excluded.{c}, " for c in ROLLUP_SUMS)
                + "first_ts = MIN(first_ts, excluded.first_ts), "
                "last_ts = MAX(last_ts, excluded.last_ts), "
                "latency_hist = excluded.latency_hist, ttft_hist = excluded.ttft_hist"
            ),
        )


_ROLLUPS = _RollupTable.of("rollups", _ROLLUP_KEY)
_FLEET = _RollupTable.of("fleet_rollups", _FLEET_KEY)


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)


def _dumps(value: object) -> str:
    return _ENCODER.encode(value)


def _clean_tags(tags: Iterable[object]) -> list[str]:
    """Stripped, non-empty, de-duplicated (first wins), bounded in count and length."""
    out: list[str] = []
    for tag in tags:
        if not isinstance(tag, str):
            continue
        tag = tag.strip()[:MAX_TAG_LEN]
        if tag and tag not in out:
            out.append(tag)
            if len(out) >= MAX_TAGS:
                break
    return out


def _trace_values(r: TraceRecord, tags: list[str]) -> tuple[object, ...]:
    """A ``request_traces`` row without its id (``TRACE_COLUMNS[1:]``)."""
    sb = r.scores_breakdown
    built = sb() if callable(sb) else sb
    breakdown = built if built is None or isinstance(built, str) else _dumps(built)
    return (
        str(r.request_id),
        float(r.timestamp),
        r.kind,
        r.endpoint,
        r.model,
        r.original_model,
        r.node_id,
        r.score,
        breakdown,
        r.status,
        int(r.http_status),
        r.error_message,
        float(r.latency_ms),
        r.time_to_first_token_ms,
        float(r.queue_ms),
        r.prompt_tokens,
        r.completion_tokens,
        r.load_ms,
        r.prompt_eval_ms,
        r.eval_ms,
        int(r.retry_count),
        int(bool(r.fallback_used)),
        _dumps(tags) if tags else "[]",
        r.client_ip,
    )


def _insert_many(
    conn: sqlite3.Connection, head: str, width: int, rows: Sequence[tuple[object, ...]]
) -> None:
    """``head`` + multi-row ``VALUES`` lists, as many rows per statement as the parameter
    limit allows.

    ``executemany`` steps SQLite once per row, and the sqlite3 module lets go of the GIL
    around every step and takes it back after; with the event loop busy on the other
    thread, every take-back is a handoff that can stall the loop. A 200-trace batch is
    6 statements instead of 200 steps, for the same rows.
    """
    per = max(1, _MAX_PARAMS // width)
    one = "(" + ",".join("?" * width) + ")"
    for start in range(0, len(rows), per):
        chunk = rows[start : start + per]
        conn.execute(head + ",".join([one] * len(chunk)), list(itertools.chain(*chunk)))


@dataclass(slots=True)
class _Prepared:
    """The Python half of writing a batch of traces, done before its transaction."""

    rows: list[tuple[object, ...]] = field(default_factory=list)  # without row ids
    tag_rows: list[tuple[str, float, int]] = field(default_factory=list)  # tag, ts, index
    hourly: dict[_RollupKey, _Agg] = field(default_factory=dict)
    fleet: dict[_FleetKey, _Agg] = field(default_factory=dict)  # per hour, all nodes x models


def _prepare(
    traces: Sequence[TraceRecord], pause: Callable[[], None] | None = None, every: int = 8,
    *, fleet: bool = True,
) -> _Prepared:
    """Row values (scores breakdown JSON included), tag rows and hourly rollup sums (the
    fleet-wide ones merged from the node x model sums: one merge per key, none per trace;
    ``fleet=False``: not yet, the writer folds the hourly sums of several batches first).

    This is the part of a write that holds the GIL (the SQL lets go of it), so the writer
    passes ``pause`` to give the event loop the GIL back every ``every`` traces: without
    it, a batch of a few hundred traces is a few milliseconds in which the loop waits.
    """
    p = _Prepared()
    for i, r in enumerate(traces):
        tags = _clean_tags(r.tags)
        p.rows.append(_trace_values(r, tags))
        ts = float(r.timestamp)
        p.tag_rows += [(tag, ts, i) for tag in tags]
        _fold_hourly(p.hourly, r, tags)
        if pause is not None and i % every == every - 1:
            pause()
    if fleet:
        p.fleet = _fleet_of(p.hourly, pause, every)
    return p


def _write_batch(
    conn: sqlite3.Connection,
    traces: Sequence[TraceRecord],
    events: Sequence[_Event],
    prepared: _Prepared | None = None,
    *,
    rollups: bool = True,
) -> int:
    """Insert traces (with their tags and, with ``rollups``, their rollups, the watermark
    moved past them) and events in one transaction; return the last trace's id (0: none).
    Without ``rollups`` the caller folds ``prepared.hourly`` into the rollups later
    (``_write_rollups``, with the watermark)."""
    p = prepared if prepared is not None else _prepare(traces)
    last_id = 0
    with _atomic(conn):
        if traces:
            # Explicit row ids, so trace_tags can reference them without a round trip per
            # row; safe because BEGIN IMMEDIATE makes this the only writer. Above the
            # watermark too: pruning may have deleted every trace below it.
            first_id: int = conn.execute(_NEXT_TRACE_ID).fetchone()[0]
            last_id = first_id + len(p.rows) - 1
            _insert_many(
                conn,
                _INSERT_TRACE,
                len(TRACE_COLUMNS),
                [(first_id + i, *row) for i, row in enumerate(p.rows)],
            )
            _insert_many(
                conn, _INSERT_TAG, 3, [(tag, ts, first_id + i) for tag, ts, i in p.tag_rows]
            )
            if rollups:
                _upsert_rollups(conn, p.hourly)
                _merge_rows(conn, _FLEET, p.fleet)
                conn.execute(_SET_WATERMARK, (last_id,))
        if events:
            conn.executemany(
                _INSERT_EVENT,
                [(e.timestamp, e.kind, e.node_id, _dumps(dict(e.detail))) for e in events],
            )
    return last_id


_NEXT_TRACE_ID = (
    "SELECT MAX(COALESCE((SELECT MAX(id) FROM request_traces), 0), "
    "COALESCE((SELECT trace_id FROM rollup_watermark), 0)) + 1"
)
_SET_WATERMARK = "UPDATE rollup_watermark SET trace_id = ?"


def _write_rollups(
    conn: sqlite3.Connection, hourly: dict[_RollupKey, _Agg], watermark: int,
    pause: Callable[[], None] | None = None,
) -> None:
    """Merge hourly sums (several batches' worth) into ``rollups`` and ``fleet_rollups``,
    and move the watermark to ``watermark`` (the last trace they count), in one
    transaction."""
    fleet = _fleet_of(hourly, pause)
    with _atomic(conn):
        _upsert_rollups(conn, hourly)
        _merge_rows(conn, _FLEET, fleet)
        conn.execute(_SET_WATERMARK, (watermark,))


def _catch_up_rollups(conn: sqlite3.Connection, chunk: int = 10000) -> int:
    """Fold the traces above the watermark (committed, their rollup sums lost with the
    process that wrote them) into the rollups, a chunk at a time, each with its watermark
    move; return how many traces that was."""
    row = conn.execute("SELECT trace_id FROM rollup_watermark").fetchone()
    after = int(row[0]) if row is not None else 0
    folded = 0
    while True:
        rows = conn.execute(
            "SELECT * FROM request_traces WHERE id > ? ORDER BY id LIMIT ?", (after, chunk)
        ).fetchall()
        if not rows:
            return folded
        hourly: dict[_RollupKey, _Agg] = {}
        for trace_row in rows:
            r = _record_from_row(trace_row)
            _fold_hourly(hourly, r, _clean_tags(r.tags))
        after = int(rows[-1]["id"])
        _write_rollups(conn, hourly, after)
        folded += len(rows)


def _add_to_rollups(
    conn: sqlite3.Connection, traces: Sequence[TraceRecord], tags: Sequence[list[str]]
) -> None:
    """Fold traces into their hourly and daily ``rollups`` rows (read-merge-upsert per key).
    Not ``fleet_rollups``: this is the v2 backfill, before that table exists (v4 fills it)."""
    hourly: dict[_RollupKey, _Agg] = {}
    for r, record_tags in zip(traces, tags, strict=True):
        _fold_hourly(hourly, r, record_tags)
    _upsert_rollups(conn, hourly)


def _fold_hourly(hourly: dict[_RollupKey, _Agg], r: TraceRecord, tags: list[str]) -> None:
    """Add one trace to its hourly keys: its node x model, and each of its tags."""
    bucket = _floor(r.timestamp, HOUR)
    key: _RollupKey = (HOUR, bucket, r.node_id, r.model, "")
    agg = hourly.get(key)
    if agg is None:
        agg = hourly[key] = _Agg()
    agg.add_trace(r)
    for tag in tags:
        _group(hourly, (HOUR, bucket, "", "", tag)).add_trace(r)


def _fleet_of(
    hourly: Mapping[_RollupKey, _Agg], pause: Callable[[], None] | None = None, every: int = 8
) -> dict[_FleetKey, _Agg]:
    """The fleet-wide sums of each bucket: its tag = '' (every request) rows merged.

    One merge per node x model key of the batch (~1.4 us per trace at 500-trace batches,
    less than adding each trace to one more key); ``pause`` every ``every`` merges, as in
    ``_prepare`` (a merge is ~15 us: two histograms of a few hundred bins).
    """
    fleet: dict[_FleetKey, _Agg] = {}
    merged = 0
    for (span, bucket, _node_id, _model, tag), agg in hourly.items():
        if not tag:
            _group(fleet, (span, bucket)).merge(agg)
            merged += 1
            if pause is not None and merged % every == 0:
                pause()
    return fleet


def _upsert_rollups(conn: sqlite3.Connection, hourly: dict[_RollupKey, _Agg]) -> None:
    """Merge hourly sums (and the daily ones made from them) into the stored rollup rows."""
    daily: dict[_RollupKey, _Agg] = {}
    for (_span, hour, node_id, model, tag), agg in hourly.items():
        _group(daily, (DAY, _floor(hour, DAY), node_id, model, tag)).merge(agg)
    _merge_rows(conn, _ROLLUPS, hourly)
    _merge_rows(conn, _ROLLUPS, daily)


def _rollup_params(key: tuple[object, ...], agg: _Agg) -> tuple[object, ...]:
    return (
        *key,
        *agg.sums,
        agg.first_ts,
        agg.last_ts,
        agg.latency_hist.to_json(),
        agg.ttft_hist.to_json(),
    )


def _merge_rows(
    conn: sqlite3.Connection, table: _RollupTable, aggs: Mapping[_TupleKey, _Agg]
) -> None:
    """Add ``aggs`` to the stored rows of ``table`` (counters in SQL, histograms here).
    Merges the stored histograms into ``aggs``' own."""
    params: list[tuple[object, ...]] = []
    for key, agg in aggs.items():
        existing = conn.execute(table.select_hists, key).fetchone()
        if existing is not None:
            agg.latency_hist.merge(_Hist.from_json(existing["latency_hist"]))
            agg.ttft_hist.merge(_Hist.from_json(existing["ttft_hist"]))
        params.append(_rollup_params(key, agg))
    conn.executemany(table.upsert, params)


def _prune(
    conn: sqlite3.Connection, *, now: float, retention_days: float, hourly_keep_days: float
) -> int:
    """Delete raw traces/tags/events past retention and expired rollups; return traces deleted.

    Traces go in chunks of PRUNE_CHUNK, one transaction each, so queued trace batches are
    never held up behind one huge DELETE.
    """
    cutoff = now - retention_days * DAY
    deleted = 0
    while True:
        with _atomic(conn):
            n = conn.execute(
                "DELETE FROM request_traces WHERE id IN "
                "(SELECT id FROM request_traces WHERE timestamp < ? LIMIT ?)",
                (cutoff, PRUNE_CHUNK),
            ).rowcount
        deleted += n
        if n < PRUNE_CHUNK:
            break
    with _atomic(conn):
        conn.execute("DELETE FROM trace_tags WHERE timestamp < ?", (cutoff,))
        conn.execute("DELETE FROM events WHERE timestamp < ?", (cutoff,))
        daily_keep = max(DAILY_KEEP_DAYS, retention_days)
        for table in (_ROLLUPS, _FLEET):
            for span, keep_days in ((HOUR, hourly_keep_days), (DAY, daily_keep)):
                # A bucket goes once its whole span is older than the horizon.
                conn.execute(
                    f"DELETE FROM {table.name} WHERE span = ? AND bucket < ?",
                    (span, now - keep_days * DAY - span),
                )
    return deleted


def _select_settings(conn: sqlite3.Connection) -> dict[str, object]:
    rows = conn.execute("SELECT key, value FROM settings ORDER BY key").fetchall()
    return {row["key"]: json.loads(row["value"]) for row in rows}


def _write_settings(
    conn: sqlite3.Connection, encoded: Mapping[str, str | None], now: float
) -> dict[str, object]:
    with _atomic(conn):
        for key, value in encoded.items():
            if value is None:
                conn.execute("DELETE FROM settings WHERE key = ?", (key,))
            else:
                conn.execute(
                    "INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
                    "updated_at = excluded.updated_at",
                    (key, value, now),
                )
    return _select_settings(conn)


def _select_admissions(conn: sqlite3.Connection) -> dict[str, dict[str, object]]:
    rows = conn.execute(
        "SELECT node_id, decision, addr, ollama_url, decided_at FROM node_admissions "
        "ORDER BY node_id"
    ).fetchall()
    return {row["node_id"]: dict(row) for row in rows}


def _write_admission(
    conn: sqlite3.Connection, node_id: str, decision: str, addr: str, url: str, now: float
) -> None:
    with _atomic(conn):
        conn.execute(
            "INSERT INTO node_admissions (node_id, decision, addr, ollama_url, decided_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET "
            "decision = excluded.decision, addr = excluded.addr, "
            "ollama_url = excluded.ollama_url, decided_at = excluded.decided_at",
            (node_id, decision, addr, url, now),
        )


@dataclass(frozen=True, slots=True)
class LearnedFact:
    """One learned fact (a row of ``learned_facts``). Written: ``value`` is a dataclass
    instance (stored as the JSON object of its fields) or a JSON-able value. Loaded:
    ``value`` is the decoded JSON; what it means is the router's business."""

    kind: str
    key: str
    node_id: str
    value: object
    updated_at: float


def _fact_json(value: object) -> str:
    if is_dataclass(value) and not isinstance(value, type):  # its fields, not a deep copy
        value = {f.name: getattr(value, f.name) for f in fields(value)}
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


LearnedLimits = Mapping[str, tuple[float, int]]  # kind -> (max age s, max rows)


def _bound_learned(conn: sqlite3.Connection, limits: LearnedLimits, now: float) -> int:
    """Per kind: delete rows not updated within its age, then the oldest beyond its count.
    Returns the rows deleted. Kinds without limits are left alone."""
    deleted = 0
    for kind, (max_age_s, max_rows) in limits.items():
        cur = conn.execute(
            "DELETE FROM learned_facts WHERE kind = ? AND updated_at < ?", (kind, now - max_age_s)
        )
        deleted += max(0, cur.rowcount)
        count = conn.execute("SELECT count(*) FROM learned_facts WHERE kind = ?", (kind,))
        over = int(count.fetchone()[0]) - max(0, max_rows)
        if over > 0:
            conn.execute(
                "DELETE FROM learned_facts WHERE kind = ? AND key IN (SELECT key FROM "
                "learned_facts WHERE kind = ? ORDER BY updated_at LIMIT ?)",
                (kind, kind, over),
            )
            deleted += over
    return deleted


def _write_learned(
    conn: sqlite3.Connection,
    facts: Sequence[LearnedFact],
    gone: Sequence[tuple[str, str]],
    limits: LearnedLimits,
    now: float,
) -> None:
    """Upsert ``facts``, delete ``gone`` (kind, key), bound each kind; one transaction."""
    rows: list[tuple[str, str, str, str, float]] = []
    for i, f in enumerate(facts):  # serialised here, on the writer thread, not on the loop
        try:
            rows.append((f.kind, f.key, f.node_id, _fact_json(f.value), f.updated_at))
        except (TypeError, ValueError) as exc:  # NaN, or something JSON cannot hold
            log.warning("store.learned_fact_unwritable: %s %s: %s", f.kind, f.key, exc)
        if i % 64 == 63:
            _yield_gil()  # thousands of facts: let the event loop have the GIL meanwhile
    with _atomic(conn):
        conn.executemany(
            "INSERT INTO learned_facts (kind, key, node_id, value, updated_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (kind, key) DO UPDATE SET "
            "node_id = excluded.node_id, value = excluded.value, "
            "updated_at = excluded.updated_at",
            rows,
        )
        conn.executemany("DELETE FROM learned_facts WHERE kind = ? AND key = ?", gone)
        _bound_learned(conn, limits, now)


def _load_learned(
    conn: sqlite3.Connection, limits: LearnedLimits, now: float
) -> list[LearnedFact]:
    """Bound each kind (old rows go), return the rest oldest first; a row whose value is
    not JSON is skipped with a log line and deleted."""
    out: list[LearnedFact] = []
    broken: list[tuple[str, str]] = []
    with _atomic(conn):
        dropped = _bound_learned(conn, limits, now)
        for row in conn.execute(
            "SELECT kind, key, node_id, value, updated_at FROM learned_facts ORDER BY updated_at"
        ):
            try:
                value = json.loads(row["value"])
            except (TypeError, ValueError) as exc:
                log.warning(
                    "store.learned_fact_skipped: %s %r is not JSON (%s)",
                    row["kind"],
                    row["key"],
                    exc,
                )
                broken.append((row["kind"], row["key"]))
                continue
            updated = float(row["updated_at"])
            out.append(LearnedFact(row["kind"], row["key"], row["node_id"], value, updated))
        conn.executemany("DELETE FROM learned_facts WHERE kind = ? AND key = ?", broken)
    if dropped:
        log.info(
            "store.learned_aged_out: %d learned facts past their age or count limit dropped",
            dropped,
            extra={"rows": dropped},
        )
    return out


BENCHMARK_FIELDS = frozenset(
    {
        "status",
        "progress",
        "started_at",
        "finished_at",
        "duration_s",
        "requests",
        "failures",
        "rps",
        "tokens_per_s",
        "latency_p50_ms",
        "latency_p95_ms",
        "latency_p99_ms",
        "ttft_p50_ms",
        "ttft_p95_ms",
        "ttft_p99_ms",
        "results",
        "error",
        "updated_at",
    }
)


def _insert_benchmark(conn: sqlite3.Connection, params: str, now: float) -> int:
    with _atomic(conn):
        cur = conn.execute(
            "INSERT INTO benchmark_runs (created_at, updated_at, params) VALUES (?, ?, ?)",
            (now, now, params),
        )
    assert cur.lastrowid is not None
    return cur.lastrowid


def _update_benchmark(
    conn: sqlite3.Connection, run_id: int, values: Mapping[str, object]
) -> dict[str, object]:
    assignments = ", ".join(f"{name} = ?" for name in values)  # names checked by the caller
    with _atomic(conn):
        cur = conn.execute(
            f"UPDATE benchmark_runs SET {assignments} WHERE run_id = ?",
            (*values.values(), run_id),
        )
        if cur.rowcount == 0:
            raise KeyError(f"no benchmark run {run_id}")
    found = _select_benchmarks(conn, run_id=run_id)
    return found[0]


# ---------------------------------------------------------------------------------------
# Reads
# ---------------------------------------------------------------------------------------


def _trace_dict(row: sqlite3.Row) -> dict[str, object]:
    out: dict[str, object] = {name: row[name] for name in TRACE_COLUMNS}
    out["scores_breakdown"] = (
        None if row["scores_breakdown"] is None else json.loads(row["scores_breakdown"])
    )
    out["tags"] = json.loads(row["tags"])
    out["fallback_used"] = bool(row["fallback_used"])
    return out


def _record_from_row(row: sqlite3.Row) -> TraceRecord:
    d = _trace_dict(row)
    del d["id"]
    return TraceRecord(**d)  # type: ignore[arg-type]  # columns mirror the fields 1:1


def _select_traces(
    conn: sqlite3.Connection,
    limit: int,
    *,
    status: str | None,
    model: str | None,
    node_id: str | None,
    tag: str | None,
    since: float | None,
) -> list[dict[str, object]]:
    clauses: list[str] = []
    params: list[object] = []
    source, ts = "request_traces t", "t.timestamp"
    if tag is not None:
        # trace_tags' key (tag, timestamp) serves both the filter and the ordering.
        source = "trace_tags g JOIN request_traces t ON t.id = g.request_rowid"
        ts = "g.timestamp"
        clauses.append("g.tag = ?")
        params.append(tag)
    for column, value in (("status", status), ("model", model), ("node_id", node_id)):
        if value is not None:
            clauses.append(f"t.{column} = ?")
            params.append(value)
    if since is not None:
        clauses.append(f"{ts} >= ?")
        params.append(since)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = conn.execute(
        f"SELECT t.* FROM {source} {where} ORDER BY {ts} DESC, t.id DESC LIMIT ?",
        (*params, max(0, min(limit, TRACE_LIMIT_MAX))),
    ).fetchall()
    return [_trace_dict(row) for row in rows]


def _select_events(
    conn: sqlite3.Connection,
    limit: int,
    *,
    kind: str | None,
    node_id: str | None,
    since: float | None,
) -> list[dict[str, object]]:
    clauses: list[str] = []
    params: list[object] = []
    for clause, value in (("kind = ?", kind), ("node_id = ?", node_id), ("timestamp >= ?", since)):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = conn.execute(
        f"SELECT * FROM events {where} ORDER BY timestamp DESC, id DESC LIMIT ?",
        (*params, max(0, min(limit, TRACE_LIMIT_MAX))),
    ).fetchall()
    return [
        {
            "id": row["id"],
            "timestamp": row["timestamp"],
            "kind": row["kind"],
            "node_id": row["node_id"],
            "detail": json.loads(row["detail"]),
        }
        for row in rows
    ]


def _select_benchmarks(
    conn: sqlite3.Connection, *, limit: int = 1, run_id: int | None = None
) -> list[dict[str, object]]:
    if run_id is None:
        rows = conn.execute(
            "SELECT * FROM benchmark_runs ORDER BY run_id DESC LIMIT ?", (limit,)
        ).fetchall()
    else:
        rows = conn.execute("SELECT * FROM benchmark_runs WHERE run_id = ?", (run_id,)).fetchall()
    out = []
    for row in rows:
        d: dict[str, object] = dict(zip(row.keys(), tuple(row), strict=True))
        d["params"] = json.loads(row["params"])
        d["results"] = None if row["results"] is None else json.loads(row["results"])
        out.append(d)
    return out


_SUMS_SELECT = (
    ", ".join(f"SUM({c}) AS {c}" for c in ROLLUP_SUMS)
    + ", MIN(first_ts) AS first_ts, MAX(last_ts) AS last_ts"
)


def _aggregate(
    conn: sqlite3.Connection,
    span: int,
    first: int,
    last: int,
    *,
    tagged: bool,
    by: Sequence[str],
) -> dict[_Key, _Agg]:
    """Sum the ``rollups`` rows of a window (tag rows or node x model rows), grouped by
    ``by`` columns, histograms included."""
    where = f"span = ? AND bucket BETWEEN ? AND ? AND tag {'!=' if tagged else '='} ''"
    return _aggregate_rows(conn, _ROLLUPS, where, (span, first, last), by)


def _aggregate_rows(
    conn: sqlite3.Connection,
    table: _RollupTable,
    where: str,
    params: tuple[object, ...],
    by: Sequence[str],
) -> dict[_Key, _Agg]:
    """Sum the rows of ``table`` matching ``where``, grouped by ``by`` columns.

    Counters are summed in SQLite; histograms are parsed once per rollup row and merged
    into their group as dense arrays (json_each in SQL is ~5x slower).
    """
    cols = "".join(f"{c}, " for c in by)
    group = f"GROUP BY {', '.join(by)}" if by else ""
    out: dict[_Key, _Agg] = {}
    for row in conn.execute(
        f"SELECT {cols}{_SUMS_SELECT} FROM {table.name} WHERE {where} {group}", params
    ):
        if row["first_ts"] is not None:  # no GROUP BY + no rows = one row of NULLs
            out[tuple(row[c] for c in by)] = _Agg.from_sums(row)
    rows = conn.execute(
        f"SELECT {cols}latency_hist, ttft_hist FROM {table.name} WHERE {where}", params
    )
    width = len(by)
    for row in rows:
        agg = out.get(tuple(row[:width]))
        if agg is not None:
            latency, ttft = _Hist.from_json(row[width]), _Hist.from_json(row[width + 1])
            agg.merge_hists(latency, ttft, adopt=True)
    return out


def _window(now: float, days: float, hourly_keep_days: float) -> tuple[int, int, int]:
    """(span, first bucket, last bucket) covering the last ``days`` up to ``now``.

    Up to SLIDING_MAX_DAYS: hour-grained, a window sliding to the hour. Longer: whole UTC
    days ending with today, read from daily rollups (24x fewer rows to merge).
    """
    if days <= min(SLIDING_MAX_DAYS, hourly_keep_days - 1):
        last = _floor(now, HOUR)
        return HOUR, last - (max(1, math.ceil(days * 24)) - 1) * HOUR, last
    last = _floor(now, DAY)
    return DAY, last - (max(1, math.ceil(days)) - 1) * DAY, last


def _by_requests(items: Iterable[dict[str, object]]) -> list[dict[str, object]]:
    return sorted(items, key=lambda d: (-_num(d["requests"]), -_num(d["attempts"])))


def _group(groups: dict[K, _Agg], key: K) -> _Agg:
    agg = groups.get(key)
    if agg is None:
        agg = groups[key] = _Agg()
    return agg


def _select_usage(conn: sqlite3.Connection, days: float, now: float) -> dict[str, object]:
    days = max(1, math.ceil(days))  # whole UTC days; a float from a query string is fine
    last = _floor(now, DAY)
    first = last - (days - 1) * DAY
    # One SQL pass for the finest grouping; the coarser ones are merged from its cells.
    cells = _aggregate(conn, DAY, first, last, tagged=False, by=("bucket", "node_id", "model"))
    # Histogram merges are the cost, so each coarser group merges from the fewest parts:
    # cells -> days -> total and cells -> node x model -> nodes, models. Counts are ints,
    # so the grouping order cannot change them; the float sums are still added cell by
    # cell in the original order, so every value is the same as merging each cell directly.
    total = _Agg()
    by_day: dict[object, _Agg] = {}
    by_node: dict[object, _Agg] = {}
    by_model: dict[object, _Agg] = {}
    by_node_model: dict[tuple[object, object], _Agg] = {}
    for (bucket, node_id, model), agg in cells.items():
        total.merge(agg, hists=False)
        _group(by_day, bucket).merge(agg)
        _group(by_node, node_id).merge(agg, hists=False)
        _group(by_model, model).merge(agg, hists=False)
        _group(by_node_model, (node_id, model)).merge_hists(agg.latency_hist, agg.ttft_hist)
    for agg in by_day.values():
        total.merge_hists(agg.latency_hist, agg.ttft_hist)
    for (node_id, model), agg in by_node_model.items():
        by_node[node_id].merge_hists(agg.latency_hist, agg.ttft_hist)
        by_model[model].merge_hists(agg.latency_hist, agg.ttft_hist, adopt=True)
    return {
        "days": days,
        "from": first,
        "to": now,
        "totals": _metrics(total),
        "by_day": [
            {"day": _day_name(b), "bucket": b, **_metrics(by_day.get(b, _Agg()))}
            for b in range(first, last + 1, DAY)
        ],
        "by_node": _by_requests({"node_id": k, **_metrics(a)} for k, a in by_node.items()),
        "by_model": _by_requests({"model": k, **_metrics(a)} for k, a in by_model.items()),
        "rows": [
            {"day": _day_name(_num(b)), "bucket": b, "node_id": n, "model": m, **_metrics(a)}
            for (b, n, m), a in sorted(cells.items(), key=lambda kv: str(kv[0]))
        ],
    }


def _select_models(
    conn: sqlite3.Connection, days: float, now: float, hourly_keep_days: float
) -> list[dict[str, object]]:
    span, first, last = _window(now, days, hourly_keep_days)
    nodes: dict[str, list[str]] = {}
    for row in conn.execute(
        "SELECT DISTINCT model, node_id FROM rollups WHERE span = ? AND bucket BETWEEN ? AND ? "
        "AND tag = '' AND node_id != '' ORDER BY node_id",
        (span, first, last),
    ):
        nodes.setdefault(row["model"], []).append(row["node_id"])
    groups = _aggregate(conn, span, first, last, tagged=False, by=("model",))
    return _by_requests(
        {"model": m, "nodes": nodes.get(str(m), []), **_metrics(a)} for (m,), a in groups.items()
    )


def _select_apps(
    conn: sqlite3.Connection, days: float, now: float, hourly_keep_days: float
) -> list[dict[str, object]]:
    span, first, last = _window(now, days, hourly_keep_days)
    groups = _aggregate(conn, span, first, last, tagged=True, by=("tag",))
    return _by_requests({"tag": t, **_metrics(a)} for (t,), a in groups.items())


def _select_trends(
    conn: sqlite3.Connection, hours: float, now: float, hourly_keep_days: float
) -> list[dict[str, object]]:
    hours = max(1, min(math.ceil(hours), math.ceil(hourly_keep_days * 24)))
    last = _floor(now, HOUR)
    first = last - (hours - 1) * HOUR
    # One fleet-wide row per hour (the sum of that hour's node x model rows).
    groups = _aggregate_rows(
        conn, _FLEET, "span = ? AND bucket BETWEEN ? AND ?", (HOUR, first, last), ("bucket",)
    )
    return [
        {"hour": b, "time": _iso(b), **_metrics(groups.get((b,), _Agg()))}
        for b in range(first, last + 1, HOUR)
    ]


def _select_node_model_stats(
    conn: sqlite3.Connection, days: float, now: float, hourly_keep_days: float
) -> list[dict[str, object]]:
    span, first, last = _window(now, days, hourly_keep_days)
    groups = _aggregate(conn, span, first, last, tagged=False, by=("node_id", "model"))
    out = []
    for (node_id, model), a in sorted(groups.items(), key=lambda kv: str(kv[0])):
        if not node_id:
            continue  # rejected requests: no node to blame
        errors = a.count("failed") + a.count("retried") + a.count("incomplete") + a.count("reaped")
        attempts = a.attempts()
        out.append(
            {
                "node_id": node_id,
                "model": model,
                "errors": int(errors),
                "attempt_error_rate": _r(errors / attempts) if attempts else 0.0,
                **_metrics(a),
            }
        )
    return out


# ---------------------------------------------------------------------------------------
# Aggregation arithmetic
# ---------------------------------------------------------------------------------------


def _floor(ts: float, span: int) -> int:
    return int(ts // span) * span


def _num(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _r(x: float) -> float:
    return round(x, 3)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _day_name(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).date().isoformat()


def _bin(value: float) -> int:
    """Histogram bin of a non-negative duration: log scale with ratio HIST_GAMMA on value+1."""
    return round(math.log1p(max(value, 0.0)) / _LOG_GAMMA)


def _bin_value(b: int) -> float:
    return math.expm1(b * _LOG_GAMMA)


class _Hist:
    """A log-bucket histogram as a dense run of counts: ``counts[i]`` is bin ``lo + i``.

    Dense so that merging is one C-level elementwise add over a slice and percentiles are
    one cumulative pass plus a bisection per rank, instead of a Python loop per bin (a
    7-day usage query merges a few thousand of these).

    Stored in rollups as JSON, in whichever of two forms is smaller: dense
    ``[lo, count_lo, count_lo+1, ...]`` (parsed by ``json.loads`` alone, no per-bin Python
    work; the usual form) or sparse ``{"bin": count}`` (a few samples spread over a wide
    range, which dense would pad with zeros; also the pre-v3 form).
    """

    __slots__ = ("counts", "lo")

    def __init__(self, lo: int = 0, counts: list[int] | None = None) -> None:
        self.lo = lo
        self.counts: list[int] = [] if counts is None else counts

    @classmethod
    def from_json(cls, text: str) -> _Hist:
        stored: list[int] | dict[str, int] = json.loads(text)
        if isinstance(stored, list):
            return cls(stored[0], stored[1:]) if stored else cls()
        if not stored:
            return cls()
        bins = list(map(int, stored))
        lo = min(bins)
        counts = [0] * (max(bins) - lo + 1)
        for b, n in zip(bins, stored.values(), strict=True):
            counts[b - lo] += n
        return cls(lo, counts)

    def to_json(self) -> str:
        counts = self.counts
        nonzero = len(counts) - counts.count(0)
        if nonzero == 0:
            return "{}"
        # Leading/trailing zero bins are never stored (a merge may leave none, but be safe).
        start = next(i for i, n in enumerate(counts) if n)
        end = len(counts) - next(i for i, n in enumerate(reversed(counts)) if n)
        # ~2.5 bytes per dense bin against ~9 per sparse entry.
        if end - start <= 4 * nonzero + 16:
            return _dumps([self.lo + start, *counts[start:end]])
        lo = self.lo
        return _dumps({str(lo + i): n for i, n in enumerate(counts) if n})

    def __bool__(self) -> bool:
        return bool(self.counts)

    def _span(self, lo: int, hi: int) -> int:
        """Grow to cover bins lo..hi (inclusive); return the offset of ``lo``."""
        counts = self.counts
        if not counts:
            self.lo = lo
            counts.extend([0] * (hi - lo + 1))
            return 0
        if lo < self.lo:
            counts[:0] = [0] * (self.lo - lo)
            self.lo = lo
        end = hi - self.lo + 1
        if end > len(counts):
            counts.extend([0] * (end - len(counts)))
        return lo - self.lo

    def add(self, b: int, n: int = 1) -> None:
        counts = self.counts
        i = b - self.lo
        if 0 <= i < len(counts):  # the usual case: a bin the histogram already spans
            counts[i] += n
        else:
            counts[self._span(b, b)] += n

    def merge(self, other: _Hist) -> None:
        theirs = other.counts
        if not theirs:
            return
        if not self.counts:
            self.lo, self.counts = other.lo, theirs.copy()
            return
        start = self._span(other.lo, other.lo + len(theirs) - 1)
        end = start + len(theirs)
        counts = self.counts
        counts[start:end] = map(operator.add, counts[start:end], theirs)

    def quantiles(self, qs: Sequence[float]) -> list[float | None]:
        """Nearest-rank quantiles, each as the representative value of its bin."""
        cumulative = list(itertools.accumulate(self.counts))
        total = cumulative[-1] if cumulative else 0
        if total == 0:
            return [None] * len(qs)
        lo = self.lo
        return [
            _r(_bin_value(lo + bisect.bisect_left(cumulative, max(1, math.ceil(q * total)))))
            for q in qs
        ]


def _quantile(hist: _Hist, q: float) -> float | None:
    return hist.quantiles((q,))[0]


_FAILED = _I["failed"]
_PROMPT, _COMPLETION = _I["prompt_tokens"], _I["completion_tokens"]
_EVAL_TOKENS, _EVAL_MS = _I["eval_tokens"], _I["eval_ms"]
_LATENCY_SUM, _LATENCY_N = _I["latency_sum"], _I["latency_n"]
_TTFT_SUM, _TTFT_N = _I["ttft_sum"], _I["ttft_n"]
_LOAD_SUM, _LOAD_N, _COLD = _I["load_ms_sum"], _I["load_n"], _I["cold_loads"]
_QUEUE, _FALLBACKS = _I["queue_ms_sum"], _I["fallbacks"]


class _Agg:
    """Additive summary of traces: the in-memory twin of one rollup row."""

    __slots__ = ("first_ts", "last_ts", "latency_hist", "sums", "ttft_hist")

    def __init__(self) -> None:
        self.sums = [0.0] * len(ROLLUP_SUMS)
        self.first_ts = math.inf
        self.last_ts = -math.inf
        self.latency_hist = _Hist()
        self.ttft_hist = _Hist()

    @classmethod
    def from_sums(cls, row: sqlite3.Row) -> _Agg:
        agg = cls()
        agg.sums = [float(row[c] or 0) for c in ROLLUP_SUMS]
        agg.first_ts, agg.last_ts = row["first_ts"], row["last_ts"]
        return agg

    def add_trace(self, r: TraceRecord) -> None:
        """Add what one trace contributes, in place: each sum it feeds (the others would
        add 0), and its latency and TTFT to the histograms (served requests only: failures
        would skew them both ways)."""
        v = self.sums
        v[_STATUS_INDEX.get(r.status, _FAILED)] += 1
        if r.prompt_tokens is not None:
            v[_PROMPT] += int(r.prompt_tokens)
        if r.completion_tokens is not None:
            v[_COMPLETION] += int(r.completion_tokens)
            if r.eval_ms is not None and r.eval_ms > 0:
                v[_EVAL_TOKENS] += int(r.completion_tokens)
                v[_EVAL_MS] += float(r.eval_ms)
        if r.status == "completed":
            latency = float(r.latency_ms)
            v[_LATENCY_SUM] += latency
            v[_LATENCY_N] += 1
            self.latency_hist.add(_bin(latency))
            if r.time_to_first_token_ms is not None:
                ttft = float(r.time_to_first_token_ms)
                v[_TTFT_SUM] += ttft
                v[_TTFT_N] += 1
                self.ttft_hist.add(_bin(ttft))
        if r.load_ms is not None:
            load = float(r.load_ms)
            v[_LOAD_SUM] += load
            v[_LOAD_N] += 1
            v[_COLD] += load >= COLD_LOAD_MS
        v[_QUEUE] += float(r.queue_ms)
        v[_FALLBACKS] += bool(r.fallback_used)
        ts = float(r.timestamp)
        if ts < self.first_ts:
            self.first_ts = ts
        if ts > self.last_ts:
            self.last_ts = ts

    def merge(self, other: _Agg, *, hists: bool = True) -> None:
        self.sums = list(map(operator.add, self.sums, other.sums))
        if hists:
            self.latency_hist.merge(other.latency_hist)
            self.ttft_hist.merge(other.ttft_hist)
        self.first_ts = min(self.first_ts, other.first_ts)
        self.last_ts = max(self.last_ts, other.last_ts)

    def merge_hists(self, latency: _Hist, ttft: _Hist, *, adopt: bool = False) -> None:
        """Merge in two histograms; ``adopt``: the caller hands them over (nothing else will
        read or change them), so an empty side takes them as they are instead of a copy."""
        if adopt and not self.latency_hist:
            self.latency_hist = latency
        else:
            self.latency_hist.merge(latency)
        if adopt and not self.ttft_hist:
            self.ttft_hist = ttft
        else:
            self.ttft_hist.merge(ttft)

    def count(self, name: str) -> float:
        return self.sums[_I[name]]

    def attempts(self) -> float:
        return sum(self.sums[i] for i in _STATUS_INDEX.values())


def _ratio(num: float, den: float, scale: float = 1.0) -> float | None:
    return _r(num * scale / den) if den else None


def _metrics(a: _Agg) -> dict[str, object]:
    """The metric block every analytics row carries (see Store's docstring)."""
    c = a.count
    attempts = a.attempts()
    requests = attempts - c("retried")
    failures = c("failed") + c("incomplete") + c("reaped") + c("rejected")
    latency_p50, latency_p95, latency_p99 = a.latency_hist.quantiles((0.50, 0.95, 0.99))
    ttft_p50, ttft_p95 = a.ttft_hist.quantiles((0.50, 0.95))
    return {
        "requests": int(requests),
        "attempts": int(attempts),
        "completed": int(c("completed")),
        "failures": int(failures),
        "retried": int(c("retried")),
        "client_disconnected": int(c("disconnected")),
        "client_errors": int(c("client_errors")),
        "error_rate": _ratio(failures, requests) or 0.0,
        "prompt_tokens": int(c("prompt_tokens")),
        "completion_tokens": int(c("completion_tokens")),
        "latency_avg_ms": _ratio(c("latency_sum"), c("latency_n")),
        "latency_p50_ms": latency_p50,
        "latency_p95_ms": latency_p95,
        "latency_p99_ms": latency_p99,
        "ttft_avg_ms": _ratio(c("ttft_sum"), c("ttft_n")),
        "ttft_p50_ms": ttft_p50,
        "ttft_p95_ms": ttft_p95,
        "tokens_per_s": _ratio(c("eval_tokens"), c("eval_ms"), 1000.0),
        "queue_ms_avg": _ratio(c("queue_ms_sum"), attempts),
        "load_ms_avg": _ratio(c("load_ms_sum"), c("load_n")),
        "cold_loads": int(c("cold_loads")),
        "fallbacks": int(c("fallbacks")),
        "first_used": a.first_ts if attempts else None,
        "last_used": a.last_ts if attempts else None,
    }


# ---------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------


def _lower_thread_priority(by: int) -> None:
    """Make the calling thread ``by`` steps nicer, Linux only (where a thread has a nice
    value of its own; elsewhere ``setpriority`` would renice a whole process).

    The writer's work can always wait a little; the event loop's cannot. When the cores
    are busy, the kernel then gives the loop thread the CPU first.
    """
    if by <= 0 or sys.platform != "linux":
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except OSError as exc:
        log.info("store.writer_priority_unchanged", extra={"error": str(exc)})


def _yield_gil() -> None:
    """A short sleep on the writer thread: the event loop takes the GIL at once, instead
    of after the interpreter's 5 ms switch interval."""
    time.sleep(0.0002)


class Store:
    """``latency.db`` behind an async API: one writer thread, one reader thread.

    Analytics rows (``usage``, ``models``, ``apps``, ``trends``, ``node_model_stats``) all
    carry the same metric block (``_metrics``): ``requests`` (client requests = attempts
    that were not retried), ``attempts``, ``completed``, ``failures`` (failed, incomplete,
    reaped, rejected), ``retried``, ``client_disconnected``, ``client_errors`` (4xx the
    request caused: neither failures nor errors), ``error_rate`` (failures / requests),
    token sums, ``latency_{avg,p50,p95,p99}_ms`` and ``ttft_{avg,p50,p95}_ms``
    over completed requests (percentiles from log histograms, within ~1 %),
    ``tokens_per_s`` (completion tokens / Ollama eval time), ``queue_ms_avg``,
    ``load_ms_avg``, ``cold_loads``, ``fallbacks``, ``first_used``/``last_used``.
    Buckets are UTC hours and days.
    """

    __slots__ = (
        "_batches_written",
        "_closed",
        "_db_bytes",
        "_drop_logged",
        "_dropped",
        "_events_written",
        "_given",
        "_hand_over_timer",
        "_last_prune_at",
        "_loop",
        "_loop_thread",
        "_pending",
        "_pruned_total",
        "_queue",
        "_reader",
        "_reader_conn",
        "_records_written",
        "_rollups",
        "_rollups_due",
        "_rollups_id",
        "_rollups_lost",
        "_settings",
        "_state",
        "_taken",
        "_write_errors",
        "_writer",
        "_writer_cpu_s",
        "batch_max",
        "data_dir",
        "db_path",
        "flush_interval_s",
        "hourly_keep_days",
        "max_queue",
        "prune_interval_s",
        "retention_days",
        "rollup_interval_s",
        "writer_nice",
    )

    def __init__(
        self,
        data_dir: Path,
        *,
        retention_days: float = 30.0,
        batch_max: int = 500,
        flush_interval_s: float = 0.25,
        prune_interval_s: float | None = 3600.0,
        max_queue: int = MAX_QUEUE,
        writer_nice: int = 10,
        rollup_interval_s: float = 2.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.db_path = self.data_dir / DB_FILENAME
        self.retention_days = retention_days
        self.hourly_keep_days = max(float(HOURLY_KEEP_DAYS), retention_days)
        self.batch_max = max(1, batch_max)
        self.flush_interval_s = flush_interval_s
        self.prune_interval_s = prune_interval_s
        self.max_queue = max_queue
        self.writer_nice = writer_nice
        # The usage rollups of committed traces, summed on the writer thread over up to
        # rollup_interval_s (0: with each batch, in its transaction) and then merged into
        # the stored rows at once, and before any task (flush, a write, shutdown) or prune
        # runs: a rollup merge reads, merges and rewrites two histograms per key, so it is
        # the costly part of a batch, and at a few requests per batch it was most of it.
        # Crash-safe: the merge moves the watermark (``rollup_watermark``) to the last trace
        # it counts, in its transaction, and open folds the traces above it first. Until
        # the merge, reads of rollups (usage, models, apps, trends, ...) lag the traces by up
        # to rollup_interval_s; ``flush()`` merges.
        self.rollup_interval_s = rollup_interval_s
        self._rollups: dict[_RollupKey, _Agg] = {}  # writer thread only
        self._rollups_id = 0  # the last trace id _rollups counts (writer thread only)
        self._rollups_lost = False  # a merge failed: fold from the traces (writer only)
        self._rollups_due = math.inf  # writer clock (monotonic) of the next merge
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        # Records made on the event loop wait in _pending for up to flush_interval_s and
        # then cross to the writer as one _Batch. _given (loop side) and _taken (writer
        # side) count records each way, each written by one thread only.
        self._pending: list[TraceRecord | _Event] = []
        self._hand_over_timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._given = 0
        self._taken = 0
        self._state = _State.NEW
        self._writer: threading.Thread | None = None
        self._closed: concurrent.futures.Future[None] | None = None
        self._reader: concurrent.futures.ThreadPoolExecutor | None = None
        self._reader_conn: sqlite3.Connection | None = None
        self._settings: dict[str, object] = {}
        self._dropped = 0
        self._drop_logged = False
        self._batches_written = 0
        self._records_written = 0
        self._events_written = 0
        self._write_errors = 0
        self._writer_cpu_s = 0.0
        self._db_bytes = 0
        self._last_prune_at: float | None = None
        self._pruned_total = 0

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the data dir and database, migrate, start both threads, load settings."""
        if self._state is not _State.NEW:
            raise RuntimeError(f"store is {self._state.value}, cannot open")
        ready: concurrent.futures.Future[dict[str, object]] = concurrent.futures.Future()
        self._writer = threading.Thread(
            target=self._writer_main, args=(ready,), name="herd-store-writer", daemon=True
        )
        self._writer.start()
        self._settings = await asyncio.wrap_future(ready)
        self._reader = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="herd-store-reader"
        )
        loop = asyncio.get_running_loop()
        self._reader_conn = await loop.run_in_executor(self._reader, _connect_reader, self.db_path)
        self._loop, self._loop_thread = loop, threading.get_ident()
        self._state = _State.OPEN

    async def close(self) -> None:
        """Commit everything queued, stop both threads. Safe to call twice."""
        if self._state is _State.NEW:
            self._state = _State.CLOSED
        if self._closed is not None:
            await asyncio.wrap_future(self._closed)
            return
        if self._state is _State.CLOSED:
            return
        self._hand_over()
        self._state = _State.CLOSED  # from here on record_* drop
        self._closed = concurrent.futures.Future()
        self._queue.put(_Shutdown(self._closed))
        await asyncio.wrap_future(self._closed)
        if self._reader is not None and self._reader_conn is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._reader, self._reader_conn.close)
            self._reader.shutdown(wait=False)
        if self._dropped:
            log.warning("store.dropped_total", extra={"dropped": self._dropped})

    # -- non-blocking writes --------------------------------------------------------------

    def record_trace(self, rec: TraceRecord, *, owned: bool = False) -> None:
        """Queue one trace for the writer; never blocks or raises (drops when full).

        ``owned``: the caller hands the record over (it made it for this call and will not
        change it or its tags again), so it is queued as it is instead of copied."""
        try:
            if self._state is _State.CLOSED or self._given - self._taken >= self.max_queue:
                self._note_drop()
                return
            if owned:
                self._enqueue(rec)
                return
            # A copy (attrgetter + constructor: ~5x cheaper than copy.copy), so the router
            # may keep mutating its record for the next attempt.
            item = TraceRecord(*_snapshot(rec))
            item.tags = list(rec.tags)
            self._enqueue(item)
        except Exception:
            log.exception("store.record_failed")

    def record_event(
        self,
        kind: str,
        node_id: str,
        detail: Mapping[str, object],
        *,
        timestamp: float | None = None,
    ) -> None:
        """Queue a fleet event (node online/offline, breaker opened, ...); never raises."""
        try:
            if self._state is _State.CLOSED or self._given - self._taken >= self.max_queue:
                self._note_drop()
                return
            ts = time.time() if timestamp is None else timestamp
            self._enqueue(_Event(ts, kind, node_id, dict(detail)))
        except Exception:
            log.exception("store.record_failed")

    def _enqueue(self, item: TraceRecord | _Event) -> None:
        """On the store's event loop, gather into the pending batch (handed over after
        ``flush_interval_s`` or at ``batch_max``); from any other thread, queue directly."""
        self._given += 1
        if self._loop is None or threading.get_ident() != self._loop_thread:
            self._queue.put_nowait(item)
            return
        self._pending.append(item)
        if len(self._pending) >= self.batch_max:
            self._hand_over()
        elif self._hand_over_timer is None:
            self._hand_over_timer = self._loop.call_later(self.flush_interval_s, self._hand_over)

    def _hand_over(self) -> None:
        """Give the pending batch to the writer (on the loop thread, or before shutdown)."""
        if self._hand_over_timer is not None:
            self._hand_over_timer.cancel()
            self._hand_over_timer = None
        if self._pending:
            batch, self._pending = self._pending, []
            self._queue.put_nowait(_Batch(batch))

    def _note_drop(self) -> None:
        self._dropped += 1
        if not self._drop_logged:
            self._drop_logged = True
            log.warning(
                "store.dropping",
                extra={"queue_depth": self._given - self._taken,
                       "closed": self._state is _State.CLOSED},
            )

    async def flush(self) -> None:
        """Return once everything queued before this call is committed."""
        await self._write(lambda conn: None)

    def stats(self) -> StoreStats:
        return StoreStats(
            queue_depth=self._given - self._taken,
            dropped=self._dropped,
            batches_written=self._batches_written,
            writer_cpu_s=self._writer_cpu_s,
            records_written=self._records_written,
            events_written=self._events_written,
            write_errors=self._write_errors,
            db_bytes=self._db_bytes,
            last_prune_at=self._last_prune_at,
            pruned_total=self._pruned_total,
        )

    # -- reads ----------------------------------------------------------------------------

    async def traces(
        self,
        limit: int = 100,
        *,
        status: str | None = None,
        model: str | None = None,
        node_id: str | None = None,
        tag: str | None = None,
        since: float | None = None,
    ) -> list[dict[str, object]]:
        """Newest first; every TraceRecord field plus ``id`` (JSON fields decoded)."""
        return await self._read(
            lambda c: _select_traces(
                c, limit, status=status, model=model, node_id=node_id, tag=tag, since=since
            )
        )

    async def events(
        self,
        limit: int = 100,
        *,
        kind: str | None = None,
        node_id: str | None = None,
        since: float | None = None,
    ) -> list[dict[str, object]]:
        """Newest first: ``{id, timestamp, kind, node_id, detail}``."""
        return await self._read(
            lambda c: _select_events(c, limit, kind=kind, node_id=node_id, since=since)
        )

    async def usage(self, days: float = 7, *, now: float) -> dict[str, object]:
        """Per UTC day x node x model (``rows``), plus ``totals``, ``by_day`` (every day),
        ``by_node`` and ``by_model``; read from daily rollups, so pruning does not affect it.
        Like every rollup read it lags the traces by up to ``rollup_interval_s`` (after
        ``flush()`` it counts every trace recorded before)."""
        return await self._read(lambda c: _select_usage(c, days, now))

    async def models(self, days: float = 7, *, now: float) -> list[dict[str, object]]:
        """Per model: ``model``, ``nodes`` it ran on, metrics; busiest first."""
        keep = self.hourly_keep_days
        return await self._read(lambda c: _select_models(c, days, now, keep))

    async def apps(self, days: float = 7, *, now: float) -> list[dict[str, object]]:
        """Per tag: ``tag``, ``models`` used, metrics; busiest first."""
        keep = self.hourly_keep_days
        return await self._read(lambda c: _select_apps(c, days, now, keep))

    async def trends(self, hours: float = 24, *, now: float) -> list[dict[str, object]]:
        """One row per UTC hour, oldest first, every hour present: ``hour``, ``time``, metrics."""
        keep = self.hourly_keep_days
        return await self._read(lambda c: _select_trends(c, hours, now, keep))

    async def node_model_stats(self, days: float = 7, *, now: float) -> list[dict[str, object]]:
        """Per node x model: metrics plus ``errors`` (failed, retried, incomplete, reaped
        attempts: what the node got wrong) and ``attempt_error_rate``."""
        keep = self.hourly_keep_days
        return await self._read(lambda c: _select_node_model_stats(c, days, now, keep))

    async def get_settings(self) -> dict[str, object]:
        return copy.deepcopy(self._settings)

    async def node_admissions(self) -> dict[str, dict[str, object]]:
        """node_id → ``{node_id, decision, addr, ollama_url, decided_at}`` (every row)."""
        return await self._read(_select_admissions)

    async def benchmarks(self, limit: int = 20) -> list[dict[str, object]]:
        """Newest first; every column of ``benchmark_runs``, ``params``/``results`` decoded."""
        return await self._read(lambda c: _select_benchmarks(c, limit=limit))

    # -- writes that answer ---------------------------------------------------------------

    async def set_settings(self, changes: Mapping[str, object]) -> dict[str, object]:
        """Persist ``key → JSON value`` (``None`` deletes the key); return all settings."""
        encoded = {str(k): None if v is None else json.dumps(v) for k, v in changes.items()}
        now = time.time()
        self._settings = await self._write(lambda c: _write_settings(c, encoded, now))
        return copy.deepcopy(self._settings)

    async def set_node_admission(
        self, node_id: str, decision: str, *, addr: str, ollama_url: str, now: float
    ) -> None:
        """Persist the operator's ``approved`` / ``rejected`` decision about a node id."""
        if decision not in ("approved", "rejected"):
            raise ValueError(f"unknown admission decision {decision!r}")
        await self._write(lambda c: _write_admission(c, node_id, decision, addr, ollama_url, now))

    async def save_learned(
        self,
        facts: Sequence[LearnedFact],
        gone: Sequence[tuple[str, str]] = (),
        *,
        now: float,
        limits: LearnedLimits,
    ) -> bool:
        """Persist changed learned facts (upsert) and forget ``gone`` ``(kind, key)`` ones;
        per kind, ``limits[kind] = (max_age_s, max_rows)`` drops rows not updated for that
        long, then the oldest beyond that many. Serialised and written on the writer
        thread. False (and a log line) when SQLite failed: a full disk costs the router its
        memory of a restart, not a crash."""
        facts, gone, limits = list(facts), list(gone), dict(limits)
        try:
            await self._write(lambda c: _write_learned(c, facts, gone, limits, now))
        except sqlite3.Error as exc:
            log.warning("store.learned_save_failed: %s", exc)
            return False
        return True

    async def load_learned(self, *, now: float, limits: LearnedLimits) -> list[LearnedFact]:
        """Every learned fact within ``limits`` (the others are deleted first), oldest
        first, ``value`` decoded from JSON."""
        limits = dict(limits)
        return await self._write(lambda c: _load_learned(c, limits, now))

    async def create_benchmark(self, params: Mapping[str, object], *, now: float) -> int:
        """A new run in status ``pending``; returns its ``run_id``."""
        encoded = json.dumps(dict(params))
        return await self._write(lambda c: _insert_benchmark(c, encoded, now))

    async def update_benchmark(self, run_id: int, **fields: object) -> dict[str, object]:
        """Set any of BENCHMARK_FIELDS; returns the updated run. Raises KeyError if unknown."""
        unknown = set(fields) - BENCHMARK_FIELDS
        if unknown:
            raise ValueError(f"unknown benchmark fields: {sorted(unknown)}")
        values = {"updated_at": time.time(), **fields}
        if "results" in values and values["results"] is not None:
            values["results"] = json.dumps(values["results"])
        return await self._write(lambda c: _update_benchmark(c, run_id, values))

    async def prune(self, *, now: float) -> int:
        """Delete raw traces/events older than retention; rollups stay. Returns traces deleted."""
        return await self._write(lambda c: self._prune_now(c, now))

    # -- threads --------------------------------------------------------------------------

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._state is _State.CLOSED:
            raise RuntimeError("store is closed")
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run(conn: sqlite3.Connection) -> None:
            if not fut.set_running_or_notify_cancel():
                return  # the caller gave up before the writer got here
            try:
                fut.set_result(fn(conn))
            except Exception as exc:  # noqa: BLE001 - delivered to the awaiting caller
                fut.set_exception(exc)

        self._hand_over()  # records made before this call are committed before it runs
        self._queue.put(_Task(run))
        return await asyncio.wrap_future(fut)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._state is not _State.OPEN or self._reader is None:
            raise RuntimeError(f"store is {self._state.value}")
        conn = self._reader_conn
        assert conn is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reader, fn, conn)

    def _writer_main(self, ready: concurrent.futures.Future[dict[str, object]]) -> None:
        _lower_thread_priority(self.writer_nice)
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            conn = _connect_writer(self.db_path)
            _migrate(conn)
            caught_up = _catch_up_rollups(conn)
            if caught_up:
                log.warning(
                    "store.rollups_caught_up: %d traces above the watermark folded",
                    caught_up, extra={"traces": caught_up},
                )
            settings = _select_settings(conn)
            self._db_bytes = _db_bytes(conn)
        except Exception as exc:  # noqa: BLE001 - delivered to open()
            ready.set_exception(exc)
            return
        ready.set_result(settings)
        shutdown: _Shutdown | None = None
        try:
            shutdown = self._write_until_shutdown(conn)
        finally:
            conn.close()
            if shutdown is not None:
                shutdown.done.set_result(None)

    def _write_until_shutdown(self, conn: sqlite3.Connection) -> _Shutdown:
        """The writer loop: batch traces/events, run tasks in queue order, prune on schedule.

        Happy path: the first record of a batch starts a ``flush_interval_s`` clock; the batch
        is committed when it holds ``batch_max`` rows, when the clock runs out, or when a task
        (flush, settings, shutdown) arrives, so tasks see every earlier record committed.
        """
        traces: list[TraceRecord] = []
        events: list[_Event] = []
        deadline = math.inf
        interval = self.prune_interval_s
        next_prune = time.monotonic() if interval is not None else math.inf
        while True:
            timeout = min(deadline, next_prune, self._rollups_due) - time.monotonic()
            try:
                item: _Item | None = self._queue.get(
                    timeout=None if math.isinf(timeout) else max(timeout, 0.0)
                )
            except queue.Empty:
                item = None
            if isinstance(item, _Batch):
                # it already waited its flush interval on the loop side: commit now
                for record in item.records:
                    (traces if isinstance(record, TraceRecord) else events).append(record)  # type: ignore[arg-type]  # split by the isinstance
                self._taken += len(item.records)
                deadline = time.monotonic()
            elif isinstance(item, TraceRecord | _Event):
                (traces if isinstance(item, TraceRecord) else events).append(item)  # type: ignore[arg-type]  # split by the isinstance above
                self._taken += 1
                if math.isinf(deadline):
                    deadline = time.monotonic() + self.flush_interval_s
            elif item is not None:
                self._commit(conn, traces, events)
                self._flush_rollups(conn)  # a task sees every earlier record in the rollups
                deadline = math.inf
                if isinstance(item, _Shutdown):
                    return item
                item.run(conn)
            if len(traces) + len(events) >= self.batch_max or time.monotonic() >= deadline:
                self._commit(conn, traces, events)
                deadline = math.inf
            if time.monotonic() >= self._rollups_due:
                self._flush_rollups(conn, _yield_gil)
            if (
                interval is not None
                and not traces
                and not events
                and time.monotonic() >= next_prune
            ):
                self._maybe_prune(conn)
                next_prune = time.monotonic() + interval

    def _commit(
        self, conn: sqlite3.Connection, traces: list[TraceRecord], events: list[_Event]
    ) -> None:
        """Write and clear the pending lists. One bad record must not cost the batch: on
        failure, retry record by record and drop only the ones that still fail."""
        if not traces and not events:
            return
        try:
            # Pause for the loop while keeping up; when records pile up (a burst), write
            # flat out instead: the writer would otherwise wait for the GIL after each pause.
            keeping_up = self._given - self._taken < self.batch_max
            self._commit_batch(conn, traces, events, _yield_gil if keeping_up else None)
            self._batches_written += 1
            self._records_written += len(traces)
            self._events_written += len(events)
        except Exception:
            log.exception(
                "store.batch_failed", extra={"traces": len(traces), "events": len(events)}
            )
            for single_t, single_e in [([t], []) for t in traces] + [([], [e]) for e in events]:
                try:
                    self._commit_batch(conn, single_t, single_e)
                    self._records_written += len(single_t)
                    self._events_written += len(single_e)
                except Exception:
                    self._write_errors += 1
                    log.exception("store.record_dropped")
        traces.clear()
        events.clear()
        self._db_bytes = _db_bytes(conn)
        self._writer_cpu_s = time.thread_time()

    def _commit_batch(
        self, conn: sqlite3.Connection, traces: list[TraceRecord], events: list[_Event],
        pause: Callable[[], None] | None = None,
    ) -> None:
        """One transaction of traces and events; their rollups in it too, or (with a
        ``rollup_interval_s``) summed for ``_flush_rollups``."""
        now_too = self.rollup_interval_s <= 0
        prepared = _prepare(traces, pause, fleet=now_too)
        last_id = _write_batch(conn, traces, events, prepared, rollups=now_too)
        if not now_too and last_id:
            self._fold_rollups(prepared.hourly, last_id)

    def _fold_rollups(self, hourly: dict[_RollupKey, _Agg], last_id: int) -> None:
        """Add a committed batch's hourly sums (its traces up to ``last_id``) to the ones
        waiting for ``_flush_rollups``."""
        self._rollups_id = last_id
        pending = self._rollups
        for key, agg in hourly.items():
            mine = pending.get(key)
            if mine is None:
                pending[key] = agg  # the batch's own: nothing else holds it
            else:
                mine.merge(agg)
        if pending and math.isinf(self._rollups_due):
            self._rollups_due = time.monotonic() + self.rollup_interval_s

    def _flush_rollups(
        self, conn: sqlite3.Connection, pause: Callable[[], None] | None = None
    ) -> None:
        """Merge the waiting rollup sums into the stored rows and move the watermark past
        the traces they count (one transaction). After a failed merge, fold the traces
        above the watermark from the database instead (their sums in memory went with it)."""
        self._rollups_due = math.inf
        if not self._rollups and not self._rollups_lost:
            return
        pending, self._rollups = self._rollups, {}
        try:
            if self._rollups_lost:
                _catch_up_rollups(conn)
                self._rollups_lost = False
            else:
                _write_rollups(conn, pending, self._rollups_id, pause)
        except Exception:
            self._write_errors += 1
            self._rollups_lost = True
            self._rollups_due = time.monotonic() + max(self.rollup_interval_s, 1.0)
            log.exception("store.rollups_failed", extra={"keys": len(pending)})

    def _prune_now(self, conn: sqlite3.Connection, now: float) -> int:
        deleted = _prune(
            conn,
            now=now,
            retention_days=self.retention_days,
            hourly_keep_days=self.hourly_keep_days,
        )
        self._last_prune_at = now
        self._pruned_total += deleted
        self._db_bytes = _db_bytes(conn)
        if deleted:
            log.info("store.pruned", extra={"traces": deleted})
        return deleted

    def _maybe_prune(self, conn: sqlite3.Connection) -> None:
        self._flush_rollups(conn)  # expired rollups go only once their sums are stored
        try:
            self._prune_now(conn, time.time())
        except Exception:
            log.exception("store.prune_failed")


# ---------------------------------------------------------------------------------------
# JSON-lines logging
# ---------------------------------------------------------------------------------------

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName"}
)


class JsonlFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        return _dumps(out)


class _JsonlQueueHandler(logging.handlers.QueueHandler):
    """Hands records to a listener thread that owns the rotating file, so logging on the
    event loop never waits for the disk. ``close()`` drains the queue and closes the file."""

    def __init__(self, target: logging.Handler) -> None:
        records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        super().__init__(records)
        self._target = target
        self._listener: logging.handlers.QueueListener | None = logging.handlers.QueueListener(
            records, target, respect_handler_level=True
        )
        self._listener.start()

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # Render message and traceback now (args may be mutated later, exc_info holds
        # frames), but keep the extras as attributes for the JSON formatter.
        prepared = copy.copy(record)
        prepared.msg = record.getMessage()
        prepared.args = None
        if record.exc_info:
            prepared.exc_text = logging.Formatter().formatException(record.exc_info)
        prepared.exc_info = None
        return prepared

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.stop()
            self._target.close()
        super().close()


def setup_jsonl_logging(
    log_path: Path,
    *,
    logger_name: str = "herd",
    max_bytes: int = 10_000_000,
    backups: int = 5,
    level: int = logging.INFO,
) -> logging.Handler:
    """Attach a rotating JSON-lines file handler to ``logger_name``; return it.

    Fields: ts, level, logger, msg, plus whatever the call passed in ``extra=``
    (``request_id``, ``node``, ``model``, ...). Remove and ``close()`` the handler at
    shutdown to flush it.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    target = logging.handlers.RotatingFileHandler(
        log_path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
    )
    target.setFormatter(JsonlFormatter())
    target.setLevel(level)
    handler = _JsonlQueueHandler(target)
    handler.setLevel(level)
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)
    return handler
