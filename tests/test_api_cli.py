"""The `influence` CLI and bulk dumps on a real digits run directory."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from api import open_index
from api.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()


def test_explain_json_matches_the_python_api(digits_mlp_run):
    result = runner.invoke(
        app, ["explain", str(digits_mlp_run), "--test-id", "3", "--k", "4", "--method", "exact", "--json"]
    )
    assert result.exit_code == 0, result.output
    [cli] = json.loads(result.output)
    [api] = open_index(digits_mlp_run).explain(test_ids=[3], k=4, method="exact")
    assert cli["prediction"] == api.prediction
    assert [p["example_id"] for p in cli["proponents"]] == [p.example_id for p in api.proponents]
    assert [p["example_id"] for p in cli["opponents"]] == [p.example_id for p in api.opponents]


def test_explain_table_and_info(digits_mlp_run):
    result = runner.invoke(
        app, ["explain", str(digits_mlp_run), "--test-id", "3", "--k", "3", "--method", "representer"]
    )
    assert result.exit_code == 0, result.output
    assert "proponents" in result.output and "opponents" in result.output
    result = runner.invoke(app, ["info", str(digits_mlp_run), "--verify"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["verify"] == "ok"


def test_explain_for_a_label_titles_its_lists_for_that_label(digits_mlp_run):
    [exp] = open_index(digits_mlp_run).explain(test_ids=[3], k=2, method="grad-dot")
    other = (exp.prediction + 1) % 10
    result = runner.invoke(
        app,
        ["explain", str(digits_mlp_run), "--test-id", "3", "--k", "2", "--method", "grad-dot", "--label", str(other)],
    )
    assert result.exit_code == 0, result.output
    assert f"proponents (support label {other})" in result.output
    assert f"opponents (push against label {other})" in result.output and "the prediction" not in result.output
    plain = runner.invoke(app, ["explain", str(digits_mlp_run), "--test-id", "3", "--k", "2", "--method", "grad-dot"])
    assert "proponents (support the prediction)" in plain.output


def test_a_resumed_build_says_what_it_resumes(digits_mlp_run, tmp_path):
    import shutil

    from indexer.resume import resume_status

    run = tmp_path / "run"
    shutil.copytree(digits_mlp_run, run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"] = ["features", "metadata"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    (run / "arrays" / "grad_vectors.done.npy").unlink(missing_ok=True)
    status = resume_status(run)
    assert status == f"resuming {run}: done features, metadata; next grad"
    assert resume_status(tmp_path / "new") is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--test-id", "99999"], "99999"),
        (["--test-id", "1", "--k", "0"], "k must be"),
        (["--test-id", "1", "--method", "nope"], "nope"),
    ],
)
def test_bad_cli_input_is_one_clear_line(digits_mlp_run, args, message):
    result = runner.invoke(app, ["explain", str(digits_mlp_run), *args])
    assert result.exit_code == 2
    assert "error:" in result.output and message in result.output
    assert "Traceback" not in result.output


def test_missing_run_directory(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "error:" in result.output


def test_dump_equals_the_dense_scores(digits_mlp_run, tmp_path):
    index = open_index(digits_mlp_run)
    test_ids = [0, 4, 5, 8, 13]
    path = index.dump(
        tmp_path / "scores.parquet", test_ids=test_ids, k=6, method="grad-dot", block_size=2, progress=False
    )
    table = pq.read_table(path).to_pylist()
    dense = index.pairwise_scores(test_ids, method="grad-dot")
    for qid, row in zip(test_ids, dense, strict=True):
        pro = [r for r in table if r["test_id"] == qid and r["kind"] == "proponent"]
        con = [r for r in table if r["test_id"] == qid and r["kind"] == "opponent"]
        top = np.argsort(-row, kind="stable")[:6]
        assert [r["example_id"] for r in pro] == top[row[top] > 0].tolist()
        assert [r["rank"] for r in pro] == list(range(1, len(pro) + 1))
        bottom = np.argsort(row, kind="stable")[:6]
        assert [r["example_id"] for r in con] == bottom[row[bottom] < 0].tolist()
        np.testing.assert_allclose([r["score"] for r in pro], row[top[: len(pro)]], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="parquet"):
        index.dump(tmp_path / "scores.csv", test_ids=[0])
    assert not (tmp_path / "scores.csv").exists()
    index.close()


def test_demo_end_to_end(tmp_path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--k", "3", "--n", "2"])
    assert result.exit_code == 0, result.output
    assert "proponents" in result.output and "label-noise job:" in result.output
    assert (tmp_path / "demo" / "explanations.png").stat().st_size > 0


def test_index_options_reach_the_manifest_and_bad_ones_write_nothing(tmp_path):
    from store import load_manifest

    bad = runner.invoke(
        app, ["index", "indexer.demo:digits_task", "--out", str(tmp_path / "bad"), "--curvature", "nope"]
    )
    assert bad.exit_code == 2 and "curvature must be 'ggn' or 'hessian', got 'nope'" in bad.output
    assert not (tmp_path / "bad").exists()
    args = ["--factory", "HNSW32", "--curvature-rows", "512", "--cache-queries"]
    result = runner.invoke(app, ["index", "indexer.demo:digits_task", "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 0, result.output
    [summary] = [line for line in result.stdout.splitlines() if line.strip()]  # one summary, not the manifest
    info = open_index(tmp_path / "run").info()
    assert summary.startswith(f"built {tmp_path / 'run'} in ") and f"{info['head']['n_params']:,} parameters" in summary
    assert f"test accuracy {info['extra']['test_accuracy']:.3f}" in summary and "spaces grad, grad-unit" in summary
    again = runner.invoke(app, ["index", "indexer.demo:digits_task", "--out", str(tmp_path / "run"), *args, "--json"])
    assert again.exit_code == 0 and "is complete: nothing to build" in again.stderr
    assert json.loads(again.stdout)["head"] == info["head"]
    methods = load_manifest(tmp_path / "run").methods
    assert (methods["factory"], methods["curvature_rows"], methods["cache_queries"]) == ("HNSW32", 512, True)
    assert "queries" in load_manifest(tmp_path / "run").stages
