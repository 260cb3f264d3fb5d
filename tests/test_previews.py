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
