"""A build interrupted at any stage resumes to the same run (every example exactly once)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from api import build_index, open_index
from indexer import IndexConfig
from store import ConfigMismatchError, load_manifest

pytestmark = pytest.mark.slow

# Small chunks so kills land mid-stage; no dense curvature and a small deflation rank keep each build short.
SMALL_CHUNKS = IndexConfig(chunk_rows=256, exact_max_params=0, deflation_rank=16)


def explanations(path):
    with open_index(path) as index:
        return [e.to_dict() for e in index.explain(test_ids=[0, 5, 9], k=5, method="lissa")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_mlp_task):
    path = tmp_path_factory.mktemp("ref") / "run"
    build_index(digits_mlp_task, path, config=SMALL_CHUNKS, progress=False).close()
    return path


# Interrupted at the 2nd chunk write (stage "features": train labels chunk 0 written, its features not) and at the
# 18th (stage "grad", after "features" and "metadata" are recorded): SMALL_CHUNKS writes 6 + 6 train, 2 + 2 test
# feature / label chunks, then 6 gradient chunks.
@pytest.mark.parametrize("fail_at", [2, 18])
def test_interrupted_build_resumes_to_the_same_run(tmp_path, monkeypatch, digits_mlp_task, reference, fail_at):
    from store import ChunkedArray
    from store.atomic import _temp_path

    calls = {"n": 0}
    original = ChunkedArray.write_chunk

    def flaky(self, i, data):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise KeyboardInterrupt("simulated kill")
        return original(self, i, data)

    monkeypatch.setattr(ChunkedArray, "write_chunk", flaky)
    path = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        build_index(digits_mlp_task, path, config=SMALL_CHUNKS, progress=False)
    assert calls["n"] == fail_at
    recorded = load_manifest(path).stages
    assert "complete" not in recorded and "grad" not in recorded
    assert ("metadata" in recorded) == (fail_at > 16)  # the second point is past the feature stages
    # what a SIGKILL in the middle of an atomic write leaves behind (the real temp names of store.atomic)
    planted = [_temp_path(path / "arrays" / "curvature_eigenvectors.npy"), _temp_path(path / "manifest.json")]
    monkeypatch.setattr(ChunkedArray, "write_chunk", original)
    build_index(digits_mlp_task, path, config=SMALL_CHUNKS, progress=False).close()
    assert not any(p.exists() for p in planted) and list(path.rglob("*.tmp")) == []
    assert explanations(path) == explanations(reference)
    for name in ("train_features", "train_labels", "grad_vectors"):
        np.testing.assert_array_equal(
            np.load(path / "arrays" / f"{name}.npy"), np.load(reference / "arrays" / f"{name}.npy")
        )
    with open_index(path) as index:
        assert index.metadata.count("train") == len(index.train_ids) == index.run.space("grad").ntotal


def test_resume_with_another_model_or_config_is_refused(reference, digits_logreg_task, digits_mlp_task):
    with pytest.raises(ConfigMismatchError, match="model"):
        build_index(digits_logreg_task, reference, progress=False)
    with pytest.raises(ConfigMismatchError, match="config"):
        build_index(
            digits_mlp_task,
            reference,
            config=IndexConfig(chunk_rows=128, exact_max_params=0, deflation_rank=16),
            progress=False,
        )


def test_start_killed_before_its_manifest_starts_over_but_a_foreign_directory_is_refused(tmp_path, digits_logreg_task):
    from indexer.errors import TaskError

    skeleton = tmp_path / "killed"
    for d in ("vectors", "arrays"):
        (skeleton / d).mkdir(parents=True)
    (skeleton / ".head.safetensors.x1y2.tmp").write_bytes(b"partial")
    build_index(digits_logreg_task, skeleton, config=SMALL_CHUNKS, progress=False).close()
    assert "complete" in load_manifest(skeleton).stages
    foreign = tmp_path / "foreign"
    (foreign / "arrays").mkdir(parents=True)
    (foreign / "arrays" / "mine.npy").write_bytes(b"user data")
    with pytest.raises(TaskError, match="holds no run"):
        build_index(digits_logreg_task, foreign, config=SMALL_CHUNKS, progress=False)
    assert (foreign / "arrays" / "mine.npy").read_bytes() == b"user data"


SCRIPT = """
import sys
from api import build_index
from indexer import IndexConfig
from indexer.demo import digits_task
build_index(digits_task(), sys.argv[1], config=IndexConfig(chunk_rows=128, exact_max_params=0, deflation_rank=16), progress=False).close()
print("done")
"""


def test_kill_9_then_resume(tmp_path, reference):
    """Real SIGKILLs at several points of the build; the resumed run answers like an uninterrupted one."""
    path = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    rng = np.random.default_rng(0)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(path)], env=env, stdout=subprocess.PIPE)
        time.sleep(float(rng.uniform(6.0, 12.0)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((path / "manifest.json").read_text())
    assert "complete" in manifest["stages"]
    ref = explanations(reference)
    got = explanations(path)
    assert [[p["example_id"] for p in e["proponents"]] for e in got] == [
        [p["example_id"] for p in e["proponents"]] for e in ref
    ]


def test_a_kill_during_the_curvature_stage_resumes_its_chunks_to_the_same_arrays(
    tmp_path, monkeypatch, digits_mlp_task
):
    """The dense curvature (2,410 parameters: 10 chunks) is written in chunks and the top eigenpairs are saved
    first: a build killed after 4 chunks recomputes neither them nor those chunks, and ends with the arrays of an
    uninterrupted build."""
    import influence as inf
    from store import ChunkedArray

    config = IndexConfig(deflation_rank=16, damping_subsets=0)
    reference = tmp_path / "reference"
    build_index(digits_mlp_task, reference, config=config, progress=False).close()

    original = ChunkedArray.write_chunk
    dense = {"n": 0}

    def killed_after_four(self, i, data):
        if self.path.name == "curvature_dense_rows.npy":
            dense["n"] += 1
            if dense["n"] == 5:
                raise KeyboardInterrupt("simulated kill")
        return original(self, i, data)

    monkeypatch.setattr(ChunkedArray, "write_chunk", killed_after_four)
    path = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        build_index(digits_mlp_task, path, config=config, progress=False)
    assert "curvature" not in load_manifest(path).stages
    monkeypatch.setattr(ChunkedArray, "write_chunk", original)

    computed = []
    rows = inf.dense_curvature_rows

    def counting(*args, **kwargs):
        computed.append(args[2])
        return rows(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("the saved top eigenpairs were recomputed")

    monkeypatch.setattr(inf, "dense_curvature_rows", counting)
    monkeypatch.setattr(inf, "compute_top_eigenpairs", refuse)
    build_index(digits_mlp_task, path, config=config, progress=False).close()
    assert computed == [256 * c for c in range(4, 10)]  # only the chunks the killed attempt had not written
    for name in ("curvature_top_eigenvalues", "curvature_eigenvalues", "curvature_eigenvectors"):
        np.testing.assert_array_equal(
            np.load(path / "arrays" / f"{name}.npy"), np.load(reference / "arrays" / f"{name}.npy")
        )
    assert not list((path / "arrays").glob("curvature_dense_rows*"))
    assert load_manifest(path).extra["damping"] == load_manifest(reference).extra["damping"]
