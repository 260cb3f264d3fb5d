"""`Task(preview=tabular_preview(names))`: tabular rows shown as feature names and values, stored and explained."""

import numpy as np
import pytest
import torch

from api import build_index
from indexer.previews import MAX_CHARS, tabular_preview


def test_a_row_shows_each_feature_by_name():
    show = tabular_preview(["alcohol", "hue", "proline"], digits=3)
    assert show(torch.tensor([13.24, 1.05, 1065.0])) == "alcohol=13.2 hue=1.05 proline=1.06e+03"
    assert show(np.array([1.0, 2.0, 3.0])) == "alcohol=1 hue=2 proline=3"
    with pytest.raises(ValueError, match="2 values, feature_names has 3"):
        show([1.0, 2.0])
    with pytest.raises(ValueError, match="feature_names"):
        tabular_preview([])
    assert len(tabular_preview([f"feature_{i}" for i in range(50)])(np.arange(50.0))) == MAX_CHARS


@pytest.mark.slow
def test_wine_explanations_show_feature_names_and_values(tmp_path):
    from small_runs import WINE_FEATURES, wine_task

    task = wine_task(preview=tabular_preview(WINE_FEATURES))
    with build_index(task, tmp_path / "wine", progress=False) as index:
        [exp] = index.explain(test_ids=[0], k=3, method="exact")
    for p in exp.proponents:
        x = task.train[p.example_id][0]
        assert p.preview.startswith(f"alcohol={float(x[0]):.4g} malic_acid=")
        assert "array[" not in p.preview


def test_an_image_is_stored_as_a_png_thumbnail_that_reads_back_as_its_pixels():
    import base64
    import io

    from PIL import Image

    from api.cli import render_preview
    from api.previews import preview_pixels
    from indexer.previews import PNG_PREFIX, image_preview, text_preview
    from indexer.task import default_preview

    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, size=(1, 28, 28)).astype(np.float32)  # [C, H, W], as torchvision yields
    shown = image_preview(size=28)(torch.from_numpy(x))
    assert shown.startswith(PNG_PREFIX)
    img = Image.open(io.BytesIO(base64.b64decode(shown[len(PNG_PREFIX) :])))
    assert img.size == (28, 28) and img.mode == "L"
    # min..max scaled to 0..255, rounded: the stored thumbnail is the image to within one grey level
    expected = (x[0] - x.min()) / (x.max() - x.min())
    np.testing.assert_allclose(preview_pixels(shown), expected, atol=0.5 / 255 + 1e-9)
    # thumbnails keep the aspect ratio within `size`; RGB stays RGB
    assert Image.open(io.BytesIO(base64.b64decode(image_preview(size=16)(np.zeros((3, 40, 20)))[22:]))).size == (8, 16)
    # the default preview shows images this way, tabular rows and texts as before
    assert default_preview(torch.from_numpy(x)) == image_preview()(x)
    assert default_preview(np.arange(13.0)).startswith("array[13]")
    # the CLI draws it as a character grid of at most 14 x 14
    rows = render_preview(shown)
    assert len(rows) == 14 and {len(r) for r in rows} == {14}
    assert render_preview("a review text") == ["a review text"]
    assert text_preview(max_chars=12)("a  long\n text that goes on") == "a long te..."
    with pytest.raises(ValueError, match=r"shape \[13\]"):
        image_preview()(np.arange(13.0))
    with pytest.raises(ValueError, match="size"):
        image_preview(size=2)
    with pytest.raises(ValueError, match="max_chars"):
        text_preview(max_chars=0)
