"""The web console in real headless Chromium (Debian's `chromium`, driven by Playwright)
against a running fleet: real Mosquitto, a `tandem fleet serve` process, simulated devices.

Screenshots go to test-artifacts/console/ (gitignored) for a person to look at.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_console_support import TOKEN, USER, ConsoleFleet, quick_plan
from tests.support.mosquitto import Broker

CHROMIUM = os.environ.get("TANDEM_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = [
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason=f"no Chromium at {CHROMIUM}: apt-get install chromium (scripts/system-deps.sh)",
    ),
    pytest.mark.timeout(120),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield b
        b.close()


@pytest.fixture
def fleet(tmp_path: Path, mosquitto_factory: Callable[..., Broker]) -> Iterator[ConsoleFleet]:
    f = ConsoleFleet(tmp_path, mosquitto_factory, devices=6)
    yield f
    f.stop()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.set_default_timeout(20_000)
    yield pg
    ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def expect_text(page: Any, selector: str, pattern: str, timeout: float = 20_000) -> None:
    try:
        sync_api.expect(page.locator(selector).first).to_have_text(
            re.compile(pattern), timeout=timeout
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- page shows:\n{page.inner_text('body')[:3000]}") from None


def test_pages_and_a_rollout_created_from_the_form_advance_live(
    fleet: ConsoleFleet, page: Any
) -> None:
    # The token bootstraps from the URL into sessionStorage and leaves the address bar.
    page.goto(f"{fleet.url}/console/?token={TOKEN}#/fleet")
    expect_text(page, "#device-count", r"^6$")
    expect_text(page, "#online-count", r"^6\s*/ 6$")
    assert "token" not in page.url
    assert page.evaluate("sessionStorage.getItem('tandem-token')") == TOKEN
    expect_text(page, "#live", "live")
    assert page.locator("#devices tbody tr").count() == 6
    expect_text(page, "#devices tbody tr >> nth=0", r"digits v1")
    shot(page, "fleet")

    # Filter by tag: two canary devices.
    page.select_option("#tag-filter", "ring=canary")
    expect_text(page, "#device-count", r"^2$")
    assert page.locator("#devices tbody tr").count() == 2

    # The model page: every version with accuracy and a size per variant.
    page.goto(f"{fleet.url}/console/#/models/digits")
    expect_text(page, "#model-page h1", "Model digits")
    sync_api.expect(page.locator(".version")).to_have_count(3)
    v1 = page.locator(".version[data-version='1']")
    expect_text(page, ".version[data-version='1'] .accuracy", r"95\.0%")
    assert v1.locator("tbody tr").count() == 2  # onnx-int8 and tflite-int8
    assert "KiB" in v1.locator("tbody tr").first.inner_text()
    shot(page, "model")

    # Create a rollout of v2 from the form: two stages, short soaks, the default gates.
    page.goto(f"{fleet.url}/console/#/rollouts/new?model=digits&version=2")
    page.wait_for_selector("#rollout-form")
    rows = page.locator(".stage-row")
    rows.nth(0).locator("[name=percent]").fill("30")
    rows.nth(0).locator("[name=soak]").fill("1")
    rows.nth(1).locator("button").click()  # drop the 50% stage
    page.locator(".stage-row").nth(1).locator("[name=soak]").fill("0.5")
    page.fill("#f-timeout", "30")
    assert page.locator(".gate-row").count() == 4
    page.evaluate("window.__sameDocument = 42")
    page.click("#create-rollout")
    page.wait_for_url(re.compile(r"#/rollouts/r-[0-9a-f]+$"))
    rollout_id = page.url.rsplit("/", 1)[1]
    created = fleet.rollout(rollout_id)
    assert created["version"] == 2 and created["baseline_version"] == 1
    assert [s["percent"] for s in created["stages"]] == [30.0, 100.0]
    assert created["created_by"] == USER
    gates = {g["metric"] for g in created["stages"][0]["gates"]}
    assert gates == {"error_rate", "p95_latency_ratio", "shadow_agreement", "failed_device_pct"}

    # It advances through both stages with no reload: the SSE stream drives the redraws.
    expect_text(page, "#rollout-page .head .badge", r"^completed$", timeout=40_000)
    assert page.evaluate("window.__sameDocument") == 42
    expect_text(page, "[data-stage='1'] .stage-count", r"^4/4 healthy")
    expect_text(page, "[data-stage='0'] .stage-count", r"^2/2 healthy")
    assert page.locator("#assignments tbody tr").count() == 6
    kinds = page.locator("#events tbody tr").evaluate_all("rs => rs.map(r => r.dataset.kind)")
    assert "stage_advanced" in kinds and "completed" in kinds and "created" in kinds
    # Gates show their values against the thresholds, all passed.
    sync_api.expect(page.locator("#gates tbody tr")).to_have_count(4)
    assert page.locator("#gates .badge.pass").count() == 4
    # ... each with the bounds it was judged on and why it passed.
    proportions = page.locator("#gates tr[data-gate='error_rate']")
    assert proportions.locator("td.interval").inner_text().startswith("[")
    reasons = page.locator("#gates td.why").all_inner_texts()
    assert len(reasons) == 4 and all(r.strip() for r in reasons), reasons
    # The charts have the new version's points against the baseline's.
    page.wait_for_function(
        "document.querySelector(\"[data-chart='p95_latency_ms']\").dataset.points > 2"
    )
    assert page.locator("[data-chart='p95_latency_ms'] path.new").count() == 1
    assert page.locator("[data-chart='p95_latency_ms'] path.base").count() == 1
    shot(page, "rollout-completed")

    # The rollouts list shows it; the fleet page now shows v2 everywhere.
    page.goto(f"{fleet.url}/console/#/rollouts")
    expect_text(page, f"[data-rollout='{rollout_id}'] .badge", r"^completed$")
    page.goto(f"{fleet.url}/console/#/fleet")
    expect_text(page, "#devices tbody tr >> nth=0", r"digits v2")


def test_pause_resume_promote_and_abort_with_confirmation(fleet: ConsoleFleet, page: Any) -> None:
    # A long first-stage soak keeps the rollout in stage 1 until someone acts.
    plan = quick_plan(2)
    plan["stages"] = [
        {"percent": 30, "min_soak_s": 600, "gates": []},
        {"percent": 60, "min_soak_s": 600, "gates": []},
        {"percent": 100, "min_soak_s": 0, "gates": []},
    ]
    rollout_id = fleet.post("/api/v1/rollouts", plan)["rollout_id"]
    page.goto(f"{fleet.url}/console/?token={TOKEN}#/rollouts/{rollout_id}")
    expect_text(page, "[data-stage='0'] .stage-count", r"^2/2 healthy")

    page.click("#act-pause")
    expect_text(page, "#rollout-page .head .badge", r"^paused$")
    assert fleet.rollout(rollout_id)["status"] == "paused"
    page.click("#act-resume")
    expect_text(page, "#rollout-page .head .badge", r"^running$")
    page.click("#act-promote")
    expect_text(page, "[data-stage='1'] .stage-count", r"^2/2 healthy")
    assert fleet.rollout(rollout_id)["stage_index"] == 1

    # Abort asks first; dismissing changes nothing.
    dialogs: list[str] = []

    def dismiss(d: Any) -> None:
        dialogs.append(d.message)
        d.dismiss()

    page.once("dialog", dismiss)
    page.click("#act-abort")
    page.wait_for_timeout(500)
    assert dialogs and "Abort rollout" in dialogs[0]
    assert fleet.rollout(rollout_id)["status"] == "running"

    page.once("dialog", lambda d: d.accept())
    page.click("#act-abort")
    expect_text(page, "#rollout-page .head .badge", r"^aborted$")
    # Every touched device goes back to v1, and the page shows it live.
    expect_text(page, "[data-stage='0'] .stage-count", r"2 rolled back", timeout=20_000)
    expect_text(page, "[data-stage='1'] .stage-count", r"2 rolled back", timeout=20_000)
    rows = page.locator("#events tbody tr[data-kind='aborted']")
    sync_api.expect(rows).to_have_count(1)
    assert USER in rows.inner_text()
    for kind in ("paused", "resumed", "stage_advanced"):
        assert page.locator(f"#events tbody tr[data-kind='{kind}']").count() >= 1
    assert sync_api.expect(page.locator("#act-abort")).to_be_disabled() is None
    shot(page, "rollout-aborted")


def test_a_bad_version_is_stopped_by_its_gates_on_the_live_page(
    fleet: ConsoleFleet, page: Any
) -> None:
    rollout_id = fleet.post("/api/v1/rollouts", quick_plan(3, baseline_version=1))["rollout_id"]
    page.goto(f"{fleet.url}/console/?token={TOKEN}#/rollouts/{rollout_id}")
    expect_text(page, "#rollout-page .head .badge", r"^aborted$", timeout=40_000)
    expect_text(page, "#reason", r"gate .* failed")
    assert page.locator("#gates .badge.fail").count() >= 1
    # Nobody outside the first cohort got it.
    assert page.locator("#assignments tbody tr").count() == 2
    page.wait_for_function(
        "document.querySelector(\"[data-chart='agreement']\").dataset.points > 1"
    )
    shot(page, "rollout-gate-abort")


def test_a_wrong_token_shows_the_sign_in_form(fleet: ConsoleFleet, page: Any) -> None:
    page.goto(f"{fleet.url}/console/?token=wrong#/fleet")
    sync_api.expect(page.locator("#login")).to_be_visible()
    expect_text(page, "#login-error", "refused")
    page.fill("#token", TOKEN)
    page.click("#login-form button[type=submit]")
    expect_text(page, "#device-count", r"^6$")
