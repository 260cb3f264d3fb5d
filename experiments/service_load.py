"""Load benchmark of the HTTP service: N POST /explain at concurrency C against a Fashion-MNIST index.

L2 logistic regression on a Fashion-MNIST training subsample (Debian package dataset-fashion-mnist), indexed
once into runs/service-load-fmnist (reused while the model is the same), served by `influence serve` (uvicorn,
a separate process) on loopback with an API key. The load generator (httpx, asyncio) runs on the same
2-core machine, so it competes with the server for CPU; the sequential (concurrency 1) pass measured in the
same run is the reference the concurrent numbers are compared with.

    .venv/bin/python -m experiments.service_load            # 5,000 requests, concurrency 16 (from the repo root)
    make bench-service
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from api import build_index, open_index
from experiments import common
from indexer import Task
from indexer.demo import SHADES, train_classifier

KEY = "bench-key"


def fashion_preview(x: torch.Tensor) -> str:
    """A 28x28 image as 28 rows of shade characters joined by '/' (the format the web page draws)."""
    a = np.clip(np.asarray(x, np.float64).reshape(28, 28), 0, 1)
    idx = np.minimum((a * len(SHADES)).astype(int), len(SHADES) - 1)
    return "/".join("".join(SHADES[i] for i in row) for row in idx)


def fmnist_task(n_train: int, l2: float = 1e-4) -> Task:
    xtr, ytr, xte, yte = common.load_fashion_mnist(n_train, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 10))
    train_classifier(model, torch.from_numpy(xtr), torch.from_numpy(ytr), l2=l2, epochs=50, lr=1e-2, seed=0)
    return Task(
        model=model,
        train=TensorDataset(torch.from_numpy(xtr), torch.from_numpy(ytr)),
        test=TensorDataset(torch.from_numpy(xte), torch.from_numpy(yte)),
        l2=l2,
        preview=fashion_preview,
        name=f"fmnist-logreg-{n_train}",
        batch_size=1024,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(url: str, ids: np.ndarray, *, concurrency: int, k: int, method: str) -> dict:
    """Sends one POST /explain per id with `concurrency` requests in flight; per-request latency and status."""
    import httpx

    latencies = np.zeros(len(ids))
    statuses = np.zeros(len(ids), np.int64)
    errors: list[str] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(ids)):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": KEY}, timeout=120, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                t0 = time.perf_counter()
                try:
                    r = await client.post("/explain", json={"test_ids": [int(ids[i])], "k": k, "method": method})
                    statuses[i] = r.status_code
                    if r.status_code == 200:
                        body = r.json()
                        if len(body) != 1 or body[0]["test_id"] != int(ids[i]) or not body[0]["proponents"]:
                            statuses[i] = -2
                            errors.append(f"request {i}: unexpected body {str(body)[:200]}")
                    else:
                        errors.append(f"request {i}: {r.status_code} {r.text[:200]}")
                except httpx.HTTPError as err:
                    statuses[i] = -1
                    errors.append(f"request {i}: {type(err).__name__} {err}")
                latencies[i] = time.perf_counter() - t0

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = statuses == 200
    return {
        "requests": len(ids),
        "concurrency": concurrency,
        "errors": int((~ok).sum()),
        "error_samples": errors[:5],
        "wall_s": wall,
        "requests_per_s": len(ids) / wall,
        "latency_ms": {
            q: float(np.percentile(latencies[ok], p) * 1e3) if ok.any() else None
            for q, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
        },
        "_latencies": latencies,
    }


def plot(results: dict, latencies: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, lat in latencies.items():
        axes[0].hist(lat * 1e3, bins=60, alpha=0.6, label=name)
        axes[1].plot(np.arange(len(lat)), lat * 1e3, ".", ms=2, alpha=0.5, label=name)
    axes[0].set_xlabel("latency (ms)")
    axes[0].set_ylabel("requests")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[1].set_xlabel("request")
    axes[1].set_ylabel("latency (ms)")
    axes[1].legend()
    c = results["concurrent"]
    fig.suptitle(
        f"POST /explain ({results['method']}, k={results['k']}) on Fashion-MNIST logreg, n_train={results['n_train']}: "
        f"{c['requests']} requests at concurrency {c['concurrency']}, {c['errors']} errors, "
        f"p50 {c['latency_ms']['p50']:.0f} ms, p99 {c['latency_ms']['p99']:.0f} ms, {c['requests_per_s']:.1f} req/s",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=20_000, help="Fashion-MNIST training subsample")
    ap.add_argument("--requests", type=int, default=5_000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--sequential", type=int, default=200, help="requests of the concurrency-1 reference pass")
    ap.add_argument("--method", default="lissa")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--run", type=Path, default=common.ROOT / "runs" / "service-load-fmnist")
    ap.add_argument("--out", type=Path, default=common.RESULTS / "service_load.json")
    args = ap.parse_args()
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    task = fmnist_task(args.n_train)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_index(task, args.run, progress=False).close()
    t_build = time.perf_counter() - t0
    with open_index(args.run) as index:
        n_test, n_params = len(index.test_ids), index.manifest.head.n_params
    print(f"trained in {t_train:.0f} s, index built/reused in {t_build:.0f} s ({n_params} head parameters)")

    port = free_port()
    env = {**os.environ, "INFLUENCE_API_KEY": KEY, "PYTHONPATH": str(common.ROOT)}
    cmd = [sys.executable, "-m", "api.cli", "serve", str(args.run), "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {server.stderr.read()[-2000:] if server.stderr else ''}")
            time.sleep(0.5)
        rng = np.random.default_rng(0)
        warm = asyncio.run(load(url, rng.integers(0, n_test, 20), concurrency=1, k=args.k, method=args.method))
        seq = asyncio.run(
            load(url, rng.integers(0, n_test, args.sequential), concurrency=1, k=args.k, method=args.method)
        )
        conc = asyncio.run(
            load(
                url,
                rng.integers(0, n_test, args.requests),
                concurrency=args.concurrency,
                k=args.k,
                method=args.method,
            )
        )
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()

    latencies = {"sequential": seq.pop("_latencies"), f"concurrency {args.concurrency}": conc.pop("_latencies")}
    warm.pop("_latencies")
    results = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist)",
        "model": "L2 logistic regression (Linear 784 -> 10)",
        "n_train": args.n_train,
        "n_test": n_test,
        "n_head_params": n_params,
        "method": args.method,
        "k": args.k,
        "train_s": t_train,
        "build_or_reuse_s": t_build,
        "warmup": warm,
        "sequential": seq,
        "concurrent": conc,
        "concurrent_vs_sequential_throughput": conc["requests_per_s"] / seq["requests_per_s"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, latencies, args.out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in results.items() if k in ("sequential", "concurrent")}, indent=2))


if __name__ == "__main__":
    main()
