"""The "clean a dataset" page (/clean) in a real headless Debian chromium driven by Playwright.

Issue 17's scenario: a reviewer relabels two suspects and removes one, reloads, sees the same decisions,
exports them, and the exported file holds exactly those three. A real uvicorn server on loopback with an API
key over a copy of the digits run after the label-noise job. With INFLUENCE_SCREENSHOT_DIR set, the page's
screenshot is written there as clean-page.png (the README's picture: experiments/results/clean-page.png).
"""

import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pytest

from api import open_index
from api.service import create_app
from store import load_noise_signals

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("INFLUENCE_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
ARGS += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "clean-key"

if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(
        f"no chromium at {CHROMIUM}: `make install` installs Debian's (apt-get install -y chromium)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright missing: pip install -e '.[dev]'")


@pytest.fixture(scope="module")
def run(digits_mlp_run, tmp_path_factory):
    path = tmp_path_factory.mktemp("clean") / "run"
    shutil.copytree(digits_mlp_run, path, ignore=shutil.ignore_patterns("dumps"))
    with open_index(path) as index:
        index.find_label_noise(oos_refit="last-layer", oos_repeats=1, progress=False)
    return path


@pytest.fixture(scope="module")
def base_url(run, loopback_uvicorn):
    with loopback_uvicorn(create_app(run, api_key=KEY), stop_timeout=30) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()


def wait_state(page, *states, timeout=120.0):
    """Waits until the page's data-state is one of `states`; an error banner fails the wait with its text."""
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = page.evaluate("document.body.dataset.state")
        if state in states:
            return state
        if state == "error" and "error" not in states:
            raise AssertionError(f"page error: {page.inner_text('#error')}")
        time.sleep(0.1)
    raise AssertionError(f"page state {state!r} after {timeout} s, wanted {states}")


def shown(page):
    """(example_id, data-decision, decision text) of every suspect card, in page order."""
    return [
        (
            int(c.get_attribute("data-example-id")),
            c.get_attribute("data-decision"),
            c.query_selector(".decision").inner_text(),
        )
        for c in page.query_selector_all("#suspects .card")
    ]


def test_a_reviewer_relabels_two_removes_one_reloads_and_exports_exactly_those(browser, base_url, run, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 1100}, accept_downloads=True)
    page.set_default_timeout(60_000)
    page.goto(base_url + "/clean")
    wait_state(page, "error")  # the key is required
    assert "401" in page.inner_text("#error")
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    wait_state(page, "ready")

    with open_index(run) as index:
        top = index.metadata.top_suspects(24)
        n_classes = index.n_classes
        signals = load_noise_signals(index.metadata, [r.example_id for r in top])
    cards = page.query_selector_all("#suspects .card")
    assert [int(c.get_attribute("data-example-id")) for c in cards] == [r.example_id for r in top]
    for card, record in zip(cards, top, strict=True):  # preview, label, suggested label on each
        assert card.query_selector("canvas") is not None
        assert f"label {record.label}" in card.inner_text()
        assert card.query_selector(".suggested").inner_text() == str(record.suggested_label)
        shown_signals = card.query_selector(".signals").inner_text()  # the signals behind the rank
        assert signals[record.example_id] and all(f"· {name} " in shown_signals for name in signals[record.example_id])
    assert all(d is None for _, d, _ in shown(page))
    # the test predictions the first suspect supports / opposes: loaded when its card's details are opened
    assert cards[0].query_selector(".influence .supports") is None
    cards[0].query_selector(".influence summary").click()
    page.wait_for_selector("#suspects .card >> nth=0 >> .influence[data-loaded=done]")
    with open_index(run) as index:
        want = index.example_influence(top[0].example_id, k=5)
    supports = cards[0].query_selector(".influence .supports").inner_text()
    assert all(f"#{a.test_id} " in supports for a in want.supports), (supports, want)

    page.fill("#reviewer", "ann")
    page.dispatch_event("#reviewer", "change")
    # relabel the 1st to its suggested label, the 3rd to another class picked in the menu; remove the 2nd
    first, second, third = top[0], top[1], top[2]
    third_label = next(c for c in range(n_classes) if c not in (third.label, third.suggested_label))
    wanted = {
        first.example_id: ("relabel", first.suggested_label),
        second.example_id: ("remove", None),
        third.example_id: ("relabel", third_label),
    }
    page.click(f"#suspects .card[data-example-id='{first.example_id}'] button.relabel")
    wait_state(page, "saved")
    page.click(f"#suspects .card[data-example-id='{second.example_id}'] button.remove")
    wait_state(page, "saved")
    page.select_option(f"#suspects .card[data-example-id='{third.example_id}'] select", str(third_label))
    page.click(f"#suspects .card[data-example-id='{third.example_id}'] button.relabel")
    wait_state(page, "saved")

    def check(page):
        got = {i: (d, text) for i, d, text in shown(page) if d is not None}
        assert {i: d for i, (d, _) in got.items()} == {i: d for i, (d, _) in wanted.items()}
        for i, (decision, label) in wanted.items():
            assert got[i][1] == (f"relabel → {label} · ann" if decision == "relabel" else "remove · ann")
        assert "3 decided: 2 relabel, 0 keep, 1 remove" in page.inner_text("#decided")

    check(page)
    page.reload()
    wait_state(page, "ready")  # the key is remembered by the browser
    check(page)
    third_select = page.query_selector(f"#suspects .card[data-example-id='{third.example_id}'] select")
    assert third_select.input_value() == str(third_label)

    with page.expect_download() as download:
        page.click("#export")
    path = tmp_path / "decisions.csv"
    download.value.save_as(path)
    as_text = pcsv.ConvertOptions(column_types={"decided_at": pa.string(), "reviewer": pa.string()})
    rows = pcsv.read_csv(io.BytesIO(path.read_bytes()), convert_options=as_text).to_pylist()
    assert {r["example_id"]: (r["decision"], r["label"]) for r in rows} == wanted
    assert len(rows) == 3 and {r["reviewer"] for r in rows} == {"ann"}
    with open_index(run) as index:  # the same three in the run, for Python
        assert {d.example_id: (d.decision, d.label) for d in index.decisions()} == wanted

    png = page.screenshot(full_page=True)
    import matplotlib.image

    pixels = matplotlib.image.imread(io.BytesIO(png), format="png")[..., :3]
    assert pixels.std() > 0.1, "blank screenshot"
    out = os.environ.get("INFLUENCE_SCREENSHOT_DIR")
    if out:
        page.set_viewport_size({"width": 1280, "height": 820})
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "clean-page.png").write_bytes(page.screenshot())
    assert np.isfinite(pixels).all()
    page.close()


def test_before_the_noise_job_the_page_says_so(browser, digits_mlp_run, tmp_path, loopback_uvicorn):
    run = tmp_path / "fresh"
    shutil.copytree(digits_mlp_run, run, ignore=shutil.ignore_patterns("dumps"))
    with open_index(run) as index:
        if index.metadata.top_suspects(1):
            pytest.skip("the shared digits run already holds suspects")
    with loopback_uvicorn(create_app(run), stop_timeout=30) as url:
        page = browser.new_page()
        page.goto(url + "/clean")
        wait_state(page, "ready")
        assert page.query_selector_all("#suspects .card") == []
        assert "run the label-noise job first" in page.inner_text("#empty")
        assert "no finished dump yet" in page.inner_text("#harmful-empty")
        page.close()
