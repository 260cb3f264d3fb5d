"""Real SIGKILLs at random points of `influence index` and `influence dump`, then resume: nothing lost.

Both chains reuse the session's uninterrupted digits run as the reference: the TASK file below rebuilds the
very same model from its saved weights (same fingerprint), so `influence index` on it must reproduce that
run exactly. After every kill the directory must hold no half-written state a reader could see (the
manifest, when present, is valid and says "incomplete"); after the final resume the answers must be identical
to the uninterrupted ones, with no duplicates or gaps, FAISS ids == SQLite ids, and a valid manifest.

KILLS kills per chain: the index chain kills each attempt inside a different build stage (drawn at random among
the stages that do work for this model, at a random point of it), the dump chain after a random fraction of a
block once the attempt has committed a block of its own. Each attempt pays the CLI's start-up (most of the
test's time), so the kills are few and placed where the work is rather than many at uniform delays.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.torch import save_file

from api import open_index
from api.cli import load_task
from api.dump import dump_paths
from store import load_manifest, verify_run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
KILLS = 4
TASK = """
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from indexer import Task
from indexer.demo import digit_preview, flip_labels, load_digits_split, make_mlp


def task():
    torch.set_num_threads(1)
    xtr, ytr, xte, yte = load_digits_split(0)
    ytr, _ = flip_labels(ytr, 30, 10, 0)
    model = make_mlp()
    model.load_state_dict(load_file(str(Path(__file__).with_name("model.safetensors"))))
    print("TASK-LOADED", file=sys.stderr, flush=True)
    train = TensorDataset(torch.from_numpy(xtr), torch.from_numpy(ytr))
    test = TensorDataset(torch.from_numpy(xte), torch.from_numpy(yte))
    return Task(model=model.eval(), train=train, test=test, l2=1e-3, preview=digit_preview, name="digits-mlp")
"""


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "api.cli", *args]


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def kill_after(cmd: list[str], ready, delay: float, log: Path) -> bool:
    """Starts `cmd`, waits until `ready(start_time)` is true, then `delay` seconds, then SIGKILLs it.
    Returns False when the process finished on its own first."""
    with open(log, "ab") as err:
        start = time.time()
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
        while proc.poll() is None and not ready(start):
            time.sleep(0.05)
        deadline = time.monotonic() + delay
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is not None:
            assert proc.returncode == 0, log.read_text()[-3000:]
            return False
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        return True


def answers(path):
    with open_index(path) as index:
        return [e.to_dict() for e in index.explain(test_ids=[0, 5, 9, 33], k=5, method="lissa")]


def assert_same_answers(got, want):
    """Same predictions, same proponents and opponents in the same order with the same metadata; scores equal
    up to float64 LAPACK rounding (the curvature's eigendecomposition differs in the last bits between
    processes, and eigenvector signs are arbitrary)."""
    for g, w in zip(got, want, strict=True):
        assert (g["test_id"], g["prediction"], g["target"]) == (w["test_id"], w["prediction"], w["target"])
        for kind in ("proponents", "opponents"):
            strip = [{k: v for k, v in p.items() if k != "score"} for p in g[kind]]
            assert strip == [{k: v for k, v in p.items() if k != "score"} for p in w[kind]]
            np.testing.assert_allclose([p["score"] for p in g[kind]], [p["score"] for p in w[kind]], rtol=1e-5)
        np.testing.assert_allclose(g["probabilities"], w["probabilities"], rtol=1e-6)


@pytest.fixture(scope="module")
def task_file(tmp_path_factory, digits_mlp_task, digits_mlp_run):
    d = tmp_path_factory.mktemp("crash-task")
    save_file({k: v.contiguous() for k, v in digits_mlp_task.model.state_dict().items()}, d / "model.safetensors")
    (d / "task.py").write_text(textwrap.dedent(TASK))
    spec = f"{d / 'task.py'}:task"
    assert load_task(spec).fingerprint() == load_manifest(digits_mlp_run).model_fingerprint
    return spec


def recorded_stages(run: Path) -> int:
    try:
        return len(load_manifest(run).stages)
    except FileNotFoundError:
        return 0


def test_index_survives_sigkills_in_different_stages(tmp_path, task_file, digits_mlp_run):
    rng = np.random.default_rng(7)
    run, log = tmp_path / "run", tmp_path / "stderr.log"
    cmd = cli("index", task_file, "--out", str(run))
    reference = load_manifest(digits_mlp_run)
    order, seconds = list(reference.stages), reference.extra["stage_seconds_last"]
    working = [i for i, name in enumerate(order) if seconds.get(name, 0.0) > 0.5]  # stages that do work here
    assert len(working) >= KILLS, seconds
    targets = sorted(int(i) for i in rng.choice(working, KILLS, replace=False))  # one kill inside each
    kills, completed, landed = 0, 0, []

    def in_target_stage(_: float) -> bool:  # kill points are drawn over the build, not the imports
        loaded = log.is_file() and log.read_text().count("TASK-LOADED") > kills + completed
        return loaded and recorded_stages(run) >= targets[kills]

    while kills < KILLS:
        # a random point of the target stage, scaled by how long that stage took in the reference build
        delay = float(rng.uniform(0.0, seconds[order[targets[kills]]]))
        if kill_after(cmd, in_target_stage, delay, log):
            kills += 1
            landed.append(order[min(recorded_stages(run), len(order) - 1)])  # the stage the kill interrupted
            if (run / "manifest.json").exists():  # whatever a reader sees now is whole and says so
                manifest = load_manifest(run)
                assert "complete" not in manifest.stages or not verify_run(run)
        else:
            completed += 1  # finished before the kill: check it, then start over
            assert_same_answers(answers(run), answers(digits_mlp_run))
            assert verify_run(run) == []
            shutil.rmtree(run)
    assert len(set(landed)) > 1, landed  # the kills interrupted different stages
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]

    assert "complete" in load_manifest(run).stages
    assert verify_run(run) == []  # manifest valid, FAISS ids == SQLite ids in every space
    assert_same_answers(answers(run), answers(digits_mlp_run))
    for name in ("train_features", "train_labels", "train_ids", "grad_vectors", "test_features"):
        np.testing.assert_array_equal(
            np.load(run / "arrays" / f"{name}.npy"), np.load(digits_mlp_run / "arrays" / f"{name}.npy")
        )
    with open_index(run) as index, open_index(digits_mlp_run) as ref:
        ids = index.metadata.ids("train")
        assert len(ids) == len(set(ids.tolist())) == len(ref.train_ids)  # no duplicates, no gaps
        assert [r.to_dict() for r in index.metadata.get("train", ids[:50])] == [
            r.to_dict() for r in ref.metadata.get("train", ids[:50])
        ]
        for space in ("grad", "representer"):
            assert np.array_equal(np.sort(index.run.space(space).ids()), np.sort(ids))
    leftovers = [p.name for p in run.rglob("*.tmp")]
    assert leftovers == [], leftovers


def test_dump_survives_sigkills(tmp_path, digits_mlp_run):
    rng = np.random.default_rng(11)
    out, log = tmp_path / "scores.parquet", tmp_path / "stderr.log"
    cmd = cli("dump", str(digits_mlp_run), "--out", str(out), "--k", "20", "--method", "lissa", "--block-size", "8")
    ref = tmp_path / "ref" / "scores.parquet"
    ref.parent.mkdir()
    stamps: list[float] = []
    with open_index(digits_mlp_run) as index:
        index.dump(
            ref, k=20, method="lissa", block_size=8, progress=False, on_block=lambda *_: stamps.append(time.time())
        )
    t_block = float(np.median(np.diff(stamps)))
    work = dump_paths(out)["work"]

    def committed_a_block(start: float) -> bool:  # this process is past its imports and compiles, dumping
        try:
            return (work / "state.npz").stat().st_mtime > start
        except FileNotFoundError:
            return False

    kills = 0
    while kills < KILLS:
        assert not out.exists(), f"the dump finished before {KILLS} kills"
        if kill_after(cmd, committed_a_block, float(rng.uniform(0.0, 2.0 * t_block)), log):
            kills += 1
            assert not out.exists()  # the final file appears only when complete
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]

    got, want = pq.read_table(out), pq.read_table(ref)
    assert got.equals(want)
    rows = got.to_pydict()
    keys = list(zip(rows["test_id"], rows["kind"], rows["rank"], strict=True))
    assert len(keys) == len(set(keys))  # no duplicates
    with open_index(digits_mlp_run) as index:
        assert set(rows["test_id"]) == set(index.test_ids.tolist())  # no gaps
    for qid in set(rows["test_id"]):
        for kind in ("proponent", "opponent"):
            ranks = sorted(r for (q, kd, r) in keys if q == qid and kd == kind)
            assert ranks == list(range(1, len(ranks) + 1))
    agg = dump_paths(out)["aggregates"]
    assert pq.read_table(agg).equals(pq.read_table(dump_paths(ref)["aggregates"]))
    assert not work.exists()
    assert json.loads((digits_mlp_run / "manifest.json").read_text())["stages"]  # the run itself untouched
