"""The "why this prediction" web page in a real headless Debian chromium driven by Playwright.

A real uvicorn server on loopback with an API key over the digits run; the page is driven like a person would
(type the key, click a test digit), and the screenshot is checked: not blank, the query digit and the
proponent/opponent digits drawn where the page puts them.
"""

import io
import os
import shutil
import time

import numpy as np
import pytest

from api import open_index
from api.service import create_app
from indexer.previews import image_preview

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("INFLUENCE_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KEY = "web-key"
SHADES = " .:-=+*#%@"

if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(
        f"no chromium at {CHROMIUM}: `make install` installs Debian's (apt-get install -y chromium)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright missing: pip install -e '.[dev]'")


@pytest.fixture(scope="module")
def base_url(digits_mlp_run, tmp_path_factory, loopback_uvicorn):
    run = tmp_path_factory.mktemp("web") / "run"
    shutil.copytree(digits_mlp_run, run, ignore=shutil.ignore_patterns("dumps"))
    with loopback_uvicorn(create_app(run, api_key=KEY), stop_timeout=30) as url:
        yield url


@pytest.fixture(scope="module")
def page(base_url):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def wait_state(page, *states, timeout=180.0):
    """Waits until the page's data-state is one of `states`; an error banner fails the wait with its text."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = page.evaluate("document.body.dataset.state")
        if state in states:
            return state
        if state == "error" and "error" not in states:
            raise AssertionError(f"page error: {page.inner_text('#error')}")
        time.sleep(0.2)
    raise AssertionError(f"page state {state!r} after {timeout} s, wanted {states}")


def png_pixels(png: bytes) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(png), format="png")[..., :3]


def test_why_this_prediction_page(page, base_url, digits_mlp_run, tmp_path):
    page.goto(base_url + "/")
    # Without the key the data routes refuse; the page says so and offers a key field.
    wait_state(page, "error")
    assert "401" in page.inner_text("#error")
    assert page.is_visible("#api-key")
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    wait_state(page, "ready")
    assert "1438 training and 359 test examples" in page.inner_text("#run-info")

    picks = page.query_selector_all("#picker .card")
    assert len(picks) == 40 and all(c.query_selector("canvas") for c in picks)
    with open_index(digits_mlp_run) as index:
        wrong = [int(i) for i in np.flatnonzero(index.metadata.column("test", "prediction") != index.run.test.labels)]
        target = next(i for i in wrong if i < 40)  # a misclassified digit on the first page
        [exp] = index.explain(test_ids=[target], k=8, method="lissa")
        [query] = index.metadata.get("test", [target])
    card = page.query_selector(f"#picker .card[data-test-id='{target}']")
    assert "wrong" in card.get_attribute("class")
    card.click()
    wait_state(page, "explained")

    assert f"test example #{target}" in page.inner_text("#query")
    assert f"predicted {exp.prediction}" in page.inner_text("#query")
    assert f"true label {exp.label}" in page.inner_text("#query")
    shown = {
        kind: [int(c.get_attribute("data-example-id")) for c in page.query_selector_all(f"#{kind} .card")]
        for kind in ("proponents", "opponents")
    }
    assert shown["proponents"] == [p.example_id for p in exp.proponents]
    assert shown["opponents"] == [p.example_id for p in exp.opponents]
    scores = [float(e.inner_text()) for e in page.query_selector_all("#proponents .card .score")]
    np.testing.assert_allclose(scores, [p.score for p in exp.proponents], rtol=6e-3)  # 3 significant digits

    # The query digit is drawn from its stored preview: canvas pixels follow the shade characters.
    drawn = np.array(
        page.evaluate(
            """() => { const c = document.querySelector('#query canvas'); const s = c.width / 8;
                 const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; const out = [];
                 for (let y = 0; y < 8; y++) for (let x = 0; x < 8; x++) out.push(d[4 * ((y * s + 1) * c.width + x * s + 1)]);
                 return out; }"""
        ),
        float,
    ).reshape(8, 8)
    shade = np.array([[SHADES.index(ch) for ch in row] for row in query.preview.split("/")], float)
    np.testing.assert_allclose(drawn, 255 - np.round(255 * shade / (len(SHADES) - 1)), atol=1)

    # Image previews become canvases, anything else (text tasks) becomes text.
    assert page.evaluate("() => previewElement('a photo of a cat', 64).tagName") == "DIV"
    assert page.evaluate("() => previewElement('the movie was great', 64).textContent") == "the movie was great"
    assert page.evaluate(f"() => previewElement({query.preview!r}, 64).tagName") == "CANVAS"
    # PNG thumbnails (indexer.previews.image_preview, the default for image arrays) become images of that PNG.
    thumb = image_preview(size=16)(np.outer(np.arange(16.0), np.ones(16)))
    assert page.evaluate(f"() => previewElement({thumb!r}, 64).tagName") == "IMG"
    assert page.evaluate(f"() => previewElement({thumb!r}, 64).src") == thumb

    png = page.screenshot(full_page=True)
    (tmp_path / "page.png").write_bytes(png)
    pixels = png_pixels(png)
    assert pixels.std() > 0.1, "blank screenshot"
    for selector in ("#query canvas", "#proponents canvas", "#opponents canvas"):
        box = page.query_selector(selector).bounding_box()
        y0, x0 = int(box["y"]), int(box["x"])
        patch = pixels[y0 : y0 + int(box["height"]), x0 : x0 + int(box["width"])]
        assert patch.size and patch.min() < 0.3 and patch.max() > 0.9, f"{selector}: no digit in the screenshot"
    # proponents have a green top border, opponents a red one (style.css)
    greenish = (pixels[..., 1] > 0.45) & (pixels[..., 0] < 0.3) & (pixels[..., 2] < 0.45)
    reddish = (pixels[..., 0] > 0.6) & (pixels[..., 1] < 0.35) & (pixels[..., 2] < 0.3)
    assert greenish.sum() > 100 and reddish.sum() > 100


def test_a_bad_test_id_shows_the_service_error(page, base_url):
    page.fill("#test-id", "99999")
    page.click("#explain")
    wait_state(page, "error")
    assert "404" in page.inner_text("#error") and "99999" in page.inner_text("#error")
