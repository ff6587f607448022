"""Pure decision logic for herd: which node serves a request, and why.

Rules of this module (enforced by tests/test_purity.py):
  1. No I/O, no asyncio, no clocks, no randomness: the current time comes in as ``now``
     (epoch seconds) and every random choice as a number in [0, 1) passed by the caller.
  2. Inputs are frozen snapshots; outputs are frozen dataclasses that carry their reasons,
     so the router can log, trace and show exactly the object it acted on.
  3. Every constant lives in ``Policy``; the router may override any field from config.

Sections: names, snapshots, policy, scoring (7 signals), selection, service-time
statistics, circuit breaker, retry decisions, context protection, VRAM fallback.

The second half, fleet analytics (health checks and recommendations for the operator), sits
under its own banner ("Fleet analytics") with the list of what it holds.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import TypeVar

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
# States (StrEnum: a member equals its string, so JSON, SQLite and old comparisons hold)
# ---------------------------------------------------------------------------------------


class NodeStatus(StrEnum):
    """A node's state in the fleet. Held nodes (waiting for consent) are ``pending`` or
    ``rejected`` and never routed to."""

    ONLINE = "online"
    DEGRADED = "degraded"
    OFFLINE = "offline"
    DRAINING = "draining"
    PENDING = "pending"
    REJECTED = "rejected"


ROUTABLE_STATUSES = frozenset({NodeStatus.ONLINE, NodeStatus.DEGRADED})
UNROUTABLE_STATUSES = frozenset({NodeStatus.OFFLINE, NodeStatus.DRAINING})  # never scored


class CircuitState(StrEnum):
    """A circuit breaker's state (``BreakerState.state``)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class AnswerKind(StrEnum):
    """What one attempt's answer was: ``ok`` or a failure kind (``classify_answer``)."""

    OK = "ok"
    CONNECT = "connect"  # never connected
    RESET = "reset"  # connection dropped before an answer
    TIMEOUT_FIRST_BYTE = "timeout_first_byte"
    STATUS_5XX = "status_5xx"
    BUSY = "busy"  # 429, 503 or "server busy": saturated
    STATUS_4XX = "status_4xx"  # the request's own fault
    MODEL_NOT_FOUND = "model_not_found"  # a model the node listed is gone (stale tags)


class TraceStatus(StrEnum):
    """An attempt's trace status; ``store.STATUSES`` holds the same set (a test checks)."""

    COMPLETED = "completed"
    FAILED = "failed"
    RETRIED = "retried"
    INCOMPLETE = "incomplete"
    CLIENT_DISCONNECTED = "client_disconnected"
    REAPED = "reaped"
    REJECTED = "rejected"
    CLIENT_ERROR = "client_error"  # the node refused the request itself (4xx)


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
    status: NodeStatus
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
    # model -> epoch s when the router sent it a request while it was not resident: the
    # load is under way, so another request for it joins that load instead of a new one
    loading: Mapping[str, float] = field(default_factory=dict)
    # where ram_total came from when no agent reports it: "" (reported or unknown),
    # "learned_fit" (only a lower bound: resident sets that fitted, no eviction seen yet),
    # "learned" (bounded by an eviction: a load past the free memory evicts)
    memory_learned: str = ""
    keep_alive_s: float = 0.0  # the node's keep-alive as learned from /api/ps; 0 = unknown
    max_loaded: int = 0  # OLLAMA_MAX_LOADED_MODELS, reported or learned; 0 = unknown


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    """The router-side queue of one ``node:model``."""

    pending: int = 0
    in_flight: int = 0
    slots: int = 1
    sure: int = 0  # slots known to run at once (told, reported or seen); 0: all of them.
    # Admitted slots past ``sure`` are a probe: the request may queue inside Ollama.
    progress_at: float = 0.0  # epoch s a slot last freed (or the queue last became busy)
    oldest_at: float = 0.0  # epoch s the oldest request in flight started (0: none known)


# ---------------------------------------------------------------------------------------
# Policy: every tunable constant, in one place
# ---------------------------------------------------------------------------------------

_GB = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Policy:
    """Every constant scoring uses. The router overrides fields with ``dataclasses.replace``.

    Scores are points; the **wait** signal converts seconds into points with
    ``wait_weight``, so one point is worth ``1 / wait_weight`` seconds of expected latency.
    The residency bonuses (``hot_bonus``, ``warm_bonus``) express the *future* cost of a
    cold load (it evicts other models and makes the next requests cold too), which the
    expected-time signal alone does not see.
    """

    # -- 1. thermal -------------------------------------------------------------------
    hot_bonus: float = 50.0  # model resident on the node (no load, no eviction)
    warm_bonus: float = 5.0  # unloaded from this node less than warm_window_s ago (small:
    # a bigger one lures evicted models back onto the node that just evicted them)
    warm_window_s: float = 600.0  # how long an unloaded model counts as warm (page cache)
    warm_load_factor: float = 0.5  # a warm load takes this share of a cold load's time
    loading_bonus: float = 50.0  # the model is being loaded there already (joins that load)
    default_max_loaded: int = 3  # Ollama's own default OLLAMA_MAX_LOADED_MODELS (3 per GPU,
    # 3 on CPU): the cap assumed for a node until it reports one or shows more loaded at once
    hot_load_factor: float = 0.0  # > 0: the residency bonus is at most this many of the
    # model's own load times (in wait points), so a small, quick-loading model is not held
    # behind a queue on the one node that has it (0: the flat hot_bonus / loading_bonus)
    hot_backlog_s: float = 40.0  # > 0: the residency bonus shrinks with the queue a request
    # would wait for on the node that has the model, to nothing at this many seconds: a
    # backlog a second replica would relieve pays for that replica's load and its risk
    # (0: the flat bonus; 20 and 60 measured worse than 40, #15)
    fit_load_credit: float = 0.0  # share of hot_bonus a cold load earns when it fits in known
    # free memory and evicts nothing (its cost is then the load time, already in "wait")
    # -- 2. memory fit ----------------------------------------------------------------
    memory_weight: float = 10.0  # full headroom (or already resident) earns this much
    memory_comfort_ratio: float = 2.0  # free / needed at which headroom counts in full
    eviction_weight: float = 30.0  # per evicted model that was just used (less if idle long)
    eviction_floor: float = 0.25  # share of eviction_weight even for a long-idle model
    eviction_recency_s: float = 300.0  # a model whose keep-alive ends later counts as in use
    eviction_blocked_penalty: float = 60.0  # memory held by busy models: the load must wait
    offload_penalty: float = 40.0  # does not fit in VRAM, would run partly on the CPU
    kv_bytes_per_token_per_gb: float = 16_384.0  # KV-cache prior: bytes/token per GB weights
    default_num_ctx: int = 4096  # context Ollama allocates when the request sets none
    # -- 3. queue depth ---------------------------------------------------------------
    queue_weight: float = 4.0  # points per outstanding request per slot
    # -- 4. wait (expected time to finish, from measured history) ---------------------
    wait_weight: float = 3.0  # points per expected second until the response completes
    busy_slowdown: float = 0.15  # each concurrent stream on a node slows a new one by this
    # (a prior: ``stream_slowdown`` learns it per node from decode speed vs streams in flight)
    slowdown_min_n: int = 8  # decode samples before the learned slowdown is trusted
    slowdown_min_var: float = 0.25  # ... and this variance of the stream count among them
    slowdown_max: float = 2.0  # learned slowdown per extra stream is clamped to [0, this]
    slowdown_alpha: float = 0.05  # EWMA weight of the slowdown regression's moments
    # -- 5. role affinity -------------------------------------------------------------
    affinity_weight: float = 5.0
    large_model_bytes: int = 20 * _GB  # at or above: a "large" model, prefers big machines
    small_model_bytes: int = 8 * _GB  # at or below: a "small" model, prefers small machines
    large_machine_bytes: int = 96 * _GB  # a machine this big (or bigger) is "big"
    # -- 6. availability --------------------------------------------------------------
    availability_weight: float = 20.0  # x (failure rate + the shares below)
    probe_penalty: float = 0.5  # breaker half-open / probing
    streak_penalty: float = 0.25  # x consecutive failures / breaker_threshold (closed breaker)
    degraded_penalty: float = 0.5  # node status "degraded"
    pressure_penalty: float = 0.25  # memory pressure "warn"
    # -- 7. context fit ---------------------------------------------------------------
    context_weight: float = 15.0  # penalty when the prompt exceeds the loaded window
    context_headroom_bonus: float = 3.0  # bonus when the loaded window has 2x headroom
    # -- slots, queues, admission ------------------------------------------------------
    default_slots: int = 1  # parallel slots when neither configured nor reported
    max_slots: int = 32
    max_queue_wait_s: float = 30.0  # bounded wait for a slot before 503
    wait_for_better: bool = True  # wait for a full node whose expected finish is sooner
    wait_margin: float = 0.0  # points a full node must lead the best free node by
    retry_after_s: float = 5.0  # Retry-After when no estimate exists
    retry_after_min_s: float = 1.0
    retry_after_max_s: float = 120.0
    tie_epsilon: float = 1e-6  # totals this close are a tie
    prewarm_queue_depth: int = 2  # winner's outstanding >= this -> pre-warm the runner-up
    # (3 before #15: 2 measured 12-16 % lower mean latency over 18 cells)
    prewarm_spares_busy: bool = True  # where the model is not known to fit, pre-warm only a
    # node whose resident models are all idle and that loads nothing now: a speculative
    # load there may evict a model with answers running (a drain that blocks the node,
    # then its reload) or wait behind another load
    prewarm_needs_room: bool = False  # pre-warm only where the model fits in memory known
    # to be free (or nothing is resident there); measured worse (#15): pre-warms that may
    # evict are how herd spreads a busy model, and they count as loads (evictions included)
    # -- retries ----------------------------------------------------------------------
    max_retries: int = 2
    # -- circuit breaker --------------------------------------------------------------
    breaker_threshold: int = 3  # consecutive failures that open the breaker
    breaker_base_backoff_s: float = 5.0  # first ejection; doubles with every trip
    breaker_max_backoff_s: float = 300.0
    breaker_max_ejected_share: float = 0.5  # never eject more of the fleet than this
    breaker_probe_timeout_s: float = 60.0  # a probe that never reports frees the slot
    breaker_reset_after_s: float = 900.0  # trips older than this are forgotten
    # -- service-time statistics --------------------------------------------------------
    ewma_alpha: float = 0.2
    quantile: float = 0.95  # streaming quantile tracked for total latency
    load_observed_min_ms: float = 250.0  # load_duration above this counts as a real load
    default_load_s: float = 10.0  # cold-load prior when the model size is unknown
    load_bytes_per_s: float = 1.5 * _GB  # cold-load prior from the size on disk
    load_overhead_s: float = 1.0
    default_tokens_per_s: float = 30.0  # decode prior when the model size is unknown
    prior_bandwidth_bytes_per_s: float = 150.0 * _GB  # decode prior: bandwidth / size
    default_prompt_tokens_per_s: float = 400.0
    prompt_speedup: float = 10.0  # prefill is this many times faster than decode (prior)
    default_completion_tokens: float = 250.0
    default_embed_s: float = 0.1
    # -- learning what Ollama does not report (agentless nodes) ----------------------------
    slot_queue_min_ms: float = 150.0  # hidden queue time at or above this: queued ...
    slot_queue_share: float = 0.1  # ... and at least this share of the request's own work
    slot_clean_max_ms: float = 60.0  # hidden time at or below this (or clean_share): no queue
    slot_clean_share: float = 0.03
    drain_aware: bool = True  # a load that must wait for a busy model to drain expects that
    # wait, and every request sent to the node meanwhile waits with it
    uncertain_evict_p: float = 0.0  # > 0: a load past the largest resident set seen (memory
    # known only as a lower bound) is priced this share of the eviction it may cause, the
    # rest as unknown memory; measured worse at 0.5 (#15), so off
    predict_uncertain_evictions: bool = False  # such a load's would-be victims stop counting
    # as hot at once (the next /api/ps puts back what stayed); off with the pricing
    unseen_load_ms: float = 500.0  # a request sent to a resident model that reports a load
    # this long found it evicted: the router reads that node's /api/ps at once
    serial_loads: bool = True  # a node loads one model at a time: a load waits for those
    # already sent there (and a load that waited teaches nothing about load speed)
    slot_probe_growth: float = 1.0  # no upper bound known: admit this x the slots seen
    # (at least one more); 2 found 4-slot nodes faster but queued long requests in Ollama
    slot_probe: bool = True  # unknown slots: admit 2 (one more than 1) to find out
    stall_aware: bool = True  # a queue whose slots have not freed for longer than they
    # should expects to wait at least that long again (see QueueSnapshot.progress_at)
    impact_weight: float = 0.0  # > 0: seconds of delay a request imposes on the streams it
    # runs beside (decode slows for all of them) count this much against a node. Off: in
    # bench/routing_sim.py (4 seeds x 3,143 requests) 1.0 made herd's mean 0.62x lo, 0.59x off
    probe_risk: float = 0.5  # chance a request on an unconfirmed (probe) slot queues inside
    # Ollama behind the ones in flight: its expected wait counts that much of their rest
    slot_bound_ttl_s: float = 300.0  # an upper bound older than this is probed again
    memory_bound_ttl_s: float = 1800.0  # an eviction bound older than this is forgotten
    # -- prompt-cache affinity ---------------------------------------------------------------
    cache_bonus: float = 6.0  # points for the node whose KV cache holds the prompt's prefix
    cache_max_points: float = 40.0  # cap on bonus + saved prefill points
    affinity_ttl_s: float = 1800.0  # a prefix not seen for this long is forgotten
    affinity_max_entries: int = 20_000  # LRU bound of the prefix -> node map
    affinity_block_chars: int = 256  # raw prompts are hashed at these boundaries
    affinity_max_chars: int = 256 * 1024  # only this much of a prompt is hashed


def tuned_policy(policy: Policy, items: Sequence[str]) -> Policy:
    """``policy`` with ``KEY=VALUE`` overrides (``--scoring hot_bonus=10``): each key a
    ``Policy`` field, each value parsed as that field's type. Raises ``ValueError`` naming
    the bad item (unknown field, wrong type, negative number)."""
    kinds = {f.name: type(getattr(policy, f.name)) for f in fields(Policy)}
    changes: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or key not in kinds:
            known = ", ".join(sorted(kinds))
            raise ValueError(f"--scoring {item!r}: expected KEY=VALUE with KEY one of: {known}")
        kind = kinds[key]
        value: object
        try:
            if kind is bool:
                if raw.lower() not in ("1", "0", "true", "false", "on", "off", "yes", "no"):
                    raise ValueError(raw)
                value = raw.lower() in ("1", "true", "on", "yes")
            elif kind is int:
                value = int(raw)
            else:
                value = float(raw)
        except ValueError:
            what = {bool: "true or false", int: "an integer"}.get(kind, "a number")
            raise ValueError(f"--scoring {item!r}: {key} takes {what}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (
            value < 0 or not math.isfinite(value)
        ):
            raise ValueError(f"--scoring {item!r}: {key} must be a finite number >= 0")
        changes[key] = value
    return replace(policy, **changes)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# Requests, factors, scores, choices
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RouteRequest:
    model: str  # normalised
    kind: str = "text"  # "text" | "embed" | "image" | "stt"
    est_tokens: int = 0  # estimated prompt tokens
    num_ctx: int | None = None
    needs_vision: bool = False
    exclude: frozenset[str] = frozenset()  # nodes already tried (retries)
    pinned_node: str | None = None  # explicit node: only that node is eligible
    cache_node: str | None = None  # node that last served this prompt's prefix (KV cache)
    cached_tokens: int = 0  # estimated tokens of that prefix
    max_tokens: int | None = None  # the client's cap on completion tokens (num_predict, ...)
    completion_tokens: float = 0.0  # expected completion tokens (score_nodes fills it in
    # from the whole fleet's history of this model, capped by max_tokens; 0: unknown)


# Factor and Score are built for every node of every request (on a 20-node fleet that was
# half of ``choose``). A frozen dataclass's generated ``__init__`` sends every field through
# ``object.__setattr__``, 2-3x the cost of a plain attribute store; their ``__init__``
# instead lets the record be, while it is filled, a mutable twin with the same slots
# (``_FactorFields``, ``_ScoreFields``), then sets ``__class__`` back. ``test_hot_path``
# checks the signatures and the results against the generated ones.
_become = object.__setattr__


class _FactorFields:
    __slots__ = ("contribution", "name", "reason", "value")
    name: str
    value: float
    contribution: float
    reason: str


@dataclass(frozen=True, slots=True, init=False)
class Factor:
    name: str
    value: float
    contribution: float
    reason: str

    def __init__(self, name: str, value: float, contribution: float, reason: str) -> None:
        _become(self, "__class__", _FactorFields)
        f: _FactorFields = self  # type: ignore[assignment]
        f.name = name
        f.value = value
        f.contribution = contribution
        f.reason = reason
        f.__class__ = Factor  # type: ignore[assignment]

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "value": round(self.value, 4) + 0.0,  # + 0.0 turns -0.0 into 0.0
            "contribution": round(self.contribution, 3) + 0.0,
            "reason": self.reason,
        }

    def to_json(self) -> str:
        """``to_dict()`` as compact JSON text, as the trace store encodes it."""
        return (f'{{"name":{_json_str(self.name)},'
                f'"value":{_json_float(round(self.value, 4) + 0.0)},'
                f'"contribution":{_json_float(round(self.contribution, 3) + 0.0)},'
                f'"reason":{_json_str(self.reason)}}}')


def _json_str(value: str) -> str:
    return json.encoder.encode_basestring(value)


def _json_float(value: float) -> str:
    return float.__repr__(value) if math.isfinite(value) else json.dumps(value)


class _ScoreFields:
    __slots__ = ("eligible", "factors", "free_slot", "node_id", "outstanding", "reason",
                 "total")
    node_id: str
    total: float
    eligible: bool
    reason: str
    factors: tuple[Factor, ...]
    outstanding: int
    free_slot: bool


@dataclass(frozen=True, slots=True, init=False)
class Score:
    node_id: str
    total: float
    eligible: bool
    reason: str
    factors: tuple[Factor, ...] = ()
    outstanding: int = 0  # pending + in_flight of this node:model (tie-break)
    free_slot: bool = True  # in_flight < slots

    def __init__(self, node_id: str, total: float, eligible: bool, reason: str,
                 factors: tuple[Factor, ...] = (), outstanding: int = 0,
                 free_slot: bool = True) -> None:
        _become(self, "__class__", _ScoreFields)  # see _become
        s: _ScoreFields = self  # type: ignore[assignment]
        s.node_id = node_id
        s.total = total
        s.eligible = eligible
        s.reason = reason
        s.factors = factors
        s.outstanding = outstanding
        s.free_slot = free_slot
        s.__class__ = Score  # type: ignore[assignment]

    def factor(self, name: str) -> Factor | None:
        for f in self.factors:
            if f.name == name:
                return f
        return None

    def to_dict(self) -> dict[str, object]:
        return {
            "node_id": self.node_id,
            "total": round(self.total, 3) + 0.0,
            "eligible": self.eligible,
            "reason": self.reason,
            "factors": [f.to_dict() for f in self.factors],
        }

    def to_json(self, factor_json: Callable[[Factor], str] = Factor.to_json,
                factors_json: Callable[[tuple[Factor, ...]], str] | None = None) -> str:
        """``to_dict()`` as compact JSON text; ``factor_json`` encodes each factor, or
        ``factors_json`` the comma-joined list (a caller may remember the encodings of the
        factors it saw before)."""
        listed = (factors_json(self.factors) if factors_json is not None
                  else ",".join(map(factor_json, self.factors)))
        return (f'{{"node_id":{_json_str(self.node_id)},'
                f'"total":{_json_float(round(self.total, 3) + 0.0)},'
                f'"eligible":{"true" if self.eligible else "false"},'
                f'"reason":{_json_str(self.reason)},'
                f'"factors":[{listed}]}}')


@dataclass(frozen=True, slots=True)
class Choice:
    action: str  # "dispatch" | "wait" | "reject"
    node_id: str | None  # dispatch target
    ranked: tuple[Score, ...]  # eligible first by total desc, ineligible after
    reason: str
    retry_after_s: float | None = None
    wait_for: str | None = None  # "wait": the (full) node expected to serve soonest
    reject_kind: str = ""  # "not_found" | "offline" | "ineligible" | "saturated" | "no_nodes"

    @property
    def winner(self) -> Score | None:
        if self.node_id is None:
            return None
        for s in self.ranked:
            if s.node_id == self.node_id:
                return s
        return None

    @property
    def runner_up(self) -> Score | None:
        if self.node_id is None:
            return None
        for s in self.ranked:
            if s.eligible and s.node_id != self.node_id:
                return s
        return None

    def breakdown(self) -> dict[str, object]:
        """Winner, runner-up and every other node scored, each once (one row per request
        is stored, so repeating the winner in a list of all nodes would double its size)."""
        w, r = self.winner, self.runner_up
        return {
            "winner": w.to_dict() if w else None,
            "runner_up": r.to_dict() if r else None,
            "others": [s.to_dict() for s in self.ranked if s is not w and s is not r],
        }

    def breakdown_json(self, factor_json: Callable[[Factor], str] = Factor.to_json,
                       factors_json: Callable[[tuple[Factor, ...]], str] | None = None
                       ) -> str:
        """``breakdown()`` as the compact JSON text the trace store writes, without the
        dicts in between (at 20 nodes that is 140 factors per request); ``factor_json`` and
        ``factors_json`` as ``Score.to_json`` takes them."""
        w, r = self.winner, self.runner_up
        others = ",".join(s.to_json(factor_json, factors_json) for s in self.ranked
                          if s is not w and s is not r)
        return (f'{{"winner":{w.to_json(factor_json, factors_json) if w else "null"},'
                f'"runner_up":{r.to_json(factor_json, factors_json) if r else "null"},'
                f'"others":[{others}]}}')


# ---------------------------------------------------------------------------------------
# Service-time statistics (bounded streaming estimates per node:model)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Observation:
    """What one finished attempt taught us (Ollama's final-chunk metrics)."""

    ok: bool
    load_ms: float = 0.0
    prompt_tokens: int = 0
    prompt_eval_ms: float = 0.0
    completion_tokens: int = 0
    eval_ms: float = 0.0
    ttft_ms: float | None = None
    total_ms: float = 0.0
    streams: int | None = None  # other streams in flight on the node at dispatch (None: unknown)
    load_queued: bool = False  # another load was under way there at dispatch: its load time
    # includes the wait for that one, so it is not a sample of this model's load speed


@dataclass(frozen=True, slots=True)
class ServiceStats:
    """Exponentially weighted estimates; constant size whatever the history length.

    ``*_ewma`` fields are 0.0 until a first sample arrives (``*_n`` counts samples).
    ``total_p`` is a streaming quantile (``Policy.quantile``, default p95) of total latency.
    """

    count: int = 0
    failures: int = 0
    failure_rate: float = 0.0  # EWMA of 0/1 failure indicator
    load_n: int = 0
    load_ms_ewma: float = 0.0  # only attempts that really loaded the model
    prompt_tps_ewma: float = 0.0  # prompt tokens per second (prefill)
    prompt_tps_n: int = 0
    eval_tps_ewma: float = 0.0  # completion tokens per second (decode)
    eval_tps_n: int = 0
    completion_tokens_ewma: float = 0.0
    prompt_tokens_ewma: float = 0.0
    ttft_ms_ewma: float = 0.0
    ttft_n: int = 0
    total_ms_ewma: float = 0.0
    total_ms_var: float = 0.0  # EW variance of total_ms
    service_ms_ewma: float = 0.0  # total minus load: the part a queue waits behind
    total_n: int = 0
    total_p: float = 0.0  # streaming quantile estimate of total_ms
    total_max: float = 0.0  # largest total_ms seen (bounds the quantile)
    # decode seconds per token y against other streams k on the node at dispatch: EW moments
    # of k, k^2, y, k*y (a least-squares line y = a + b k; see ``stream_slowdown``)
    conc_n: int = 0
    eval_k_ewma: float = 0.0  # other streams at dispatch, same weight as eval_tps_ewma
    conc_k: float = 0.0
    conc_kk: float = 0.0
    conc_y: float = 0.0
    conc_ky: float = 0.0


_EMPTY_STATS = ServiceStats()


def _ewma(old: float, n: int, x: float, alpha: float) -> float:
    """EWMA whose first sample is taken as is (no bias toward 0)."""
    if n <= 0:
        return x
    # early samples weigh 1/n so the estimate converges fast, then settle at alpha
    a = max(alpha, 1.0 / (n + 1))
    return old + a * (x - old)


class _StatsFields:
    """``ServiceStats``'s mutable twin (same slots, same order): ``observe`` fills a new
    record as one of these, then makes it a ``ServiceStats`` (see ``_become``). A frozen
    dataclass's ``replace`` sends all 25 fields through ``object.__setattr__`` after
    collecting them by name; this is a plain store per field."""

    __slots__ = ServiceStats.__slots__
    count: int
    failures: int
    failure_rate: float
    load_n: int
    load_ms_ewma: float
    prompt_tps_ewma: float
    prompt_tps_n: int
    eval_tps_ewma: float
    eval_tps_n: int
    completion_tokens_ewma: float
    prompt_tokens_ewma: float
    ttft_ms_ewma: float
    ttft_n: int
    total_ms_ewma: float
    total_ms_var: float
    service_ms_ewma: float
    total_n: int
    total_p: float
    total_max: float
    conc_n: int
    eval_k_ewma: float
    conc_k: float
    conc_kk: float
    conc_y: float
    conc_ky: float


def _stats_copy(s: ServiceStats) -> _StatsFields:
    """A field-by-field copy of ``s`` as its mutable twin (written out: 5x a loop over the
    names; ``test_lean_path`` checks that every field is copied)."""
    n = object.__new__(_StatsFields)
    n.count = s.count
    n.failures = s.failures
    n.failure_rate = s.failure_rate
    n.load_n = s.load_n
    n.load_ms_ewma = s.load_ms_ewma
    n.prompt_tps_ewma = s.prompt_tps_ewma
    n.prompt_tps_n = s.prompt_tps_n
    n.eval_tps_ewma = s.eval_tps_ewma
    n.eval_tps_n = s.eval_tps_n
    n.completion_tokens_ewma = s.completion_tokens_ewma
    n.prompt_tokens_ewma = s.prompt_tokens_ewma
    n.ttft_ms_ewma = s.ttft_ms_ewma
    n.ttft_n = s.ttft_n
    n.total_ms_ewma = s.total_ms_ewma
    n.total_ms_var = s.total_ms_var
    n.service_ms_ewma = s.service_ms_ewma
    n.total_n = s.total_n
    n.total_p = s.total_p
    n.total_max = s.total_max
    n.conc_n = s.conc_n
    n.eval_k_ewma = s.eval_k_ewma
    n.conc_k = s.conc_k
    n.conc_kk = s.conc_kk
    n.conc_y = s.conc_y
    n.conc_ky = s.conc_ky
    return n


def observe(stats: ServiceStats | None, obs: Observation, policy: Policy) -> ServiceStats:
    """Fold one attempt into the statistics (pure; O(1) time and space).

    The new record is a copy of the old one, changed in place before anyone sees it (the
    router calls this for every request it serves; ``_StatsFields``)."""
    s = stats if stats is not None else _EMPTY_STATS
    n = _stats_copy(s)
    a = policy.ewma_alpha
    ok = obs.ok
    n.count = count = s.count + 1
    n.failures = failures = s.failures + (0 if ok else 1)
    n.failure_rate = _ewma(s.failure_rate, s.count, 0.0 if ok else 1.0, a)
    if ok:
        _observe_ok(s, n, obs, policy, a, count - 1 - failures)
    n.__class__ = ServiceStats  # type: ignore[assignment]
    return n  # type: ignore[return-value]


def _observe_ok(
    s: ServiceStats, n: _StatsFields, obs: Observation, policy: Policy, a: float, ok_n: int
) -> None:
    """The part of ``observe`` for a successful attempt: ``n`` (a copy of ``s``) updated."""
    load_ms = max(0.0, obs.load_ms)
    loaded = load_ms >= policy.load_observed_min_ms
    if loaded and not obs.load_queued:
        n.load_ms_ewma = _ewma(s.load_ms_ewma, s.load_n, load_ms, a)
        n.load_n = s.load_n + 1
    if obs.prompt_tokens > 0 and obs.prompt_eval_ms > 0:
        tps = obs.prompt_tokens / (obs.prompt_eval_ms / 1000.0)
        n.prompt_tps_ewma = _ewma(s.prompt_tps_ewma, s.prompt_tps_n, tps, a)
        n.prompt_tps_n = s.prompt_tps_n + 1
    if obs.completion_tokens > 0 and obs.eval_ms > 0:
        tps = obs.completion_tokens / (obs.eval_ms / 1000.0)
        n.eval_tps_ewma = _ewma(s.eval_tps_ewma, s.eval_tps_n, tps, a)
        n.eval_tps_n = s.eval_tps_n + 1
        if obs.streams is not None and obs.streams >= 0:
            k = float(obs.streams)
            y = obs.eval_ms / 1000.0 / obs.completion_tokens
            b, c = policy.slowdown_alpha, s.conc_n
            n.conc_n = c + 1
            n.eval_k_ewma = _ewma(s.eval_k_ewma, c, k, a)
            n.conc_k = _ewma(s.conc_k, c, k, b)
            n.conc_kk = _ewma(s.conc_kk, c, k * k, b)
            n.conc_y = _ewma(s.conc_y, c, y, b)
            n.conc_ky = _ewma(s.conc_ky, c, k * y, b)
    n.completion_tokens_ewma = _ewma(
        s.completion_tokens_ewma, ok_n, float(max(0, obs.completion_tokens)), a
    )
    n.prompt_tokens_ewma = _ewma(s.prompt_tokens_ewma, ok_n, float(max(0, obs.prompt_tokens)), a)
    if obs.ttft_ms is not None and obs.ttft_ms >= 0:
        n.ttft_ms_ewma = _ewma(s.ttft_ms_ewma, s.ttft_n, obs.ttft_ms, a)
        n.ttft_n = s.ttft_n + 1
    total = max(0.0, obs.total_ms)
    if total > 0:
        c = s.total_n
        mean = _ewma(s.total_ms_ewma, c, total, a)
        var = 0.0 if c == 0 else (1 - a) * (s.total_ms_var + a * (total - s.total_ms_ewma) ** 2)
        service = max(0.0, total - (load_ms if loaded else 0.0))
        if obs.eval_ms > 0:
            # what a request queued behind this one waits for: its prefill and decode, not
            # the time it spent queued inside Ollama itself (that would count queues twice)
            service = min(service, max(0.0, obs.prompt_eval_ms) + obs.eval_ms)
        tmax = max(s.total_max, total)
        if c == 0:
            q = total
        else:
            # stochastic-approximation quantile; the step scales with the spread seen so far
            step = a * max(var**0.5, 0.05 * mean, 1.0)
            tau = policy.quantile
            if total > s.total_p:
                q = s.total_p + step * tau
            elif total < s.total_p:
                q = s.total_p - step * (1.0 - tau)
            else:
                q = s.total_p
        n.total_ms_ewma = mean
        n.total_ms_var = var
        n.service_ms_ewma = _ewma(s.service_ms_ewma, c, service, a)
        n.total_n = c + 1
        n.total_max = tmax
        n.total_p = min(max(q, 0.0), tmax)


def _decode_tps(
    stats: ServiceStats | None, model_bytes: int, node_bw: float, policy: Policy
) -> float:
    if stats is not None and stats.eval_tps_ewma > 0:
        return stats.eval_tps_ewma
    bw = node_bw if node_bw > 0 else policy.prior_bandwidth_bytes_per_s
    if model_bytes > 0:
        return max(0.5, bw / model_bytes)
    return policy.default_tokens_per_s


def _prefill_tps(
    stats: ServiceStats | None, model_bytes: int, node_bw: float, policy: Policy
) -> float:
    if stats is not None and stats.prompt_tps_ewma > 0:
        return stats.prompt_tps_ewma
    if model_bytes > 0 or node_bw > 0:
        return _decode_tps(stats, model_bytes, node_bw, policy) * policy.prompt_speedup
    return policy.default_prompt_tokens_per_s


def _load_s(
    stats: ServiceStats | None, model_bytes: int, node_load_bps: float, policy: Policy
) -> float:
    if stats is not None and stats.load_n > 0:
        return stats.load_ms_ewma / 1000.0
    if model_bytes > 0:
        bps = node_load_bps if node_load_bps > 0 else policy.load_bytes_per_s
        return policy.load_overhead_s + model_bytes / bps
    return policy.default_load_s


def load_ends(
    node: NodeSnapshot,
    stats: Mapping[tuple[str, str], ServiceStats],
    load_bps: float,
    policy: Policy,
) -> dict[str, float]:
    """When each load herd sent to ``node`` should be done (same clock as
    ``node.loading``): Ollama loads one model at a time, so a load sent while another is
    under way starts when that one ends."""
    if not node.loading:
        return {}
    out: dict[str, float] = {}
    end = -math.inf
    for model, sent in sorted(node.loading.items(), key=lambda kv: kv[1]):
        am = node.available.get(model)
        took = _load_s(stats.get((node.node_id, model)), am.size if am is not None else 0,
                       load_bps, policy)
        end = max(sent, end) + took
        out[model] = end
    return out


def other_load_under_way(
    node: NodeSnapshot, model: str, stats: Mapping[tuple[str, str], ServiceStats], now: float,
    policy: Policy,
) -> bool:
    """A load of another model sent to ``node`` is expected to be still running at ``now``
    (so a load of ``model`` sent now waits for it)."""
    if not node.loading or not any(m != model for m in node.loading):
        return False
    _bw, load_bps = node_rates(node.node_id, node.available, stats)
    return any(m != model and end > now
               for m, end in load_ends(node, stats, load_bps, policy).items())


def expected_service_s(
    stats: ServiceStats | None,
    req: RouteRequest,
    cold: bool,
    policy: Policy,
    *,
    model_bytes: int = 0,
    node_bandwidth: float = 0.0,
    node_load_bps: float = 0.0,
    warm: bool = False,
) -> float:
    """Seconds one request is expected to take on a node: (load) + prefill + decode.

    Learned rates win; without history the priors come from the model size (decode speed
    ~ memory bandwidth / size, load time ~ size / disk speed) or, lacking a size, from the
    fixed defaults. ``node_bandwidth`` / ``node_load_bps`` are per-node rates learned from
    other models on the same node (see ``node_rates``).
    """
    load = 0.0
    if cold:
        load = _load_s(stats, model_bytes, node_load_bps, policy)
        if warm:
            load *= policy.warm_load_factor
    if req.kind == "embed":
        if stats is not None and stats.service_ms_ewma > 0:
            return load + stats.service_ms_ewma / 1000.0
        return load + policy.default_embed_s + req.est_tokens / policy.default_prompt_tokens_per_s
    if req.kind in ("image", "stt"):
        if stats is not None and stats.service_ms_ewma > 0:
            return load + stats.service_ms_ewma / 1000.0
        return load + policy.default_load_s
    decode_tps = _decode_tps(stats, model_bytes, node_bandwidth, policy)
    if stats is not None and stats.prompt_tps_ewma > 0:
        prompt_tps = stats.prompt_tps_ewma
    elif model_bytes > 0 or node_bandwidth > 0:
        prompt_tps = decode_tps * policy.prompt_speedup
    else:
        prompt_tps = policy.default_prompt_tokens_per_s
    if req.completion_tokens > 0:
        completion = req.completion_tokens
    elif stats is not None and stats.eval_tps_ewma > 0:
        completion = stats.completion_tokens_ewma
    elif stats is not None and stats.service_ms_ewma > 0:
        # history without token metrics (e.g. a proxy that hides them): use it as is
        return load + stats.service_ms_ewma / 1000.0
    else:
        completion = policy.default_completion_tokens
    if req.max_tokens is not None and req.max_tokens > 0:
        completion = min(completion, float(req.max_tokens))
    return load + max(0, req.est_tokens) / prompt_tps + completion / decode_tps


def _typical_service_s(stats: ServiceStats | None, req: RouteRequest, policy: Policy) -> float:
    """What a request queued behind one of ``req.model``'s answers waits for: the learned
    service time (Ollama's own queue excluded), else the expected one."""
    if stats is not None and stats.service_ms_ewma > 0:
        return stats.service_ms_ewma / 1000.0
    return expected_service_s(stats, req, False, policy)


class FleetStats(Mapping[tuple[str, str], ServiceStats]):
    """Every ``node:model``'s statistics (read-only), also grouped by node, built once.

    ``score_nodes`` wraps its ``stats`` in one: the per-node learning (``node_rates``,
    ``stream_slowdown``) then reads a node's own entries instead of scanning the whole
    fleet's for every node it scores. Same entries, same order, same results.

    ``previous`` and ``changed``: the view of the same mapping before the entries under
    the keys in ``changed`` were set or deleted (and nothing else changed). What was derived
    from the other nodes' entries (their groups, rates, slowdown) and the other models'
    answer lengths is carried over instead of derived again: a finished request changes one
    node:model, not the 20 nodes a request scores. ``test_lean_path`` checks a carried view
    against a fresh one."""

    __slots__ = ("_all", "_answer", "_by_node", "_rates", "_slowdown", "_stale")

    def __init__(
        self,
        stats: Mapping[tuple[str, str], ServiceStats],
        previous: FleetStats | None = None,
        changed: Collection[tuple[str, str]] | None = None,
    ) -> None:
        self._all = stats
        self._by_node: dict[str, list[tuple[tuple[str, str], ServiceStats]]] | None = None
        self._stale: set[str] = set()  # nodes whose group in _by_node must be built again
        # per node, what was derived from its entries (valid while this view is: a caller
        # that keeps one across requests replaces it whenever its statistics change)
        self._rates: dict[str, tuple[Mapping[str, AvailableModel], tuple[float, float]]] = {}
        self._slowdown: dict[str, tuple[Policy, tuple[float, bool]]] = {}
        self._answer: dict[str, float] = {}  # model -> its answers' length, fleet-wide
        if previous is None or changed is None or previous._all is not stats:
            return
        nodes = {nid for nid, _m in changed}
        models = {m for _nid, m in changed}
        if previous._by_node is not None:
            self._by_node = previous._by_node.copy()
            self._stale = previous._stale | nodes
        self._rates = {n: v for n, v in previous._rates.items() if n not in nodes}
        self._slowdown = {n: v for n, v in previous._slowdown.items() if n not in nodes}
        self._answer = {m: v for m, v in previous._answer.items() if m not in models}

    def __getitem__(self, key: tuple[str, str]) -> ServiceStats:
        return self._all[key]

    def get(self, key: tuple[str, str], default: object = None) -> ServiceStats | None:  # type: ignore[override]
        return self._all.get(key, default)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._all)

    def __len__(self) -> int:
        return len(self._all)

    def node_items(self, node_id: str) -> Sequence[tuple[tuple[str, str], ServiceStats]]:
        """``node_id``'s entries, in the order the whole mapping holds them."""
        if self._by_node is None:
            self._by_node = {}
            for key, st in self._all.items():
                self._by_node.setdefault(key[0], []).append((key, st))
        elif self._stale:  # carried over: regroup the nodes whose entries changed
            stale, self._stale = self._stale, set()
            groups: dict[str, list[tuple[tuple[str, str], ServiceStats]]] = {
                nid: [] for nid in stale}
            for key, st in self._all.items():
                if key[0] in stale:
                    groups[key[0]].append((key, st))
            for nid, items in groups.items():
                if items:
                    self._by_node[nid] = items
                else:
                    self._by_node.pop(nid, None)
        return self._by_node.get(node_id, ())


_T = TypeVar("_T")
_K = TypeVar("_K")


def _memoised(
    cache: dict[str, tuple[_K, _T]], key: str, basis: _K, compute: Callable[[], _T]
) -> _T:
    """``cache[key]``'s value while it was computed from this very ``basis`` object (a
    policy, a node's model list), else ``compute()``, remembered."""
    hit = cache.get(key)
    if hit is not None and hit[0] is basis:
        return hit[1]
    value = compute()
    cache[key] = (basis, value)
    return value


def _node_items(
    stats: Mapping[tuple[str, str], ServiceStats], node_id: str
) -> Iterable[tuple[tuple[str, str], ServiceStats]]:
    """The entries of ``stats`` that may belong to ``node_id`` (callers still check)."""
    if isinstance(stats, FleetStats):
        return stats.node_items(node_id)
    return stats.items()


def stream_slowdown(
    node_id: str, stats: Mapping[tuple[str, str], ServiceStats], policy: Policy
) -> tuple[float, bool]:
    """(slowdown per other stream on the node, learned?) — the ``c`` in
    ``time(k) = time(0) x (1 + c k)`` for a request that runs beside ``k`` other streams.

    Learned per node from every model served there: a least-squares line of decode seconds
    per token against the streams in flight at dispatch, ``c = slope / intercept``; the
    models' estimates are averaged by sample count. Too few samples, or a stream count
    that barely varied: the prior ``busy_slowdown``.
    """
    if isinstance(stats, FleetStats):
        hit = stats._slowdown.get(node_id)
        if hit is not None and hit[0] is policy:  # _memoised's hit, inline (per node)
            return hit[1]
        return _memoised(stats._slowdown, node_id, policy,
                         lambda: _stream_slowdown(node_id, stats, policy))
    return _stream_slowdown(node_id, stats, policy)


def _stream_slowdown(
    node_id: str, stats: Mapping[tuple[str, str], ServiceStats], policy: Policy
) -> tuple[float, bool]:
    w_sum = c_sum = 0.0
    for (n, _m), st in _node_items(stats, node_id):
        if n != node_id or st.conc_n < policy.slowdown_min_n:
            continue
        var = st.conc_kk - st.conc_k * st.conc_k
        if var < policy.slowdown_min_var or st.conc_y <= 0:
            continue
        slope = (st.conc_ky - st.conc_k * st.conc_y) / var
        icpt = st.conc_y - slope * st.conc_k
        c = policy.slowdown_max if icpt <= 0 else min(policy.slowdown_max, max(0.0, slope / icpt))
        w_sum += st.conc_n
        c_sum += st.conc_n * c
    if w_sum <= 0:
        return policy.busy_slowdown, False
    return c_sum / w_sum, True


def node_rates(
    node_id: str,
    available: Mapping[str, AvailableModel],
    stats: Mapping[tuple[str, str], ServiceStats],
) -> tuple[float, float]:
    """(decode bytes/s, load bytes/s) learned on this node from any model it has served.

    Decoding is memory-bound, so ``tokens/s x model bytes`` is roughly constant per machine:
    a model never served on a node still gets a node-specific prior.
    """
    if isinstance(stats, FleetStats):
        hit = stats._rates.get(node_id)
        if hit is not None and hit[0] is available:  # _memoised's hit, inline (per node)
            return hit[1]
        return _memoised(stats._rates, node_id, available,
                         lambda: _node_rates(node_id, available, stats))
    return _node_rates(node_id, available, stats)


def _node_rates(
    node_id: str,
    available: Mapping[str, AvailableModel],
    stats: Mapping[tuple[str, str], ServiceStats],
) -> tuple[float, float]:
    bw_sum = bw_n = ld_sum = ld_n = 0.0
    for (n, m), st in _node_items(stats, node_id):
        if n != node_id:
            continue
        am = available.get(m)
        if am is None or am.size <= 0:
            continue
        if st.eval_tps_ewma > 0:
            bw_sum += st.eval_tps_ewma * am.size
            bw_n += 1
        if st.load_n > 0 and st.load_ms_ewma > 0:
            ld_sum += am.size / (st.load_ms_ewma / 1000.0)
            ld_n += 1
    return (bw_sum / bw_n if bw_n else 0.0, ld_sum / ld_n if ld_n else 0.0)


# ---------------------------------------------------------------------------------------
# Learning what Ollama does not report (agentless nodes): parallel slots, memory capacity.
# Learned state is plain frozen data; the router feeds observations through the pure
# functions below and passes the result back in (``slots_for(learned=...)``,
# ``NodeSnapshot.memory_learned``). Agent reports and ``--slots`` are facts and win.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SlotBounds:
    """What herd has seen of one ``node:model``'s parallel slots (or a node's, merged).

    ``lo``: slots >= lo (the most requests herd had running there at once while a new one
    started without queueing). ``hi``: slots < hi (a request queued inside Ollama while herd
    had ``hi`` requests there); 0 = no upper bound seen. Queueing is noisier evidence than
    its absence, so a queued request that would lower a bound is held as ``suspect`` until a
    second one confirms it. Contradicting evidence replaces the bound it contradicts (the
    node may have been restarted with another ``OLLAMA_NUM_PARALLEL``).
    """

    lo: int = 0
    hi: int = 0
    hi_at: float = 0.0  # epoch s the upper bound was last confirmed
    suspect: int = 0  # one unconfirmed queued observation at this concurrency
    clean: int = 0  # observations without queueing
    queued: int = 0  # observations with queueing
    last_at: float = 0.0

    @property
    def n(self) -> int:
        return self.clean + self.queued

    def tight(self) -> bool:
        return self.hi > 0 and self.lo >= self.hi - 1

    def to_dict(self, now: float, policy: Policy) -> dict[str, object]:
        return {
            "at_least": self.lo,
            "below": self.hi or None,
            "estimate": learned_slots(self, now, policy),
            "observations": self.n,
            "queued_seen": self.queued,
            "tight": self.tight(),
        }


def hidden_queue_ms(
    total_ms: float, load_ms: float, prompt_eval_ms: float, eval_ms: float, hot: bool
) -> float | None:
    """Time a request spent waiting inside Ollama, from Ollama's own final metrics:
    ``total - load - prompt_eval - eval``. When the model was already resident (``hot``),
    ``load_duration`` is no load either: Ollama's scheduler wait (and some servers' slot
    wait) is counted there, so it counts as queueing too. None without a total."""
    if total_ms <= 0:
        return None
    hidden = total_ms - max(0.0, load_ms) - max(0.0, prompt_eval_ms) - max(0.0, eval_ms)
    if hot:
        hidden += max(0.0, load_ms)
    return max(0.0, hidden)


def learn_slots(
    bounds: SlotBounds | None,
    *,
    concurrency: int,
    concurrency_clean: int,
    queue_ms: float,
    work_ms: float,
    now: float,
    policy: Policy,
    started_as_one_ended: bool = True,
) -> SlotBounds:
    """Fold one finished request into the slot bounds (pure).

    ``concurrency``: requests herd had in flight on that node:model when it sent this one
    (itself included). ``concurrency_clean``: how many of those were still running when this
    one started to run (the others finished before). ``queue_ms``: ``hidden_queue_ms``;
    ``work_ms``: its own prefill + decode time. Queueing at k means slots < k; none while
    ``concurrency_clean`` ran together means slots >= concurrency_clean. A value between the
    two thresholds says nothing. ``started_as_one_ended``: it began to run the moment
    another request on the same node:model finished, as a request waiting for a slot does;
    a wait that ended otherwise was for something else (Ollama's scheduler loading another
    model, memory draining) and says nothing about slots.
    """
    b = bounds if bounds is not None else SlotBounds()
    queued = queue_ms >= max(policy.slot_queue_min_ms, policy.slot_queue_share * work_ms)
    clean = queue_ms <= max(policy.slot_clean_max_ms, policy.slot_clean_share * work_ms)
    if queued and not started_as_one_ended:
        return b
    if queued and concurrency >= 2:
        k = concurrency
        stale = now - b.hi_at > policy.slot_bound_ttl_s
        if not (b.hi <= 0 or k < b.hi or k <= b.lo or stale):  # agrees with the bound
            return replace(b, hi_at=now, queued=b.queued + 1, last_at=now)
        if b.suspect <= 0:  # news: wait for a second queued request to confirm it
            return replace(b, suspect=k, queued=b.queued + 1, last_at=now)
        k = max(k, b.suspect)
        hi = k if b.hi <= 0 or k < b.hi or stale else b.hi
        lo = min(b.lo, hi - 1)  # contradicted twice: the newer evidence wins
        return replace(b, lo=lo, hi=hi, hi_at=now, suspect=0, queued=b.queued + 1, last_at=now)
    if clean and concurrency_clean >= 1:
        k = min(concurrency_clean, policy.max_slots)
        lo = max(b.lo, k)
        hi = b.hi if b.hi > lo else 0  # ran k at once: an upper bound <= k was wrong
        suspect = b.suspect if b.suspect > k else 0
        # the usual outcome, once per request: the fields by position, not replace()
        # (which collects all seven by name); test_lean_path checks it against replace
        return SlotBounds(lo, hi, b.hi_at, suspect, b.clean + 1, b.queued, now)
    return b


def learned_slots(bounds: SlotBounds | None, now: float, policy: Policy) -> int | None:
    """Slots to admit on a node:model from what was learned (None: nothing learned and
    ``slot_probe`` off).

    A known upper bound (fresh) gives ``hi - 1``; without one herd admits more than it has
    seen run at once (``slot_probe_growth`` times, at least one more), so the bound is found
    under load in a few steps (a request or two may queue inside Ollama to find it, after
    which the bound holds for ``slot_bound_ttl_s``). Growing by one at a time kept requests
    waiting in herd's queue behind slots the node had: a model used now and then on a
    4-slot node never got past 2.
    """
    if bounds is None or bounds.n == 0:
        return 2 if policy.slot_probe else None
    if bounds.hi > 0 and now - bounds.hi_at <= policy.slot_bound_ttl_s:
        return max(1, min(bounds.hi - 1, policy.max_slots))
    lo = max(1, bounds.lo)
    return max(1, min(max(lo + 1, math.ceil(lo * policy.slot_probe_growth)), policy.max_slots))


def sure_slots(bounds: SlotBounds | None) -> int:
    """Slots seen running at once on a node:model (at least 1): admitting more is a probe."""
    return max(1, bounds.lo) if bounds is not None else 1


def lift_slot_bounds(own: SlotBounds, node: SlotBounds) -> SlotBounds:
    """A node:model's bounds with the node's lower bound where the model's own evidence does
    not contradict it: ``OLLAMA_NUM_PARALLEL`` is one setting per server, so a node seen
    running 4 requests of one model at once has 4 slots for a rarely used model too, until
    that model queues below it (its own upper bound wins)."""
    if node.lo <= own.lo or (own.hi > 0 and node.lo >= own.hi):
        return own
    return replace(own, lo=node.lo)


def node_slot_bounds(per_model: Sequence[SlotBounds]) -> SlotBounds:
    """A node's slots for a model it has not served yet, from the models it has: Ollama's
    ``OLLAMA_NUM_PARALLEL`` is one setting per server, so the best-evidenced model stands
    for the node, with the most any model was seen running at once as its lower bound
    (unless that model's own upper bound says less)."""
    best = SlotBounds()
    for b in per_model:
        if (b.tight(), b.n) > (best.tight(), best.n):
            best = b
    # any model seen running k at once shows the server runs k at once
    return lift_slot_bounds(best, SlotBounds(lo=max((b.lo for b in per_model), default=0)))


@dataclass(frozen=True, slots=True)
class MemoryBounds:
    """What herd has seen of a node's memory for models, from ``/api/ps``.

    ``fits``: the largest resident set (sum of ``size``) seen at once: that much fits.
    ``evicts_at``: the smallest set that did not fit — a model vanished before its keep-alive
    ended (Ollama evicted it to load another), so resident-before + the newcomer was too much;
    0 = no eviction seen. ``vanished``: models evicted that way (name -> epoch s).
    """

    fits: int = 0
    evicts_at: int = 0
    keep_alive_s: float = 0.0  # longest time-to-expiry seen right after a use (capped)
    max_models: int = 0  # most models seen resident at once
    model_cap: int = 0  # evictions with memory to spare: at most this many models (0: none)
    evicts_at_t: float = 0.0
    evictions: int = 0
    polls: int = 0
    vanished: Mapping[str, float] = field(default_factory=dict)

    def capacity(self, now: float, policy: Policy) -> tuple[int, str]:
        """(bytes, how sure): "learned" once an eviction bounds it, "learned_fit" while
        only the lower bound is known, ("", 0) when nothing was seen."""
        if self.fits <= 0:
            return 0, ""
        if self.evicts_at > 0 and now - self.evicts_at_t <= policy.memory_bound_ttl_s:
            return self.fits, "learned"
        return self.fits, "learned_fit"

    def to_dict(self, now: float, policy: Policy) -> dict[str, object]:
        cap, how = self.capacity(now, policy)
        return {
            "fits_bytes": self.fits,
            "evicts_at_bytes": self.evicts_at or None,
            "capacity_bytes": cap or None,
            "basis": how or "unknown",
            "evictions": self.evictions,
            "observations": self.polls,
            "tight": bool(self.evicts_at) and self.fits >= 0.8 * self.evicts_at,
            "evicted_models": sorted(self.vanished),
            "keep_alive_s": round(self.keep_alive_s, 1) or None,
            "max_loaded_models": self.model_cap or None,
        }


def learn_memory(
    bounds: MemoryBounds | None,
    before: Mapping[str, LoadedModel],
    after: Mapping[str, LoadedModel],
    now: float,
    policy: Policy,
    evict_grace_s: float = 5.0,
) -> MemoryBounds:
    """Fold one ``/api/ps`` reading (``after``) following the previous one (``before``).

    A model gone more than ``evict_grace_s`` before its ``expires_at`` (and not just
    reloaded under the same name) was evicted to make room: the set before plus what
    arrived did not fit.
    """
    b = bounds if bounds is not None else MemoryBounds()
    total = sum(max(0, lm.size) for lm in after.values())
    fits = max(b.fits, total)
    evicted = [
        name
        for name, lm in before.items()
        if name not in after and lm.expires_at is not None and lm.expires_at - now > evict_grace_s
    ]
    arrived = [name for name in after if name not in before]
    vanished = {k: t for k, t in b.vanished.items() if now - t <= policy.warm_window_s}
    evicts_at, evicts_t, evictions = b.evicts_at, b.evicts_at_t, b.evictions
    max_models = max(b.max_models, len(after))
    model_cap = b.model_cap if b.model_cap <= 0 or len(after) <= b.model_cap else 0
    if evicted and arrived:
        bound = sum(before[n].size for n in before) + sum(after[n].size for n in arrived)
        if bound <= b.fits and len(before) >= b.max_models:
            # that much memory held models before: the count was full
            # (OLLAMA_MAX_LOADED_MODELS), not the memory
            model_cap = len(before) if model_cap <= 0 else min(model_cap, len(before))
        elif evicts_at <= 0 or bound < evicts_at or now - evicts_t > policy.memory_bound_ttl_s:
            evicts_at = bound
        evicts_t = now
        evictions += len(evicted)
        for name in evicted:
            vanished[name] = now
    if evicts_at and fits >= evicts_at:
        evicts_at = 0  # more fits now than once did not: memory was freed elsewhere
    ttl = [lm.expires_at - now for lm in after.values() if lm.expires_at is not None]
    keep_alive = max([b.keep_alive_s, *(t for t in ttl if 0 < t <= policy.eviction_recency_s)])
    return MemoryBounds(
        max_models=max_models,
        model_cap=model_cap,
        keep_alive_s=keep_alive,
        fits=fits,
        evicts_at=evicts_at,
        evicts_at_t=evicts_t,
        evictions=evictions,
        polls=b.polls + 1,
        vanished=vanished,
    )


# ---------------------------------------------------------------------------------------
# Prompt-cache affinity: a conversation goes back to the node whose KV cache has its prefix
# ---------------------------------------------------------------------------------------


def _digest(h: hashlib._Hash) -> str:
    return h.hexdigest()[:32]


def prefix_keys(
    model: str, messages: object, prompt: object, system: object, policy: Policy
) -> tuple[list[str], str | None]:
    """(lookup keys, longest first; key to remember) for a chat or a prompt.

    Chat: a hash chained over the messages; the lookup keys are every earlier prefix
    (longest first), the stored key is the whole conversation, which is the prefix of its
    next turn (plus the reply, which the node cached too). Prompt: hashes at every
    ``affinity_block_chars`` boundary, the stored key the longest whole block. Keys carry
    the model (caches are per model).
    """
    h = hashlib.sha256(f"{model}\x00{system if isinstance(system, str) else ''}".encode())
    keys: list[str] = []
    if isinstance(messages, list) and messages:
        budget = policy.affinity_max_chars
        for msg in messages:
            text = json.dumps(msg, sort_keys=True, ensure_ascii=False, default=str)
            budget -= len(text)
            if budget < 0:
                break
            h.update(hashlib.sha256(text.encode("utf-8", "replace")).digest())
            keys.append(_digest(h))
        if not keys:
            return [], None
        store = keys[-1] if len(keys) == len(messages) else None
        return keys[-2::-1] if store is not None else keys[::-1], store
    if isinstance(prompt, str) and prompt:
        block = max(16, policy.affinity_block_chars)
        text = prompt[: policy.affinity_max_chars]
        for i in range(0, len(text) - block + 1, block):
            h.update(text[i : i + block].encode("utf-8", "replace"))
            keys.append(_digest(h.copy()))
        if not keys:
            return [], None
        return keys[::-1], keys[-1]
    return [], None


@dataclass(frozen=True, slots=True)
class AffinityEntry:
    node_id: str
    at: float  # epoch s last served
    tokens: int  # estimated prompt tokens of that request (what the node has cached)


def affinity_lookup(
    keys: Sequence[str], table: Mapping[str, AffinityEntry], now: float, policy: Policy
) -> AffinityEntry | None:
    """The freshest entry for the longest prefix of ``keys`` that is known and not stale."""
    for k in keys:
        e = table.get(k)
        if e is not None and now - e.at <= policy.affinity_ttl_s:
            return e
    return None


def affinity_evictions(
    table: Mapping[str, AffinityEntry], now: float, policy: Policy
) -> list[str]:
    """Keys to drop: stale ones, then the oldest beyond ``affinity_max_entries`` (the table
    is kept in insertion = recency order by the caller)."""
    drop = [k for k, e in table.items() if now - e.at > policy.affinity_ttl_s]
    over = len(table) - len(drop) - policy.affinity_max_entries
    if over > 0:
        gone = set(drop)
        for k in table:
            if over <= 0:
                break
            if k not in gone:
                drop.append(k)
                over -= 1
    return drop


# ---------------------------------------------------------------------------------------
# Circuit breaker (per node, and per node:model under the key f"{node}:{model}")
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BreakerState:
    state: CircuitState = CircuitState.CLOSED
    consecutive_failures: int = 0
    trips: int = 0  # how many times it opened (recently): back-off grows with it
    open_until: float = 0.0  # epoch s: no traffic before this
    probe_in_flight: bool = False
    opened_at: float = 0.0  # epoch s of the last trip
    probe_deadline: float = 0.0  # a probe not reported by then no longer blocks the next


def breaker_key(node_id: str, model: str | None = None) -> str:
    return node_id if model is None else f"{node_id}:{model}"


def breaker_backoff_s(trips: int, policy: Policy) -> float:
    """Ejection time for the ``trips``-th trip (1-based): base x 2^(trips-1), capped."""
    exp = min(max(trips - 1, 0), 30)
    return float(min(policy.breaker_max_backoff_s, policy.breaker_base_backoff_s * (2**exp)))


def breaker_on_failure(
    state: BreakerState | None,
    now: float,
    policy: Policy,
    ejected_share: float,
    kind: str = "error",
) -> BreakerState:
    """Record a failure. Opens after ``breaker_threshold`` consecutive failures, or at once
    when ``kind`` is ``"connect"``/``"unreachable"`` (the node's Ollama cannot be reached, so
    every request sent there would pay a failed connect). A failed half-open probe re-opens
    with a longer back-off. ``ejected_share`` is the share of the fleet that would be ejected
    if this breaker opened (router: (open breakers + 1) / nodes); above
    ``breaker_max_ejected_share`` the breaker stays closed (panic mode: better a flaky node
    than no node), except after a failed probe, which was already ejected.
    """
    s = state if state is not None else BreakerState()
    failures = s.consecutive_failures + 1
    immediate = kind in ("connect", "unreachable")
    trips = s.trips
    if s.opened_at and now - s.opened_at > policy.breaker_reset_after_s:
        trips = 0  # an old trip no longer counts toward the back-off
    if s.state == CircuitState.OPEN and now < s.open_until:
        return replace(s, consecutive_failures=failures)  # a straggler: stays open
    if s.state != CircuitState.CLOSED:
        # the probe (half-open, or open with its back-off over) failed: re-open, longer
        trips += 1
        return BreakerState(
            state=CircuitState.OPEN,
            consecutive_failures=failures,
            trips=trips,
            open_until=now + breaker_backoff_s(trips, policy),
            opened_at=now,
        )
    if (immediate or failures >= policy.breaker_threshold) and (
        ejected_share <= policy.breaker_max_ejected_share + 1e-9
    ):
        trips += 1
        return BreakerState(
            state=CircuitState.OPEN,
            consecutive_failures=failures,
            trips=trips,
            open_until=now + breaker_backoff_s(trips, policy),
            opened_at=now,
        )
    return replace(
        s, state=CircuitState.CLOSED, consecutive_failures=failures, probe_in_flight=False
    )


def breaker_on_success(state: BreakerState | None, now: float, policy: Policy) -> BreakerState:
    """A success closes the breaker and clears the failure streak; the trip count is kept
    (a flapping node backs off longer) until ``breaker_reset_after_s`` has passed."""
    s = state if state is not None else BreakerState()
    trips = s.trips
    if s.opened_at and now - s.opened_at > policy.breaker_reset_after_s:
        trips = 0
    opened_at = s.opened_at if trips else 0.0
    return BreakerState(state=CircuitState.CLOSED, trips=trips, opened_at=opened_at)


def breaker_allows(state: BreakerState | None, now: float) -> bool:
    """May traffic go there now? Closed: yes. Open: only once the back-off has passed (as a
    half-open probe). Half-open: only while no probe is in flight (or the probe is overdue)."""
    if state is None or state.state == CircuitState.CLOSED:
        return True
    if state.state == CircuitState.OPEN:
        return now >= state.open_until
    return not state.probe_in_flight or now >= state.probe_deadline


def breaker_begin_probe(state: BreakerState, now: float, policy: Policy) -> BreakerState:
    """The router sends the one probe request to an open breaker whose back-off passed."""
    if state.state == CircuitState.CLOSED:
        return state
    return replace(
        state,
        state=CircuitState.HALF_OPEN,
        probe_in_flight=True,
        probe_deadline=now + policy.breaker_probe_timeout_s,
    )


# ---------------------------------------------------------------------------------------
# Retry decisions
# ---------------------------------------------------------------------------------------

RETRYABLE_FAILURES = frozenset(
    {
        AnswerKind.CONNECT,
        AnswerKind.RESET,
        AnswerKind.TIMEOUT_FIRST_BYTE,
        AnswerKind.STATUS_5XX,
        AnswerKind.BUSY,
    }
)
FAILURE_KINDS = RETRYABLE_FAILURES | {AnswerKind.STATUS_4XX, AnswerKind.MODEL_NOT_FOUND}
NO_ANSWER_KINDS = frozenset(
    {AnswerKind.CONNECT, AnswerKind.RESET, AnswerKind.TIMEOUT_FIRST_BYTE}
)


@dataclass(frozen=True, slots=True)
class AnswerClass:
    """What a node's answer (or the lack of one) means, decided in one place.

    ``kind``: ``ok`` or a failure kind of ``FAILURE_KINDS`` (``status_4xx`` = the request's
    own fault). ``node_fault``: it counts against the node (breaker, availability signal,
    error rate, health). ``trace_status``: the attempt's status when it is not retried
    (``completed`` | ``client_error`` | ``failed``).
    """

    kind: AnswerKind
    node_fault: bool
    trace_status: TraceStatus


def classify_answer(
    status: int, body: bytes = b"", *, node_lists_model: bool = True, no_answer: str = ""
) -> AnswerClass:
    """Classify one attempt's answer by who is to blame.

    ``status``: the node's HTTP status (0 when it never answered; ``no_answer`` then says
    why: ``connect`` | ``reset`` | ``timeout_first_byte``). ``body``: the start of the
    answer's body (enough to see Ollama's ``server busy`` / ``not found``).
    ``node_lists_model``: the node's last report lists the requested model.

    2xx/3xx: ok. 429, 503 and any 5xx saying ``server busy``: the node is saturated. 404
    "not found" for a model the node reported: the node lost it (stale tags). Other 5xx,
    408 and anything outside 200..599: the node failed. Every other 4xx (400 ``does not
    support tools``, 413, 422, a 404 for a model the node never listed, ...) is the
    client's error: the node did its job, and any node would answer the same.
    """
    failed = TraceStatus.FAILED
    if status <= 0 or no_answer:
        kind = AnswerKind(no_answer) if no_answer in NO_ANSWER_KINDS else AnswerKind.RESET
        return AnswerClass(kind, True, failed)
    if 200 <= status < 400:
        return AnswerClass(AnswerKind.OK, False, TraceStatus.COMPLETED)
    if status == 429 or status == 503 or (500 <= status < 600 and b"server busy" in body):
        return AnswerClass(AnswerKind.BUSY, True, failed)
    if status == 404 and b"not found" in body and node_lists_model:
        return AnswerClass(AnswerKind.MODEL_NOT_FOUND, True, failed)
    if 400 <= status < 500 and status != 408:
        return AnswerClass(AnswerKind.STATUS_4XX, False, TraceStatus.CLIENT_ERROR)
    return AnswerClass(AnswerKind.STATUS_5XX, True, failed)


@dataclass(frozen=True, slots=True)
class RetryDecision:
    retry: bool
    reason: str


def retry_decision(
    attempt: int, failure: str, bytes_sent_to_client: bool, policy: Policy
) -> RetryDecision:
    """Retry on the next-best node? ``attempt`` = retries already made (0 on the first
    failure). Never once a byte reached the client; at most ``policy.max_retries``."""
    if bytes_sent_to_client:
        return RetryDecision(False, "bytes already reached the client; cannot replay")
    if failure not in FAILURE_KINDS:
        return RetryDecision(False, f"unknown failure kind {failure!r}; not retried")
    if failure == AnswerKind.STATUS_4XX:
        return RetryDecision(False, "client error (4xx) would fail the same way elsewhere")
    if attempt >= policy.max_retries:
        return RetryDecision(False, f"retry budget exhausted ({attempt}/{policy.max_retries})")
    if failure == AnswerKind.MODEL_NOT_FOUND:
        return RetryDecision(True, "model missing on that node (stale tags); trying another")
    return RetryDecision(True, f"{failure} before the first byte; retry {attempt + 1}")


# ---------------------------------------------------------------------------------------
# Scoring: eligibility, then 7 signals
# ---------------------------------------------------------------------------------------


def slot_count(node: NodeSnapshot, configured: int | None, policy: Policy) -> int:
    """Real parallel slots of a node:model queue: configured > reported > policy default."""
    return slots_for(node.num_parallel, configured, policy)


def slots_for(
    num_parallel: int | None, configured: int | None, policy: Policy, learned: int | None = None
) -> int:
    """``slot_count`` from the node's reported parallelism alone (no snapshot needed).

    Facts win: configured (``--slots``) > reported (agent) > ``learned`` (see
    ``learned_slots``) > ``policy.default_slots``."""
    if configured is not None and configured > 0:
        n = configured
    elif num_parallel is not None and num_parallel > 0:
        n = num_parallel
    elif learned is not None and learned > 0:
        n = learned
    else:
        n = policy.default_slots
    return max(1, min(n, policy.max_slots))


def _gb(n: float) -> str:
    return f"{n / _GB:.1f} GB"


def _memory(node: NodeSnapshot) -> tuple[int, int, int]:
    """(fast memory total, fast memory free, spill-over total) in bytes.

    Discrete GPU: VRAM is the fast memory and system RAM the (slow) spill-over; unified
    memory or CPU only: RAM is the fast memory.
    """
    if node.vram_total > 0:
        return node.vram_total, node.vram_available, node.ram_total
    return node.ram_total, node.ram_available, 0


def resident_bytes(model_bytes: int, num_ctx: int | None, slots: int, policy: Policy) -> int:
    """Estimated resident footprint of a model about to load: weights + KV cache for
    ``num_ctx`` tokens in each of ``slots`` parallel sequences."""
    ctx = num_ctx if num_ctx and num_ctx > 0 else policy.default_num_ctx
    kv = policy.kv_bytes_per_token_per_gb * (model_bytes / _GB) * ctx * max(1, slots)
    return int(model_bytes + kv)


def _thermal(
    node: NodeSnapshot, req: RouteRequest, now: float, policy: Policy
) -> tuple[str, float, float, str]:
    """(state, value, contribution, reason); state in hot|reload|loading|warm|cold. A load
    herd sent is "loading" until an answer shows it done, though /api/ps lists the model
    from the moment its load starts."""
    if req.model in node.loading:
        return "loading", 0.75, policy.loading_bonus, "being loaded for an earlier request"
    lm = node.loaded.get(req.model)
    if lm is not None and (lm.expires_at is None or lm.expires_at > now):
        ctx = lm.context_length
        if req.num_ctx is not None and ctx is not None and req.num_ctx != ctx:
            return (
                "reload",
                0.25,
                policy.warm_bonus,
                f"loaded with num_ctx {ctx}, request asks {req.num_ctx}: Ollama reloads",
            )
        return "hot", 1.0, policy.hot_bonus, "loaded in memory (hot)"
    t = node.recently_unloaded.get(req.model)
    if lm is not None:
        t = max(t or 0.0, lm.expires_at or 0.0)
    if t is not None and 0 <= now - t <= policy.warm_window_s:
        return "warm", 0.5, policy.warm_bonus, f"unloaded {now - t:.0f}s ago (warm)"
    return "cold", 0.0, 0.0, "on disk only (cold load)"


def _victims(
    node: NodeSnapshot,
    model: str,
    deficit: int,
    queues: Mapping[tuple[str, str], QueueSnapshot],
    drain: bool = False,
) -> tuple[list[tuple[float, str, int]], int]:
    """Idle models Ollama would evict (least recently used first, by ``expires_at``) to free
    ``deficit`` bytes, as (expires_at, name, size), and the bytes they free. Models with
    requests in flight or queued cannot be evicted at once; with ``drain``, when the idle
    ones are not enough, busy ones follow (least recently used first): Ollama marks them,
    lets their requests finish, and unloads them, with the node's queue blocked meanwhile."""
    idle: list[tuple[float, str, int]] = []
    busy: list[tuple[float, str, int]] = []
    for name, lm in node.loaded.items():
        if name == model:
            continue
        q = queues.get((node.node_id, name))
        exp = lm.expires_at if lm.expires_at is not None else math.inf
        (busy if q is not None and q.in_flight + q.pending > 0 else idle).append(
            (exp, name, lm.size)
        )
    idle.sort()
    out: list[tuple[float, str, int]] = []
    freed = 0
    for victim in idle + (sorted(busy) if drain else []):
        if freed >= deficit:
            break
        out.append(victim)
        freed += victim[2]
    return out, freed


def predicted_evictions(
    req: RouteRequest,
    node: NodeSnapshot,
    queues: Mapping[tuple[str, str], QueueSnapshot],
    policy: Policy,
) -> tuple[str, ...]:
    """Models that loading ``req.model`` on ``node`` is expected to evict (the router stops
    counting them as hot there at once, instead of at the next ``/api/ps``): for memory
    (known or bounded; a mere lower bound with ``predict_uncertain_evictions``) or for the
    number of loaded models. Busy
    models count too when the idle ones are not enough: Ollama drains and then unloads
    them, and takes no new request for them meanwhile."""
    if req.model in node.loaded:
        return ()
    deficit = 0
    fast_total, fast_free, _spill = _memory(node)
    am = node.available.get(req.model)
    if (fast_total > 0 and am is not None and am.size
            and (node.memory_learned != "learned_fit" or policy.predict_uncertain_evictions)):
        q = queues.get((node.node_id, req.model))
        slots = max(1, q.slots) if q is not None else slot_count(node, None, policy)
        deficit = resident_bytes(am.size, req.num_ctx, slots, policy) - fast_free
    if node.max_loaded > 0 and resident_count(node, req.model) >= node.max_loaded:
        deficit = max(deficit, 1)  # the count is full: the least recently used goes
    if deficit <= 0:
        return ()
    victims, _freed = _victims(node, req.model, deficit, queues, drain=True)
    return tuple(name for _exp, name, _size in victims)


def drain_s(
    req: RouteRequest,
    node: NodeSnapshot,
    queues: Mapping[tuple[str, str], QueueSnapshot],
    stats: Mapping[tuple[str, str], ServiceStats],
    now: float,
    policy: Policy,
) -> float:
    """Seconds before a load of ``req.model`` on ``node`` can start: when it must evict a
    model with requests running (``predicted_evictions``), Ollama lets them finish first,
    and its scheduler takes no other request meanwhile (``drain_wait_s``). A node with no
    other model busy has nothing to drain, and is not asked for its evictions."""
    if not policy.drain_aware or req.model in node.loaded:
        return 0.0
    nid = node.node_id
    if not any(name != req.model and (q := queues.get((nid, name))) is not None
               and q.in_flight > 0 for name in node.loaded):
        return 0.0
    return drain_wait_s(node, predicted_evictions(req, node, queues, policy), queues, stats,
                        now, policy)


def drain_wait_s(
    node: NodeSnapshot,
    victims: Sequence[str],
    queues: Mapping[tuple[str, str], QueueSnapshot],
    stats: Mapping[tuple[str, str], ServiceStats],
    now: float,
    policy: Policy,
) -> float:
    """Seconds until the busy ones among ``victims`` have finished their running answers:
    the last of a victim's requests ends about one answer (``_typical_service_s``) after
    it started, the oldest's rest when it runs alone."""
    if not policy.drain_aware:
        return 0.0
    wait = 0.0
    for name in victims:
        q = queues.get((node.node_id, name))
        if q is None or q.in_flight <= 0:
            continue
        typical = _typical_service_s(stats.get((node.node_id, name)), RouteRequest(name),
                                     policy)
        left = typical
        if q.in_flight == 1 and q.oldest_at > 0:
            left = max(0.0, typical - (now - q.oldest_at))
        wait = max(wait, left)
    return wait


def node_blocked_s(node: NodeSnapshot, model: str, now: float) -> float:
    """Seconds the node's scheduler stays blocked by a draining load herd sent there (a
    ``loading`` time in the future is when that load can start) for a request of
    ``model``; the model being loaded itself waits through ``load_ends`` instead."""
    starts = [t for m, t in node.loading.items() if t > now and m != model]
    return max(starts) - now if starts else 0.0


def _eviction_cost(
    node: NodeSnapshot,
    model: str,
    deficit: int,
    queues: Mapping[tuple[str, str], QueueSnapshot],
    now: float,
    policy: Policy,
    spread: Mapping[str, tuple[int, int]] | None = None,
) -> tuple[float, str]:
    """(negative contribution, reason) for freeing ``deficit`` bytes the way Ollama does:
    idle models are evicted least-recently-used first (by ``expires_at``); models with
    requests in flight cannot be evicted, so the load would wait for them. Evicting a model
    used moments ago costs ``eviction_weight`` (its next request reloads it); one about to
    expire anyway costs ``eviction_floor`` of that. ``spread``: model -> (nodes where it is
    hot, nodes that have it): a victim hot on another node too costs half, one no other node
    has costs double (its next request must come back here and evict in turn)."""
    victims, freed = _victims(node, model, deficit, queues)
    cost = 0.0
    names: list[str] = []
    for exp, name, _size in victims:
        recency = 1.0
        if exp != math.inf:
            span = policy.eviction_recency_s
            if node.keep_alive_s > 0:  # the node's own keep-alive, learned from /api/ps
                span = min(span, node.keep_alive_s)
            recency = min(1.0, max(0.0, (exp - now) / max(span, 1e-9)))
        hot_n, have_n = (spread or {}).get(name, (1, 2))
        mult = 2.0 if have_n <= 1 else 0.5 if hot_n >= 2 else 1.0
        cost += mult * policy.eviction_weight * (
            policy.eviction_floor + (1.0 - policy.eviction_floor) * recency
        )
        names.append(name)
    why = f"evicts {', '.join(names)}" if names else ""
    if freed < deficit:
        cost += policy.eviction_blocked_penalty
        why = (why + "; " if why else "") + "not enough idle memory to evict: the load waits"
    return -cost, why or "evicts idle memory"


def _ineligible(node_id: str, reason: str, outstanding: int = 0) -> Score:
    return Score(node_id, 0.0, False, reason, (), outstanding, False)


def score_nodes(
    req: RouteRequest,
    nodes: Sequence[NodeSnapshot],
    queues: Mapping[tuple[str, str], QueueSnapshot],
    stats: Mapping[tuple[str, str], ServiceStats],
    breakers: Mapping[str, BreakerState],
    now: float,
    policy: Policy,
    node_in_flight: Mapping[str, int] | None = None,
    memo: ScoreMemo | None = None,
) -> tuple[Score, ...]:
    """Score every node for ``req``: eligible nodes by total (desc; ties by fewest
    outstanding, then node id), then ineligible nodes, each with its reason.

    ``node_in_flight``: requests in flight per node, all models (the sum of ``queues``'
    ``in_flight`` by node, which is what is computed when it is not given). ``memo``: the
    caller's ``ScoreMemo`` (kept across requests), else a fresh one."""
    busy = node_in_flight
    if busy is None:
        counted: dict[str, int] = {}
        for (nid, _m), q in queues.items():
            counted[nid] = counted.get(nid, 0) + q.in_flight
        busy = counted
    spread = SpreadOnDemand(nodes, now)
    if not isinstance(stats, FleetStats):
        stats = FleetStats(stats)  # per-node learning reads its own node's entries only
    req = with_completion_estimate(req, stats)
    # a caller's memo: scores kept across requests, while no breaker says anything (a
    # closed breaker with no failure streak, as one stays after a recovery, says nothing)
    kept = memo is not None and all(
        b.state == CircuitState.CLOSED and not b.consecutive_failures for b in breakers.values())
    memo = (memo if memo is not None else ScoreMemo()).bind(policy)
    scores = memo.scores_for(req) if kept else None
    eligible: list[Score] = []
    rejected: list[Score] = []
    for node in nodes:
        nif = busy.get(node.node_id, 0)
        s = _kept_score(scores, req, node, queues, stats, nif, now) if scores is not None else None
        if s is None:
            s = _score_node(req, node, queues, stats, breakers, now, policy, nif, spread, memo)
            if scores is not None:
                _keep_score(scores, s, req, node, queues, stats, nif, policy)
        (eligible if s.eligible else rejected).append(s)
    eligible.sort(key=lambda s: (-s.total, s.outstanding, s.node_id))
    rejected.sort(key=lambda s: s.node_id)
    return tuple(eligible) + tuple(rejected)


# A hot node with a free slot, no load under way and no breaker that says anything (open,
# half-open or counting failures) anywhere: its score is made
# of the request, the node's snapshot, its queue's snapshot, its statistics (the entry,
# its learned rates and slowdown), its requests in flight and the policy, and of ``now``
# only through "the model has not expired yet" (checked: ``now`` < the entry's expiry).
# Nothing else it reads (no eviction, drain, stall, probe or load path) is taken then.
# ``ScoreMemo`` keeps such scores per request and node; they are found by those inputs'
# identities (``test_lean_path`` scores changing fleets with and without it).
KeptScore = tuple[NodeSnapshot, "QueueSnapshot | None", "ServiceStats | None", int, float,
                  object, object, "Score"]


def _kept_score(
    scores: dict[str, KeptScore],
    req: RouteRequest,
    node: NodeSnapshot,
    queues: Mapping[tuple[str, str], QueueSnapshot],
    stats: FleetStats,
    node_in_flight: int,
    now: float,
) -> Score | None:
    nid = node.node_id
    e = scores.get(nid)
    if e is None or e[0] is not node or not now < e[4] or e[3] != node_in_flight:
        return None
    if (e[1] is queues.get((nid, req.model)) and e[2] is stats.get((nid, req.model))
            and e[5] is stats._rates.get(nid) and e[6] is stats._slowdown.get(nid)):
        return e[7]
    return None


def _keep_score(
    scores: dict[str, KeptScore],
    score: Score,
    req: RouteRequest,
    node: NodeSnapshot,
    queues: Mapping[tuple[str, str], QueueSnapshot],
    stats: FleetStats,
    node_in_flight: int,
    policy: Policy,
) -> None:
    """Keep ``score`` when it is one of those (see ``KeptScore``); else forget the node's."""
    nid = node.node_id
    if not score.eligible or node.loading or not score.reason.startswith("hot,"):
        scores.pop(nid, None)
        return
    lm = node.loaded.get(req.model)
    q = queues.get((nid, req.model))
    if q is not None:
        slots = max(1, q.slots)
        free = q.pending + q.in_flight < slots and not (0 < q.sure < slots
                                                        and q.in_flight >= q.sure)
    else:
        free = True  # an idle queue of slot_count(node) slots: no stall, no probe
    if lm is None or not free:
        scores.pop(nid, None)
        return
    rates, slow = stats._rates.get(nid), stats._slowdown.get(nid)
    if rates is None or slow is None:  # not derived through the memo: not kept
        scores.pop(nid, None)
        return
    until = lm.expires_at if lm.expires_at is not None else math.inf
    scores[nid] = (node, q, stats.get((nid, req.model)), node_in_flight, until, rates, slow,
                   score)


def with_completion_estimate(
    req: RouteRequest, stats: Mapping[tuple[str, str], ServiceStats]
) -> RouteRequest:
    """``req`` with ``completion_tokens`` filled in: how long this model's answers have
    been on any node (the length of an answer is the workload's, not the machine's, so
    every node's samples count; a node that never served the model still gets the fleet's
    figure), capped by the client's own ``max_tokens``. Unchanged when already set or
    nothing is known."""
    if req.completion_tokens > 0 or req.kind != "text":
        return req
    memo = stats._answer if isinstance(stats, FleetStats) else None
    tokens = memo.get(req.model) if memo is not None else None
    if tokens is None:
        n = total = 0.0
        for (_nid, model), st in stats.items():
            if model == req.model and st.eval_tps_ewma > 0 and st.completion_tokens_ewma > 0:
                w = float(min(st.count, 50))
                n += w
                total += w * st.completion_tokens_ewma
        tokens = total / n if n > 0 else 0.0
        if memo is not None:
            memo[req.model] = tokens
    if req.max_tokens is not None and req.max_tokens > 0:
        tokens = min(tokens, float(req.max_tokens)) if tokens > 0 else 0.0
    if tokens <= 0:
        return req
    # once per request: the fields by position, not replace() (which collects all eleven
    # by name); test_lean_path checks it against replace with every field set
    return RouteRequest(req.model, req.kind, req.est_tokens, req.num_ctx, req.needs_vision,
                        req.exclude, req.pinned_node, req.cache_node, req.cached_tokens,
                        req.max_tokens, tokens)


class SpreadOnDemand(Mapping[str, tuple[int, int]]):
    """``model_spread(nodes, now)``, built the first time it is read: only an eviction
    cost reads it, so a request whose model is resident everywhere never builds it."""

    __slots__ = ("_built", "_nodes", "_now")

    def __init__(self, nodes: Sequence[NodeSnapshot], now: float) -> None:
        self._nodes = nodes
        self._now = now
        self._built: dict[str, tuple[int, int]] | None = None

    def _spread(self) -> dict[str, tuple[int, int]]:
        if self._built is None:
            self._built = model_spread(self._nodes, self._now)
        return self._built

    def __getitem__(self, model: str) -> tuple[int, int]:
        return self._spread()[model]

    def __iter__(self) -> Iterator[str]:
        return iter(self._spread())

    def __len__(self) -> int:
        return len(self._spread())


def model_spread(nodes: Sequence[NodeSnapshot], now: float) -> dict[str, tuple[int, int]]:
    """model -> (live nodes where it is loaded, live nodes that have it at all)."""
    hot: dict[str, int] = {}
    have: dict[str, int] = {}
    for n in nodes:
        if n.status not in ROUTABLE_STATUSES or not n.reachable:
            continue
        for name, lm in n.loaded.items():
            if lm.expires_at is None or lm.expires_at > now:
                hot[name] = hot.get(name, 0) + 1
        for name in set(n.available) | set(n.loaded):
            have[name] = have.get(name, 0) + 1
    return {name: (hot.get(name, 0), cnt) for name, cnt in have.items()}


class ScoreMemo:
    """What scoring keeps from one request to the next (the router holds one and passes it
    to ``choose``): the factors whose every field follows from the policy and a few whole
    numbers (an idle queue, a machine's size, a prompt against a context window, the fixed
    texts of a hot, loading or cold model, "healthy", "already resident"), one record
    each. Building a Factor costs about as much as the rest of its factor's work, and a
    request over 20 nodes builds 140, most of them the same as the request before.
    Bounded (``limit``); another policy starts afresh. Decisions and breakdowns are the
    same with or without one (``test_lean_path``)."""

    __slots__ = ("factors", "healthy", "limit", "policy", "reserved", "resident", "scores",
                 "unknown_memory")

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self.policy: Policy | None = None
        self.factors: dict[tuple[object, ...], Factor] = {}
        # per request (its fields), per node: a score kept with what it was made of
        self.scores: dict[RouteRequest, dict[str, KeptScore]] = {}

    def bind(self, policy: Policy) -> ScoreMemo:
        """This memo for ``policy`` (emptied when it was another one)."""
        if policy is not self.policy:
            self.policy = policy
            self.factors = {}
            self.scores = {}
            self.healthy = Factor("availability", 1.0, -policy.availability_weight * 0.0,
                                  "healthy")
            self.resident = Factor("memory", 1.0, policy.memory_weight, "already resident")
            self.reserved = Factor("memory", 1.0, policy.memory_weight,
                                   "memory already reserved")
            self.unknown_memory = Factor("memory", 0.5, 0.5 * policy.memory_weight,
                                         "memory unknown")
        return self

    def scores_for(self, req: RouteRequest) -> dict[str, KeptScore]:
        """The scores kept for requests equal to ``req`` (bounded: ``limit`` / 64 kinds of
        request)."""
        kept = self.scores.get(req)
        if kept is None:
            if len(self.scores) >= max(1, self.limit // 64):
                self.scores.clear()
            kept = self.scores[req] = {}
        return kept

    def keep(self, key: tuple[object, ...], factor: Factor) -> Factor:
        if len(self.factors) >= self.limit:
            self.factors.clear()
        self.factors[key] = factor
        return factor


@dataclass(slots=True)
class _Facts:
    """What eligibility learned about one node for one request; every factor reads it.
    Not frozen: built for every node of every request and never kept, it is not worth a
    frozen dataclass's construction cost (its fields go through ``object.__setattr__``)."""

    q: QueueSnapshot
    slots: int
    outstanding: int
    lm: LoadedModel | None
    state: str  # hot|reload|loading|warm|cold, from ``_thermal``
    thermal: Factor
    resident: bool  # hot or loading: no cold load to pay for
    model_bytes: int
    fast_total: int
    fast_free: int
    need: int  # bytes the model needs resident (loaded size, or the estimate to load it)
    offload: bool  # a load would spill past fast memory (partial CPU offload)


def _eligibility(
    req: RouteRequest,
    node: NodeSnapshot,
    q: QueueSnapshot,
    breakers: Mapping[str, BreakerState],
    now: float,
    policy: Policy,
    memo: ScoreMemo | None = None,
) -> str | _Facts:
    """Why ``node`` cannot serve ``req`` (a reason), or the facts its factors need."""
    nid = node.node_id
    slots = max(1, q.slots)
    if req.pinned_node is not None and nid != req.pinned_node:
        return f"not the pinned node ({req.pinned_node})"
    if nid in req.exclude:
        return "already tried for this request"
    if node.status == NodeStatus.OFFLINE:
        return "node offline"
    if node.status == NodeStatus.DRAINING:
        return "node draining"
    if not node.reachable:
        return "node's Ollama unreachable from the router"
    checks = ((nid, "node"), (breaker_key(nid, req.model), "node:model")) if breakers else ()
    for key, what in checks:  # (no breaker at all, the usual case: nothing to look up)
        b = breakers.get(key)
        if not breaker_allows(b, now):
            assert b is not None
            if b.state == CircuitState.OPEN:
                return f"circuit open ({what}) for {max(0.0, b.open_until - now):.0f}s more"
            return f"circuit half-open ({what}), probe in flight"
    lm = node.loaded.get(req.model)
    am = node.available.get(req.model)
    if lm is None and am is None:
        return f"model '{req.model}' not on this node"
    if req.needs_vision and am is not None and am.capabilities and "vision" not in am.capabilities:
        return f"model '{req.model}' has no vision capability"
    state, t_value, t_contrib, t_reason = _thermal(node, req, now, policy)
    resident = state == "hot" or state == "loading"
    model_bytes = am.size if am is not None and am.size > 0 else (lm.size if lm else 0)
    fast_total, fast_free, spill = _memory(node)
    need = lm.size if lm is not None else resident_bytes(model_bytes, req.num_ctx, slots, policy)
    if state == "reload" and lm is not None:
        need = max(need, resident_bytes(model_bytes, req.num_ctx, slots, policy))
    offload = False
    if not resident and fast_total > 0 and need > 0 and not node.memory_learned:
        if need > fast_total + spill:
            return f"does not fit: needs ~{_gb(need)}, node has {_gb(fast_total + spill)}"
        offload = need > fast_total
    if not resident and node.memory_pressure == "critical":
        return "memory pressure critical: cold load withheld"
    return _Facts(
        q,
        slots,
        q.pending + q.in_flight,
        lm,
        state,
        _thermal_record(state, t_value, t_contrib, t_reason, memo),
        resident,
        model_bytes,
        fast_total,
        fast_free,
        need,
        offload,
    )


def _thermal_record(
    state: str, value: float, contribution: float, reason: str, memo: ScoreMemo | None
) -> Factor:
    """The thermal factor; a hot, loading or cold one (fixed texts, made of the policy
    alone) kept in ``memo``."""
    if memo is None or not (state == "hot" or state == "loading" or state == "cold"):
        return Factor("thermal", value, contribution, reason)
    key = ("thermal", reason)
    return memo.factors.get(key) or memo.keep(key, Factor("thermal", value, contribution,
                                                          reason))


def _memory_factor(
    req: RouteRequest,
    node: NodeSnapshot,
    f: _Facts,
    queues: Mapping[tuple[str, str], QueueSnapshot],
    now: float,
    policy: Policy,
    spread: Mapping[str, tuple[int, int]] | None,
    memo: ScoreMemo | None = None,
) -> Factor:
    """Memory fit: resident, room to spare, or what a load would evict (the fixed texts
    from ``memo``)."""
    if memo is None:
        memo = ScoreMemo().bind(policy)
    need, fast_total, fast_free = f.need, f.fast_total, f.fast_free
    count_full = (
        node.max_loaded > 0
        and not f.resident
        and resident_count(node, req.model) >= node.max_loaded
    )
    if f.resident and f.state == "hot":
        return memo.resident  # Factor("memory", 1.0, policy.memory_weight, "already resident")
    if count_full and (fast_total <= 0 or need <= 0 or fast_free >= need):
        contrib, why = _eviction_cost(node, req.model, 1, queues, now, policy, spread)
        return Factor("memory", 0.0, contrib, f"{node.max_loaded} models loaded (the most): {why}")
    if fast_total <= 0 or need <= 0:
        return memo.unknown_memory  # Factor("memory", 0.5, 0.5 * weight, "memory unknown")
    if f.state == "loading":
        return memo.reserved  # Factor("memory", 1.0, weight, "memory already reserved")
    if node.memory_learned == "learned_fit" and fast_free < need and not count_full:
        # only a lower bound is known (the most seen resident at once): past it, a load may
        # fit or evict; priced as unknown memory, and uncertain_evict_p of the eviction
        p = policy.uncertain_evict_p
        contrib = 0.5 * policy.memory_weight
        why = "may fit or evict"
        if p > 0:
            cost, victims = _eviction_cost(node, req.model, need - fast_free, queues, now,
                                           policy, spread)
            contrib = (1.0 - p) * contrib + p * cost
            why = f"may fit or evict ({victims}, p={p:g})"
        return Factor(
            "memory",
            fast_free / need,
            contrib,
            f"needs ~{_gb(need)}, {_gb(fast_free)} known free (learned lower bound): {why}",
        )
    ratio = fast_free / need
    if f.offload:
        contrib = -policy.offload_penalty - policy.eviction_weight
        why = f"needs ~{_gb(need)} > {_gb(fast_total)} VRAM: partial CPU offload"
    elif ratio >= 1.0:
        span = max(policy.memory_comfort_ratio - 1.0, 1e-9)
        contrib = policy.memory_weight * min(1.0, (ratio - 1.0) / span)
        why = f"needs ~{_gb(need)}, {_gb(fast_free)} free"
    else:
        contrib, why = _eviction_cost(
            node, req.model, need - fast_free, queues, now, policy, spread
        )
        why = f"needs ~{_gb(need)}, {_gb(fast_free)} free: {why}"
    return Factor("memory", ratio, contrib, why)


def _thermal_factor(
    req: RouteRequest,
    node: NodeSnapshot,
    f: _Facts,
    stats: Mapping[tuple[str, str], ServiceStats],
    policy: Policy,
    queued: float = 0.0,
) -> Factor:
    """Residency: ``_thermal``'s bonus, capped at ``hot_load_factor`` load times when that
    is set and shrunk by a backlog of ``queued`` seconds (``hot_backlog_s``), plus
    ``fit_load_credit`` for a cold load into memory known to be free."""
    nid = node.node_id
    thermal = f.thermal
    if policy.hot_backlog_s > 0 and queued > 0 and thermal.contribution > 0:
        keep = max(0.0, 1.0 - queued / policy.hot_backlog_s)
        thermal = replace(
            thermal,
            contribution=thermal.contribution * keep,
            reason=f"{thermal.reason}; {queued:.1f}s backlog there keeps {keep:.0%} of it",
        )
    if policy.hot_load_factor > 0 and f.state in ("hot", "loading") and thermal.contribution > 0:
        _bw, load_bps = node_rates(nid, node.available, stats)
        load_s = _load_s(stats.get((nid, req.model)), f.model_bytes, load_bps, policy)
        cap = policy.wait_weight * policy.hot_load_factor * load_s
        if cap < thermal.contribution:
            thermal = replace(
                thermal,
                contribution=cap,
                reason=f"{thermal.reason}; worth {policy.hot_load_factor:g} x its "
                f"~{load_s:.1f}s load",
            )
    if policy.fit_load_credit > 0 and _fits_free(req, node, f):
        credit = policy.fit_load_credit * policy.hot_bonus
        thermal = replace(
            thermal,
            contribution=thermal.contribution + credit,
            reason=f"{thermal.reason}; fits in free memory, evicts nothing (+{credit:.0f})",
        )
    return thermal


def resident_count(node: NodeSnapshot, besides: str) -> int:
    """Models resident on ``node`` or being loaded there (a load herd sent counts before
    ``/api/ps`` shows it), ``besides`` not counted."""
    names = set(node.loaded) | set(node.loading)
    names.discard(besides)
    return len(names)


def _fits_free(req: RouteRequest, node: NodeSnapshot, f: _Facts) -> bool:
    """A cold (or warm) load that fits in memory known to be free (reported, or within the
    largest resident set seen), without offload and under the loaded-models cap: it evicts
    nothing, so it costs its load time and no future request anything."""
    if f.state not in ("cold", "warm") or f.fast_total <= 0 or f.need <= 0 or f.offload:
        return False
    if node.max_loaded > 0 and resident_count(node, req.model) >= node.max_loaded:
        return False
    return f.fast_free >= f.need


def _queue_factor(f: _Facts, policy: Policy) -> Factor:
    """Queue depth: requests ahead per slot."""
    depth = f.outstanding / f.slots
    return Factor(
        "queue",
        depth,
        -policy.queue_weight * depth,
        f"{f.q.in_flight} in flight + {f.q.pending} pending on {f.slots} slot(s)",
    )


def _wait_factor(
    req: RouteRequest,
    node: NodeSnapshot,
    f: _Facts,
    stats: Mapping[tuple[str, str], ServiceStats],
    now: float,
    policy: Policy,
    node_in_flight: int,
    drain: float = 0.0,
    memo: ScoreMemo | None = None,
) -> tuple[Factor, float, float, float]:
    """Expected seconds until this request completes (queue + load + run), the prefill
    seconds a cached conversation prefix saves, the delay it adds to the node's other
    streams (``_impact_s``), and the seconds of it spent waiting for a slot. ``memo``:
    keeps the factor by its numbers (``_wait_record``)."""
    nid = node.node_id
    state, slots, q = f.state, f.slots, f.q
    st = stats.get((nid, req.model))
    bw, load_bps = node_rates(nid, node.available, stats)
    svc = expected_service_s(st, req, False, policy, model_bytes=f.model_bytes, node_bandwidth=bw)
    load = 0.0
    ends = load_ends(node, stats, load_bps, policy) if node.loading else {}
    if state in ("cold", "warm", "reload"):
        load = _load_s(st, f.model_bytes, load_bps, policy)
        if state in ("warm", "reload"):
            load *= policy.warm_load_factor
        if policy.serial_loads and ends:  # it starts once the loads already sent are done
            load += max(0.0, max(ends.values()) - now)
        load += drain  # ... and once the models it evicts have finished their requests
    elif state == "loading":
        if policy.serial_loads:
            load = max(0.0, ends.get(req.model, now) - now)
        else:
            started = node.loading.get(req.model, now)
            load = max(0.0, _load_s(st, f.model_bytes, load_bps, policy)
                       - max(0.0, now - started))
    typical = st.service_ms_ewma / 1000.0 if st is not None and st.service_ms_ewma > 0 else svc
    queue_wait, stalled, probe = _queue_wait_s(q, f.outstanding, slots, typical, now, policy)
    blocked = node_blocked_s(node, req.model, now) if policy.drain_aware and node.loading else 0.0
    queue_wait = max(queue_wait, blocked)
    concurrent = min(q.in_flight, slots - 1) + max(0, node_in_flight - q.in_flight)
    saved = 0.0
    if req.cache_node == nid and state == "hot" and req.cached_tokens > 0 and req.kind == "text":
        tps = _prefill_tps(st, f.model_bytes, bw, policy)
        saved = min(svc, req.cached_tokens / tps)
    slow, learned = stream_slowdown(nid, stats, policy)
    # a learned slowdown: the measured speed already ran beside ``eval_k_ewma`` streams on
    # average, rescale it to the streams running now (the prior keeps the old, cruder rule)
    base_k = 0.0
    if learned and st is not None and st.conc_n > 0 and st.eval_tps_ewma > 0:
        base_k = st.eval_k_ewma
    run = (svc - saved) * (1.0 + slow * concurrent) / (1.0 + slow * base_k)
    expected = queue_wait + load + run
    factor = _wait_record(expected, queue_wait, load, run, st is not None and st.count > 0,
                          probe, stalled, drain, blocked, policy, memo)
    impact = _impact_s(concurrent, slow, run, policy) if policy.impact_weight > 0 else 0.0
    return factor, saved, impact, queue_wait


def _wait_record(
    expected: float, queue_wait: float, load: float, run: float, measured: bool, probe: bool,
    stalled: float, drain: float, blocked: float, policy: Policy, memo: ScoreMemo | None,
) -> Factor:
    """The wait factor, kept in ``memo`` by the numbers it is made of: the same seconds
    give the same record (a cold node's prior, an idle hot node's measured time repeat
    request after request). Keys tell 0.0 from -0.0 (equal as floats, not as texts)."""
    key: tuple[object, ...] | None = None
    if memo is not None:
        key = ("wait", expected or _signed_zero(expected), queue_wait or _signed_zero(queue_wait),
               load or _signed_zero(load), run or _signed_zero(run), measured, probe,
               stalled if stalled > 0 else 0.0, drain if drain > 0 else 0.0,
               blocked if blocked > 0 else 0.0)
        kept = memo.factors.get(key)
        if kept is not None:
            return kept
    factor = Factor(
        "wait",
        expected,
        -policy.wait_weight * expected,
        f"~{expected:.1f}s = {queue_wait:.1f}s queue + {load:.1f}s load + {run:.1f}s run"
        + (" (measured)" if measured else " (prior)")
        + ("; an unconfirmed (probe) slot" if probe else "")
        + (f"; no slot freed for {stalled:.1f}s" if stalled > 0 else "")
        + (f"; {drain:.1f}s for a busy model to drain first" if drain > 0 else "")
        + (f"; the node is blocked by a drain for {blocked:.1f}s" if blocked > 0 else ""),
    )
    return memo.keep(key, factor) if memo is not None and key is not None else factor


def _signed_zero(x: float) -> str:
    """A key for a zero that keeps its sign (``0.0 == -0.0``, but they print apart)."""
    return "-0" if math.copysign(1.0, x) < 0 else "+0"


def _queue_wait_s(
    q: QueueSnapshot, outstanding: int, slots: int, typical: float, now: float, policy: Policy
) -> tuple[float, float, bool]:
    """(seconds until this request gets a slot, seconds no slot has freed when that is
    overdue else 0, whether it would run on a probe slot).

    Requests ahead share the slots (``ahead x typical / slots``); a full queue's first slot
    frees when its oldest request should end (a burst ends together); a queue whose slots
    stopped freeing (stuck behind a load or drain inside Ollama) expects that long again; a
    slot past the ones seen running at once risks queueing inside Ollama."""
    ahead = max(0, outstanding - slots + 1)
    share = typical / slots
    wait = ahead * share
    if ahead > 0 and q.oldest_at > 0 and q.in_flight >= slots:
        wait = max(wait, max(0.0, typical - (now - q.oldest_at)) + (ahead - 1) * share)
    stalled = 0.0
    if policy.stall_aware and ahead > 0 and q.progress_at > 0:
        stalled = now - q.progress_at
    if stalled > share:
        wait = max(wait, stalled + (ahead - 1) * share)
    else:
        stalled = 0.0
    probe = ahead == 0 and 0 < q.sure < slots and q.in_flight >= q.sure
    if probe:  # if the node has only the slots seen, it waits for the oldest to end
        left = typical - (now - q.oldest_at) if q.oldest_at > 0 else 0.0
        wait += policy.probe_risk * (left if left > 0 else typical / (q.in_flight + 1))
    return wait, stalled, probe


def _impact_s(others: int, slow: float, run: float, policy: Policy) -> float:
    """Seconds of delay a new stream adds to the ``others`` already decoding on the node:
    each runs ``slow`` x slower per extra stream while they overlap (on average half the
    new request's run, the others being half done)."""
    if others <= 0 or slow <= 0 or policy.impact_weight <= 0:
        return 0.0
    overlap = 0.5 * run
    return policy.impact_weight * others * slow * overlap / (1.0 + slow * (others - 1))


def _cache_factor(req: RouteRequest, nid: str, state: str, saved: float, policy: Policy) -> Factor:
    """The node that served this conversation's prefix: a bonus when the prefill is saved."""
    bonus = policy.cache_bonus if saved > 0 else 0.0
    # the saved prefill already shortens "wait"; bound the total pull of the cache
    bonus = min(bonus, max(0.0, policy.cache_max_points - policy.wait_weight * saved))
    return Factor(
        "cache",
        saved,
        bonus,
        f"served this conversation's prefix (~{req.cached_tokens} tokens): "
        + (f"~{saved:.1f}s prefill saved" if saved > 0 else f"no saving ({state})"),
    )


def _affinity_factor(f: _Facts, policy: Policy) -> Factor:
    """Role affinity: large models to big machines, small models to small ones."""
    size = f.model_bytes or f.need
    if f.fast_total <= 0 or size <= 0:
        return Factor("affinity", 0.5, 0.0, "machine size unknown")
    bigness = min(1.0, f.fast_total / policy.large_machine_bytes)
    if size >= policy.large_model_bytes:
        val, why = bigness, "large model prefers a big machine"
    elif size <= policy.small_model_bytes:
        val, why = 1.0 - bigness, "small model leaves big machines to big models"
    else:
        val, why = 0.5, "mid-size model"
    return Factor("affinity", val, policy.affinity_weight * val, why)


def _availability_factor(
    req: RouteRequest,
    node: NodeSnapshot,
    stats: Mapping[tuple[str, str], ServiceStats],
    breakers: Mapping[str, BreakerState],
    policy: Policy,
) -> Factor:
    """Availability: probing breakers, failure streaks and rate, degraded, memory pressure."""
    nid = node.node_id
    penalty = 0.0
    notes: list[str] = []
    for key in (nid, breaker_key(nid, req.model)):
        b = breakers.get(key)
        if b is None:
            continue
        if b.state != CircuitState.CLOSED:
            penalty += policy.probe_penalty
            notes.append("probing after circuit open")
        elif b.consecutive_failures > 0:
            penalty += policy.streak_penalty * min(
                1.0, b.consecutive_failures / max(1, policy.breaker_threshold)
            )
            notes.append(f"{b.consecutive_failures} recent failure(s)")
    st = stats.get((nid, req.model))
    if st is not None and st.failure_rate > 0:
        penalty += st.failure_rate
        notes.append(f"failure rate {st.failure_rate:.0%}")
    if node.status == NodeStatus.DEGRADED:
        penalty += policy.degraded_penalty
        notes.append("node degraded")
    if node.memory_pressure == "warn":
        penalty += policy.pressure_penalty
        notes.append("memory pressure")
    return Factor(
        "availability",
        max(0.0, 1.0 - penalty),
        -policy.availability_weight * penalty,
        "; ".join(notes) if notes else "healthy",
    )


def _context_factor(req: RouteRequest, f: _Facts, policy: Policy) -> Factor:
    """Context fit of a hot model's loaded window for the prompt estimate."""
    ctx = f.lm.context_length if f.lm is not None else None
    if f.state == "hot" and ctx is not None and req.est_tokens > 0:
        if req.est_tokens > ctx:
            return Factor(
                "context",
                ctx / req.est_tokens,
                -policy.context_weight,
                f"prompt ~{req.est_tokens} tokens exceeds loaded context {ctx}",
            )
        r = ctx / req.est_tokens
        bonus = policy.context_headroom_bonus * min(1.0, max(0.0, r - 1.0))
        return Factor("context", r, bonus, f"prompt ~{req.est_tokens} tokens fits context {ctx}")
    if f.state == "reload":
        return Factor("context", 0.0, 0.0, "context changes with the reload")
    if f.state == "hot":
        return Factor("context", 1.0, 0.0, "no prompt estimate or window unknown")
    return Factor("context", 1.0, 0.0, "context set at load")


def _score_node(
    req: RouteRequest,
    node: NodeSnapshot,
    queues: Mapping[tuple[str, str], QueueSnapshot],
    stats: Mapping[tuple[str, str], ServiceStats],
    breakers: Mapping[str, BreakerState],
    now: float,
    policy: Policy,
    node_in_flight: int,
    spread: Mapping[str, tuple[int, int]] | None = None,
    memo: ScoreMemo | None = None,
) -> Score:
    """Eligibility, then one factor each: thermal, memory, queue, wait, (cache), affinity,
    availability, context; the total is their sum in that order. ``memo``: ``ScoreMemo``."""
    nid = node.node_id
    memo = memo if memo is not None else ScoreMemo().bind(policy)
    q = queues.get((nid, req.model))
    if q is None:
        q = QueueSnapshot(slots=slot_count(node, None, policy))
    f = _eligibility(req, node, q, breakers, now, policy, memo)
    if isinstance(f, str):
        return _ineligible(nid, f, q.pending + q.in_flight)
    drain = (drain_s(req, node, queues, stats, now, policy)
             if not f.resident and node.loaded else 0.0)  # nothing loaded: nothing drains
    wait, saved, impact, queued = _wait_factor(req, node, f, stats, now, policy,
                                               node_in_flight, drain, memo)
    thermal = _thermal_factor(req, node, f, stats, policy, queued)
    memory = _memory_factor(req, node, f, queues, now, policy, spread, memo)
    kept = memo.factors  # each kept factor by what it is made of (and the memo's policy)
    key: tuple[object, ...] = ("queue", q.in_flight, q.pending, f.slots)
    queue = kept.get(key) or memo.keep(key, _queue_factor(f, policy))
    key = ("affinity", f.fast_total, f.model_bytes or f.need)
    affinity = kept.get(key) or memo.keep(key, _affinity_factor(f, policy))
    availability = (memo.healthy if _healthy(req, node, stats, breakers)
                    else _availability_factor(req, node, stats, breakers, policy))
    key = ("context", f.state, f.lm.context_length if f.lm else None, req.est_tokens)
    context = kept.get(key) or memo.keep(key, _context_factor(req, f, policy))
    extra: tuple[Factor, ...] = ()
    if saved > 0 or req.cache_node == nid:
        extra = (_cache_factor(req, nid, f.state, saved, policy),)
    if impact > 0:
        extra += (_impact_factor(impact, policy),)
    factors = (thermal, memory, queue, wait, *extra, affinity, availability, context)
    total: float = 0  # added as sum() adds them, without a generator
    for x in factors:
        total += x.contribution
    return Score(nid, total, True, f"{f.state}, ~{wait.value:.1f}s expected", factors,
                 f.outstanding, q.in_flight < f.slots)


def _healthy(
    req: RouteRequest,
    node: NodeSnapshot,
    stats: Mapping[tuple[str, str], ServiceStats],
    breakers: Mapping[str, BreakerState],
) -> bool:
    """Nothing for ``_availability_factor`` to note (it would say "healthy", penalty 0):
    no breaker, no failure rate, not degraded, no memory pressure."""
    if breakers or node.status == NodeStatus.DEGRADED or node.memory_pressure == "warn":
        return False
    st = stats.get((node.node_id, req.model))
    return st is None or not st.failure_rate > 0


def _impact_factor(impact: float, policy: Policy) -> Factor:
    return Factor("impact", impact, -policy.wait_weight * impact,
                  f"slows the node's other streams by ~{impact:.1f}s in all")


# ---------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------


def _pick(cands: Sequence[Score], rand: float, policy: Policy) -> Score:
    """Best total; ties (within tie_epsilon) -> fewest outstanding -> ``rand``."""
    if len(cands) == 1:  # one candidate (one node holds the model): nothing to compare
        return cands[0]
    top = max(s.total for s in cands)
    tied = [s for s in cands if s.total >= top - policy.tie_epsilon]
    fewest = min(s.outstanding for s in tied)
    tied = sorted((s for s in tied if s.outstanding == fewest), key=lambda s: s.node_id)
    idx = min(int(max(0.0, rand) * len(tied)), len(tied) - 1)
    return tied[idx]


def _expected_s(score: Score) -> float:
    w = score.factor("wait")
    return w.value if w is not None else math.inf


def _hot(score: Score) -> bool:
    t = score.factor("thermal")
    return t is not None and t.value >= 1.0


def _worth_waiting(full: Score, best_free: Score, policy: Policy) -> bool:
    """A full node is worth waiting for when it leads the best free node by more than
    ``wait_margin`` points and — when that free node has the model hot (no cold load, no
    eviction to avoid) — it is also honestly expected to finish sooner, its queue included.
    """
    if full.free_slot or full.total - best_free.total <= policy.wait_margin:
        return False
    return not _hot(best_free) or _expected_s(full) < _expected_s(best_free)


def _reorder(ranked: tuple[Score, ...], first: Score) -> tuple[Score, ...]:
    """Put the chosen node first among equals so ``ranked`` reads like the decision."""
    rest = tuple(s for s in ranked if s is not first)
    return (first, *rest) if first.eligible else ranked


def _slot_free_estimate_s(
    score: Score,
    req: RouteRequest,
    queues: Mapping[tuple[str, str], QueueSnapshot],
    stats: Mapping[tuple[str, str], ServiceStats],
    policy: Policy,
) -> float:
    q = queues.get((score.node_id, req.model), QueueSnapshot())
    slots = max(1, q.slots)
    svc = _typical_service_s(stats.get((score.node_id, req.model)), req, policy)
    ahead = max(1, q.pending + q.in_flight - slots + 1)
    return ahead * svc / slots


def choose(
    req: RouteRequest,
    nodes: Sequence[NodeSnapshot],
    queues: Mapping[tuple[str, str], QueueSnapshot],
    stats: Mapping[tuple[str, str], ServiceStats],
    breakers: Mapping[str, BreakerState],
    now: float,
    rand: float,
    policy: Policy,
    waited_s: float = 0.0,
    node_in_flight: Mapping[str, int] | None = None,
    memo: ScoreMemo | None = None,
) -> Choice:
    """Dispatch, wait or reject.

    * dispatch: the best eligible node with a free slot (in_flight < slots) — unless a
      *full* node scores higher (e.g. it has the model hot and the free node would
      cold-load it; its points need not mean an earlier finish, and the reason says which)
      and ``wait_for_better``: then wait for it, up to ``max_queue_wait_s``. A free node
      with the model hot is only passed over for a full one expected to finish sooner
      (``_worth_waiting``).
    * wait: every eligible node is full (or a full one is worth waiting for). The router
      waits until any slot frees, then calls ``choose`` again (re-scoring, so a waiting
      request is never stuck behind its first choice), passing ``waited_s``.
    * reject: no eligible node (``retry_after_s`` None, except when only open circuit
      breakers stand in the way), or saturated for ``max_queue_wait_s`` (``retry_after_s``
      from the measured service times).
    """
    ranked = score_nodes(req, nodes, queues, stats, breakers, now, policy, node_in_flight, memo)
    eligible = [s for s in ranked if s.eligible]
    if not eligible:
        return _reject_no_eligible(req, nodes, ranked, breakers, now, policy)
    free = [s for s in eligible if s.free_slot]
    best_any = _pick(eligible, rand, policy)
    out_of_time = waited_s >= policy.max_queue_wait_s
    if free:
        best_free = _pick(free, rand, policy)
        full_lead = best_any.total - best_free.total
        if (
            not policy.wait_for_better
            or out_of_time
            or best_any.free_slot
            or not _worth_waiting(best_any, best_free, policy)
        ):
            reason = f"best free node ({best_free.reason})"
            if best_any is not best_free and not best_any.free_slot:
                reason += f"; {best_any.node_id} scores higher but is full"
            return Choice("dispatch", best_free.node_id, _reorder(ranked, best_free), reason)
        t_full, t_free = _expected_s(best_any), _expected_s(best_free)
        why = (
            "still expected to finish sooner"
            if t_full < t_free
            else f"scores higher though expected later (~{t_full:.1f}s against ~{t_free:.1f}s)"
        )
        return Choice(
            "wait",
            None,
            _reorder(ranked, best_any),
            f"{best_any.node_id} is full but {why} "
            f"(+{full_lead:.1f} points over {best_free.node_id})",
            wait_for=best_any.node_id,
        )
    if out_of_time:
        est = min(_slot_free_estimate_s(s, req, queues, stats, policy) for s in eligible)
        if not est > 0 or not math.isfinite(est):
            est = policy.retry_after_s
        retry = min(policy.retry_after_max_s, max(policy.retry_after_min_s, est))
        return Choice(
            "reject",
            None,
            ranked,
            f"fleet saturated for '{req.model}': no free slot after {waited_s:.0f}s",
            retry_after_s=float(round(retry + 0.499)),
            reject_kind="saturated",
        )
    return Choice(
        "wait",
        None,
        _reorder(ranked, best_any),
        f"all {len(eligible)} eligible node(s) full; waiting for a slot",
        wait_for=best_any.node_id,
    )


def _reject_no_eligible(
    req: RouteRequest,
    nodes: Sequence[NodeSnapshot],
    ranked: tuple[Score, ...],
    breakers: Mapping[str, BreakerState],
    now: float,
    policy: Policy,
) -> Choice:
    if not nodes:
        return Choice("reject", None, ranked, "no nodes registered", reject_kind="no_nodes")
    if not any(req.model in n.loaded or req.model in n.available for n in nodes):
        return Choice(
            "reject",
            None,
            ranked,
            f"model '{req.model}' not found on any node",
            reject_kind="not_found",
        )
    if all(n.status in UNROUTABLE_STATUSES or not n.reachable for n in nodes):
        return Choice("reject", None, ranked, "all nodes offline", reject_kind="offline")
    reasons = "; ".join(f"{s.node_id}: {s.reason}" for s in ranked)
    retry: float | None = None
    if all(s.reason.startswith("circuit") or "not on this node" in s.reason for s in ranked):
        waits = [
            b.open_until - now
            for n in nodes
            for k in (n.node_id, breaker_key(n.node_id, req.model))
            if (b := breakers.get(k)) is not None and b.state == CircuitState.OPEN
        ]
        if waits:
            retry = float(
                round(min(policy.retry_after_max_s, max(policy.retry_after_min_s, min(waits))))
            )
    return Choice(
        "reject",
        None,
        ranked,
        f"no eligible node for '{req.model}': {reasons}",
        retry_after_s=retry,
        reject_kind="ineligible",
    )


def wait_targets(choice: Choice, policy: Policy) -> tuple[str, ...]:
    """For a "wait" choice: the nodes whose next free slot the waiting request takes (in
    its arrival order, without scoring the fleet again).

    Every eligible node is full: any of them (a node full with this model has it loaded,
    so none of them is a cold load). Some node is free but a full one scores higher
    (``wait_for_better``): the full nodes that lead the best free one by more than
    ``wait_margin`` — exactly the ones it chose to wait for.
    """
    eligible = [s for s in choice.ranked if s.eligible]
    free = [s for s in eligible if s.free_slot]
    if not free:
        return tuple(s.node_id for s in eligible)
    best_free = max(free, key=lambda s: s.total)
    return tuple(s.node_id for s in eligible if _worth_waiting(s, best_free, policy))


def prewarm_target(
    req: RouteRequest,
    choice: Choice,
    queues: Mapping[tuple[str, str], QueueSnapshot],
    policy: Policy,
    nodes: Sequence[NodeSnapshot] = (),
) -> str | None:
    """Runner-up node to pre-warm (load-only request) when the winner's queue is deep.

    Only a runner-up that is eligible, does not have the model hot or loading, and can
    load it without evicting anything for sure (memory factor >= 0). Where the model is not
    known to fit (memory factor value < 1: memory unknown, or known only as a lower bound
    the load would pass; ``nodes``: the snapshots scored), nobody asked for this load and
    it may evict: with ``prewarm_spares_busy`` only a node whose resident models have no
    request in flight or queued and that loads nothing now, with ``prewarm_needs_room``
    only a node with nothing resident at all.
    """
    target = choice.node_id or choice.wait_for
    if target is None or choice.action == "reject":
        return None
    q = queues.get((target, req.model), QueueSnapshot())
    if q.pending + q.in_flight < policy.prewarm_queue_depth:
        return None
    for s in choice.ranked:
        if not s.eligible or s.node_id == target:
            continue
        thermal = s.factor("thermal")
        memory = s.factor("memory")
        if thermal is not None and thermal.value >= 0.75:
            return None  # runner-up already has it (hot or loading)
        if memory is not None and memory.contribution < 0:
            return None  # would evict other models
        if memory is not None and memory.value < 1.0 and (
                policy.prewarm_needs_room or policy.prewarm_spares_busy):
            snap = next((n for n in nodes if n.node_id == s.node_id), None)
            if snap is None:
                return None
            if policy.prewarm_needs_room and (snap.loaded or snap.loading):
                return None  # may evict: not known to fit, and something is resident
            if snap.loading or any(
                    (other := queues.get((s.node_id, name))) is not None
                    and other.in_flight + other.pending > 0 for name in snap.loaded):
                return None  # may evict a busy model (a drain), or waits behind a load
        return s.node_id
    return None


# ---------------------------------------------------------------------------------------
# Model fallbacks, context protection, VRAM-aware fallback
# ---------------------------------------------------------------------------------------


def fallback_chain(model: str, fallback_models: Sequence[str]) -> tuple[str, ...]:
    """``[model, *fallback_models]`` normalised, invalid names dropped, first occurrence kept."""
    out: list[str] = []
    for name in (model, *fallback_models):
        if not isinstance(name, str) or not is_valid_model_name(name):
            continue
        n = normalize_model(name)
        if n not in out:
            out.append(n)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class ContextDecision:
    action: str  # "keep" | "drop" | "set" | "upgrade"
    num_ctx: int | None  # the value to send (None: send none)
    model: str  # model to send the request to (changes only on "upgrade")
    reason: str


def _family(name: str, nodes: Sequence[NodeSnapshot]) -> str:
    for n in nodes:
        am = n.available.get(name)
        if am is not None and am.family:
            return am.family.lower()
    base = name.rsplit("/", 1)[-1].split(":", 1)[0]
    return re.sub(r"[\d.]+$", "", base) or base


def _size(name: str, nodes: Sequence[NodeSnapshot]) -> int:
    for n in nodes:
        am = n.available.get(name)
        if am is not None and am.size > 0:
            return am.size
    for n in nodes:
        lm = n.loaded.get(name)
        if lm is not None:
            return lm.size
    return 0


def _live(nodes: Sequence[NodeSnapshot]) -> list[NodeSnapshot]:
    return [n for n in nodes if n.status not in UNROUTABLE_STATUSES and n.reachable]


def protect_context(
    model: str,
    num_ctx: int | None,
    est_tokens: int,
    nodes: Sequence[NodeSnapshot],
    allow_upgrade: bool,
) -> ContextDecision:
    """Avoid reloads caused by ``options.num_ctx``.

    Ollama reloads a model whenever a request's num_ctx differs from the resident one
    (an absent num_ctx means the server default, which never reloads an auto-sized runner).
    So when the model is resident with a context that covers both the request's num_ctx and
    its estimated tokens, send that resident value ("set"; "keep" if it already matches or
    the request has no num_ctx: the body is changed only when that spares a reload). A
    request that needs more than any resident copy may be moved ("upgrade") to a larger
    resident model of the same family whose window is big enough, when allowed; otherwise
    it is kept (Ollama will reload).
    Unknown or no resident context: keep.
    """
    live = _live(nodes)
    ctxs = sorted(
        {
            lm.context_length
            for n in live
            if (lm := n.loaded.get(model)) is not None and lm.context_length
        }
    )
    need = max(num_ctx or 0, max(0, est_tokens))
    if not ctxs:
        return ContextDecision("keep", num_ctx, model, "model not resident anywhere")
    fitting = [c for c in ctxs if c >= need]
    if fitting:
        if num_ctx is None:
            # Ollama does not reload an auto-sized runner for a request without num_ctx, and
            # /api/ps cannot tell a pinned runner from an auto-sized one: adding a num_ctx
            # would change the client's bytes for no proven gain.
            return ContextDecision("keep", None, model, "no num_ctx and it fits: left as is")
        c = fitting[0]
        if num_ctx == c:
            return ContextDecision("keep", c, model, f"num_ctx {c} matches the resident model")
        asked = "no num_ctx" if num_ctx is None else f"num_ctx {num_ctx}"
        return ContextDecision(
            "set", c, model, f"{asked} -> resident {c} (fits ~{est_tokens} tokens, no reload)"
        )
    if allow_upgrade:
        fam = _family(model, nodes)
        size = _size(model, nodes)
        best: tuple[int, str, int] | None = None
        for n in live:
            for name, lm in n.loaded.items():
                if name == model or not lm.context_length or lm.context_length < need:
                    continue
                if _family(name, nodes) != fam:
                    continue
                s = _size(name, nodes) or lm.size
                if s <= size:
                    continue
                cand = (s, name, lm.context_length)
                if best is None or cand < best:
                    best = cand
        if best is not None:
            return ContextDecision(
                "upgrade",
                best[2],
                best[1],
                f"needs {need} tokens of context, '{model}' resident at {ctxs[-1]}: "
                f"upgraded to resident '{best[1]}' ({best[2]})",
            )
    return ContextDecision(
        "keep",
        num_ctx,
        model,
        f"needs {need} tokens, resident context {ctxs[-1]}: Ollama will reload",
    )


def model_category(name: str, nodes: Sequence[NodeSnapshot], kind: str = "text") -> str:
    """ "embedding" | "vision" | "completion", from capabilities, else families, else name."""
    caps: set[str] = set()
    fams: set[str] = set()
    for n in nodes:
        am = n.available.get(name)
        if am is not None:
            caps.update(c.lower() for c in am.capabilities)
            fams.update(f.lower() for f in am.families)
            if am.family:
                fams.add(am.family.lower())
    low = name.lower()
    if "embedding" in caps or (not caps and ("embed" in low or fams & {"bert", "nomic-bert"})):
        return "embedding"
    if "vision" in caps or fams & {"clip", "mllama"}:
        return "vision"
    if kind == "embed" and not caps and not fams:
        return "embedding"
    return "completion"


def vram_fallback(
    model: str,
    nodes: Sequence[NodeSnapshot],
    needs_vision: bool,
    kind: str,
) -> tuple[str, str] | None:
    """A resident model that may serve a request for a model resident nowhere.

    Same category only (embedding / vision / completion); a vision request only goes to a
    vision model; prefers the same family, then the closest size, then the name.
    Returns (served model, reason) or None.
    """
    live = _live(nodes)
    if any(model in n.loaded for n in live):
        return None
    want = "embedding" if kind == "embed" else model_category(model, nodes, kind)
    required = "vision" if needs_vision else want
    fam = _family(model, nodes)
    size = _size(model, nodes)
    best: tuple[int, float, str] | None = None
    for n in live:
        for name in n.loaded:
            if name == model:
                continue
            if model_category(name, nodes) != required:
                continue
            csize = _size(name, nodes)
            dist = abs(csize - size) / max(size, 1) if size and csize else 1e9
            cand = (0 if _family(name, nodes) == fam else 1, dist, name)
            if best is None or cand < best:
                best = cand
    if best is None:
        return None
    same = "same family" if best[0] == 0 else "same category"
    return best[2], f"'{model}' is not loaded anywhere; served by resident '{best[2]}' ({same})"


# =======================================================================================
# Fleet analytics: health checks and recommendations
# =======================================================================================
#
# The second half of this module. It reads what the router has seen (fleet facts and the
# store's traffic rollups, gathered into frozen inputs) and gives advice to the operator; it
# takes no routing decision, and the routing half above never calls it. Same rules: pure,
# the current time comes in as an argument. Its public names (tests/test_health.py keeps
# this list true):
#
#   inputs           `NodeFacts` `DiskModel` `ModelUse` `Incident` `FleetEvent` `PendingNode`
#                    `HealthInput`
#   health checks    `Severity` `SEVERITIES` `HealthPolicy` `HealthCheck` `HealthReport`
#                    `HEALTH_CHECKS` (family id, name, check function) `health_checks`
#                    `health_score` `health_vitals`
#   recommendations  `RecommendPolicy` `Recommendation` `NodeRecommendations` `UnmetDemand`
#                    `RecommendationReport` `recommendations` `usable_bytes`
#
# Names it takes from the routing half: `Policy` `LoadedModel` `BreakerState`
# `CircuitState` `resident_bytes` `_gb` `_GB`.

# ---------------------------------------------------------------------------------------
# Health checks
# ---------------------------------------------------------------------------------------
#
# ``health_checks`` turns one frozen ``HealthInput`` (fleet facts + store analytics, all
# gathered by the router) into cards: ``{id, name, severity, reason, fix, node_id, model}``.
# Every threshold lives in ``HealthPolicy``. Two windows:
#
# * "24 h": ``HealthInput.usage_24h`` (Store.node_model_stats over 24 hourly buckets) and
#   incidents/events whose timestamp is within ``window_s`` of ``now``.
# * "recent": ``usage_recent`` (Store.node_model_stats over the current and the previous UTC
#   hour, i.e. the last 60-120 min) and incidents/events within ``recent_s`` of ``now``. A
#   trace-based finding is *active* (WARNING or worse) only while it also shows in the
#   recent window; otherwise it is reported as resolved (INFO) so it stops costing score
#   points an hour after the cause is gone.
#
# Rules that keep the checks from firing on correct behaviour: sample floors before any
# rate is judged (a 1-of-3 failure is not a 33 % error rate); the first load of a model on
# a node is never a "cold-load" problem; idle memory on an idle fleet is not a finding
# (underutilisation needs unmet demand); KV-cache size is only a problem when it costs
# something (memory pressure, thrashing, or a context nobody uses); offline / draining
# nodes are reported once (node status) and not again by every other check.


class Severity(StrEnum):
    """How bad a health card is; a ``str``, so cards and JSON carry the plain word."""

    CRITICAL = "critical"
    WARNING = "warning"
    INFO = "info"
    OK = "ok"


SEVERITIES = tuple(Severity)  # worst first: the order of the cards


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """Every health threshold, in one place (the router may ``replace`` any of them)."""

    # -- score ------------------------------------------------------------------------
    critical_points: int = 20
    warning_points: int = 10
    info_points: int = 3
    # -- windows ----------------------------------------------------------------------
    window_s: float = 86_400.0  # "24 h"
    recent_s: float = 3_600.0  # "recent" for incidents / events (usage_recent: 1-2 h)
    # -- node status / reachability ----------------------------------------------------
    degraded_after_s: float = 15.0  # informational: silence shown in the reason
    unreachable_min_errors: int = 3  # recent failed attempts with nothing served → unreachable
    # -- memory -----------------------------------------------------------------------
    low_memory_share: float = 0.05  # available / total below this → WARNING even if "normal"
    swap_warn_share: float = 0.25  # swap used / RAM
    swap_min_bytes: int = 2 * _GB
    underused_free_share: float = 0.5  # > this share of memory free ...
    underused_min_free_bytes: int = 8 * _GB  # ... and at least this much ...
    underused_min_demand: int = 10  # ... while models with >= this many requests go cold
    kv_bloat_ratio: float = 1.5  # resident / weights above this = KV cache dominates
    kv_share_warning: float = 0.3  # KV bytes / node memory → WARNING (when it costs)
    kv_share_critical: float = 0.5
    context_used_share: float = 0.25  # avg tokens / context below this = context unused
    context_min_requests: int = 10
    context_full_share: float = 0.9  # avg prompt tokens / context above: prompts truncated
    offload_min_share: float = 0.02  # part of a model not in VRAM above this → offload card
    disk_min_free_bytes: int = 10 * _GB
    disk_min_free_share: float = 0.05
    # -- traffic ----------------------------------------------------------------------
    reaper_critical: int = 10  # reaped streams in 24 h
    load_timeout_ms: float = 120_000.0  # failed/retried attempt slower than this = load timeout
    load_timeout_min: int = 3  # per node:model in 24 h
    wedged_free_share: float = 0.4  # >= 2 models time out while this much memory is free
    thrash_min_reloads: int = 4  # loads beyond the first per node:model in 24 h ...
    thrash_reload_share: float = 0.2  # ... and at least this share of its requests
    thrash_recent_reloads: int = 2  # reloads in the recent window → WARNING
    error_rate: float = 0.05  # attempt error rate (failed + retried + incomplete + reaped)
    error_rate_critical: float = 0.25
    error_min_attempts: int = 21  # floor(1 / error_rate) + 1: one error alone never fires
    error_min_errors: int = 3
    retry_info: float = 0.3  # retried attempts per request
    retry_warning: float = 0.5
    retry_min_requests: int = 10
    disconnect_min: int = 3
    disconnect_rate: float = 0.01
    incomplete_min: int = 2
    incomplete_rate: float = 0.005
    capability_min_completed: int = 3  # image/stt requests before suggesting expansion
    image_free_bytes: int = 8 * _GB
    stt_free_bytes: int = 4 * _GB
    store_errors_critical: int = 50


@dataclass(frozen=True, slots=True)
class DiskModel:
    """One model on a node's disk (``/api/tags``)."""

    name: str  # normalised
    size: int
    modified_at: float | None = None  # epoch s
    family: str = ""
    capabilities: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """What the router knows about one node, for health and recommendations."""

    node_id: str
    status: str = "online"  # online | degraded | offline | draining
    source: str = "agent"  # agent | static | local
    url: str = ""
    seconds_since_seen: float | None = None
    last_error: str = ""
    ram_total: int = 0
    ram_available: int = 0
    vram_total: int = 0  # discrete GPU memory (0 = none / unified)
    vram_available: int = 0
    memory_pressure: str = "normal"
    swap_total: int = 0
    swap_used: int = 0
    disk_total: int | None = None
    disk_free: int | None = None
    loaded: tuple[LoadedModel, ...] = ()
    on_disk: tuple[DiskModel, ...] = ()
    agent_version: str = ""
    ollama_version: str = ""
    reachable: bool = True  # the router's own view
    errors: tuple[str, ...] = ()  # collector errors reported by the agent
    image_models: tuple[str, ...] = ()
    stt_models: tuple[str, ...] = ()
    num_parallel: int | None = None
    max_loaded_models: int | None = None
    breaker: BreakerState | None = None  # node-level breaker
    model_breakers: Mapping[str, BreakerState] = field(default_factory=dict)

    @property
    def fast_total(self) -> int:
        return self.vram_total if self.vram_total > 0 else self.ram_total

    @property
    def fast_free(self) -> int:
        return self.vram_available if self.vram_total > 0 else self.ram_available

    @property
    def live(self) -> bool:
        return self.status in ("online", "degraded")

    def disk_size(self, model: str) -> int:
        for d in self.on_disk:
            if d.name == model:
                return d.size
        return 0


@dataclass(frozen=True, slots=True)
class ModelUse:
    """One node x model row of ``Store.node_model_stats`` (a window of traffic)."""

    node_id: str
    model: str
    requests: int = 0
    attempts: int = 0
    completed: int = 0
    failures: int = 0  # failed + incomplete + reaped (+ rejected)
    errors: int = 0  # failed + retried + incomplete + reaped attempts
    retried: int = 0
    client_disconnected: int = 0
    cold_loads: int = 0
    fallbacks: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_p95_ms: float | None = None
    latency_p95_ms: float | None = None
    tokens_per_s: float | None = None
    last_used: float | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, object]) -> ModelUse:
        def i(k: str) -> int:
            v = row.get(k)
            return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0

        def f(k: str) -> float | None:
            v = row.get(k)
            return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

        return cls(
            node_id=str(row.get("node_id") or ""),
            model=str(row.get("model") or ""),
            requests=i("requests"),
            attempts=i("attempts"),
            completed=i("completed"),
            failures=i("failures"),
            errors=i("errors"),
            retried=i("retried"),
            client_disconnected=i("client_disconnected"),
            cold_loads=i("cold_loads"),
            fallbacks=i("fallbacks"),
            prompt_tokens=i("prompt_tokens"),
            completion_tokens=i("completion_tokens"),
            ttft_p95_ms=f("ttft_p95_ms"),
            latency_p95_ms=f("latency_p95_ms"),
            tokens_per_s=f("tokens_per_s"),
            last_used=f("last_used"),
        )


@dataclass(frozen=True, slots=True)
class Incident:
    """One non-completed trace row (failed, retried, incomplete, reaped, rejected, ...)."""

    timestamp: float
    node_id: str
    model: str
    status: str
    http_status: int = 0
    latency_ms: float = 0.0
    error: str = ""
    kind: str = "text"


@dataclass(frozen=True, slots=True)
class FleetEvent:
    """One row of ``Store.events`` (breaker_open, node_offline, auto_pull, settings, ...)."""

    timestamp: float
    kind: str
    node_id: str = ""
    detail: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PendingNode:
    """An agent node waiting for the operator's approval (consent): never routed to."""

    node_id: str
    addr: str
    url: str
    waiting_since: float
    reason: str = ""


@dataclass(frozen=True, slots=True)
class HealthInput:
    now: float
    nodes: tuple[NodeFacts, ...] = ()
    router_version: str = ""
    usage_24h: tuple[ModelUse, ...] = ()
    usage_recent: tuple[ModelUse, ...] = ()
    incidents: tuple[Incident, ...] = ()  # last 24 h, newest first (bounded by the router)
    events: tuple[FleetEvent, ...] = ()  # last 24 h
    store_dropped: int = 0
    store_write_errors: int = 0
    store_queue_depth: int = 0
    settings: Mapping[str, object] = field(default_factory=dict)
    stall_timeout_s: float = 300.0
    pending_nodes: tuple[PendingNode, ...] = ()


@dataclass(frozen=True, slots=True)
class HealthCheck:
    id: str
    name: str
    severity: Severity
    reason: str
    fix: str = ""
    node_id: str | None = None
    model: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "severity": str(self.severity),
            "reason": self.reason,
            "fix": self.fix,
            "node_id": self.node_id,
            "model": self.model,
        }


@dataclass(frozen=True, slots=True)
class HealthReport:
    score: int
    checks: tuple[HealthCheck, ...]  # critical → warning → info → ok
    vitals: Mapping[str, object]
    generated_at: float

    def to_dict(self) -> dict[str, object]:
        return {
            "score": self.score,
            "checks": [c.to_dict() for c in self.checks],
            "vitals": dict(self.vitals),
            "generated_at": self.generated_at,
        }


def health_score(checks: Sequence[HealthCheck], policy: HealthPolicy = HealthPolicy()) -> int:
    """100 - 20*critical - 10*warning - 3*info, floored at 0 (points from ``policy``)."""
    pts = {
        Severity.CRITICAL: policy.critical_points,
        Severity.WARNING: policy.warning_points,
        Severity.INFO: policy.info_points,
    }
    return max(0, 100 - sum(pts.get(c.severity, 0) for c in checks))


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f}%"


def _recent_ts(inp: HealthInput, pol: HealthPolicy) -> float:
    return inp.now - pol.recent_s


def _in_window(ts: float, inp: HealthInput, pol: HealthPolicy) -> bool:
    return inp.now - pol.window_s <= ts <= inp.now + 60.0


def _add_use(o: ModelUse, u: ModelUse) -> ModelUse:
    return replace(
        o,
        requests=o.requests + u.requests,
        attempts=o.attempts + u.attempts,
        completed=o.completed + u.completed,
        failures=o.failures + u.failures,
        errors=o.errors + u.errors,
        retried=o.retried + u.retried,
        client_disconnected=o.client_disconnected + u.client_disconnected,
        cold_loads=o.cold_loads + u.cold_loads,
        fallbacks=o.fallbacks + u.fallbacks,
        prompt_tokens=o.prompt_tokens + u.prompt_tokens,
        completion_tokens=o.completion_tokens + u.completion_tokens,
    )


def _node_usage(usage: Sequence[ModelUse]) -> dict[str, ModelUse]:
    """Per node sums of a window (models folded together)."""
    out: dict[str, ModelUse] = {}
    for u in usage:
        o = out.get(u.node_id)
        out[u.node_id] = replace(u, model="") if o is None else _add_use(o, u)
    return out


def _model_usage(usage: Sequence[ModelUse]) -> dict[str, ModelUse]:
    """Per model sums of a window (nodes folded together)."""
    out: dict[str, ModelUse] = {}
    for u in usage:
        o = out.get(u.model)
        out[u.model] = replace(u, node_id="") if o is None else _add_use(o, u)
    return out


def _fleet_usage(usage: Sequence[ModelUse]) -> ModelUse:
    total = ModelUse(node_id="", model="")
    for u in _node_usage(usage).values():
        total = replace(
            total,
            requests=total.requests + u.requests,
            attempts=total.attempts + u.attempts,
            completed=total.completed + u.completed,
            failures=total.failures + u.failures,
            errors=total.errors + u.errors,
            retried=total.retried + u.retried,
            client_disconnected=total.client_disconnected + u.client_disconnected,
            cold_loads=total.cold_loads + u.cold_loads,
            fallbacks=total.fallbacks + u.fallbacks,
        )
    return total


def _count(
    incidents: Sequence[Incident], status: str, since: float, node_id: str | None = None
) -> int:
    return sum(
        1
        for x in incidents
        if x.status == status and x.timestamp >= since and (node_id is None or x.node_id == node_id)
    )


# -- the checks: each returns the cards of one family (empty list = family is ok) -------


def _empty_fleet_card(inp: HealthInput) -> HealthCheck:
    known = (
        f"{len(inp.nodes)} known node(s), none online or degraded"
        if inp.nodes
        else "no node has joined or been configured"
    )
    return HealthCheck(
        "no_nodes_online",
        "No node online",
        Severity.CRITICAL,
        f"The fleet is empty ({known}): every request fails with 'model not found'.",
        "Run `herd-node` on each Ollama machine (it finds this router by mDNS, or give "
        "it `--router-url http://ROUTER:11435`), or start the router with "
        "`--node http://HOST:11434` (repeatable) for machines without the agent.",
    )


def _node_status_card(n: NodeFacts) -> HealthCheck | None:
    """The card of an offline, degraded or draining node (None when it is online)."""
    silent = (
        f"{n.seconds_since_seen:.0f}s since last contact"
        if n.seconds_since_seen is not None
        else "never seen"
    )
    err = f"; last error: {n.last_error}" if n.last_error else ""
    where = n.url or n.node_id
    if n.status == "offline":
        fix = (
            f"Check the node: is Ollama running (`systemctl status ollama` / `ollama ps` on "
            f"{n.node_id}) and reachable from the router (`curl {where}/api/version`)?"
        )
        if n.source == "agent":
            fix += " Is the herd-node agent running (`herd-node` / its service) and "
            fix += "pointed at this router?"
        return HealthCheck(
            "node_offline",
            "Node offline",
            Severity.CRITICAL,
            f"{n.node_id} is offline ({silent}){err}; its requests go elsewhere.",
            fix,
            n.node_id,
        )
    if n.status == "degraded":
        return HealthCheck(
            "node_degraded",
            "Node degraded",
            Severity.WARNING,
            f"{n.node_id} is degraded ({silent}, heartbeats/polls missed){err}; it only "
            "gets traffic when no healthy node can serve.",
            f"Check network and load on {n.node_id}; `curl {where}/api/version` from the "
            "router host. It turns offline after three missed beats/polls.",
            n.node_id,
        )
    if n.status == "draining":
        return HealthCheck(
            "node_draining",
            "Node draining",
            Severity.INFO,
            f"{n.node_id} is draining (its agent is shutting down): no new requests.",
            "Expected during a restart; restart the herd-node agent if it stays so.",
            n.node_id,
        )
    return None


def _check_node_status(inp: HealthInput, pol: HealthPolicy) -> list[HealthCheck]:
    """An empty fleet, then one card per node that is not online."""
    out = [] if any(n.live for n in inp.nodes) else [_empty_fleet_card(inp)]
    out.extend(card for n in inp.nodes if (card := _node_status_card(n)) is not None)
    return out


def _check_unreachable(inp: HealthInput, pol: HealthPolicy) -> list[HealthCheck]:
    """A node that heartbeats (online/degraded) while the router cannot reach its Ollama."""
    out: list[HealthCheck] = []
    recent = _node_usage(inp.usage_recent)
    since = _recent_ts(inp, pol)
    for n in inp.nodes:
        if not n.live:
            continue
        if n.source != "agent" and n.status == "degraded":
            continue  # a polled node that fails polls: node status already says so
        signals: list[str] = []
        if not n.reachable:
            signals.append("the router's last connection attempt failed")
        conn_events = [
            e
            for e in inp.events
            if e.kind == "breaker_open"
            and e.node_id == n.node_id
            and e.timestamp >= since
            and str(e.detail.get("kind", "")) in ("connect", "reset", "timeout_first_byte")
        ]
        if n.breaker is not None and n.breaker.state != CircuitState.CLOSED and conn_events:
            signals.append(
                f"its circuit breaker opened {len(conn_events)}x in the last "
                f"{pol.recent_s / 60:.0f} min on {conn_events[0].detail.get('kind')} failures"
            )
        u = recent.get(n.node_id)
        if u is not None and u.errors >= pol.unreachable_min_errors and u.completed == 0:
            signals.append(f"{u.errors} failed/retried attempts and none completed recently")
        if not signals:
            continue
        sev = Severity.CRITICAL if n.status == "online" else Severity.WARNING
        out.append(
            HealthCheck(
                "node_unreachable",
                "Ollama unreachable from the router",
                sev,
                f"{n.node_id} reports {n.status} but "
                + "; ".join(signals)
                + (f" ({n.last_error})" if n.last_error else "")
                + ". Requests routed there fail and are retried elsewhere.",
                f"Make Ollama listen on the network on {n.node_id}: set OLLAMA_HOST=0.0.0.0:11434 "
                '(systemd: `systemctl edit ollama` → Environment="OLLAMA_HOST=0.0.0.0:11434"; '
                "macOS: `launchctl setenv OLLAMA_HOST 0.0.0.0:11434`), restart Ollama, open TCP "
                f"11434 in the firewall, then `curl {n.url or '<node>:11434'}/api/version` from "
                "the router host.",
                n.node_id,
            )
        )
    return out


def _check_memory_pressure(inp: HealthInput, pol: HealthPolicy) -> list[HealthCheck]:
    out: list[HealthCheck] = []
    for n in inp.nodes:
        if not n.live or n.ram_total <= 0:
            continue
        free = n.ram_available / n.ram_total
        sev = {"warn": Severity.WARNING, "critical": Severity.CRITICAL}.get(n.memory_pressure)
        if sev is None and free < pol.low_memory_share:
            sev = Severity.WARNING
        if sev is None:
            continue
        biggest = sorted(n.loaded, key=lambda m: -m.size)[:3]
        models = ", ".join(f"{m.name} {_gb(m.size)}" for m in biggest) or "none loaded"
        out.append(
            HealthCheck(
                "memory_pressure",
                "Memory pressure",
                sev,
                f"{n.node_id}: pressure '{n.memory_pressure}', {_gb(n.ram_available)} of "
                f"{_gb(n.ram_total)} RAM available ({_pct(free)}); resident: {models}.",
                "Free memory: unload idle models (`ollama stop <model>`), lower "
                "OLLAMA_MAX_LOADED_MODELS or OLLAMA_NUM_PARALLEL / context length on this node, "
                "or close other memory-hungry apps.",
                n.node_id,
            )
        )
    return out


def _check_swap(inp: HealthInput, pol: HealthPolicy) -> list[HealthCheck]:
    out: list[HealthCheck] = []
    for n in inp.nodes:
        if not n.live or n.ram_total <= 0 or n.swap_used < pol.swap_min_bytes:
            continue
        share = n.swap_used / n.ram_total
        if share < pol.swap_warn_share:
            continue
        out.append(
            HealthCheck(
                "swap_usage",
                "Swap in use",
                Severity.WARNING,
                f"{n.node_id}: {_gb(n.swap_used)} swapped ({_pct(share)} of "
                f"{_gb(n.ram_total)} RAM); model weights paged to disk make inference crawl.",
                "Load fewer/smaller models on this node (lower OLLAMA_MAX_LOADED_MODELS, a "
                "smaller quantisation) or add RAM; `ollama ps` shows what is resident.",
                n.node_id,
            )
        )
    return out


def _cold_models(inp: HealthInput, pol: HealthPolicy) -> dict[str, int]:
    """Models with real demand (24 h) that paid reloads beyond their first load somewhere."""
    reloads: dict[str, int] = {}
    demand = _model_usage(inp.usage_24h)
    for u in inp.usage_24h:
        extra = max(0, u.cold_loads - 1)
        if extra and demand[u.model].requests >= pol.underused_min_demand:
            reloads[u.model] = reloads.get(u.model, 0) + extra
    return reloads


def _thrash_rows(inp: HealthInput, pol: HealthPolicy) -> list[ModelUse]:
    return [
        u
        for u in inp.usage_24h
        if u.cold_loads - 1 >= pol.thrash_min_reloads
        and (u.cold_loads - 1) >= pol.thrash_reload_share * max(1, u.requests)
    ]


def _load_timeouts(inp: HealthInput, pol: HealthPolicy) -> list[Incident]:
    return [
        x
        for x in inp.incidents
        if x.status in ("failed", "retried")
        and x.node_id
        and _in_window(x.timestamp, inp, pol)
        and (
            x.latency_ms >= pol.load_timeout_ms
            or ("within" in x.error and "no response" in x.error)
        )
    ]


def _check_underutilized(inp: HealthInput, pol: HealthPolicy) -> list[HealthCheck]:
    """Free memory while demanded models keep going cold. Idle memory alone is not a finding."""
    out: list[HealthCheck] = []
    cold = _cold_models(inp, pol)
    thrashing = {u.node_id for u in _thrash_rows(inp, pol)}
    timeouts = {x.node_id for x in _load_timeouts(inp, pol)}
    for n in inp.nodes:
        if n.status != "online" or not n.reachable or n.fast_total <= 0:
            continue
        if n.node_id in thrashing or n.node_id in timeouts or n.memory_pressure != "normal":
            continue  # its memory is not idle in any useful sense: other checks explain why
        free = n.fast_free
        if free < pol.underused_min_free_bytes or free / n.fast_total <= pol.underused_free_share:
            continue
        loaded = {m.name for m in n.loaded}
        on_disk = {d.name: d.size for d in n.on_disk}
        fitting = sorted(
            (m for m in cold if m not in loaded and 0 < on_disk.get(m, 0) <= free),
            key=lambda m: -cold[m],
        )
        at_cap = n.max_loaded_models is not None and len(loaded) >= n.max_loaded_models
        if not fitting and not (at_cap and cold):
            continue
        parts = [
            f"{n.node_id} has {_gb(free)} of {_gb(n.fast_total)} free "
            f"({_pct(free / n.fast_total)}) with {len(loaded)} model(s) resident"
        ]
        if fitting:
            parts.append(
                "while "
                + ", ".join(f"{m} ({cold[m]} reloads in 24 h)" for m in fitting[:3])
                + " keep being loaded again on the fleet"
            )
        fix = []
        if at_cap:
            fix.append(
                f"raise OLLAMA_MAX_LOADED_MODELS on {n.node_id} (now {n.max_loaded_models}) to "
                f"{(n.max_loaded_models or 0) + 2} — a positive number; -1 is not a valid value"
            )
        fix.append("set OLLAMA_KEEP_ALIVE=30m (or -1 to keep models until evicted) on the node")
        if fitting:
            fix.append(f'preload: `ollama run {fitting[0]} ""` on {n.node_id}')
        out.append(
            HealthCheck(
                "underutilized_memory",
                "Underutilised memory",
                Severity.INFO,
                "; ".join(parts) + ".",
                "; ".join(fix) + ".",
                n.node_id,
            )
        )
    return out


def _check_kv_bloat(inp: HealthInput, pol: HealthPolicy) -> list[HealthCheck]:
    out: list[HealthCheck] = []
    usage = {(u.node_id, u.model): u for u in inp.usage_24h}
    thrashing = {u.node_id for u in _thrash_rows(inp, pol)}
    for n in inp.nodes:
        if not n.live or n.fast_total <= 0:
            continue
        for lm in n.loaded:
            weights = n.disk_size(lm.name)
            if weights <= 0 or lm.size <= pol.kv_bloat_ratio * weights:
                continue
            kv = lm.size - weights
            share = kv / n.fast_total
            u = usage.get((n.node_id, lm.name))
            ctx = lm.context_length or 0
            used = ""
            unused = False
            if u is not None and u.completed >= pol.context_min_requests and ctx:
                avg = (u.prompt_tokens + u.completion_tokens) / u.completed
                unused = avg < pol.context_used_share * ctx
                used = f"; requests use ~{avg:.0f} tokens on average"
            costly = n.memory_pressure != "normal" or n.node_id in thrashing
            if share >= pol.kv_share_critical and costly:
                sev = Severity.CRITICAL
            elif (share >= pol.kv_share_warning and (costly or unused)) or (costly and unused):
                sev = Severity.WARNING
            else:
                sev = Severity.INFO
            par = f", OLLAMA_NUM_PARALLEL={n.num_parallel}" if n.num_parallel else ""
            out.append(
                HealthCheck(
                    "kv_cache_bloat",
                    "KV cache larger than the weights",
                    sev,
                    f"{lm.name} on {n.node_id} holds {_gb(lm.size)} for {_gb(weights)} of "
                    f"weights: {_gb(kv)} of KV cache ({_pct(share)} of the node's memory) for "
                    f"context {ctx or 'unknown'}{par}{used}.",
                    "Size the context to what clients use: OLLAMA_CONTEXT_LENGTH=<tokens> (or "
                    "options.num_ctx), fewer parallel slots (OLLAMA_NUM_PARALLEL=1..2), and "
                    "OLLAMA_FLASH_ATTENTION=1 with OLLAMA_KV_CACHE_TYPE=q8_0 to halve the cache.",
                    n.node_id,
                    lm.name,
                )
            )
    return out


def _check_vram(inp: HealthInput, pol: HealthPolicy) -> list[HealthCheck]:
    out: list[HealthCheck] = []
    fallbacks = sorted(
        ((m, u.fallbacks) for m, u in _model_usage(inp.usage_24h).items() if u.fallbacks),
        key=lambda kv: -kv[1],
    )
    if fallbacks:
        total = sum(c for _, c in fallbacks)
        out.append(
            HealthCheck(
                "vram_fallback_active",
                "Fallbacks served requests",
                Severity.INFO,
                f"{total} request(s) in 24 h were served by another model than asked; top: "
                + ", ".join(f"{m} ({c})" for m, c in fallbacks[:5])
                + ".",
                "Keep the asked-for models resident where memory allows (see Recommendations), "
                "or turn fallbacks off (settings: vram_fallback=false) if exact models matter.",
            )
        )
    for n in inp.nodes:
        if not n.live or n.vram_total <= 0:
            continue  # CPU-only / unified memory: size_vram says nothing about offload
        for lm in n.loaded:
            if lm.size <= 0:
                continue
            cpu = (lm.size - lm.size_vram) / lm.size
            if cpu <= pol.offload_min_share:
                continue
            out.append(
                HealthCheck(
                    "gpu_offload",
                    "Model partly on CPU",
                    Severity.WARNING,
                    f"{lm.name} on {n.node_id}: {_pct(cpu)} of its {_gb(lm.size)} runs from "
                    f"system RAM (only {_gb(lm.size_vram)} in VRAM of {_gb(n.vram_total)}); "
                    "decoding is several times slower.",
                    "Unload other models from this GPU, shrink the context (OLLAMA_CONTEXT_LENGTH) "
                    "or use a smaller quantisation / a node with more VRAM.",
                    n.node_id,
                    lm.name,
                )
            )
    return out


def _vkey(v: str) -> tuple[int, ...]:
    nums = re.findall(r"\d+", v)
    return tuple(int(x) for x in nums[:3])


def _agent_version_card(n: NodeFacts, router_version: str) -> HealthCheck | None:
    """An agent that does not say its version, or runs another one than the router."""
    if not n.agent_version:
        return HealthCheck(
            "version_unknown",
            "Agent version unknown",
            Severity.INFO,
            f"{n.node_id}'s agent does not report its version.",
            f"Upgrade herd-node on {n.node_id} to {router_version or 'the router'}'s "
            "version (`pip install -U herd`) and restart it.",
            n.node_id,
        )
    if router_version and n.agent_version != router_version:
        return HealthCheck(
            "version_mismatch",
            "Agent version differs from the router",
            Severity.WARNING,
            f"{n.node_id} runs herd-node {n.agent_version}, router is {router_version}.",
            f"Run the same version everywhere: `pip install herd=={router_version}` "
            f"on {n.node_id} (or upgrade the router), then restart the agent.",
            n.node_id,
        )
    return None


def _ollama_versions_card(live: Sequence[NodeFacts]) -> HealthCheck | None:
    """One card when the reachable live nodes run more than one Ollama version."""
    versions = {n.ollama_version for n in live if n.ollama_version}
    if len(versions) <= 1:
        return None
    newest = max(versions, key=_vkey)
    old = [
        f"{n.node_id} {n.ollama_version}"
        for n in live
        if n.ollama_version and n.ollama_version != newest
    ]
    return HealthCheck(
        "ollama_version_mismatch",
        "Ollama versions differ",
        Severity.INFO,
        f"Nodes run different Ollama versions (newest {newest}; older: "
        + ", ".join(old)
        + "): model support and memory estimates may differ.",
        "Upgrade Ollama on the older nodes (`curl -fsSL https://ollama.com/install.sh | "
        "sh`, or the macOS app) so every node behaves the same.",
    )


def _ollama_version_unknown_card(n: NodeFacts) -> HealthCheck:
    return HealthCheck(
        "ollama_version_unknown",
        "Ollama version unknown",
        Severity.INFO,
        f"{n.node_id} did not report its Ollama version.",
        f"`curl {n.url or '<node>:11434'}/api/version` on {n.node_id}; upgrade Ollama "
        "if the endpoint is missing.",
        n.node_id,
    )


def _check_versions(inp: HealthInput, pol: HealthPolicy) -> list[HealthCheck]:
    """Agents against the router's version; Ollama versions across the reachable nodes."""
    out: list[HealthCheck] = []
    for n in inp.nodes:
        if n.source == "agent" and n.status != "offline":
            card = _agent_version_card(n, inp.router_version)
            if card is not None:
                out.append(card)
    live = [n for n in inp.nodes if n.live and n.reachable]
    mixed = _ollama_versions_card(live)
    if mixed is not None:
        out.append(mixed)
    out.extend(
        _ollama_version_unknown_card(n)
        for n in live
        if not n.ollama_version and n.status == "online"
    )
    return out


def _check_context(inp: HealthInput, pol: HealthPolicy) -> list[HealthCheck]:
    out: list[HealthCheck] = []
    usage = {(u.node_id, u.model): u for u in inp.usage_24h}
    for n in inp.nodes:
        if not n.live:
            continue
        for lm in n.loaded:
            u = usage.get((n.node_id, lm.name))
            ctx = lm.context_length or 0
            if u is None or not ctx or u.completed < pol.context_min_requests:
                continue
            avg_prompt = u.prompt_tokens / u.completed
            if avg_prompt < pol.context_full_share * ctx:
                continue
            out.append(
                HealthCheck(
                    "context_protection_insufficient",
                    "Prompts fill the context window",
                    Severity.WARNING,
                    f"{lm.name} on {n.node_id} runs with context {ctx} and prompts average "
                    f"{avg_prompt:.0f} tokens over {u.completed} requests "
                    f"({_pct(avg_prompt / ctx)}): Ollama silently truncates longer prompts.",
                    f"Give it a larger window: OLLAMA_CONTEXT_LENGTH={ctx * 2} on the node, or "
                    f"options.num_ctx >= {ctx * 2} in the clients (context protection then keeps "
                    "that window resident).",
                    n.node_id,
                    lm.name,
                )
            )
    if inp.settings.get("context_protection") is False:
        out.append(
            HealthCheck(
                "context_protection_disabled",
                "Context protection off",
                Severity.INFO,
                "Context protection is off: a request with a different options.num_ctx than "
                "the resident model reloads it (seconds to minutes each time).",
                'Turn it on: POST /dashboard/api/settings {"context_protection": true}.',
            )
        )
    acts = [
        e for e in inp.events if e.kind.startswith("context") and _in_window(e.timestamp, inp, pol)
    ]
    if acts:
        out.append(
            HealthCheck(
                "context_protection_active",
                "Context protection at work",
                Severity.INFO,
                f"{len(acts)} context adjustment(s) in 24 h kept resident models from reloading.",
                "Nothing to do; to avoid them, send the resident num_ctx from the clients.",
            )
        )
    return out


def _check_reaper(inp: HealthInput, pol: HealthPolicy) -> list[HealthCheck]:
    out: list[HealthCheck] = []
    day = [x for x in inp.incidents if x.status == "reaped" and _in_window(x.timestamp, inp, pol)]
    if not day:
        return out
    recent = [x for x in day if x.timestamp >= _recent_ts(inp, pol)]
    by_node: dict[str, int] = {}
    for x in day:
        by_node[x.node_id] = by_node.get(x.node_id, 0) + 1
    if len(day) > pol.reaper_critical and recent:
        sev = Severity.CRITICAL
    elif recent:
        sev = Severity.WARNING
    else:
        sev = Severity.INFO
    worst = max(by_node, key=lambda k: by_node[k])
    out.append(
        HealthCheck(
            "zombie_reaper_active",
            "Stalled streams reaped",
            sev,
            f"{len(day)} stream(s) in 24 h ({len(recent)} in the last hour) made no progress "
            f"for {inp.stall_timeout_s:g}s and were cut; by node: "
            + ", ".join(f"{k or '?'} {v}" for k, v in sorted(by_node.items()))
            + ".",
            f"Look at the Ollama log on {worst or 'the node'} (`journalctl -u ollama` / "
            "~/.ollama/logs/server.log) for a stuck runner and restart Ollama there; raise "
            "--stall-timeout if long CPU prompt evaluations are legitimate.",
            worst or None,
        )
    )
    return out


def _capability_models(n: NodeFacts, kind: str) -> tuple[str, ...]:
    return n.image_models if kind == "image" else n.stt_models


def _capability_expansion_card(
    inp: HealthInput, pol: HealthPolicy, kind: str, completed: int
) -> HealthCheck | None:
    """Busy image/stt traffic on few nodes while an online node has the room for it."""
    label = "Image generation" if kind == "image" else "Transcription"
    need_free = pol.image_free_bytes if kind == "image" else pol.stt_free_bytes
    holders = {n.node_id for n in inp.nodes if _capability_models(n, kind)}
    spare = [
        n.node_id
        for n in inp.nodes
        if n.status == "online" and n.node_id not in holders and n.fast_free >= need_free
    ]
    if not spare:
        return None
    return HealthCheck(
        "mflux_expansion" if kind == "image" else "stt_expansion",
        f"{label} could use more nodes",
        Severity.INFO,
        f"{completed} {kind} requests in 24 h run on {len(holders)} node(s); "
        f"{', '.join(spare[:3])} ha{'s' if len(spare) == 1 else 've'} "
        f">= {_gb(need_free)} free and no {kind} backend.",
        f"Install a {kind} backend on {spare[0]} and restart its herd-node "
        f"(see README: herd-node --{'image' if kind == 'image' else 'stt'}-backend).",
    )


def _check_capability(inp: HealthInput, pol: HealthPolicy, kind: str) -> list[HealthCheck]:
    """Image or speech models offered: setting off, their 24 h activity, room to expand."""
    label = "Image generation" if kind == "image" else "Transcription"
    cid = "image_generation" if kind == "image" else "transcription_activity"
    setting = "image_generation" if kind == "image" else "transcription"
    names = {m for n in inp.nodes for m in _capability_models(n, kind)}
    out: list[HealthCheck] = []
    if not names:
        return out
    if inp.settings.get(setting) is False:
        out.append(
            HealthCheck(
                f"{setting}_disabled",
                f"{label} disabled",
                Severity.INFO,
                f"Nodes offer {kind} models ({', '.join(sorted(names)[:5])}) but the "
                f"{setting} setting is off: those requests are refused.",
                f'POST /dashboard/api/settings {{"{setting}": true}} to serve them.',
            )
        )
    rows = [u for u in inp.usage_24h if u.model in names]
    if not rows:
        return out
    completed = sum(u.completed for u in rows)
    failed = sum(u.failures for u in rows)
    out.append(
        HealthCheck(
            cid,
            f"{label} activity",
            Severity.WARNING if failed else Severity.INFO,
            f"{completed} {kind} request(s) completed and {failed} failed in 24 h.",
            "Nothing to do."
            if not failed
            else "Open Traces filtered by the model for the errors; check the node's herd-node log "
            f"(~/.fleet-manager/logs/herd-node.jsonl) for the {kind} backend.",
        )
    )
    if completed >= pol.capability_min_completed:
        more = _capability_expansion_card(inp, pol, kind, completed)
        if more is not None:
            out.append(more)
    return out


def _check_image(inp: HealthInput, pol: HealthPolicy) -> list[HealthCheck]:
    return _check_capability(inp, pol, "image")


def _check_stt(inp: HealthInput, pol: HealthPolicy) -> list[HealthCheck]:
    return _check_capability(inp, pol, "stt")


def _check_load_timeouts(inp: HealthInput, pol: HealthPolicy) -> list[HealthCheck]:
    out: list[HealthCheck] = []
    rows = _load_timeouts(inp, pol)
    groups: dict[tuple[str, str], list[Incident]] = {}
    for x in rows:
        groups.setdefault((x.node_id, x.model), []).append(x)
    facts = {n.node_id: n for n in inp.nodes}
    models_per_node: dict[str, int] = {}
    for (nid, _), xs in groups.items():
        if len(xs) >= pol.load_timeout_min:
            models_per_node[nid] = models_per_node.get(nid, 0) + 1
    for (nid, model), xs in sorted(groups.items()):
        if len(xs) < pol.load_timeout_min:
            continue
        recent = [x for x in xs if x.timestamp >= _recent_ts(inp, pol)]
        n = facts.get(nid)
        wedged = (
            n is not None
            and models_per_node.get(nid, 0) >= 2
            and n.fast_total > 0
            and n.fast_free / n.fast_total >= pol.wedged_free_share
        )
        slowest = max(x.latency_ms for x in xs) / 1000.0
        reason = (
            f"{len(xs)} attempt(s) of {model} on {nid} timed out in 24 h "
            f"({len(recent)} in the last hour; slowest {slowest:.0f}s)"
        )
        if wedged and n is not None:
            reason += (
                f"; {models_per_node[nid]} models time out while {_gb(n.fast_free)} is free: "
                "Ollama looks wedged, not short of memory"
            )
            fix = f"Restart Ollama on {nid} (`systemctl restart ollama` / quit and reopen the app)."
        else:
            fix = (
                f"The model loads too slowly on {nid}: keep it resident (OLLAMA_KEEP_ALIVE=30m), "
                "use faster storage or a smaller quantisation, or raise --first-byte-timeout."
            )
        out.append(
            HealthCheck(
                "model_load_timeout",
                "Model load timeouts",
                Severity.WARNING if recent else Severity.INFO,
                reason + ".",
                fix,
                nid,
                model,
            )
        )
    return out


def _check_thrashing(inp: HealthInput, pol: HealthPolicy) -> list[HealthCheck]:
    out: list[HealthCheck] = []
    recent = {(u.node_id, u.model): u for u in inp.usage_recent}
    facts = {n.node_id: n for n in inp.nodes}
    for u in _thrash_rows(inp, pol):
        reloads = u.cold_loads - 1
        r = recent.get((u.node_id, u.model))
        active = r is not None and r.cold_loads >= pol.thrash_recent_reloads
        n = facts.get(u.node_id)
        mem = ""
        if n is not None and n.fast_total > 0:
            mem = f"; {_gb(n.fast_free)} of {_gb(n.fast_total)} free now"
        others = sorted(
            x.model
            for x in inp.usage_24h
            if x.node_id == u.node_id and x.model != u.model and x.cold_loads > 1
        )
        out.append(
            HealthCheck(
                "model_thrashing",
                "Models keep reloading",
                Severity.WARNING if active else Severity.INFO,
                f"{u.model} on {u.node_id} was loaded {u.cold_loads}x for {u.requests} requests "
                f"in 24 h ({reloads} reloads"
                + (f", {r.cold_loads} recently" if r is not None and r.cold_loads else "")
                + ")"
                + (f"; also reloading: {', '.join(others[:3])}" if others else "")
                + mem
                + ".",
                "Models evict each other: raise OLLAMA_MAX_LOADED_MODELS if memory allows, set "
                "OLLAMA_KEEP_ALIVE=30m, keep clients on one num_ctx, or spread the models over "
                "more nodes (see Recommendations).",
                u.node_id,
                u.model,
            )
        )
    return out


def _check_error_rate(inp: HealthInput, pol: HealthPolicy) -> list[HealthCheck]:
    """Per node, every attempt that went wrong counts: failed, retried, incomplete, reaped."""
    out: list[HealthCheck] = []
    day = _node_usage(inp.usage_24h)
    recent = _node_usage(inp.usage_recent)
    for nid, u in sorted(day.items()):
        if u.attempts <= 0 or u.errors <= 0:
            continue
        rate = u.errors / u.attempts
        r = recent.get(nid)
        r_rate = r.errors / r.attempts if r is not None and r.attempts else 0.0
        active = r is not None and r.errors >= 1 and r_rate >= pol.error_rate
        if u.attempts < pol.error_min_attempts:
            if u.errors < pol.error_min_errors or rate < 0.5:
                continue
            sev = Severity.INFO
            note = f" (only {u.attempts} attempts: below the {pol.error_min_attempts} floor)"
        elif rate < pol.error_rate:
            continue
        else:
            if active and rate >= pol.error_rate_critical:
                sev = Severity.CRITICAL
            elif active:
                sev = Severity.WARNING
            else:
                sev = Severity.INFO
            note = "" if active else " (none or few recently: resolved?)"
        out.append(
            HealthCheck(
                "high_error_rate",
                "High error rate",
                sev,
                f"{nid}: {u.errors} of {u.attempts} attempts went wrong in 24 h "
                f"({_pct(rate)}: {u.retried} retried elsewhere, {u.failures} failed/incomplete)"
                + (
                    f"; last hour {_pct(r_rate)} of {r.attempts}"
                    if r is not None and r.attempts
                    else ""
                )
                + note
                + ".",
                f"Open Traces for node {nid} (status failed/retried) for the error messages; "
                "common causes: Ollama out of memory (lower OLLAMA_NUM_PARALLEL / context), "
                "model files missing (`ollama pull`), or the network to the node.",
                nid,
            )
        )
    return out


def _check_retry_rate(inp: HealthInput, pol: HealthPolicy) -> list[HealthCheck]:
    out: list[HealthCheck] = []
    recent = _model_usage(inp.usage_recent)
    for model, u in sorted(_model_usage(inp.usage_24h).items()):
        if u.requests < pol.retry_min_requests or u.retried <= 0:
            continue
        per = u.retried / u.requests
        if per < pol.retry_info:
            continue
        r = recent.get(model)
        active = r is not None and r.retried > 0
        sev = Severity.WARNING if per >= pol.retry_warning and active else Severity.INFO
        nodes = sorted({x.node_id for x in inp.usage_24h if x.model == model and x.retried})
        out.append(
            HealthCheck(
                "high_retry_rate",
                "Many retries",
                sev,
                f"{model}: {u.retried} retries for {u.requests} requests in 24 h "
                f"({per:.2f} per request); failing attempts on {', '.join(nodes)}.",
                "Retries hide a failing node: fix the node(s) named (see High error rate), or "
                f"remove {model} from them (`ollama rm {model}`) so they stop being chosen.",
                model=model,
            )
        )
    return out


def _check_streams(inp: HealthInput, pol: HealthPolicy) -> list[HealthCheck]:
    out: list[HealthCheck] = []
    fleet = _fleet_usage(inp.usage_24h)
    recent_fleet = _fleet_usage(inp.usage_recent)
    if fleet.client_disconnected >= pol.disconnect_min and fleet.requests:
        rate = fleet.client_disconnected / fleet.requests
        active = recent_fleet.client_disconnected > 0 and rate > pol.disconnect_rate
        out.append(
            HealthCheck(
                "client_disconnects",
                "Clients hang up",
                Severity.WARNING if active else Severity.INFO,
                f"{fleet.client_disconnected} of {fleet.requests} requests in 24 h ended with "
                f"the client gone ({_pct(rate)}; {recent_fleet.client_disconnected} recently).",
                "Clients give up before the answer: raise their timeout (e.g. the OpenAI SDK "
                "`timeout=`), or cut the wait — keep models resident, more nodes for busy models.",
            )
        )
    since_day = inp.now - pol.window_s
    incomplete = _count(inp.incidents, "incomplete", since_day)
    if incomplete >= pol.incomplete_min and fleet.requests:
        rate = incomplete / fleet.requests
        recent = _count(inp.incidents, "incomplete", _recent_ts(inp, pol))
        by_node: dict[str, int] = {}
        for x in inp.incidents:
            if x.status == "incomplete" and x.timestamp >= since_day:
                by_node[x.node_id] = by_node.get(x.node_id, 0) + 1
        worst = max(by_node, key=lambda k: by_node[k]) if by_node else ""
        active = recent > 0 and rate > pol.incomplete_rate
        out.append(
            HealthCheck(
                "incomplete_streams",
                "Streams cut mid-answer",
                Severity.WARNING if active else Severity.INFO,
                f"{incomplete} stream(s) in 24 h ended without Ollama's final chunk "
                f"({_pct(rate)}; {recent} in the last hour); by node: "
                + ", ".join(f"{k or '?'} {v}" for k, v in sorted(by_node.items()))
                + ".",
                f"The node dropped the connection mid-answer: check {worst or 'the node'}'s Ollama "
                "log for crashes / out-of-memory kills (`journalctl -u ollama`, `dmesg | grep -i "
                "oom`).",
                worst or None,
            )
        )
    return out


def _check_breakers(inp: HealthInput, pol: HealthPolicy) -> list[HealthCheck]:
    out: list[HealthCheck] = []
    unreachable = {c.node_id for c in _check_unreachable(inp, pol)}
    for n in inp.nodes:
        if n.status == "offline":
            continue
        b = n.breaker
        if b is not None and b.state != CircuitState.CLOSED and n.node_id not in unreachable:
            wait = max(0.0, b.open_until - inp.now)
            out.append(
                HealthCheck(
                    "breaker_open",
                    "Circuit breaker open",
                    Severity.WARNING,
                    f"{n.node_id}: breaker {b.state} after {b.consecutive_failures} consecutive "
                    f"failure(s) (trip {b.trips}); next probe in {wait:.0f}s.",
                    f"Find the failures in Traces (node {n.node_id}); the breaker closes by itself "
                    "after a successful probe.",
                    n.node_id,
                )
            )
        for model, mb in sorted(n.model_breakers.items()):
            if mb.state == CircuitState.CLOSED:
                continue
            wait = max(0.0, mb.open_until - inp.now)
            out.append(
                HealthCheck(
                    "breaker_open",
                    "Circuit breaker open",
                    Severity.WARNING,
                    f"{model} on {n.node_id}: breaker {mb.state} after {mb.consecutive_failures} "
                    f"consecutive failure(s); next probe in {wait:.0f}s.",
                    f"Try it on the node: `ollama run {model} hi` on {n.node_id}; re-pull it "
                    f"(`ollama pull {model}`) if it fails to load.",
                    n.node_id,
                    model,
                )
            )
    return out


def _check_store(inp: HealthInput, pol: HealthPolicy) -> list[HealthCheck]:
    out: list[HealthCheck] = []
    if inp.store_write_errors:
        sev = (
            Severity.CRITICAL
            if inp.store_write_errors >= pol.store_errors_critical
            else Severity.WARNING
        )
        out.append(
            HealthCheck(
                "trace_store_write_failures",
                "Trace store write failures",
                sev,
                f"{inp.store_write_errors} batch write(s) to latency.db failed since start: "
                "those traces and analytics are lost.",
                "Check disk space and permissions of the data dir (~/.fleet-manager) and the "
                "router log (logs/herd.jsonl, 'store.' messages).",
            )
        )
    if inp.store_dropped:
        out.append(
            HealthCheck(
                "trace_store_dropped",
                "Traces dropped",
                Severity.WARNING,
                f"{inp.store_dropped} trace/event record(s) dropped since start (write queue "
                f"full or store closed; queue depth now {inp.store_queue_depth}).",
                "The disk cannot keep up: put the data dir on faster storage, or lower "
                "--retention-days so pruning is cheaper.",
            )
        )
    return out


def _check_node_resources(inp: HealthInput, pol: HealthPolicy) -> list[HealthCheck]:
    out: list[HealthCheck] = []
    for n in inp.nodes:
        if n.status == "offline":
            continue
        if n.disk_free is not None and n.disk_total:
            share = n.disk_free / n.disk_total
            if n.disk_free < pol.disk_min_free_bytes or share < pol.disk_min_free_share:
                out.append(
                    HealthCheck(
                        "disk_space_low",
                        "Disk space low",
                        Severity.WARNING,
                        f"{n.node_id}: {_gb(n.disk_free)} free of {_gb(n.disk_total)} "
                        f"({_pct(share)}): pulls will fail.",
                        "Remove unused models (`ollama rm <model>`; see Recommendations → remove) "
                        "or move OLLAMA_MODELS to a bigger disk.",
                        n.node_id,
                    )
                )
        if n.errors:
            out.append(
                HealthCheck(
                    "agent_collector_errors",
                    "Node agent cannot read some facts",
                    Severity.INFO,
                    f"{n.node_id}: " + "; ".join(n.errors[:3]) + ".",
                    "Install the missing tool (e.g. nvidia-smi with the NVIDIA driver) or psutil "
                    "on the node; memory/GPU-based routing uses defaults meanwhile.",
                    n.node_id,
                )
            )
    return out


def _check_pending(inp: HealthInput, pol: HealthPolicy) -> list[HealthCheck]:
    """One card for every node waiting for approval (a burst of strangers is one card)."""
    if not inp.pending_nodes:
        return []
    waiting = sorted(inp.pending_nodes, key=lambda p: p.waiting_since)
    shown = "; ".join(
        f"{p.node_id} from {p.addr} (Ollama {p.url}, waiting "
        f"{max(0.0, inp.now - p.waiting_since) / 60:.0f} min)"
        for p in waiting[:5]
    )
    more = f" and {len(waiting) - 5} more" if len(waiting) > 5 else ""
    return [
        HealthCheck(
            "nodes_pending",
            "Nodes waiting for approval",
            Severity.WARNING,
            f"{len(waiting)} node(s) asked to join and get no requests until approved: "
            f"{shown}{more}.",
            "If you know the machine, approve it (Fleet Overview → Waiting for approval → "
            "Approve, or POST /dashboard/api/nodes/approve); otherwise reject it. To let your own "
            "machines join without a click, give router and agents the same --fleet-key.",
            waiting[0].node_id if len(waiting) == 1 else None,
        )
    ]


# (family id, name when healthy, check) — the anchor's 15 first, then the extras
_CheckFn = Callable[[HealthInput, HealthPolicy], list[HealthCheck]]
HEALTH_CHECKS: tuple[tuple[str, str, _CheckFn], ...] = (
    ("node_status", "Node status", _check_node_status),
    ("memory_pressure", "Memory pressure", _check_memory_pressure),
    ("underutilized_memory", "Memory use", _check_underutilized),
    ("kv_cache_bloat", "KV cache size", _check_kv_bloat),
    ("vram", "VRAM fallback and offload", _check_vram),
    ("versions", "Versions", _check_versions),
    ("context_protection", "Context protection", _check_context),
    ("zombie_reaper", "Stalled streams", _check_reaper),
    ("image_generation", "Image generation", _check_image),
    ("transcription", "Transcription", _check_stt),
    ("model_load_timeout", "Model load timeouts", _check_load_timeouts),
    ("model_thrashing", "Model reloads", _check_thrashing),
    ("high_error_rate", "Error rate", _check_error_rate),
    ("high_retry_rate", "Retry rate", _check_retry_rate),
    ("stream_reliability", "Stream reliability", _check_streams),
    ("node_unreachable", "Ollama reachability", _check_unreachable),
    ("breaker_open", "Circuit breakers", _check_breakers),
    ("swap_usage", "Swap", _check_swap),
    ("trace_store", "Trace store", _check_store),
    ("node_resources", "Node disk and collectors", _check_node_resources),
    ("nodes_pending", "Nodes waiting for approval", _check_pending),
)


def health_vitals(inp: HealthInput, pol: HealthPolicy = HealthPolicy()) -> dict[str, object]:
    day = _fleet_usage(inp.usage_24h)
    since = inp.now - pol.window_s
    ttfts = [u.ttft_p95_ms for u in inp.usage_24h if u.ttft_p95_ms is not None and u.completed]
    status = [n.status for n in inp.nodes]
    return {
        "nodes_total": len(inp.nodes),
        "nodes_online": status.count("online"),
        "nodes_degraded": status.count("degraded"),
        "nodes_offline": status.count("offline"),
        "nodes_draining": status.count("draining"),
        "models_loaded": sum(len(n.loaded) for n in inp.nodes if n.live),
        "total_requests_24h": day.requests,
        "total_attempts_24h": day.attempts,
        "errors_24h": day.errors,
        "overall_error_rate_pct": round(100.0 * day.errors / day.attempts, 2)
        if day.attempts
        else 0.0,
        "total_retries_24h": day.retried,
        "cold_loads_24h": day.cold_loads,
        "fallbacks_24h": day.fallbacks,
        "client_disconnects_24h": day.client_disconnected,
        "incomplete_streams_24h": _count(inp.incidents, "incomplete", since),
        "reaped_24h": _count(inp.incidents, "reaped", since),
        "worst_ttft_p95_ms": max(ttfts) if ttfts else None,
        "store_dropped": inp.store_dropped,
        "store_write_errors": inp.store_write_errors,
    }


def health_checks(inp: HealthInput, policy: HealthPolicy = HealthPolicy()) -> HealthReport:
    """Run every check; one ``ok`` card per family that found nothing; score and vitals."""
    cards: list[HealthCheck] = []
    for fid, name, fn in HEALTH_CHECKS:
        found = fn(inp, policy)
        if found:
            cards.extend(found)
        else:
            cards.append(HealthCheck(fid, name, Severity.OK, "No problem found."))
    cards.sort(
        key=lambda c: (
            SEVERITIES.index(c.severity) if c.severity in SEVERITIES else 9,
            c.id,
            c.node_id or "",
            c.model or "",
        )
    )
    score = health_score(cards, policy)
    vitals = health_vitals(inp, policy)
    vitals["health_score"] = score
    for sev in SEVERITIES:
        vitals[f"checks_{sev}"] = sum(1 for c in cards if c.severity == sev)
    return HealthReport(score, tuple(cards), vitals, inp.now)


# ---------------------------------------------------------------------------------------
# Recommendations
# ---------------------------------------------------------------------------------------
#
# Which models each node should hold, from measured facts only (no quality catalog):
#
# 1. usable memory per node = fast memory (VRAM on a discrete GPU, else RAM) minus a
#    headroom of max(headroom_bytes, headroom_share x total) for the OS and apps
#    (``_usable_memory``, ``usable_bytes``);
# 2. a resident estimate per model and node: the size Ollama reports for it where it is
#    loaded (weights + KV cache at the context in use), else weights + KV cache for the
#    default context x the node's parallel slots (``_weights``, ``_resident_estimate``);
# 3. demand per model: requests in 24 h and 7 d (Store.node_model_stats), plus 404
#    "not found" requests (unmet demand) (``_demand``);
# 4. placement, busiest model first: one copy for any demand, a second when the 24 h demand
#    reaches ``hot_requests_24h`` (a third at ``very_hot_requests_24h``) on as many nodes as
#    exist; each copy goes to the node that already has it resident (keep), else on disk
#    (load), else pulls it where the disk allows (pull); among equals the node that served
#    it most in 7 d, then the one with the most room left (``_place_model``,
#    ``_copies_wanted``, ``_best_node``, ``_place_copy``; what fits nowhere is unmet
#    demand: ``_unknown_size``, ``_no_room``);
# 5. remove: copies on disk nobody asked for on this node for ``idle_days`` that the plan
#    does not need (no demand fleet-wide, or enough copies elsewhere), older than the idle
#    window and only once the history covers it (a fresh router knows nothing yet)
#    (``_removals``).


@dataclass(frozen=True, slots=True)
class RecommendPolicy:
    headroom_bytes: int = 4 * _GB  # kept free for the OS and other apps ...
    headroom_share: float = 0.15  # ... or this share of memory, whichever is larger
    hot_requests_24h: int = 500  # demand that earns a second copy
    very_hot_requests_24h: int = 2500  # and a third
    idle_days: float = 7.0
    disk_reserve_bytes: int = 10 * _GB  # never plan a pull that leaves less than this free


@dataclass(frozen=True, slots=True)
class Recommendation:
    model: str
    action: str  # keep | load | pull | remove
    reason: str
    bytes: int  # resident estimate (keep/load/pull) or disk freed (remove)

    def to_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "action": self.action,
            "reason": self.reason,
            "bytes": self.bytes,
        }


@dataclass(frozen=True, slots=True)
class NodeRecommendations:
    node_id: str
    status: str
    memory_total_bytes: int
    usable_bytes: int
    planned_bytes: int  # sum of the resident estimates of keep/load/pull
    disk_free_bytes: int | None
    recommendations: tuple[Recommendation, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "node_id": self.node_id,
            "status": self.status,
            "memory_total_bytes": self.memory_total_bytes,
            "usable_bytes": self.usable_bytes,
            "planned_bytes": self.planned_bytes,
            "disk_free_bytes": self.disk_free_bytes,
            "recommendations": [r.to_dict() for r in self.recommendations],
        }


@dataclass(frozen=True, slots=True)
class UnmetDemand:
    model: str
    requests_7d: int
    not_found_7d: int
    reason: str
    suggested_node: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "requests_7d": self.requests_7d,
            "not_found_7d": self.not_found_7d,
            "reason": self.reason,
            "suggested_node": self.suggested_node,
        }


@dataclass(frozen=True, slots=True)
class RecommendationReport:
    nodes: tuple[NodeRecommendations, ...]
    unmet_demand: tuple[UnmetDemand, ...]
    generated_at: float

    def to_dict(self) -> dict[str, object]:
        return {
            "nodes": [n.to_dict() for n in self.nodes],
            "unmet_demand": [u.to_dict() for u in self.unmet_demand],
            "generated_at": self.generated_at,
        }


def usable_bytes(node: NodeFacts, policy: RecommendPolicy = RecommendPolicy()) -> int:
    total = node.fast_total
    if total <= 0:
        return 0
    return max(0, total - max(policy.headroom_bytes, int(policy.headroom_share * total)))


def _resident_estimate(
    model: str, node: NodeFacts, nodes: Sequence[NodeFacts], weights: int, sp: Policy
) -> int:
    for lm in node.loaded:
        if lm.name == model and lm.size > 0:
            return lm.size
    seen = [lm.size for n in nodes for lm in n.loaded if lm.name == model and lm.size > 0]
    if seen:
        return max(seen)
    slots = node.num_parallel if node.num_parallel and node.num_parallel > 0 else 1
    return resident_bytes(weights, None, slots, sp)


_ACTION_ORDER = ("keep", "load", "pull", "remove")  # the order of the cards


@dataclass(slots=True)
class _Demand:
    """Step 3: requests per model in 24 h and 7 d, 404s per model, 7 d per node x model."""

    d24: dict[str, int]
    d7: dict[str, int]
    node7: dict[tuple[str, str], int]
    not_found: dict[str, int]

    def order(self, model: str) -> tuple[int, int, str]:
        """Busiest first: 24 h requests, then 7 d requests + 404s, then the name."""
        return (
            -self.d24.get(model, 0),
            -(self.d7.get(model, 0) + self.not_found.get(model, 0)),
            model,
        )

    def text(self, model: str) -> str:
        miss = self.not_found.get(model, 0)
        return f"{self.d24.get(model, 0)} requests in 24 h, {self.d7.get(model, 0)} in 7 d" + (
            f", {miss} not found" if miss else ""
        )


@dataclass(slots=True)
class _Plan:
    """The plan while it is built: what is left per node, where each model went, the cards."""

    usable: dict[str, int]  # node -> usable memory (step 1)
    room: dict[str, int]  # node -> usable memory not yet planned
    disk_left: dict[str, int | None]  # node -> disk left above the reserve (None: unknown)
    cards: dict[str, list[Recommendation]]  # node -> its recommendations
    placed: dict[str, list[str]] = field(default_factory=dict)  # model -> nodes holding it
    unmet: list[UnmetDemand] = field(default_factory=list)


def _plannable(nodes: Sequence[NodeFacts]) -> list[NodeFacts]:
    """The live nodes with anything to plan with (memory facts, or models)."""
    return [n for n in nodes if n.live and (n.fast_total > 0 or n.loaded or n.on_disk)]


def _usable_memory(
    live: Sequence[NodeFacts], policy: RecommendPolicy, sp: Policy
) -> dict[str, int]:
    """Step 1: usable memory per node. A node without memory facts (polled, no agent) is
    planned with what it demonstrably runs: what it holds now, or else its largest model on
    disk (someone pulled it there)."""
    return {
        n.node_id: usable_bytes(n, policy)
        if n.fast_total > 0
        else max(
            sum(m.size for m in n.loaded),
            max((resident_bytes(d.size, None, 1, sp) for d in n.on_disk), default=0),
        )
        for n in live
    }


def _weights(nodes: Sequence[NodeFacts]) -> dict[str, int]:
    """Step 2's input: each model's weights (its largest size on any disk; 0 = unknown)."""
    weights: dict[str, int] = {}
    for n in nodes:
        for d in n.on_disk:
            weights[d.name] = max(weights.get(d.name, 0), d.size)
        for lm in n.loaded:
            weights.setdefault(lm.name, 0)
    return weights


def _demand(
    usage_24h: Sequence[ModelUse], usage_7d: Sequence[ModelUse], not_found_7d: Mapping[str, int]
) -> _Demand:
    """Step 3: demand per model (and per node x model over 7 d)."""
    demand = _Demand({}, {}, {}, dict(not_found_7d))
    for u in usage_24h:
        demand.d24[u.model] = demand.d24.get(u.model, 0) + u.requests
    for u in usage_7d:
        demand.d7[u.model] = demand.d7.get(u.model, 0) + u.requests
        key = (u.node_id, u.model)
        demand.node7[key] = demand.node7.get(key, 0) + u.requests
    return demand


def _copies_wanted(requests_24h: int, live: int, policy: RecommendPolicy) -> int:
    """Step 4: one copy for any demand, two when hot, three when very hot, at most one per
    node."""
    want = 1
    if requests_24h >= policy.hot_requests_24h:
        want = 2
    if requests_24h >= policy.very_hot_requests_24h:
        want = 3
    return min(want, max(1, live))


def _best_node(
    model: str,
    weights: int,
    live: Sequence[NodeFacts],
    nodes: Sequence[NodeFacts],
    plan: _Plan,
    demand: _Demand,
    sp: Policy,
) -> tuple[NodeFacts, str, int] | None:
    """Step 4: the node for the next copy (node, keep|load|pull, resident estimate): one
    that has it resident, else on disk, else pulls it; among equals the one that served it
    most in 7 d, then the most room. None when no node has room (or disk for a pull)."""
    best: tuple[tuple[int, int, int, str], NodeFacts, str, int] | None = None
    for n in live:
        if n.node_id in plan.placed.get(model, []):
            continue
        est = _resident_estimate(model, n, nodes, weights, sp)
        if est > plan.room[n.node_id]:
            continue
        loaded = any(lm.name == model for lm in n.loaded)
        disk = n.disk_size(model) > 0
        action = "keep" if loaded else "load" if disk else "pull"
        left = plan.disk_left[n.node_id]
        if action == "pull" and left is not None and left < weights:
            continue
        key = (
            _ACTION_ORDER.index(action),
            -demand.node7.get((n.node_id, model), 0),
            -plan.room[n.node_id],
            n.node_id,
        )
        if best is None or key < best[0]:
            best = (key, n, action, est)
    return None if best is None else best[1:]


def _unknown_size(
    model: str, live: Sequence[NodeFacts], plan: _Plan, demand: _Demand
) -> UnmetDemand:
    """A requested model no node has: its size is unknown, so suggest the roomiest node."""
    r7, miss = demand.d7.get(model, 0), demand.not_found.get(model, 0)
    roomiest = max(live, key=lambda n: (plan.room[n.node_id], n.node_id), default=None)
    return UnmetDemand(
        model,
        r7,
        miss,
        f"requested {r7 + miss}x in 7 d ({miss} answered 404 'not found') but on no "
        "node: size unknown until pulled; `ollama pull` it where the room is, or "
        "fix the clients if the name is a typo",
        roomiest.node_id if roomiest is not None else None,
    )


def _no_room(
    model: str, weights: int, nodes: Sequence[NodeFacts], plan: _Plan, demand: _Demand, sp: Policy
) -> UnmetDemand:
    """A model with demand whose first copy fits nowhere: too big, or crowded out."""
    biggest = max(plan.usable.values(), default=0)
    need = _resident_estimate(model, NodeFacts(""), nodes, weights, sp)
    why = (
        f"needs ~{_gb(need)} resident, more than any node's usable memory ({_gb(biggest)})"
        if need > biggest
        else "no node has room left after busier models (or disk for a pull)"
    )
    return UnmetDemand(
        model,
        demand.d7.get(model, 0),
        demand.not_found.get(model, 0),
        f"{demand.text(model)}: {why}",
    )


def _place_copy(
    model: str,
    weights: int,
    copy_no: int,
    want: int,
    chosen: tuple[NodeFacts, str, int],
    plan: _Plan,
    demand: _Demand,
    policy: RecommendPolicy,
) -> None:
    """Step 4: book one copy on its node (memory, disk for a pull) and write its card."""
    n, action, est = chosen
    plan.room[n.node_id] -= est
    if action == "pull" and plan.disk_left[n.node_id] is not None:
        plan.disk_left[n.node_id] = (plan.disk_left[n.node_id] or 0) - weights
    plan.placed.setdefault(model, []).append(n.node_id)
    copies = f"copy {copy_no + 1} of {want}" + (
        f" (hot: >= {policy.hot_requests_24h} requests/24 h)" if want > 1 else ""
    )
    verb = {
        "keep": f"resident ({_gb(est)})",
        "load": f'on disk, not resident: load it (~{_gb(est)} resident, `ollama run {model} ""`)',
        "pull": f"pull {_gb(weights)} (`ollama pull {model}`; ~{_gb(est)} resident)",
    }[action]
    plan.cards[n.node_id].append(
        Recommendation(
            model,
            action,
            f"{demand.text(model)}; {copies}; {verb}; {_gb(plan.room[n.node_id])} of "
            f"{_gb(plan.usable[n.node_id])} usable left after it",
            est,
        )
    )


def _place_model(
    model: str,
    weights: int,
    live: Sequence[NodeFacts],
    nodes: Sequence[NodeFacts],
    plan: _Plan,
    demand: _Demand,
    policy: RecommendPolicy,
    sp: Policy,
) -> None:
    """Step 4 for one model: its copies, or why it cannot be served (unmet demand)."""
    if weights <= 0 and not any(lm.name == model for n in nodes for lm in n.loaded):
        plan.unmet.append(_unknown_size(model, live, plan, demand))
        return
    want = _copies_wanted(demand.d24.get(model, 0), len(live), policy)
    for copy_no in range(want):
        chosen = _best_node(model, weights, live, nodes, plan, demand, sp)
        if chosen is None:
            if copy_no == 0:
                plan.unmet.append(_no_room(model, weights, nodes, plan, demand, sp))
            return
        _place_copy(model, weights, copy_no, want, chosen, plan, demand, policy)


def _removals(
    now: float,
    n: NodeFacts,
    plan: _Plan,
    demand: _Demand,
    capability: set[str],
    history_s: float,
    policy: RecommendPolicy,
) -> list[Recommendation]:
    """Step 5: the copies on this node's disk that nobody asked for here in ``idle_days``,
    that the plan does not need, older than the idle window, once the history covers it."""
    idle_s = policy.idle_days * 86_400.0
    if history_s < idle_s:
        return []  # a fresh router knows nothing yet
    kept = {r.model for r in plan.cards[n.node_id]}
    out: list[Recommendation] = []
    for d in sorted(n.on_disk, key=lambda d: -d.size):
        if d.name in kept or d.name in capability or d.size <= 0:
            continue
        if any(lm.name == d.name for lm in n.loaded):
            continue  # in use right now; it is not idle
        if demand.node7.get((n.node_id, d.name), 0) > 0:
            continue
        if d.modified_at is not None and now - d.modified_at < idle_s:
            continue  # pulled recently: give it a chance
        fleet = demand.d7.get(d.name, 0) + demand.not_found.get(d.name, 0)
        elsewhere = [x for x in plan.placed.get(d.name, []) if x != n.node_id]
        if fleet > 0 and not elsewhere:
            continue  # the only copy of a model someone uses
        why = (
            f"no requests anywhere in {policy.idle_days:g} d"
            if fleet == 0
            else f"served from {', '.join(elsewhere)}; no requests here in {policy.idle_days:g} d"
        )
        out.append(
            Recommendation(
                d.name, "remove", f"{why}: `ollama rm {d.name}` frees {_gb(d.size)} of disk", d.size
            )
        )
    return out


def _report(
    now: float, nodes: Sequence[NodeFacts], plan: _Plan, policy: RecommendPolicy
) -> RecommendationReport:
    """Every node (planned or not) with its cards in action order; unmet demand, busiest
    first."""
    out = []
    for n in nodes:
        recs = tuple(
            sorted(
                plan.cards[n.node_id],
                key=lambda r: (_ACTION_ORDER.index(r.action), -r.bytes, r.model),
            )
        )
        out.append(
            NodeRecommendations(
                node_id=n.node_id,
                status=n.status,
                memory_total_bytes=n.fast_total,
                usable_bytes=plan.usable.get(n.node_id, usable_bytes(n, policy)),
                planned_bytes=sum(r.bytes for r in recs if r.action != "remove"),
                disk_free_bytes=n.disk_free,
                recommendations=recs,
            )
        )
    unmet = sorted(plan.unmet, key=lambda u: (-(u.requests_7d + u.not_found_7d), u.model))
    return RecommendationReport(tuple(out), tuple(unmet), now)


def recommendations(
    now: float,
    nodes: Sequence[NodeFacts],
    usage_24h: Sequence[ModelUse],
    usage_7d: Sequence[ModelUse],
    not_found_7d: Mapping[str, int] | None = None,
    *,
    history_s: float = 0.0,
    policy: RecommendPolicy = RecommendPolicy(),
    scoring_policy: Policy = Policy(),
) -> RecommendationReport:
    """Per node keep / load / pull / remove, with the numbers behind each: the five steps
    of the section comment, one function each."""
    live = _plannable(nodes)
    usable = _usable_memory(live, policy, scoring_policy)  # 1
    weights = _weights(nodes)  # 2 (resident estimates: ``_resident_estimate``)
    demand = _demand(usage_24h, usage_7d, not_found_7d or {})  # 3
    plan = _Plan(
        usable=usable,
        room=dict(usable),
        disk_left={
            n.node_id: None if n.disk_free is None else n.disk_free - policy.disk_reserve_bytes
            for n in live
        },
        cards={n.node_id: [] for n in nodes},
    )
    capability = {m for n in nodes for m in (*n.image_models, *n.stt_models)}
    universe = (
        (set(weights) | set(demand.d7) | set(demand.d24) | set(demand.not_found))
        - capability
        - {""}
    )
    for model in sorted(universe, key=demand.order):  # 4
        r24, r7 = demand.d24.get(model, 0), demand.d7.get(model, 0)
        if r24 + r7 + demand.not_found.get(model, 0) <= 0:
            continue
        _place_model(
            model, weights.get(model, 0), live, nodes, plan, demand, policy, scoring_policy
        )
    for n in live:  # 5
        plan.cards[n.node_id].extend(_removals(now, n, plan, demand, capability, history_s, policy))
    return _report(now, nodes, plan, policy)
