"""The web UI in a real headless Chromium (Debian's package, driven by Playwright).

Each test serves the UI from the library on 127.0.0.1 over a SQLite store
that real workers filled, and checks what a person sees.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvicorn
from click.testing import CliRunner
from playwright.async_api import Browser, Page, async_playwright, expect

from substantial import Conductor, Context, Queue, RetryPolicy, WorkflowFailed, workflow
from substantial.cli import main
from substantial.ui import UIConfig, create_app

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
HOSTILE_NAME = '<img src=x onerror="window.__pwned=1">'
HOSTILE_VALUE = "<script>window.__pwned=2</script><b>bold?</b>"
TOKEN = "s3cret-token-for-tests"


@workflow()
async def child_flow(c: Context, x: int = 1) -> int:
    return await c.save(lambda: x * 2, name="double")


_calls: dict[str, int] = {}


@workflow()
async def shown(c: Context) -> int:
    def flaky() -> int:
        _calls[c.run_id] = _calls.get(c.run_id, 0) + 1
        if _calls[c.run_id] < 3:
            raise ValueError(f"flaky failure {_calls[c.run_id]}")
        return 7

    a = await c.save(flaky, name="flaky", retry=RetryPolicy(initial_delay=0.01))
    c.publish("progress", {"a": a})
    await c.sleep(0.05)
    b = await c.child(child_flow, {"x": a})
    v = await c.receive("go")
    return int(a + b + v)


@workflow()
async def hostile(c: Context) -> None:
    await c.save(lambda: HOSTILE_VALUE, name=HOSTILE_NAME)
    c.publish(HOSTILE_NAME, HOSTILE_VALUE)
    raise RuntimeError(HOSTILE_VALUE)


#: Whether the bug that fails ``fixable`` is fixed yet (the test "deploys" the fix).
_fixed: dict[str, bool] = {}


@workflow()
async def fixable(c: Context) -> str:
    def charge() -> str:
        if not _fixed.get(c.run_id):
            raise ValueError("card service misconfigured")
        return "charged"

    first = await c.save(lambda: "reserved", name="reserve")
    return first + " and " + await c.save(charge, name="charge", retry=RetryPolicy(max_attempts=1))


def _conductor(url: str) -> Conductor:
    conductor = Conductor(url)
    for wf in (child_flow, shown, hostile, fixable):
        conductor.register(wf)
    return conductor


async def _wait(check: Callable[[], Any], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[tuple[str, Conductor]]:
    """A store with a finished run, a run waiting for an event, and a hostile failed run."""
    url = f"sqlite:///{tmp_path / 'ui.db'}"
    conductor = _conductor(url)
    agent = conductor.run(poll_interval=0.2)
    try:
        done = await conductor.start(shown, run_id="done")
        await conductor.start(shown, run_id="waiting")
        await conductor.start(hostile, run_id="hostile")

        async def children_done() -> bool:
            infos = [await conductor.backend.get_run(f"{r}:3") for r in ("done", "waiting")]
            return all(i is not None and i.status == "completed" for i in infos)

        await _wait(children_done)
        await done.send("go", 3)
        assert await done.result(timeout=20) == 24
        with pytest.raises(WorkflowFailed):
            await conductor.get("hostile").result(timeout=20)
    finally:
        agent.cancel()
        await agent
    yield url, conductor
    await conductor.close()


class Served:
    """The UI served from a thread, on a free port."""

    def __init__(self, config: UIConfig) -> None:
        self.server = uvicorn.Server(
            uvicorn.Config(create_app(config), host="127.0.0.1", port=0, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "UI did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    servers: list[Served] = []

    def start(url: str, **options: Any) -> str:
        served = Served(UIConfig(url, **options))
        servers.append(served)
        return served.__enter__()

    yield start
    for served in servers:
        served.__exit__()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        await b.close()


async def new_page(browser: Browser) -> tuple[Page, list[str]]:
    """A page that records dialogs and script errors: none may happen."""
    page = await browser.new_page(viewport={"width": 1300, "height": 900})
    problems: list[str] = []

    async def on_dialog(dialog: Any) -> None:
        problems.append(f"dialog: {dialog.message}")
        await dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
    return page, problems


def http(method: str, url: str, body: bytes | None = None, **headers: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, orjson.loads(err.read())


async def test_runs_list_and_run_page(
    store: tuple[str, Conductor], serve: Callable[..., str], browser: Browser, tmp_path: Path
) -> None:
    url, _ = store
    base = serve(url)
    page, problems = await new_page(browser)
    await page.goto(base + "/")
    await page.wait_for_selector('tr[data-run="done"]')
    rows = await page.locator("table.runs tbody tr").count()
    assert rows == 5  # done, waiting, hostile and the two children
    assert "read-only" in await page.inner_text("#store")
    await page.select_option("select[name=status]", "active")
    await page.click("#filters button[type=submit]")
    await expect(page.locator("table.runs tbody tr")).to_have_count(1, timeout=20_000)
    assert await page.inner_text("table.runs tbody tr td:first-child") == "waiting"
    await page.screenshot(path=str(tmp_path / "list.png"))

    await page.goto(base + "/#/run/done")
    await page.wait_for_selector("#timeline .trow.kind-end")
    api = http("GET", base + "/api/runs/done")[1]
    assert await page.locator("#timeline .trow:not(.head)").count() == len(api["rows"])
    flaky = page.locator("#timeline .trow.kind-step", has_text="flaky")
    assert await flaky.locator(".seg.failed").count() == 2  # two failed attempts, then ok
    assert await flaky.locator(".seg.st-ok").count() == 1
    assert "flaky failure 1" in (
        await flaky.locator(".seg.failed").first.get_attribute("title") or ""
    )
    assert await page.locator("#timeline .trow.kind-sleep .seg").count() == 1
    assert await page.locator("#timeline .trow.kind-child .seg.st-ok").count() == 1
    assert "24" in await page.inner_text(".facts")
    assert '{"a":7}' in await page.inner_text("#published")
    assert await page.locator("#records tbody tr").count() == len(api["records"])
    await page.screenshot(path=str(tmp_path / "run.png"), full_page=True)

    await page.click("#children a.runlink")  # to the child, and back through its parent link
    await page.wait_for_selector("#timeline .trow.kind-end")
    assert await page.inner_text("h1 .runid") == "done:3"
    await page.click(".facts a.runlink")
    await expect(page.locator("h1 .runid")).to_have_text("done", timeout=20_000)
    assert problems == []


async def test_hostile_names_and_values_are_shown_as_text(
    store: tuple[str, Conductor], serve: Callable[..., str], browser: Browser
) -> None:
    url, _ = store
    base = serve(url)
    page, problems = await new_page(browser)
    await page.goto(base + "/")
    await page.wait_for_selector('tr[data-run="hostile"]')
    outcome = await page.inner_text('tr[data-run="hostile"] td.outcome')
    assert outcome == f"RuntimeError: {HOSTILE_VALUE}"
    await page.goto(base + "/#/run/hostile")
    await page.wait_for_selector("#timeline .trow.kind-end")
    step = page.locator("#timeline .trow.kind-step .tlabel")
    assert await step.inner_text() == HOSTILE_NAME
    assert HOSTILE_VALUE in await page.inner_text("#published")
    assert HOSTILE_NAME in await page.inner_text("#published")
    assert HOSTILE_VALUE in await page.inner_text(".facts .error")
    # Shown, never parsed: no element the log's text describes exists, and nothing ran.
    assert await page.locator("img").count() == 0
    assert await page.locator("main script, main b").count() == 0
    assert await page.evaluate("window.__pwned") is None
    assert problems == []


async def test_actions_only_with_the_flag_and_pages_update_live(
    store: tuple[str, Conductor], serve: Callable[..., str], browser: Browser
) -> None:
    url, conductor = store
    read_only = serve(url)
    status, body = http(
        "POST",
        read_only + "/api/runs/waiting/events",
        b'{"name": "go"}',
        **{"Content-Type": "application/json"},
    )
    assert status == 403 and "--allow-actions" in body["error"]
    page, problems = await new_page(browser)
    await page.goto(read_only + "/#/run/waiting")
    await page.wait_for_selector("#timeline .trow")
    assert await page.locator("#send-event").count() == 0

    acting = serve(url, allow_actions=True)
    status, body = http(
        "POST",
        acting + "/api/runs/waiting/events",
        b'{"name": "go"}',
        **{"Content-Type": "text/plain"},
    )
    assert status == 415
    status, body = http(
        "POST",
        acting + "/api/runs/waiting/events",
        b'{"name": "go"}',
        **{"Content-Type": "application/json", "Origin": "http://evil.example"},
    )
    assert status == 403 and "cross-origin" in body["error"]
    agent = conductor.run(poll_interval=0.2)
    try:
        await page.goto(acting + "/#/")
        await page.wait_for_selector('tr[data-run="waiting"]')
        await conductor.start(child_flow, {"x": 4}, run_id="late-arrival")
        await page.wait_for_selector('tr[data-run="late-arrival"]', timeout=20_000)  # live list

        await page.goto(acting + "/#/run/waiting")
        await page.wait_for_selector("#send-event")
        assert "waiting for" in await page.inner_text(".facts")
        await page.fill("input[name=event-name]", "go")
        await page.fill("input[name=event-value]", "5")
        await page.click("#send-event button")
        await page.wait_for_selector(".facts .st-completed", timeout=20_000)  # live run page
        assert "26" in await page.inner_text(".facts")
        assert await conductor.get("waiting").result(timeout=5) == 26

        await conductor.start(shown, run_id="to-cancel")
        await page.goto(acting + "/#/run/to-cancel")
        await page.wait_for_selector("#cancel-run")
        await page.click("#cancel-run")
        await page.click("#cancel-run")  # the second click confirms
        await page.wait_for_selector(".facts .st-cancelled", timeout=20_000)
    finally:
        agent.cancel()
        await agent
    assert problems == []


async def test_resume_a_failed_run_from_its_page(
    store: tuple[str, Conductor], serve: Callable[..., str], browser: Browser
) -> None:
    url, conductor = store
    json_post = {"Content-Type": "application/json"}
    agent = conductor.run(poll_interval=0.2)
    try:
        run = await conductor.start(fixable, run_id="to-resume")
        with pytest.raises(WorkflowFailed, match="card service misconfigured"):
            await run.result(timeout=20)

        read_only = serve(url)
        status, body = http("POST", read_only + "/api/runs/to-resume/resume", b"{}", **json_post)
        assert status == 403 and "--allow-actions" in body["error"]
        page, problems = await new_page(browser)
        await page.goto(read_only + "/#/run/to-resume")
        await page.wait_for_selector(".facts .st-failed")
        assert await page.locator("#resume-run").count() == 0

        acting = serve(url, allow_actions=True)
        status, body = http(
            "POST",
            acting + "/api/runs/to-resume/resume",
            b"{}",
            **json_post,
            Origin="http://evil.example",
        )
        assert status == 403 and "cross-origin" in body["error"]
        status, body = http("POST", acting + "/api/runs/done/resume", b"{}", **json_post)
        assert status == 400 and "only failed, cancelled or timed-out runs resume" in body["error"]
        status, body = http("POST", acting + "/api/runs/nope/resume", b"{}", **json_post)
        assert status == 404
        assert (await conductor.backend.get_run("to-resume")).status == "failed"  # type: ignore[union-attr]

        await page.goto(acting + "/#/run/done")  # completed: nothing to resume
        await page.wait_for_selector(".facts .st-completed")
        assert await page.locator("#resume-run, #send-event").count() == 0
        await page.goto(acting + "/#/run/to-resume")
        await page.wait_for_selector("#resume-run")
        assert "failed" in await page.inner_text("#resume")
        await page.fill("input[name=resume-timeout]", "soon")
        await page.click("#resume-run")
        await page.click("#resume-run")  # the second click confirms
        await expect(page.locator("#action-message")).to_contain_text(
            "takes a number of seconds", timeout=20_000
        )
        assert (await conductor.backend.get_run("to-resume")).status == "failed"  # type: ignore[union-attr]

        _fixed["to-resume"] = True  # the fix is deployed
        await page.fill("input[name=resume-timeout]", "")
        await page.click("#resume-run")
        await page.click("#resume-run")
        await page.wait_for_selector(".facts .st-completed", timeout=20_000)  # live again
        assert await run.result(timeout=5) == "reserved and charged"
        assert "charged" in await page.inner_text(".facts")
        assert "resumed by" in await page.inner_text("#timeline .trow.kind-repair")
        steps = [r for r in http("GET", acting + "/api/runs/to-resume")[1]["rows"]]
        assert [r["state"] for r in steps if r["kind"] == "step"] == ["ok", "ok"]
        assert await page.locator("#resume-run").count() == 0
    finally:
        agent.cancel()
        await agent
    assert problems == []


async def test_workers_page_shows_who_holds_what(
    store: tuple[str, Conductor], serve: Callable[..., str], browser: Browser
) -> None:
    url, conductor = store
    backend = conductor.backend
    base = serve(url)
    page, problems = await new_page(browser)
    await page.goto(base + "/")
    await page.click("#nav-workers")
    await page.wait_for_selector("#no-workers")

    # What crashes leave: a lease of a process of this host that is gone, and one run out.
    exited = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True
    )
    gone = f"{socket.gethostname()}/{int(exited.stdout)}/1/w-gone"
    assert await backend.acquire_lease("waiting", gone, 60)
    await conductor.start(child_flow, run_id="stale")  # no worker runs yet
    assert await backend.acquire_lease("stale", "elsewhere/1/1/w-other", 0.2)
    await page.wait_for_selector(f'tr.gone[data-owner="{gone}"]', timeout=20_000)  # live
    assert "waiting" in await page.inner_text(f'tr[data-owner="{gone}"]')
    assert "the process is gone" in await page.inner_text("#workers")
    await expect(page.locator("#expired")).to_contain_text("stale", timeout=20_000)
    await backend.release_lease("waiting", gone)

    agent = conductor.run(poll_interval=0.2)
    try:
        await conductor.start(shown, run_id="held")
        row = page.locator(f'tr[data-owner="{agent.worker.owner}"]')
        await expect(row).to_contain_text("held", timeout=20_000)
        cells = await row.locator("td").all_inner_texts()
        assert cells[:2] == [socket.gethostname(), str(os.getpid())]
        assert await page.locator("tr.gone").count() == 0
        await row.locator("a.runlink", has_text="held").click()
        await expect(page.locator("h1 .runid")).to_have_text("held", timeout=20_000)
        assert agent.worker.owner in await page.inner_text(".facts")
        http_status, data = http("GET", base + "/api/workers")
        assert http_status == 200
        (worker,) = data["workers"]
        assert worker["owner"] == agent.worker.owner and "held" in worker["runs"]
        await conductor.get("held").send("go", 1)
        assert await conductor.get("held").result(timeout=20) == 22
    finally:
        agent.cancel()
        await agent
    assert problems == []


async def test_token_and_host_guards(
    store: tuple[str, Conductor], serve: Callable[..., str], browser: Browser
) -> None:
    url, _ = store
    base = serve(url, token=TOKEN)
    assert http("GET", base + "/api/runs")[0] == 401
    assert http("GET", base + "/api/runs", Authorization="Bearer wrong-token-value")[0] == 401
    status, body = http("GET", base + "/api/runs", Authorization=f"Bearer {TOKEN}")
    assert status == 200 and body["total"] == 5
    status, body = http("GET", base + "/api/config", Host="evil.example")
    assert status == 400 and "Host" in body["error"]
    page, problems = await new_page(browser)
    await page.goto(base + f"/?token={TOKEN}")
    await page.wait_for_selector('tr[data-run="done"]')
    assert "token" not in page.url  # moved into an HttpOnly cookie
    assert await page.evaluate("document.cookie") == ""
    assert problems == []


async def test_list_api_filters_by_queue(serve: Callable[..., str], tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'queued.db'}"
    conductor = Conductor(url, queues=[Queue("mail")])
    conductor.register(child_flow)
    await conductor.start(child_flow, queue="mail", run_id="queued")
    await conductor.start(child_flow, run_id="direct")
    await conductor.close()
    base = serve(url)
    status, body = http("GET", base + "/api/runs?queue=mail")
    assert status == 200 and [r["run_id"] for r in body["runs"]] == ["queued"]
    status, body = http("GET", base + "/api/runs?queue=nope")
    assert status == 400 and "no queue named 'nope'" in body["error"]


def test_ui_refuses_to_listen_beyond_loopback_without_a_token() -> None:
    result = CliRunner().invoke(main, ["ui", "--host", "0.0.0.0", "--backend", "memory://"])
    assert result.exit_code == 2
    assert "pass --token with a secret, or bind to 127.0.0.1" in result.output
    result = CliRunner().invoke(main, ["ui", "--token", "short", "--backend", "memory://"])
    assert result.exit_code == 2 and "at least 8 characters" in result.output


async def test_newest_first_pages_follow_a_cursor_not_an_offset(
    serve: Callable[..., str], browser: Browser, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'many.db'}"
    conductor = Conductor(url)
    conductor.register(child_flow)
    ids = [f"r{i:03d}" for i in range(120)]
    for run_id in ids:  # created one after the other: the newest is r119
        await conductor.start(child_flow, run_id=run_id)
    await conductor.close()
    newest_first = list(reversed(ids))
    base = serve(url)
    status, body = http("GET", base + "/api/runs?limit=50")
    assert status == 200 and [r["run_id"] for r in body["runs"]] == newest_first[:50]
    cursor = body["next_before"]
    assert cursor[1] == "r070"
    status, body = http("GET", f"{base}/api/runs?limit=50&before={cursor[0]},{cursor[1]}")
    assert [r["run_id"] for r in body["runs"]] == newest_first[50:100]
    assert http("GET", base + "/api/runs?before=soon,r1")[0] == 400

    page, problems = await new_page(browser)
    await page.goto(base + "/")
    await page.wait_for_selector('tr[data-run="r119"]')
    shown: list[str] = []
    rows = page.locator("table.runs tbody tr")
    for _ in range(3):
        count = await rows.count()
        page_ids = [await rows.nth(i).get_attribute("data-run") or "" for i in range(count)]
        shown += page_ids
        if not await page.locator("#next").count():
            break
        await page.click("#next")
        await expect(rows.first).not_to_have_attribute("data-run", page_ids[0], timeout=20_000)
    assert shown == newest_first
    assert "101-120 runs" in await page.inner_text(".pager")
    assert "before=" in page.url
    await page.click("#previous")
    await expect(page.locator("table.runs tbody tr").first).to_have_attribute(
        "data-run", "r069", timeout=20_000
    )
    assert problems == []
