"""dashboard.html in a real headless Chromium against a running router with fake nodes.

Router, fake Ollama nodes and the browser driver share one event loop (Playwright's async
API), so the router keeps serving while the test waits on the page. Every tab is checked on
the DOM, not on status codes; screenshots of each tab land in the test's tmp dir.

The browser is Debian's ``/usr/bin/chromium``: missing locally → skip; missing in CI
(``CI=true``) → fail, because CI installs it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import herd
from tests.conftest import RouterFactory, RunningRouter, router_config
from tests.fake_ollama import FakeModel, FakeOllama

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
XSS = "<img src=x onerror=alert(1)>"
ADMIN_TOKEN = "dash-admin-token"
API_KEY = "dash-client-key"
POLL = "?poll=300"  # fast polling keeps the file well under a minute
DASHBOARD = Path(herd.__file__).with_name("dashboard.html")
WAIT_MS = 10_000
NO_VALUE = "\u2013"  # what the page shows for a missing figure


def require_browser() -> Any:
    """The async Playwright entry point, or skip (locally) / fail (CI) with the reason."""
    problem = None
    if not CHROMIUM.exists():
        problem = f"{CHROMIUM} is missing (apt-get install -y chromium)"
    else:
        try:
            from playwright.async_api import async_playwright
        except ImportError:
            problem = "playwright is not installed (pip install playwright)"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests must run in CI: {problem}")
        pytest.skip(problem)
    return async_playwright


# ------------------------------------------------------------------ static checks -------


def test_every_api_path_in_the_page_is_routed(tmp_path: Path) -> None:
    page = DASHBOARD.read_text()
    paths = set(re.findall(r'"((?:dashboard/api|fleet)/[a-z-]+)', page))
    assert {
        "fleet/status",
        "dashboard/api/settings",
        "dashboard/api/benchmarks",
        "dashboard/api/health",
        "dashboard/api/recommendations",
    } <= paths
    router = herd.Router(router_config(tmp_path, []))
    missing = {
        p for p in paths if router.dashboard_routes("/" + p) is None and p != "fleet/status"
    }
    assert not missing, f"dashboard.html calls endpoints the router does not serve: {missing}"


def test_page_has_no_html_sinks_and_no_external_resources() -> None:
    page = DASHBOARD.read_text()
    for sink in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        "setInterval",
    ):
        assert sink not in page, f"dashboard.html must not use {sink}"
    external = re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page)
    assert not external, "no CDN or external resources: the page must work air-gapped"


# ------------------------------------------------------------------ fixtures ------------


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async_playwright = require_browser()
    async with async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


class PageWatch:
    """Console errors, uncaught exceptions and dialogs of one page."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.dialogs: list[tuple[str, str]] = []
        self.requests: list[str] = []

    def attach(self, page: Any) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("dialog", self._dialog)
        page.on("request", lambda req: self.requests.append(req.url))

    def _console(self, msg: Any) -> None:
        # Chromium logs every non-2xx fetch as "Failed to load resource"; 404s of optional
        # endpoints and refused connections during the restart test are expected.
        if msg.type == "error" and "Failed to load resource" not in msg.text:
            self.errors.append(f"console.error: {msg.text}")
        if msg.type == "warning" and "render failed" in msg.text:
            self.errors.append(f"console.warn: {msg.text}")

    async def _dialog(self, dialog: Any) -> None:
        self.dialogs.append((dialog.type, dialog.message))
        if dialog.type == "confirm":
            await dialog.accept()
        elif dialog.type == "prompt" and "admin token" in dialog.message.lower():
            await dialog.accept(ADMIN_TOKEN)
        elif dialog.type == "prompt" and "api key" in dialog.message.lower():
            await dialog.accept(API_KEY)
        else:  # an alert() here would be injected script: record it, never run more
            await dialog.dismiss()

    def unexpected_dialogs(self) -> list[tuple[str, str]]:
        return [d for d in self.dialogs if d[0] not in ("confirm", "prompt")]


def stub(status: int, body: object) -> Any:
    """A Playwright route handler answering with fixed JSON (or text)."""
    text = body if isinstance(body, str) else json.dumps(body)
    ctype = "text/plain" if isinstance(body, str) else "application/json"
    return lambda route: route.fulfill(status=status, content_type=ctype, body=text)


async def open_page(
    browser: Any, url: str, width: int = 1280, scheme: str = "light"
) -> tuple[Any, PageWatch]:
    context = await browser.new_context(
        viewport={"width": width, "height": 900}, color_scheme=scheme
    )
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    watch = PageWatch()
    watch.attach(page)
    await page.goto(url)
    return page, watch


async def send_traffic(base: str) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        for model in ("llama3.2:3b", "qwen2.5:7b", "llama3.2:3b"):
            res = await client.post(
                "/api/generate",
                headers={"X-Herd-Tags": "billing-bot"},
                json={"model": model, "prompt": "hello", "stream": False},
            )
            assert res.status_code == 200, res.text
        res = await client.post("/api/embed", json={"model": "nomic-embed-text", "input": "x"})
        assert res.status_code == 200, res.text


async def inject_hostile_node(base: str) -> None:
    """An agent heartbeat whose free-text fields all carry markup (node ids cannot)."""
    beat = {
        "node_id": "evil-node",
        "ollama_url": "http://127.0.0.1:9",
        "interval_s": 300,
        "agent_version": XSS,
        "hardware": {
            "memory": {"total_bytes": 16 * 2**30, "available_bytes": 6 * 2**30, "pressure": XSS},
            "cpu": {"cores": 8, "utilization_pct": 37.5, "load_1m": 2.5},
            "disk": {"total_bytes": 500 * 2**30, "free_bytes": 120 * 2**30},
        },
        "ollama": {
            "version": XSS,
            "reachable": True,
            "loaded": [
                {
                    "name": XSS,
                    "size": 2**30,
                    "size_vram": 2**29,
                    "context_length": 8192,
                    "expires_at": "2099-01-01T00:00:00Z",
                }
            ],
            "available": [{"name": XSS, "size": 2**30, "details": {"parameter_size": XSS}}],
        },
        "capabilities": {"image": [XSS], "stt": [XSS]},
        "errors": [{"collector": "gpu", "error": XSS}],
    }
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        res = await client.post("/heartbeat", json=beat)
        assert res.status_code == 200, res.text


@pytest.fixture
async def fleet(
    make_router: RouterFactory,
) -> AsyncIterator[tuple[RunningRouter, FakeOllama, FakeOllama]]:
    a = FakeOllama(
        [FakeModel("llama3.2:3b"), FakeModel("nomic-embed-text", capabilities=["embedding"])],
        tokens_per_s=0,
        pullable={"phi3:mini": FakeModel("phi3:mini")},
    )
    b = FakeOllama(
        [FakeModel("llama3.2:3b"), FakeModel("qwen2.5:7b")], tokens_per_s=0, version="0.11.10"
    )
    await a.start()
    await b.start()
    r = await make_router([a.url, b.url], admin_token=ADMIN_TOKEN)
    await r.wait_ready(models=3, nodes=2)
    await send_traffic(r.url)
    await inject_hostile_node(r.url)
    yield r, a, b
    await a.stop()
    await b.stop()


def id_of(r: RunningRouter, fake: FakeOllama) -> str:
    return next(n.node_id for n in r.router.fleet.nodes.values() if n.url == fake.url)


async def select_tab(page: Any, name: str) -> None:
    await page.click(f'[role="tab"][data-tab="{name}"]')
    await page.wait_for_selector(f"#panel-{name}:not([hidden])")


async def text_of(page: Any, selector: str) -> str:
    return str(await page.locator(selector).first.inner_text())


# ------------------------------------------------------------------ the tabs ------------


@pytest.mark.browser
async def test_every_tab_renders_live_fleet_data(fleet: Any, browser: Any, tmp_path: Path) -> None:
    r, node_a, node_b = fleet
    ids = [id_of(r, node_a), id_of(r, node_b)]
    page, watch = await open_page(browser, r.url + "/dashboard" + POLL)
    shots = tmp_path / "screenshots"

    # Fleet Overview: a card per node, loaded models with context, queues with kind badges.
    for node in [*ids, "evil-node"]:
        await page.wait_for_selector(f'#node-cards > [data-key="{node}"]')
    card = await text_of(page, f'#node-cards > [data-key="{ids[1]}"]')
    assert "qwen2.5:7b" in card and "ctx 4,096" in card and "unloads in 5 min" in card
    # what herd learned of an agentless node, from its own traffic
    await page.wait_for_function(
        "() => /Learned: [^\\n]*slot/.test(document.querySelector('#node-cards').textContent)"
    )
    assert "llama3.2:3b" in await text_of(page, "#node-cards")
    await page.wait_for_function("() => document.querySelectorAll('#queue-rows tr').length >= 3")
    queue = await text_of(page, "#queue-rows")
    assert "[TEXT]" in queue and "[EMBED]" in queue and "nomic-embed-text" in queue
    assert await text_of(page, '#fleet-totals [data-f="nodes"]') == "3 / 3"
    assert re.search(r"updated \d+ s ago", await text_of(page, "#freshness"))

    # Hostile strings from the heartbeat are shown as text and run nothing.
    evil = await text_of(page, '#node-cards > [data-key="evil-node"]')
    assert evil.count(XSS) >= 4, evil  # loaded model, capabilities, error, versions
    assert "10.0 GB of 16.0 GB" in evil  # memory bar from the heartbeat
    await page.screenshot(path=str(shots / "1-overview.png"), full_page=True)

    # Keyboard: arrows move the selection along the tablist.
    await page.focus("#tab-overview")
    await page.keyboard.press("ArrowRight")
    assert await page.get_attribute("#tab-trends", "aria-selected") == "true"
    assert await page.get_attribute("#tab-overview", "aria-selected") == "false"
    assert await page.evaluate("document.activeElement.id") == "tab-trends"

    # Trends: SVG paths drawn from the hourly buckets; the range switch refetches.
    await page.wait_for_function(
        "() => document.querySelector('#trend-totals [data-f=requests]').textContent === '4'"
    )
    d = await page.get_attribute("#chart-requests path.s0:not(.area)", "d")
    assert d and d.startswith("M") and "L" in d
    assert await page.locator("#chart-latency path").count() >= 3
    await page.click('#trend-hours [data-hours="72"]')
    await page.wait_for_function(
        "() => /72 hours/.test(document.querySelector('#trends-range').textContent)"
    )
    await page.screenshot(path=str(shots / "2-trends.png"), full_page=True)

    # Model Insights: every model, with where it lives.
    await select_tab(page, "models")
    await page.wait_for_selector('#model-rows > [data-key="qwen2.5:7b"]')
    row = await text_of(page, '#model-rows > [data-key="llama3.2:3b"]')
    assert row.split("\t")[1].strip() == "2" and ids[0] in row and ids[1] in row
    assert await page.locator('#model-rows > [data-key="nomic-embed-text:latest"]').count() == 1
    await page.screenshot(path=str(shots / "3-models.png"), full_page=True)

    # Apps: the tag from X-Herd-Tags, and recent requests.
    await select_tab(page, "apps")
    await page.wait_for_selector('#app-rows > [data-key="billing-bot"]')
    app = await text_of(page, '#app-rows > [data-key="billing-bot"]')
    assert app.split("\t")[1].strip() == "3"
    await page.wait_for_function("() => document.querySelectorAll('#trace-rows tr').length >= 4")
    await page.screenshot(path=str(shots / "4-apps.png"), full_page=True)

    # Benchmarks: start a small run through the form (confirm + admin token prompt).
    await select_tab(page, "benchmarks")
    await page.fill('#bench-form [name="models"]', "llama3.2:3b")
    await page.fill('#bench-form [name="requests_per_model"]', "3")
    await page.fill('#bench-form [name="max_tokens"]', "8")
    await page.click("#bench-start")
    await page.wait_for_selector('#bench-rows > [data-key="1"] [data-level="ok"]')
    run = await text_of(page, '#bench-rows > [data-key="1"]')
    assert "done" in run and "llama3.2:3b" in run and "tok/s" in run
    cells = run.split("\t")
    assert cells[4].strip() == "3" and cells[5].strip() == "0" and cells[6].strip() != NO_VALUE
    assert await page.get_attribute("#chart-bench-rps path.s0:not(.area)", "d")
    assert watch.dialogs[0][0] == "confirm"
    assert any(t == "prompt" for t, _ in watch.dialogs), "the admin token was asked for"
    await page.screenshot(path=str(shots / "5-benchmarks.png"), full_page=True)

    # Health: the real endpoint's checks with a score (a 404 "not available" is a failure).
    await select_tab(page, "health")
    await page.wait_for_function(
        "() => document.querySelector('#score').textContent !== '\\u2013' || "
        "!document.querySelector('[data-notice=health]').hidden"
    )
    assert await page.locator('[data-notice="health"]').is_hidden(), await text_of(
        page, '[data-notice="health"]'
    )
    assert await page.locator("#health-checks > li").count() > 0
    await page.wait_for_function("() => document.querySelectorAll('#event-rows tr').length > 0")
    # The rendering of checks, whatever the real endpoint answers today.
    health = {
        "score": 72,
        "checks": [
            {
                "id": "node_down",
                "name": "Node offline",
                "severity": "critical",
                "reason": XSS,
                "fix": "Start herd-node on it",
                "node_id": ids[0],
            },
            {"id": "disk", "name": "Disk space", "severity": "ok", "reason": "plenty", "fix": ""},
        ],
    }
    await page.route("**/dashboard/api/health", stub(200, health))
    await page.wait_for_selector('#health-checks > li[data-key^="disk"]')
    assert await text_of(page, "#score") == "72"
    checks = await text_of(page, "#health-checks")
    assert XSS in checks and "Fix: Start herd-node on it" in checks and ids[0] in checks
    assert await page.locator('[data-notice="health"]').is_hidden()
    await page.screenshot(path=str(shots / "6-health.png"), full_page=True)
    await page.unroute("**/dashboard/api/health")

    # Recommendations: the real endpoint's cards (a 404 "not available" is a failure), then
    # a one-click pull on a recommendation served by a route stub.
    await select_tab(page, "recommendations")
    await page.wait_for_selector(f'#mm-cards > [data-key="{ids[0]}"]')
    await page.wait_for_function(
        "() => document.querySelector('#rec-cards').children.length > 0 || "
        "!document.querySelector('[data-notice=recommendations]').hidden"
    )
    assert await page.locator('[data-notice="recommendations"]').is_hidden(), await text_of(
        page, '[data-notice="recommendations"]'
    )
    assert await page.locator("#rec-cards > *").count() > 0
    recs = {
        "nodes": [
            {
                "node_id": ids[0],
                "memory_total_bytes": 32 * 2**30,
                "recommendations": [
                    {"model": "phi3:mini", "action": "pull", "reason": XSS},
                    {"model": "llama3.2:3b", "action": "keep", "reason": "used every day"},
                ],
            }
        ]
    }
    await page.route("**/dashboard/api/recommendations", stub(200, recs))
    button = f'#rec-cards > [data-key="{ids[0]}"] [data-key^="phi3:mini"] button'
    await page.wait_for_selector(button)
    await page.click(button)
    await page.wait_for_selector(f'#pull-jobs > [data-key^="{ids[0]}:phi3:mini"]')
    assert any("phi3:mini" in m for t, m in watch.dialogs if t == "confirm")
    await page.wait_for_selector(f'#mm-cards > [data-key="{ids[0]}"] [data-key^="phi3:mini"]')
    assert "phi3:mini" in node_a.models
    await page.screenshot(path=str(shots / "7-recommendations.png"), full_page=True)
    await page.unroute("**/dashboard/api/recommendations")

    # Settings: a confirmed toggle round-trips to the API and persists in the store.
    await select_tab(page, "settings")
    await page.wait_for_selector("#setting-vram_fallback")
    assert not await page.is_checked("#setting-vram_fallback")
    await page.click("#setting-vram_fallback")
    await page.wait_for_function("() => document.querySelector('#setting-vram_fallback').checked")
    async with httpx.AsyncClient(base_url=r.url) as client:
        shown = (await client.get("/dashboard/api/settings")).json()
    assert shown["settings"]["vram_fallback"] is True
    assert (await r.router.store.get_settings())["vram_fallback"] is True
    versions = await text_of(page, "#version-rows")
    assert ids[0] in versions and "0.11.10" in versions
    assert "static_nodes" in await text_of(page, "#settings-config")
    await page.screenshot(path=str(shots / "8-settings.png"), full_page=True)

    assert await page.evaluate("document.querySelectorAll('img').length") == 0
    assert not watch.unexpected_dialogs(), watch.dialogs
    assert not watch.errors, watch.errors


@pytest.mark.browser
async def test_phone_width_has_no_horizontal_overflow(
    fleet: Any, browser: Any, tmp_path: Path
) -> None:
    r, _, _ = fleet
    page, watch = await open_page(browser, r.url + "/dashboard" + POLL, width=390, scheme="dark")
    await page.wait_for_selector('#node-cards > [data-key="evil-node"]')
    for tab in (
        "overview",
        "trends",
        "models",
        "apps",
        "benchmarks",
        "health",
        "recommendations",
        "settings",
    ):
        await select_tab(page, tab)
        await page.wait_for_function(
            "() => document.querySelector('#freshness').dataset.state === 'fresh'"
        )
        await asyncio.sleep(0.35)  # one poll: the tab's own data is rendered
        width = await page.evaluate("document.scrollingElement.scrollWidth")
        assert width <= 390, f"{tab}: page is {width}px wide at a 390px viewport"
        await page.screenshot(path=str(tmp_path / f"phone-{tab}.png"), full_page=True)
    assert await page.evaluate("document.querySelectorAll('img').length") == 0
    assert not watch.unexpected_dialogs() and not watch.errors, (watch.dialogs, watch.errors)


# ------------------------------------------------------------------ resilience ----------


@pytest.mark.browser
async def test_page_survives_router_restart_and_endpoint_errors(
    make_router: RouterFactory, browser: Any, tmp_path: Path
) -> None:
    fake = FakeOllama([FakeModel("llama3.2:3b")], tokens_per_s=0)
    await fake.start()
    data_dir = tmp_path / "shared-data"
    try:
        r = await make_router([fake.url], data_dir=data_dir)
        await r.wait_ready()
        node = id_of(r, fake)
        page, watch = await open_page(browser, r.url + "/dashboard" + POLL)
        await page.wait_for_selector(f'#node-cards > [data-key="{node}"]')
        await page.wait_for_selector('#freshness[data-state="fresh"]')

        # Router gone: stale indicator and retry banner; the last data stays on screen.
        await r.router.stop()
        await page.wait_for_selector('#freshness[data-state="stale"]')
        assert "stale" in await text_of(page, "#freshness")
        assert "retrying" in await text_of(page, "#banner")
        assert await page.locator(f'#node-cards > [data-key="{node}"]').count() == 1

        # Back on the same port: fresh again without a reload.
        r2 = await make_router([fake.url], data_dir=data_dir, port=r.port)
        await r2.wait_ready()
        await page.wait_for_selector('#freshness[data-state="fresh"]', timeout=15_000)
        assert await page.locator("#banner").is_hidden()

        # One endpoint failing or missing: its panel says so, the rest keeps updating.
        await page.route("**/dashboard/api/models*", stub(500, {"error": "store broke"}))
        await page.route("**/dashboard/api/health", stub(404, "404 page not found"))
        await select_tab(page, "models")
        await page.wait_for_selector('[data-notice="models"]:not([hidden])')
        assert "store broke" in await text_of(page, '[data-notice="models"]')
        await select_tab(page, "health")
        await page.wait_for_selector('[data-notice="health"]:not([hidden])')
        assert "Not available" in await text_of(page, '[data-notice="health"]')
        await page.wait_for_function("() => document.querySelectorAll('#event-rows tr').length > 0")
        await page.unroute("**/dashboard/api/models*")
        await select_tab(page, "models")
        await page.wait_for_selector('[data-notice="models"]', state="hidden")
        await page.wait_for_selector('#model-rows > [data-key="llama3.2:3b"]')

        # Hidden tab: no polling at all; visible again: polling resumes at once.
        hide = """h => { Object.defineProperty(document, 'hidden', {value: h, configurable: true});
                         document.dispatchEvent(new Event('visibilitychange')); }"""
        await page.evaluate(hide, True)
        await asyncio.sleep(0.4)  # a poll already under way may finish
        before = len(watch.requests)
        await asyncio.sleep(1.0)
        assert len(watch.requests) == before, watch.requests[before:]
        assert await page.get_attribute("#freshness", "data-state") == "paused"
        await page.evaluate(hide, False)
        await asyncio.sleep(0.5)
        assert len(watch.requests) > before
        assert not watch.errors, watch.errors
    finally:
        await fake.stop()


@pytest.mark.browser
async def test_api_key_is_asked_once_and_sent_as_bearer(
    make_router: RouterFactory, browser: Any
) -> None:
    fake = FakeOllama([FakeModel("llama3.2:3b")], tokens_per_s=0)
    await fake.start()
    try:
        r = await make_router([fake.url], api_keys=[API_KEY])
        await r.wait_ready()
        page, watch = await open_page(browser, r.url + "/dashboard" + POLL + "#models")
        await page.wait_for_selector(
            f'#node-cards > [data-key="{id_of(r, fake)}"]', state="attached"
        )
        await page.wait_for_selector('#model-rows > [data-key="llama3.2:3b"]')
        await page.wait_for_selector('#freshness[data-state="fresh"]')
        assert [t for t, _ in watch.dialogs] == ["prompt"], watch.dialogs
        assert not watch.errors, watch.errors
    finally:
        await fake.stop()


@pytest.mark.browser
async def test_a_client_error_trace_is_not_shown_as_critical(
    make_router: RouterFactory, browser: Any
) -> None:
    """A request the node refused because of the request itself (issue 13): its trace row
    says client_error with the node's text, at info level, not critical like a failure."""
    fake = FakeOllama([FakeModel("llama3.2:3b")], tokens_per_s=0)
    await fake.start()
    try:
        r = await make_router([fake.url])
        await r.wait_ready()
        tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
        async with httpx.AsyncClient(base_url=r.url, timeout=10) as client:
            res = await client.post("/api/chat", json={
                "model": "llama3.2:3b", "messages": [{"role": "user", "content": "x"}],
                "tools": tools, "stream": False})
            assert res.status_code == 400
        page, watch = await open_page(browser, r.url + "/dashboard" + POLL + "#apps")
        cell = page.locator("#trace-rows tr td", has_text="client_error")
        await cell.first.wait_for()
        assert "does not support tools" in await cell.first.inner_text()
        assert await cell.first.get_attribute("data-level") == "info"
        assert not watch.errors, watch.errors
    finally:
        await fake.stop()
