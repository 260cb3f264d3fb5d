"""Jobs on Ray (issue 16): a build and a dump with ray=None and a local Ray instance of 1 and 2 workers.

Usage: .venv/bin/python -m experiments.ray_scale [--n-train 60000] [--queries 10000] [--workers 0 1 2] [--out PATH]
(`make bench-ray`; needs `make data`). The Fashion-MNIST MLP 784-128-10 of experiments/model_scale.py, the whole
MLP as the head (101,770 parameters, so gradients are projected to 1,024 dimensions), trained 2 epochs (the
model's quality does not matter here), indexed with the default IndexConfig; the dump scores `--queries` test
images with method "representer" (k=100; `--method`). Why not a gradient method: this head's FAISS space is
projected, and the exact gradient scores recompute every training gradient (101,770 dimensions) for each block of
256 queries: 10,000 queries x 60,000 rows x 101,770 x 2 = 1.2e14 multiply-adds, hours on 2 cores in any mode
(issue 14's projected-index item); representer scores are 1,290-dimensional inner products. Each mode builds a
fresh run directory, one mode per call of this script (so each process's peak RSS is its own mode's), merged
into the JSON. Local Ray instances are bound to 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, set by the
Makefile and here).

Reported per mode: wall seconds of the build and of the dump, parallel efficiency t(None) / (workers x t(mode)),
Ray's overhead at one worker t(local, 1) / t(None) - 1 (target <= 15%), and the peak RSS of the driver and of
each Ray worker process this run started (VmHWM, sampled from /proc). The machine is shared: ratios, not absolute times, are the
result. Writes experiments/results/ray_scale.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from experiments import common

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
WORK = Path("experiments/cache/ray_scale")


def _parent(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")), 0)


def _descends_from(pid: int, root: int) -> bool:
    while pid > 1:
        if pid == root:
            return True
        pid = _parent(pid)
    return False


class RssSampler:
    """Peak VmHWM (MiB) of every ``ray::`` process this process started (its Ray instance's workers, not other
    Ray instances of the machine) while running, sampled every 0.2 s."""

    def __init__(self) -> None:
        self.peak: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    if not (entry / "cmdline").read_bytes().startswith(b"ray::"):
                        continue
                    if not _descends_from(int(entry.name), me):
                        continue
                    for line in (entry / "status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            mib = int(line.split()[1]) / 1024
                            self.peak[int(entry.name)] = max(self.peak.get(int(entry.name), 0.0), mib)
                except OSError:
                    continue
            self._stop.wait(0.2)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def make_task(n_train: int, n_test: int):
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from indexer import Task

    xtr, ytr, xte, yte = common.load_fashion_mnist(n_train, seed=0)
    xte, yte = xte[:n_test], yte[:n_test]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.from_numpy(xtr), torch.from_numpy(ytr)
    for _ in range(2):
        for i in range(0, len(x), 256):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i : i + 256]), y[i : i + 256]).backward()
            opt.step()
    model.eval()
    return Task(
        model=model,
        train=TensorDataset(x, y),
        test=TensorDataset(torch.from_numpy(xte), torch.from_numpy(yte)),
        l2=1e-3,
        name="ray-scale",
    )


def run_mode(task: Any, workers: int | None, queries: int, config: Any, method: str) -> dict[str, Any]:
    from api import build_index
    from api.ray_cluster import start_local

    out = WORK / f"run_{workers or 0}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(WORK / f"dump_{workers or 0}.parquet.partial", ignore_errors=True)
    rec: dict[str, Any] = {"workers": workers, "load_average_start": os.getloadavg()}
    with RssSampler() as rss:
        if workers:
            t0 = time.perf_counter()
            start_local(num_cpus=workers)
            rec["ray_start_seconds"] = time.perf_counter() - t0
        ray = "auto" if workers else None
        t0 = time.perf_counter()
        index = build_index(task, out, config=config, progress=False, ray=ray)
        rec["build_seconds"] = time.perf_counter() - t0
        rec["stages"] = index.manifest.stages
        rec["stage_seconds"] = index.manifest.extra.get("stage_seconds_last")
        rec["run_bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        t0 = time.perf_counter()
        index.dump(
            WORK / f"dump_{workers or 0}.parquet",
            index.test_ids[:queries].tolist(),
            k=100,
            method=method,
            progress=False,
            ray=ray,
        )
        rec["dump_seconds"] = time.perf_counter() - t0
        index.close()
        if workers:
            import ray as ray_mod

            ray_mod.shutdown()
    rec["worker_peak_rss_mib"] = sorted(rss.peak.values(), reverse=True)
    rec["driver_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rec["load_average_end"] = os.getloadavg()
    print(rec, flush=True)
    return rec


def plot(res: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = res["modes"]
    labels = ["no Ray" if m["workers"] is None else f"local, {m['workers']} worker(s)" for m in modes]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = np.arange(len(modes))
    ax.bar(xs - 0.2, [m["build_seconds"] for m in modes], 0.4, label="build")
    ax.bar(xs + 0.2, [m["dump_seconds"] for m in modes], 0.4, label=f"dump ({res['queries']} queries)")
    ax.set_xticks(xs, labels)
    ax.set_ylabel("wall seconds")
    ax.set_title(f"Fashion-MNIST MLP head, n_train={res['n_train']} (shared 2-core machine)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def derive(res: dict[str, Any]) -> None:
    """Speed-up, parallel efficiency t(None) / (workers x t(mode)) and Ray's overhead at one worker per job."""
    base = next((m for m in res["modes"] if m["workers"] is None), None)
    if base is None:
        return
    for m in res["modes"]:
        if m["workers"] is None:
            continue
        for job in ("build", "dump"):
            m[f"{job}_speedup"] = base[f"{job}_seconds"] / m[f"{job}_seconds"]
            m[f"{job}_parallel_efficiency"] = m[f"{job}_speedup"] / m["workers"]
            if m["workers"] == 1:
                m[f"{job}_ray_overhead"] = m[f"{job}_seconds"] / base[f"{job}_seconds"] - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=60_000)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument(
        "--workers", type=int, nargs="*", default=[0, 1, 2], help="modes to run: 0 = no Ray, N = local Ray, N CPUs"
    )
    ap.add_argument(
        "--damping-subsets", type=int, default=16, help="IndexConfig.damping_subsets (0: no calibration refits)"
    )
    ap.add_argument("--method", default="representer", help="the dump's method (see the module docstring)")
    ap.add_argument("--out", type=Path, default=Path("experiments/results/ray_scale.json"))
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    settings = {
        "n_train": args.n_train,
        "queries": args.queries,
        "damping_subsets": args.damping_subsets,
        "dump_method": args.method,
    }
    res: dict[str, Any] = {**settings, "cpus": os.cpu_count(), "modes": []}
    if args.out.exists():  # modes run by earlier invocations with the same settings are kept (one mode per call)
        old = json.loads(args.out.read_text())
        if all(old.get(k) == v for k, v in settings.items()) and not old.get("partial"):
            res["modes"] = old["modes"]
    task = make_task(args.n_train, args.queries)
    from indexer import IndexConfig

    config = IndexConfig(damping_subsets=args.damping_subsets)
    for w in args.workers:
        workers = w or None
        rec = run_mode(task, workers, args.queries, config, args.method)
        res["modes"] = sorted(
            [m for m in res["modes"] if m["workers"] != workers] + [rec], key=lambda m: m["workers"] or 0
        )
        derive(res)
        common.save_results(res, args.out, plot)


if __name__ == "__main__":
    main()
