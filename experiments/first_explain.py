"""The first explains a user waits on, with and without the service's start-up warm-up (issue 17).

Builds (or reuses) the digits MLP run under experiments/cache/, then, in a fresh Python process per mode (JAX's
compile cache lives in the process), serves it with `create_app(warm=False | True)` through FastAPI's TestClient
and times a sequence of `POST /explain` requests on stored test ids with the default method: batches of 1, 1, 3,
5, 2 and 8 queries, each new. With `warm=True` the requests start after `/health` reports the warm-up done, and its
duration is recorded. Writes experiments/results/first_explain.json and .png.

    make bench-first-explain     # or: .venv/bin/python -m experiments.first_explain
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

from experiments import common

RUN = common.CACHE / "first_explain" / "digits-mlp"
BATCHES = (1, 1, 3, 5, 2, 8)
OUT = common.ROOT / "experiments" / "results" / "first_explain"


def serve_and_time(warm: bool) -> dict:
    """In this process: the service over RUN, the warm-up awaited (if on), each request's wall time."""
    from fastapi.testclient import TestClient

    from api.service import create_app

    t0 = time.perf_counter()
    with TestClient(create_app(RUN, warm=warm)) as client:
        while client.get("/health").json()["warm"] == "running":
            time.sleep(0.2)
        ready = time.perf_counter() - t0
        state = client.get("/health").json()["warm"]
        times, start = [], 0
        for m in BATCHES:
            ids = list(range(start, start + m))
            start += m
            t = time.perf_counter()
            r = client.post("/explain", json={"test_ids": ids, "k": 10})
            times.append(time.perf_counter() - t)
            if r.status_code != 200:
                raise RuntimeError(f"/explain {ids}: {r.status_code} {r.text[:200]}")
    return {"warm": state, "ready_s": ready, "request_s": times}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(serve_and_time(sys.argv[2] == "on")))
        return
    if not (RUN / "manifest.json").exists():
        from api import build_index
        from indexer.demo import digits_task

        build_index(digits_task(), RUN, progress=True).close()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    modes = {}
    for mode in ("off", "on"):
        out = subprocess.run(
            [sys.executable, "-m", "experiments.first_explain", "--child", mode],
            cwd=common.ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        modes[f"warm_{mode}"] = json.loads(out.stdout.strip().splitlines()[-1])
        print(mode, modes[f"warm_{mode}"], flush=True)
    result = {
        "run": "digits MLP (indexer.demo.digits_task), default method, stored test ids, k=10",
        "batches": list(BATCHES),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0],
            "python": platform.python_version(),
        },
        **modes,
    }
    OUT.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(BATCHES))
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for i, mode in enumerate(("off", "on")):
        ax.bar(x + (i - 0.5) * 0.38, modes[f"warm_{mode}"]["request_s"], 0.38, label=f"warm-up {mode}")
    ax.set_xticks(x, [f"#{i + 1}: {m} q" for i, m in enumerate(BATCHES)])
    ax.set_ylabel("request wall time (s)")
    ax.set_title(f"first /explain requests (warm-up took {modes['warm_on']['ready_s']:.1f} s at start)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
