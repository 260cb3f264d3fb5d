"""Faults of a distributed build (issue 16): a worker killed mid-build, a driver killed mid-build.

Both on a two-node loopback cluster (`ray_cluster`), with a training set slowed down enough (a sleep per example)
that the kill lands while shards are being computed. The processes killed are ones this test started, by pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from api import build_index, open_index
from indexer import IndexConfig

pytestmark = pytest.mark.slow
ARRAYS = ("train_features", "train_labels", "train_ids", "test_features", "grad_vectors")
# Small chunks so the kill lands mid-stage; no dense curvature, a small deflation rank, no damping calibration: the
# driver runs those (never the workers) and the arrays compared below do not depend on them.
CONFIG = IndexConfig(chunk_rows=128, exact_max_params=0, deflation_rank=16, damping_subsets=0)


class SlowDataset:
    """A dataset that sleeps `delay` seconds per example (so a build takes long enough to be killed)."""

    def __init__(self, ds, delay: float) -> None:
        self.ds, self.delay = ds, delay

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        time.sleep(self.delay)
        return self.ds[i]


def slow_task(delay: float = 0.004):
    """The digits MLP task of conftest.py with a slow training set (a TASK for the CLI)."""
    import dataclasses

    from indexer.demo import digits_task

    task = digits_task(n_flips=30, seed=0)
    return dataclasses.replace(task, train=SlowDataset(task.train, delay))


def _shard_worker_pids(cluster) -> list[int]:
    """Pids of the build's Ray actor processes (title ``ray::ShardWorker...``) of this test's cluster: children of
    its raylets, never another Ray instance's on this machine."""
    raylets = {info.process.pid for node in cluster.list_all_nodes() for info in node.all_processes.get("raylet", [])}
    assert raylets, "the test cluster reports no raylet process"
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
                status = (entry / "status").read_text()
            except OSError:
                continue
            ppid = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")), -1)
            if cmd.startswith(b"ray::ShardWorker") and ppid in raylets:
                pids.append(int(entry.name))
    return pids


def _wait_for_shard(out: Path, timeout: float = 300.0) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if any((out / "shards").glob("*/*.npz")):
            return True
        time.sleep(0.05)
    return False


def _assert_same_arrays(run: Path, ref: Path) -> None:
    with open_index(run) as a, open_index(ref) as b:
        np.testing.assert_array_equal(a.train_ids, np.arange(len(b.train_ids)))  # every example, once, in order
        for name in ARRAYS:
            np.testing.assert_allclose(
                np.asarray(a.run.array(name)), np.asarray(b.run.array(name)), rtol=1e-5, atol=1e-6, err_msg=name
            )
        assert "complete" in a.manifest.stages


@pytest.fixture(scope="module", autouse=True)
def _pickle_this_module_by_value(ray_cluster):
    """The workers cannot import this test module: its classes travel by value."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_a_worker_killed_mid_build_is_replaced_and_the_build_is_complete(ray_cluster, digits_mlp_run, tmp_path):
    out = tmp_path / "run"
    killed: list[int] = []

    def kill_one_worker() -> None:
        if _wait_for_shard(out):
            pids = _shard_worker_pids(ray_cluster)
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    build_index(slow_task(), out, config=CONFIG, progress=False, ray=ray_cluster.address).close()
    killer.join(timeout=5)
    assert killed, "no worker was killed: the build finished before a shard was written"
    _assert_same_arrays(out, digits_mlp_run)


def test_a_driver_killed_mid_build_resumes_with_the_same_command(ray_cluster, digits_mlp_run, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "api.cli", "index", f"{__file__}:slow_task", "--out", str(out)]
    cmd += ["--ray", ray_cluster.address]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert _wait_for_shard(out), driver.stderr.read().decode()[-2000:] if driver.poll() is not None else "no shard"
    finally:
        driver.send_signal(signal.SIGKILL)  # the driver this test started, by its pid
        driver.wait()
    assert not (out / "manifest.json").exists() or "complete" not in (out / "manifest.json").read_text()
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    _assert_same_arrays(out, digits_mlp_run)
    assert not (out / "shards").exists()
