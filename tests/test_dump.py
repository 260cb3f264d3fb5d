"""Bulk dumps (api/dump.py): equal to the dense pairwise scores, resumable after a real SIGKILL."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from api import build_index, open_index
from api.cli import app
from api.dump import dump_paths, read_aggregates
from indexer import IndexConfig

ROOT = Path(__file__).resolve().parents[1]


def _check_against_dense(path, dense, test_ids, train_ids, train_labels, k, mis):
    rows = pq.read_table(path).to_pylist()
    for qid, row in zip(test_ids, dense, strict=True):
        pro = [r for r in rows if r["test_id"] == qid and r["kind"] == "proponent"]
        con = [r for r in rows if r["test_id"] == qid and r["kind"] == "opponent"]
        top = np.argsort(-row, kind="stable")[:k]
        top = top[row[top] > 0]
        bottom = np.argsort(row, kind="stable")[:k]
        bottom = bottom[row[bottom] < 0]
        assert [r["example_id"] for r in pro] == train_ids[top].tolist()
        assert [r["example_id"] for r in con] == train_ids[bottom].tolist()
        assert [r["rank"] for r in con] == list(range(1, len(con) + 1))
        assert [r["label"] for r in pro] == train_labels[top].tolist()
        np.testing.assert_allclose([r["score"] for r in pro], row[top], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose([r["score"] for r in con], row[bottom], rtol=1e-4, atol=1e-6)
    agg = pq.read_table(dump_paths(Path(path))["aggregates"]).to_pydict()
    assert agg["example_id"] == train_ids.tolist()
    scale = np.abs(dense).sum(0).max()
    np.testing.assert_allclose(agg["sum_positive"], np.maximum(dense, 0).sum(0), atol=1e-5 * scale)
    np.testing.assert_allclose(agg["sum_negative"], np.minimum(dense, 0).sum(0), atol=1e-5 * scale)
    np.testing.assert_allclose(agg["sum_negative_misclassified"], np.minimum(dense[mis], 0).sum(0), atol=1e-5 * scale)
    np.testing.assert_allclose(agg["sum_positive_misclassified"], np.maximum(dense[mis], 0).sum(0), atol=1e-5 * scale)
    n_opp = np.zeros(len(train_ids), np.int64)
    n_opp_mis = np.zeros(len(train_ids), np.int64)
    n_pro_mis = np.zeros(len(train_ids), np.int64)
    for j, row in enumerate(dense):
        bottom = np.argsort(row, kind="stable")[:k]
        bottom = bottom[row[bottom] < 0]
        n_opp[bottom] += 1
        n_opp_mis[bottom] += int(mis[j])
        top = np.argsort(-row, kind="stable")[:k]
        n_pro_mis[top[row[top] > 0]] += int(mis[j])
    assert agg["n_top_opponent"] == n_opp.tolist()
    assert agg["n_top_opponent_misclassified"] == n_opp_mis.tolist()
    assert agg["n_top_proponent_misclassified"] == n_pro_mis.tolist()
    assert sum(agg["n_top_proponent"]) == sum(1 for r in rows if r["kind"] == "proponent")


@pytest.mark.parametrize("method", ["exact", "representer", "grad-cos"])
def test_dump_equals_pairwise_scores(digits_logreg_run, tmp_path, method):
    index = open_index(digits_logreg_run)
    test_ids = [0, 3, 21, 48, 11, 12, 19, 74, 30, 31]
    calls = []
    path = index.dump(
        tmp_path / "scores.parquet",
        test_ids=test_ids,
        k=7,
        method=method,
        block_size=3,
        progress=False,
        dense=True,
        on_block=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(3, 10), (6, 10), (9, 10), (10, 10)]
    dense = index.pairwise_scores(test_ids, method=method)
    rows = index.run.test.rows(test_ids)
    mis = index.engine.logits(np.asarray(index.run.test.features[rows])).argmax(1) != index.run.test.labels[rows]
    assert mis.any()
    _check_against_dense(path, dense, test_ids, index.train_ids, index.run.train.labels, 7, mis)
    out = dump_paths(path)
    np.testing.assert_allclose(np.load(out["dense"]), dense, rtol=1e-4, atol=1e-6 * np.abs(dense).max())
    with np.load(out["dense_ids"]) as z:
        assert z["test_ids"].tolist() == test_ids
        assert np.array_equal(z["train_ids"], index.train_ids)
    assert not out["work"].exists()
    worst = read_aggregates(path, by="sum_negative", top=3).to_pydict()["example_id"]
    assert worst == np.argsort(np.minimum(dense, 0).sum(0), kind="stable")[:3].tolist()
    index.close()


@pytest.mark.parametrize("method", ["lissa", "representer"])
def test_dump_at_the_true_labels_equals_pairwise_scores_at_them(digits_logreg_run, tmp_path, method):
    """`dump(targets="label")` scores each query at its stored label, as `pairwise_scores(targets=labels)`."""
    with open_index(digits_logreg_run) as index:
        test_ids = [0, 3, 21, 48, 11, 12, 19, 74]
        labels = index.run.test.labels[index.run.test.rows(test_ids)]
        path = index.dump(
            tmp_path / "truth.parquet", test_ids, k=5, method=method, targets="label", block_size=3, progress=False
        )
        at_labels = index.pairwise_scores(test_ids, method=method, targets=labels)
        at_predictions = index.pairwise_scores(test_ids, method=method)
        mis = index.engine.logits(np.asarray(index.run.test.features[index.run.test.rows(test_ids)])).argmax(1)
        mis = mis != labels
        assert mis.any() and not np.allclose(at_labels[mis], at_predictions[mis])  # the option matters here
        _check_against_dense(path, at_labels, test_ids, index.train_ids, index.run.train.labels, 5, mis)
        # at the true labels the harmful examples oppose the correct class: the default list says so
        harmful = read_aggregates(path).to_pydict()
        assert harmful == read_aggregates(path, by="n_top_opponent_misclassified").to_pydict()


@pytest.fixture(scope="module")
def systematic_flips_task():
    """Digits MLP with 40% of the training 3s labelled 5 (planted flips that cause misclassified test 3s)."""
    import torch
    from torch.utils.data import TensorDataset

    from indexer import Task
    from indexer.demo import load_digits_split, make_mlp, train_classifier

    xtr, ytr, xte, yte = load_digits_split(0)
    threes = np.flatnonzero(ytr == 3)
    flipped = np.sort(np.random.default_rng(0).choice(threes, int(0.4 * len(threes)), replace=False))
    y = ytr.copy()
    y[flipped] = 5
    model = make_mlp(seed=0)
    train_classifier(model, torch.from_numpy(xtr), torch.from_numpy(y), l2=1e-3, epochs=200)
    train = TensorDataset(torch.from_numpy(xtr), torch.from_numpy(y))
    test = TensorDataset(torch.from_numpy(xte), torch.from_numpy(yte))
    return Task(model=model, train=train, test=test, l2=1e-3), flipped


@pytest.mark.slow
def test_planted_flips_rank_at_the_top_of_the_harmful_list(systematic_flips_task, tmp_path):
    """A misclassified test 3 predicted as 5 is pushed there by the proponents of that wrong prediction: the 3s
    labelled 5. `read_aggregates(path)` (n_top_proponent_misclassified) puts them at the top; the list it used
    to default to (n_top_opponent_misclassified: the opponents of the wrong prediction) holds far fewer."""
    task, flipped = systematic_flips_task
    with build_index(task, tmp_path / "run", progress=False) as index:
        path = index.dump(tmp_path / "all.parquet", k=10, method="lissa", progress=False)
        base_rate = len(flipped) / len(index.train_ids)
    n = len(flipped)

    def hits(by):
        return len(set(read_aggregates(path, by=by, top=n).to_pydict()["example_id"]) & set(flipped.tolist()))

    harmful = hits(None)
    assert (
        read_aggregates(path, top=n).to_pydict()
        == read_aggregates(path, by="n_top_proponent_misclassified", top=n).to_pydict()
    )
    assert harmful / n >= 5 * base_rate, (harmful, n, base_rate)
    assert harmful >= 2 * hits("n_top_opponent_misclassified"), (harmful, hits("n_top_opponent_misclassified"))
    assert hits("sum_positive_misclassified") >= 2 * hits("sum_negative_misclassified")


@pytest.fixture(scope="module")
def projected_run(tmp_path_factory, digits_logreg_task):
    path = tmp_path_factory.mktemp("runs") / "digits-projected"
    config = IndexConfig(project_above=100, projection_dim=32, deflation_rank=8)
    build_index(digits_logreg_task, path, config=config, progress=False).close()
    return path


@pytest.mark.slow
def test_projected_dump_reports_exact_scores(projected_run, tmp_path):
    index = open_index(projected_run)
    assert index.run.projection is not None
    test_ids = list(range(6))
    path = index.dump(tmp_path / "p.parquet", test_ids=test_ids, k=5, method="grad-dot", progress=False)
    dense = index.pairwise_scores(test_ids, method="grad-dot")
    rows = index.run.test.rows(test_ids)
    mis = index.engine.logits(np.asarray(index.run.test.features[rows])).argmax(1) != index.run.test.labels[rows]
    _check_against_dense(path, dense, test_ids, index.train_ids, index.run.train.labels, 5, mis)
    index.close()


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from api import open_index

    run, out, kill_after = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def on_block(done, total):
        if done >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    open_index(run).dump(out, test_ids=list(range(40)), k=5, method="grad-dot", block_size=8,
                         progress=False, dense=True, on_block=on_block)
    """
)


@pytest.mark.slow
def test_killed_dump_resumes_to_the_same_files(digits_logreg_run, tmp_path):
    index = open_index(digits_logreg_run)
    reference = index.dump(
        tmp_path / "ref.parquet",
        test_ids=list(range(40)),
        k=5,
        method="grad-dot",
        block_size=8,
        progress=False,
        dense=True,
    )
    target = tmp_path / "killed.parquet"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(digits_logreg_run), str(target), "16"], env=env, cwd=ROOT, timeout=300
    )
    assert proc.returncode == -9  # a real SIGKILL, mid-dump
    out = dump_paths(target)
    assert not target.exists() and out["work"].is_dir()
    assert sorted(p.name for p in out["work"].glob("part-*.parquet")) == ["part-000000.parquet", "part-000001.parquet"]
    calls = []
    index.dump(
        target,
        test_ids=list(range(40)),
        k=5,
        method="grad-dot",
        block_size=8,
        progress=False,
        dense=True,
        on_block=lambda d, t: calls.append(d),
    )
    assert calls == [24, 32, 40]  # only the blocks not committed before the kill
    ref = dump_paths(reference)
    # Blocks written by the killed process may differ from this process's in the last float32 bit (thread
    # settings left by earlier tests change BLAS summation order): every id, rank and label is identical,
    # scores agree to float32 round-off.
    got, want = pq.read_table(target).to_pydict(), pq.read_table(reference).to_pydict()
    for column in want:
        if column == "score":
            np.testing.assert_allclose(got[column], want[column], rtol=1e-5, atol=1e-6)
        else:
            assert got[column] == want[column], column
    got_agg, want_agg = pq.read_table(out["aggregates"]).to_pydict(), pq.read_table(ref["aggregates"]).to_pydict()
    for column in want_agg:
        np.testing.assert_allclose(
            np.asarray(got_agg[column], float), np.asarray(want_agg[column], float), rtol=1e-5, atol=1e-5
        )
    np.testing.assert_allclose(np.load(out["dense"]), np.load(ref["dense"]), rtol=1e-5, atol=1e-6)
    assert not out["work"].exists()
    index.close()


def test_a_changed_argument_restarts_instead_of_mixing(digits_logreg_run, tmp_path):
    index = open_index(digits_logreg_run)
    path = tmp_path / "s.parquet"
    work = dump_paths(path)["work"]

    class Stop(Exception):
        pass

    def stop(done, total):
        raise Stop

    with pytest.raises(Stop):
        index.dump(path, test_ids=[0, 1, 2, 3], k=3, method="grad-dot", block_size=2, progress=False, on_block=stop)
    assert work.is_dir() and not path.exists()
    calls = []
    index.dump(
        path,
        test_ids=[0, 1, 2, 3],
        k=4,
        method="grad-dot",
        block_size=2,
        progress=False,
        on_block=lambda d, t: calls.append(d),
    )
    assert calls == [2, 4]  # k changed: the partial dump is discarded, both blocks recomputed
    assert pq.read_table(path).to_pydict()["rank"].count(4) > 0
    index.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"path": "x.csv"}, "parquet"),
        ({"test_ids": [0, 999_999]}, "999999"),
        ({"test_ids": [1, 1]}, "unique"),
        ({"k": 0}, "k must be"),
        ({"method": "nope"}, "nope"),
        ({"block_size": 0}, "block_size"),
        ({"on_block": 3}, "on_block"),
        ({"targets": "truth"}, "targets"),
    ],
)
def test_bad_dump_input_writes_nothing(digits_logreg_run, tmp_path, kwargs, message):
    index = open_index(digits_logreg_run)
    args = {"path": "s.parquet", "test_ids": [0, 1], **kwargs}
    with pytest.raises((ValueError, KeyError), match=message):
        index.dump(tmp_path / args.pop("path"), progress=False, **args)
    assert list(tmp_path.iterdir()) == []
    index.close()


def test_cli_dump_with_dense_and_aggregates(digits_logreg_run, tmp_path):
    out = tmp_path / "cli.parquet"
    result = CliRunner().invoke(
        app, ["dump", str(digits_logreg_run), "--out", str(out), "--k", "3", "--method", "grad-dot", "--dense"]
    )
    assert result.exit_code == 0, result.output
    paths = dump_paths(out)
    with open_index(digits_logreg_run) as index:
        n_test, n_train = len(index.test_ids), len(index.train_ids)
    assert np.load(paths["dense"], mmap_mode="r").shape == (n_test, n_train)
    assert pq.read_table(paths["aggregates"]).num_rows == n_train
    assert set(pq.read_table(out).to_pydict()["test_id"]) <= set(range(n_test))


@pytest.mark.parametrize("seed_columns", [1, 3, 1024])
def test_streaming_topk_equals_a_full_sort_with_ties(monkeypatch, seed_columns):
    """Every path of the streaming top-k: the partial-sort seed, the doubling spans, the threshold merges."""
    import influence.topk
    from influence.topk import merge_topk as _update

    monkeypatch.setattr(influence.topk, "SEED_COLUMNS", seed_columns)
    rng = np.random.default_rng(seed_columns)
    for _ in range(300):
        b, n, k, c = rng.integers(1, 5), int(rng.integers(1, 60)), int(rng.integers(1, 12)), int(rng.integers(1, 20))
        scores = rng.integers(-5, 6, size=(b, n)).astype(np.float32)  # many ties
        for largest in (True, False):
            best = None
            for start in range(0, n, c):
                best = _update(best, scores[:, start : start + c], start, k, largest=largest)
            for j in range(b):
                ref = np.lexsort((np.arange(n), -scores[j] if largest else scores[j]))[:k]  # ties: smaller row
                assert best[1][j].tolist() == ref.tolist()
                assert np.array_equal(best[0][j], scores[j][ref])
