"""`influence add RUN TASK` and `influence delete RUN --ids ...` on a real digits run."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from api import build_index, open_index
from api.cli import app
from indexer import IndexConfig
from store import load_manifest, verify_run

pytestmark = pytest.mark.slow
runner = CliRunner()
N0, N = 900, 1000

TASK_FILE = """
import torch
from torch.utils.data import TensorDataset
from indexer import Task

def _task(n):
    saved = torch.load({data!r}, weights_only=False)
    return Task(model=saved["model"], train=TensorDataset(saved["x"][:n], saved["y"][:n]),
                test=TensorDataset(saved["xt"], saved["yt"]), l2=saved["l2"])

def small():
    return _task({n0})

def full():
    return _task({n})
"""


@pytest.fixture(scope="module")
def task_file(tmp_path_factory, digits_logreg_task):
    root = tmp_path_factory.mktemp("cli-update")
    x, y = digits_logreg_task.train.tensors
    xt, yt = digits_logreg_task.test.tensors
    data = root / "data.pt"
    torch.save(
        {"model": digits_logreg_task.model, "x": x, "y": y, "xt": xt[:40], "yt": yt[:40], "l2": digits_logreg_task.l2},
        data,
    )
    path = root / "digits_tasks.py"
    path.write_text(TASK_FILE.format(data=str(data), n0=N0, n=N))
    return path


def test_add_then_delete_then_add_again(task_file, tmp_path):
    run = tmp_path / "run"
    built = runner.invoke(app, ["index", f"{task_file}:small", "--out", str(run), "--json"])
    assert built.exit_code == 0, built.output
    config = IndexConfig.from_stored(load_manifest(run).methods)
    added = runner.invoke(app, ["add", str(run), f"{task_file}:full"])
    assert added.exit_code == 0, added.output
    assert f"added {N - N0} training examples (ids {N0}, {N0 + 1}," in added.output
    with open_index(run) as index:
        assert np.array_equal(index.train_ids, np.arange(N))
    assert verify_run(run) == []

    deleted = runner.invoke(app, ["delete", str(run), "--ids", "3", "17"])
    assert deleted.exit_code == 0, deleted.output
    assert "deleted 2 training examples (ids 3, 17)" in deleted.output
    again = runner.invoke(app, ["add", str(run), f"{task_file}:full"])
    assert again.exit_code == 0 and "nothing to add" in again.output  # the build's deleted examples stay deleted
    with open_index(run) as index:
        assert not np.isin([3, 17], index.train_ids).any() and len(index.train_ids) == N - 2
    assert verify_run(run) == []

    # the same rows as a fresh build of the full set (the examples and ids the updates left)
    fresh = tmp_path / "fresh"
    spec = {"__name__": "t"}
    exec(compile(task_file.read_text(), str(task_file), "exec"), spec)
    build_index(spec["full"](), fresh, config=config, progress=False).close()
    with open_index(run) as a, open_index(fresh) as b:
        rows = np.searchsorted(b.train_ids, a.train_ids)
        np.testing.assert_allclose(
            a.pairwise_scores([0, 1], method="grad-dot"),
            b.pairwise_scores([0, 1], method="grad-dot")[:, rows],
            rtol=1e-4,
            atol=1e-6,
        )


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--ids", "x"], "--ids"), ([], "--ids"), (["--ids", "123456"], "123456")],
)
def test_bad_delete_ids_are_one_line_and_change_nothing(digits_logreg_run, tmp_path, args, message):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(digits_logreg_run, run)
    before = json.loads((run / "manifest.json").read_text())
    result = runner.invoke(app, ["delete", str(run), *args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert json.loads((run / "manifest.json").read_text()) == before
