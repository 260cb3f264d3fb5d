"""Scale benchmark: one run with 1,000,000 training examples whose gradient space has dimension 256.

The task is a real (if synthetic) one: multinomial logistic regression, 31 inputs and 8 classes (8 x 32 = 256
head parameters, so the "grad" space is 256-dimensional, unprojected), trained on clustered Gaussian data with
a linear teacher and 5% label noise; 10,000 test examples. Everything goes through the product: `build_index`
(features, SQLite metadata, gradients, FAISS, representer, curvature), `Index.explain`, `Index.dump`.

Measured, each phase in its own process (so peak memory, VmHWM, is per phase), all in the same run:
- build: time, disk per file, peak memory;
- ceilings: memory bandwidth (numpy copy of 512 MB, read+write bytes) and float32 matmul rate;
- search per FAISS index (exact Flat, IVF-Flat, IVF-SQfp16, IVF-PQ, HNSW): build time, file size, resident
  memory after loading, p50/p99 latency of one query, k = 10, both signs (`store.search_both_signs`), recall@10
  against exact on held-out test queries (their real gradients), and for exact search the memory-bandwidth
  floor (one read of the 1 GB of vectors at the measured bandwidth);
- explain: end-to-end `Index.explain(test_ids=[i], k=10, method="grad-dot")` latency (gradient, search,
  SQLite join);
- dump: `Index.dump` of 10,000 queries x 1M training examples, top-100 Parquet + aggregates: scores/s against
  the matmul rate expressed in scores/s (2 x 256 flop per score), and peak memory.

Run: `make scale` (SCALE_N=100000 for a quick pass), i.e. `python -m experiments.scale_1m [--dump | --approximate]`
from the repository root. Results: experiments/results/scale_1m.{json,png}.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from experiments import common

WORK = Path(os.environ.get("SCALE_WORKDIR", common.CACHE / "scale"))
N_TRAIN = int(os.environ.get("SCALE_N", 1_000_000))
N_TEST = 10_000
D_IN, N_CLASSES = 31, 8
FACTORIES = ["Flat", "SQfp16", "IVF1024,Flat", "IVF1024,SQfp16", "IVF1024,PQ32x4fs", "HNSW32"]
APPROX_ONLY = [f for f in os.environ.get("SCALE_FACTORIES", "").split(";") if f]
#: phases not started by this wall-clock time (epoch seconds) are skipped and marked so
DEADLINE = float(os.environ.get("SCALE_DEADLINE", "inf"))
N_LAT = 200


def run_dir() -> Path:
    return WORK / f"run-{N_TRAIN}"


def make_task():
    import torch
    from torch.utils.data import TensorDataset

    from indexer import Task

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(64, D_IN)) * 2.0
    teacher = rng.normal(size=(D_IN, N_CLASSES))

    def sample(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        r = np.random.default_rng(seed)
        x = centres[r.integers(0, 64, n)] + r.normal(size=(n, D_IN))
        y = (x @ teacher + r.gumbel(size=(n, N_CLASSES))).argmax(1)
        flip = r.random(n) < 0.05
        y[flip] = r.integers(0, N_CLASSES, flip.sum())
        return x.astype(np.float32), y.astype(np.int64)

    x, y = sample(N_TRAIN, 1)
    xt, yt = sample(N_TEST, 2)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = torch.nn.Sequential(torch.nn.Linear(D_IN, N_CLASSES))
    sub = torch.from_numpy(x[:100_000]), torch.from_numpy(y[:100_000])
    opt = torch.optim.LBFGS(model.parameters(), max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(sub[0]), sub[1])
        loss = loss + 0.5e-3 * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return Task(
        model=model,
        train=TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
        test=TensorDataset(torch.from_numpy(xt), torch.from_numpy(yt)),
        l2=1e-3,
        name=f"synthetic-logreg-{N_TRAIN}",
        batch_size=8192,
    )


def config():
    from indexer import IndexConfig

    return IndexConfig(deflation_rank=8, exact_max_params=0, chunk_rows=65_536)


# ------------------------------------------------------------------------------------------------- phases
def phase_build() -> dict:
    from api import build_index

    task = make_task()
    t0 = time.perf_counter()
    build_index(task, run_dir(), config=config(), progress=False).close()
    seconds = time.perf_counter() - t0
    files = {str(p.relative_to(run_dir())): p.stat().st_size for p in sorted(run_dir().rglob("*")) if p.is_file()}
    return {
        "seconds": seconds,
        "disk_bytes": sum(files.values()),
        "largest_files": dict(sorted(files.items(), key=lambda kv: -kv[1])[:8]),
        "peak_rss_mb": common.peak_rss_mb(),
    }


def phase_ceilings() -> dict:
    src = np.random.default_rng(0).random(128 << 20, dtype=np.float32)  # 512 MB
    dst = np.empty_like(src)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    bandwidth = 2 * src.nbytes / min(times)  # bytes read + written per second
    return {"copy_bandwidth_gb_s": bandwidth / 1e9, "matmul_gflop_s": matmul_gflop_s(5)}


def test_queries(n: int) -> np.ndarray:
    """Gradients of `n` test examples at their predicted class (what `Engine.gradients` computes for
    `Engine.prepare`'s targets), from the run's arrays and head files alone: `store.OpenedRun` opens complete
    runs only, and the search phases can run before the build's last stages finish."""
    import influence as inf
    from store import RunPaths, load_array, load_manifest, load_tensors, params_from_tensors

    paths = RunPaths(run_dir())
    spec = load_manifest(paths.root).head.spec
    params = params_from_tensors(spec, load_tensors(paths.head))
    theta, unravel = inf.flatten_params(params)
    h_all = load_array(paths.array("test_features"))
    rows = np.sort(np.random.default_rng(3).choice(len(h_all), size=n, replace=False))
    h = np.asarray(h_all[rows])
    pred = np.asarray(inf.apply_head(spec, params, h)).argmax(1)
    return np.asarray(inf.compute_per_example_grads(spec, unravel, theta, h, pred), np.float32)


def phase_search(factory: str) -> dict:
    import faiss

    from store import FaissVectorIndex, RunPaths, build_vector_index, compute_recall, load_array, search_both_signs
    from store.vectors import exact_neighbours

    faiss.omp_set_num_threads(1)  # one query at a time: OpenMP threads only spin on a shared 2-core machine
    paths = RunPaths(run_dir())
    queries = test_queries(N_LAT)
    out: dict = {"factory": factory}
    target = paths.vector("grad") if factory == "Flat" else WORK / f"grad-{N_TRAIN}-{factory.replace(',', '_')}.faiss"
    grads = load_array(paths.array("grad_vectors"))
    ids = np.arange(len(grads), dtype=np.int64)
    if factory != "Flat":
        t0 = time.perf_counter()
        index, spec = build_vector_index(np.ascontiguousarray(grads), ids, factory=factory, max_train=40_960)
        out["build_seconds"] = time.perf_counter() - t0
        out["build_spec"] = spec
        index.save(target)
        del index
    out["file_bytes"] = target.stat().st_size
    before = common.rss_mb()
    index = FaissVectorIndex.load(target)
    out["rss_after_load_mb"] = common.rss_mb() - before
    lat = []
    for q in queries:
        t0 = time.perf_counter()
        search_both_signs(index, q[None], 10)
        lat.append(time.perf_counter() - t0)
    out["p50_ms"] = 1e3 * float(np.percentile(lat, 50))
    out["p99_ms"] = 1e3 * float(np.percentile(lat, 99))
    both = np.concatenate([queries, -queries])
    exact = exact_neighbours(np.asarray(grads), ids, both, 10)
    pos, neg = zip(*(search_both_signs(index, q[None], 10) for q in queries), strict=True)
    approx = np.stack([h[0].ids for h in pos] + [h[0].ids for h in neg])
    out["recall_at_10"] = compute_recall(exact, approx)
    if factory == "Flat":  # the two-pass alternative, for the record
        lat2 = []
        for q in queries[:50]:
            t0 = time.perf_counter()
            index.search(q[None], 10)
            index.search(-q[None], 10)
            lat2.append(time.perf_counter() - t0)
        out["two_faiss_searches_p50_ms"] = 1e3 * float(np.percentile(lat2, 50))
        out["vector_bytes"] = int(grads.nbytes)
    return out


def phase_explain() -> dict:
    from api import open_index

    with open_index(run_dir()) as index:
        rows = np.random.default_rng(4).choice(len(index.test_ids), size=N_LAT, replace=False)
        index.explain(test_ids=[int(index.test_ids[0])], k=10, method="grad-dot")
        lat = []
        for r in rows:
            t0 = time.perf_counter()
            index.explain(test_ids=[int(index.test_ids[r])], k=10, method="grad-dot")
            lat.append(time.perf_counter() - t0)
    return {"p50_ms": 1e3 * float(np.percentile(lat, 50)), "p99_ms": 1e3 * float(np.percentile(lat, 99))}


def matmul_gflop_s(reps: int = 3) -> float:
    """The float32 matmul rate of `phase_ceilings` ([256, 256] x [256, 65536], numpy's BLAS, its default threads),
    median of `reps` timed products."""
    a = np.random.default_rng(1).random((256, 256), dtype=np.float32)
    b = np.random.default_rng(2).random((256, 65_536), dtype=np.float32)
    return common.matmul_gflop_s(a, b, repeats=reps, reduce=np.median)


def phase_dump() -> dict:
    """`Index.dump` of the test queries (all 10k unless SCALE_DUMP_QUERIES) x 1M, top-100 Parquet + aggregates.

    The machine is shared, so the matmul rate it is compared with is measured in the same process between the
    dump's blocks (`on_block`, after each durable block; the time spent there is excluded from the dump's time):
    both see the same load. Reported: overall scores/s over the mean interleaved matmul rate, and per block."""
    from threadpoolctl import threadpool_info

    from api import open_index

    out_path = WORK / f"dump-{N_TRAIN}.parquet"
    block_size = int(os.environ.get("SCALE_DUMP_BLOCK", 256))
    blocks: list[dict] = []
    excluded = [0.0]
    last = [0.0]

    def on_block(done: int, total: int) -> None:
        t0 = time.perf_counter()
        rate = matmul_gflop_s()
        blocks.append({"done": done, "seconds": t0 - last[0], "matmul_gflop_s": rate})
        excluded[0] += time.perf_counter() - t0
        last[0] = time.perf_counter()

    with open_index(run_dir()) as index:
        ids = [int(v) for v in index.test_ids][: int(os.environ.get("SCALE_DUMP_QUERIES", N_TEST))]
        n_train = len(index.train_ids)
        before = matmul_gflop_s(5)
        if out_path.exists():
            out_path.unlink()
        shutil.rmtree(f"{out_path}.partial", ignore_errors=True)  # time a fresh dump, not a resumed one
        t0 = last[0] = time.perf_counter()
        index.dump(
            out_path, test_ids=ids, k=100, method="grad-dot", block_size=block_size, progress=False, on_block=on_block
        )
        seconds = time.perf_counter() - t0 - excluded[0]
        after = matmul_gflop_s(5)
    rate = len(ids) * n_train / seconds
    interleaved = float(np.mean([b["matmul_gflop_s"] for b in blocks]))
    sizes = [min(block_size, len(ids) - i * block_size) for i in range(len(blocks))]
    per_block = [
        n * n_train / b["seconds"] / (b["matmul_gflop_s"] * 1e9 / 512) for n, b in zip(sizes, blocks, strict=True)
    ]
    return {
        "queries": len(ids),
        "train": n_train,
        "k": 100,
        "block_size": block_size,
        "method": "grad-dot",
        "aggregates": True,
        "seconds": seconds,
        "scores_per_s": rate,
        "matmul_gflop_s_interleaved_mean": interleaved,
        "matmul_gflop_s_before_after": [before, after],
        "dump_over_matmul": rate / (interleaved * 1e9 / 512),  # 2 x 256 flop per score
        "dump_over_matmul_per_block_median": float(np.median(per_block)),
        "dump_over_matmul_vs_before_after_max": rate / (max(before, after) * 1e9 / 512),
        "threads": [{k: v for k, v in p.items() if k in ("internal_api", "num_threads")} for p in threadpool_info()],
        "cpus": os.cpu_count(),
        "load_avg_after": os.getloadavg(),
        "parquet_bytes": out_path.stat().st_size,
        "parquet_rows": _parquet_rows(out_path),
        "peak_rss_mb": common.peak_rss_mb(),
        "blocks": blocks,
    }


def phase_dump_profile() -> dict:
    """Where a dump block's time goes: the steps of `api.dump`'s block loop timed one by one on the real run
    (one block of 256 queries x 1M, after a warm-up block so JAX compilation is not counted)."""
    import contextlib

    import influence as inf
    from api import open_index
    from api.dump import topk_columns
    from api.scorers import scorer_for
    from store import DumpWork, new_accumulators

    times: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(name: str):
        t0 = time.perf_counter()
        yield
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0

    with open_index(run_dir()) as index:
        engine = index.engine
        scorer = scorer_for(engine, "grad-dot")
        train_ids, train_labels = np.asarray(index.run.train.ids, np.int64), np.asarray(index.run.train.labels)
        n, chunk, b = len(train_ids), 65_536, 256
        tile = np.empty(b * chunk, np.float32)
        acc = {"sum_positive": np.zeros(n), "sum_negative": np.zeros(n)}
        weights = np.ones((2, b), np.float32)
        for first in (0, b):  # the first block warms up (JAX compiles the query-gradient function)
            times.clear()
            ids = [int(v) for v in index.test_ids[first : first + b]]
            with timed("prepare + query vectors"):
                q = np.ascontiguousarray(scorer.query_vectors(engine.prepare(ids, None, None))[0], np.float32)
            pos, neg = inf.StreamingTopK(100, largest=True), inf.StreamingTopK(100, largest=False)
            for start in range(0, n, chunk):
                sl = slice(start, min(start + chunk, n))
                s = tile[: b * (sl.stop - start)].reshape(b, -1)
                with timed("train chunk (memmap)"):
                    g = np.ascontiguousarray(scorer.train_vectors(sl), np.float32)
                with timed("matmul"):
                    np.matmul(q, g.T, out=s)
                with timed("top-k proponents"):
                    pos.update(s, start)
                with timed("top-k opponents"):
                    neg.update(s, start)
                with timed("aggregates"):
                    total = weights @ s
                    plus = weights @ np.maximum(s, 0.0, out=s)
                    acc["sum_positive"][sl] += plus[0]
                    acc["sum_negative"][sl] += total[0] - plus[0].astype(np.float64)
            with timed("Parquet columns"):
                topk_columns(np.asarray(ids), pos.result, neg.result, train_ids, train_labels, "grad-dot")
            work = DumpWork(WORK / "profile-state.parquet")
            work.dir.mkdir(exist_ok=True)
            state = new_accumulators(n)  # the dump's 7 accumulators [n]
            with timed("checkpoint (7 accumulators of 1M, fsync)"):
                work.save_state(1, state)
            shutil.rmtree(work.dir)
    total_s = sum(times.values())
    return {
        "queries": b,
        "train": n,
        "seconds": times,
        "share": {k: v / total_s for k, v in times.items()},
        "matmul_gflop_s_in_loop": 2 * 256 * b * n / times["matmul"] / 1e9,
        "matmul_gflop_s_after": matmul_gflop_s(5),
        "load_avg_after": os.getloadavg(),
    }


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


# ------------------------------------------------------------------------------------------------- driver
def run_phase(name: str, *args: str) -> dict:
    if time.time() > DEADLINE:
        return {"skipped": "out of time for this run", "factory": args[0] if args else None}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.scale_1m", "--phase", name, *args],
        cwd=common.ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{name} {' '.join(args)}: {time.perf_counter() - t0:.0f} s {json.dumps(result)[:300]}", flush=True)
    return result


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["search"] if "p50_ms" in r and "recall_at_10" in r]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["factory"] for r in rows]
    ax[0].bar(names, [r["p50_ms"] for r in rows], label="p50")
    ax[0].scatter(names, [r["p99_ms"] for r in rows], color="k", zorder=3, label="p99")
    ax[0].axhline(results["search_floor_ms"], color="r", ls="--", label="bandwidth floor (one read)")
    ax[0].set_ylabel("ms per query, k=10, both signs")
    ax[0].set_yscale("log")
    ax[0].legend()
    ax[0].tick_params(axis="x", rotation=20)
    ax[0].set_title(f"search, {results['n_train']:,} x 256")
    ax[1].bar(names, [r["recall_at_10"] for r in rows])
    ax[1].axhline(0.95, color="r", ls="--")
    ax[1].set_ylim(0, 1.02)
    ax[1].set_ylabel("recall@10 vs exact (both signs)")
    ax[1].tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    if {"-h", "--help"} & set(sys.argv[1:]):  # usage only: anything else starts the benchmark
        print(__doc__)
        return
    if len(sys.argv) > 2 and sys.argv[1] == "--phase":
        name, args = sys.argv[2], sys.argv[3:]
        result = {
            "build": phase_build,
            "ceilings": phase_ceilings,
            "search": phase_search,
            "explain": phase_explain,
            "dump": phase_dump,
            "dump_profile": phase_dump_profile,
        }[name](*args)
        print(json.dumps(result))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    if len(sys.argv) > 1 and sys.argv[1] == "--dump":  # the dump alone, against the cached built run
        json_path = common.RESULTS / f"scale_1m{'' if N_TRAIN == 1_000_000 else f'_{N_TRAIN}'}.json"
        results = json.loads(json_path.read_text()) if json_path.exists() else {"n_train": N_TRAIN}
        results["dump"] = run_phase("dump")
        results["dump_over_matmul"] = results["dump"].get("dump_over_matmul", float("nan"))
        results["dump_profile"] = run_phase("dump_profile")
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--approximate":  # the approximate indexes alone, on a built grad space
        part: dict = {"n_train": N_TRAIN, "ceilings": run_phase("ceilings"), "search": []}
        out = common.RESULTS / f"scale_1m_approximate{'' if N_TRAIN == 1_000_000 else f'_{N_TRAIN}'}.json"
        for factory in APPROX_ONLY or FACTORIES[1:]:
            part["search"].append(run_phase("search", factory))
            out.write_text(json.dumps(part, indent=2) + "\n")
        return
    results: dict = {"n_train": N_TRAIN, "n_test": N_TEST, "dim": 256, "cpus": os.cpu_count()}
    suffix = "" if N_TRAIN == 1_000_000 else f"_{N_TRAIN}"
    json_path = common.RESULTS / f"scale_1m{suffix}.json"
    common.RESULTS.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        json_path.write_text(json.dumps(results, indent=2) + "\n")

    results["build"] = run_phase("build")
    save()
    results["ceilings"] = run_phase("ceilings")
    results["search"] = [run_phase("search", "Flat")]
    flat = results["search"][0]
    bandwidth = results["ceilings"]["copy_bandwidth_gb_s"] * 1e9
    results["search_floor_ms"] = 1e3 * flat.get("vector_bytes", N_TRAIN * 1024) / bandwidth
    results["exact_p50_over_floor"] = flat.get("p50_ms", float("nan")) / results["search_floor_ms"]
    results["explain"] = run_phase("explain")
    results["dump"] = run_phase("dump")
    results["dump_over_matmul"] = results["dump"].get("dump_over_matmul", float("nan"))
    save()
    for factory in FACTORIES[1:] if not os.environ.get("SCALE_EXACT_ONLY") else []:  # else: --approximate
        results["search"].append(run_phase("search", factory))
        save()
    results["ceilings"] = run_phase("ceilings") | {"before": results["ceilings"]}  # drift check
    save()
    plot(results, json_path.with_suffix(".png"))
    print(json.dumps({k: results[k] for k in ("exact_p50_over_floor", "dump_over_matmul")}))


if __name__ == "__main__":
    main()
