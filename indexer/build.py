"""The offline build: body forward -> cached features -> metadata, gradient and representer spaces.

Stages run in order and each is recorded in the manifest only when its artifacts are on disk, so a build
killed at any point resumes with the same command: cached features are written in chunks with a done-mask,
SQLite rows are replaced in one transaction, FAISS files and arrays are written atomically.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

import influence as inf
from store import (
    ChunkedArray,
    ConfigMismatchError,
    ExampleRecord,
    Manifest,
    MetadataStore,
    RunPaths,
    atomic_write_json,
    build_vector_index,
    content_hash,
    load_array,
    load_manifest,
    remove_stale_temps,
    save_array,
    save_manifest,
    save_tensors,
)

from .errors import TaskError
from .task import Task
from .translate import TranslatedHead, check_head_logits

STAGES = ("features", "metadata", "grad", "representer", "curvature", "tracin", "queries", "block")
SPLITS = ("train", "test")


@dataclass(frozen=True, kw_only=True)
class IndexConfig:
    """How a run is built; saved in the manifest and compared when a build resumes.

    Args:
        curvature: "ggn" (Gauss-Newton, PSD; equals the Hessian for a linear head) or "hessian".
        project_above: gradients are randomly projected when the head has more parameters than this.
        projection_dim: dimension of the projected gradient space.
        projection_seed: seed of the Gaussian projection.
        exact_max_params: heads up to this many parameters get a dense eigendecomposition (method "exact").
        deflation_rank: top eigenpairs of the curvature computed once and deflated in LiSSA (0 = plain LiSSA).
        curvature_rows: the top-eigenpair subspace iterations run over a seeded subsample of this many
            training rows (all rows when there are fewer); one final Rayleigh-Ritz step uses every row. The
            eigenpairs only precondition LiSSA (its fixed point is exact whatever the subspace), so the
            subsample costs iterations, never accuracy; it makes 100k-parameter heads buildable on a CPU.
        representer_l2: Yeh et al.'s lambda of lambda||Theta||^2; None = l2/2 of the task, or 1e-3 if it is 0.
        logit_tolerance: max abs difference allowed between torch and JAX head logits (relative to max |logit|).
        chunk_rows: examples per resumable chunk.
        factory: FAISS index factory string: "Flat" (exact inner product, default), or approximate/compressed
            ones such as "IVF,Flat", "IVF,PQ32", "IVF,SQfp16" (IVF list count chosen from n when omitted),
            "HNSW32", "SQfp16"; their search breadth is tuned to recall@10 >= 0.95 against exact search and
            the measured recall recorded per space in the manifest.
        cache_queries: solve LiSSA once at build time for every stored test example (at its predicted class)
            and store the vectors, so that `explain(test_ids=..., method="lissa")` skips the solve; see
            `indexer.queries` (cheap when the head has a dense eigendecomposition, else n_test x depth
            curvature products over the training set).
    """

    curvature: str = "ggn"
    project_above: int = 16_384
    projection_dim: int = 1024
    projection_seed: int = 0
    exact_max_params: int = 4096
    deflation_rank: int = 64
    curvature_rows: int = 4096
    representer_l2: float | None = None
    logit_tolerance: float = 1e-4
    chunk_rows: int = 2048
    factory: str = "Flat"
    cache_queries: bool = False

    def __post_init__(self) -> None:
        if self.curvature not in ("ggn", "hessian"):
            raise ValueError(f"curvature must be 'ggn' or 'hessian', got {self.curvature!r}")
        for name in ("project_above", "projection_dim", "chunk_rows", "curvature_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.deflation_rank, int) or self.deflation_rank < 0:
            raise ValueError(f"deflation_rank must be an int >= 0, got {self.deflation_rank!r}")
        if not isinstance(self.exact_max_params, int) or self.exact_max_params < 0:
            raise ValueError(f"exact_max_params must be an int >= 0, got {self.exact_max_params!r}")
        if self.representer_l2 is not None and not (math.isfinite(self.representer_l2) and self.representer_l2 > 0):
            raise ValueError(f"representer_l2 must be > 0, got {self.representer_l2!r}")
        if not isinstance(self.factory, str) or not self.factory.strip():
            raise ValueError(f"factory must be a non-empty FAISS factory string, got {self.factory!r}")
        if not (math.isfinite(self.logit_tolerance) and self.logit_tolerance > 0):
            raise ValueError(f"logit_tolerance must be > 0, got {self.logit_tolerance!r}")
        if not isinstance(self.cache_queries, bool):
            raise ValueError(f"cache_queries must be a bool, got {self.cache_queries!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def head_tensors(head: TranslatedHead) -> dict[str, np.ndarray]:
    """Flat safetensors dict `"<layer>.<name>"` -> array."""
    return {f"{i}.{name}": np.ascontiguousarray(a) for i, p in enumerate(head.params) for name, a in p.items()}


def params_from_tensors(spec: list[dict[str, Any]], tensors: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    params: list[dict[str, np.ndarray]] = [{} for _ in spec]
    for key, value in tensors.items():
        layer, name = key.split(".", 1)
        params[int(layer)][name] = value
    return params


def iterate(ds, indices: range, batch_size: int):
    """Batches `(x, y, raw_items)` of the examples at `indices` (texts stay a list of str for a text body)."""
    loader = DataLoader(Subset(ds, list(indices)), batch_size=batch_size, shuffle=False, collate_fn=lambda b: b)
    for items in loader:
        xs = [item[0] for item in items]
        ys = [item[1] for item in items]
        x = xs if all(isinstance(v, str) for v in xs) else torch.stack([torch.as_tensor(v) for v in xs])
        y = torch.as_tensor([int(v) for v in ys], dtype=torch.int64)
        yield x, y, xs


def example_hash(x: Any) -> str:
    if isinstance(x, str):
        return content_hash(x.encode())
    return content_hash(
        np.ascontiguousarray(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)).tobytes()
    )


def write_curvature(
    paths: RunPaths,
    spec: list[dict[str, Any]],
    n_params: int,
    unravel: Any,
    theta: Any,
    h: np.ndarray,
    y: np.ndarray,
    *,
    l2: float,
    config: IndexConfig,
) -> dict[str, Any]:
    """Computes and saves the curvature arrays of the head over the training features; returns manifest extras.

    Top eigenpairs for deflated LiSSA (the top Ritz value doubles as the top-eigenvalue estimate, no separate
    power iteration), plus the dense eigendecomposition for heads up to `exact_max_params` parameters. Used by
    the build and by incremental updates (`indexer.update`).
    """
    matvec = inf.make_head_matvec(
        spec,
        unravel,
        theta,
        np.asarray(h),
        y,
        l2=l2,
        curvature=config.curvature,
        batch_size=None if len(h) <= 16_384 else 4096,
    )
    p = n_params
    extra: dict[str, Any] = {}
    rank = min(config.deflation_rank, p - 1)
    if rank > 0:
        subspace_matvec = None
        if len(h) > config.curvature_rows:
            rows = np.sort(np.random.default_rng(0).choice(len(h), size=config.curvature_rows, replace=False))
            subspace_matvec = inf.make_head_matvec(
                spec, unravel, theta, np.asarray(h[rows]), y[rows], l2=l2, curvature=config.curvature
            )
            extra["curvature_subspace_rows"] = config.curvature_rows
        lam, vecs = inf.compute_top_eigenpairs(matvec, p, rank=rank, dtype=np.float64, subspace_matvec=subspace_matvec)
        save_array(paths.array("curvature_top_eigenvalues"), np.asarray(lam, np.float64))
        save_array(paths.array("curvature_top_eigenvectors"), np.asarray(vecs, np.float32))
        extra |= {"top_eigenvalue": float(lam[0]), "deflation_rank": rank}
    else:
        extra["top_eigenvalue"] = float(inf.estimate_top_eigenvalue(matvec, p, dtype=np.asarray(h).dtype))
    if p <= config.exact_max_params:
        dense = inf.compute_dense_curvature(matvec, p, dtype=np.float64)
        solver = inf.EigenSolver.from_dense(np.asarray(dense, np.float64))
        eigenvalues, eigenvectors = solver.to_arrays()
        save_array(paths.array("curvature_eigenvalues"), np.asarray(eigenvalues, np.float64))
        save_array(paths.array("curvature_eigenvectors"), np.asarray(eigenvectors, np.float64))
        extra["min_eigenvalue"] = float(solver.min_eigenvalue)
        extra["top_eigenvalue_exact"] = float(solver.top_eigenvalue)
    return extra


def _is_unstarted(paths: RunPaths) -> bool:
    """True when the directory is empty or holds only what a start killed before its manifest leaves behind
    (the empty ``vectors/`` and ``arrays/``, the head tensors or their temporary file): safe to start over."""
    for entry in paths.root.iterdir():
        if entry in (paths.vectors_dir, paths.arrays_dir) and entry.is_dir() and not any(entry.iterdir()):
            continue
        if entry == paths.head or (entry.name.startswith(f".{paths.head.name}.") and entry.name.endswith(".tmp")):
            continue
        return False
    return True


class Builder:
    """Runs the build stages for one Task into one run directory."""

    def __init__(self, task: Task, out: str | Path, config: IndexConfig, progress: bool = True) -> None:
        self.task, self.config, self.progress = task, config, progress
        self.paths = RunPaths(Path(out))
        self.head = task.translated_head()
        self.fingerprint = task.fingerprint()
        self.n_classes = self.head.n_classes
        if task.scope == "last-block" and config.curvature != "ggn":
            raise TaskError(
                f"curvature={config.curvature!r} is not available for scope='last-block': its projected curvature "
                "is the Gauss-Newton matrix (indexer.block); use IndexConfig(curvature='ggn')"
            )

    # ----------------------------------------------------------------------------------------- manifest
    def open_or_start(self) -> Manifest:
        paths = self.paths
        if paths.manifest.exists():
            manifest = load_manifest(paths.root)
            if manifest.model_fingerprint != self.fingerprint:
                raise ConfigMismatchError(
                    f"run directory {paths.root} was built for model {manifest.model_fingerprint[:16]}, "
                    f"not this model ({self.fingerprint[:16]}): use another --out"
                )
            # runs written before a config field existed hold its default
            stored = {**IndexConfig().to_dict(), **manifest.methods}
            if stored != self.config.to_dict() or manifest.task != self.task.config():
                raise ConfigMismatchError(
                    f"run directory {paths.root} was started with another config "
                    f"({manifest.methods}, {manifest.task}); use another --out or the same config"
                )
            if "complete" not in manifest.stages:  # resuming: drop what a killed build was half-way writing
                remove_stale_temps(paths.root)
            return manifest
        if paths.root.exists() and not _is_unstarted(paths):
            raise TaskError(f"out directory {paths.root} exists, is not empty and holds no run (no manifest.json)")
        self.check_translation()
        paths.create_dirs()
        save_tensors(paths.head, head_tensors(self.head))
        p = self.head.n_params
        projection = (
            {"seed": self.config.projection_seed, "dim": self.config.projection_dim, "n_params": p}
            if p > self.config.project_above
            else None
        )
        manifest = Manifest(
            model_fingerprint=self.fingerprint,
            task=self.task.config(),
            methods=self.config.to_dict(),
            head={"spec": self.head.spec, "n_classes": self.n_classes, "n_params": p},
            projection=projection,
            spaces={},
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            extra={"max_abs_logit_diff": self.logit_diff},
        )
        save_manifest(paths.root, manifest)
        return manifest

    def check_translation(self) -> None:
        n = min(len(self.task.train), 256)
        x, _, _ = next(iterate(self.task.train, range(n), n))
        h = self.task.features(x)
        bad = ~np.isfinite(h.reshape(len(h), -1)).all(1)
        if bad.any():
            raise TaskError(f"train dataset: example {int(np.argmax(bad))} gives non-finite features (NaN/inf)")
        with torch.no_grad():
            torch_logits = self.task.head_forward(torch.as_tensor(h)).numpy()
        params = self.head.params
        jax_logits = np.asarray(inf.apply_head(self.head.spec, params, h))
        self.logit_diff = check_head_logits(torch_logits, jax_logits, tolerance=self.config.logit_tolerance)
        if torch_logits.ndim != 2:
            raise TaskError(f"model must output logits [batch, n_classes], got shape {torch_logits.shape}")

    # ---------------------------------------------------------------------------------------- stages
    def run(self) -> Manifest:
        manifest = self.open_or_start()
        t0 = time.perf_counter()
        for stage in STAGES:
            if stage in manifest.stages:
                continue
            getattr(self, f"stage_{stage}")(manifest)
            manifest = load_manifest(self.paths.root).with_stage(stage)
            save_manifest(self.paths.root, manifest)
        if "complete" not in manifest.stages:
            manifest = manifest.with_stage("complete")
            manifest = dataclasses.replace(
                manifest, extra={**manifest.extra, "build_seconds_last": time.perf_counter() - t0}
            )
            save_manifest(self.paths.root, manifest)
        return manifest

    def update_manifest(self, **changes: Any) -> None:
        manifest = load_manifest(self.paths.root)
        extra = {**manifest.extra, **changes.pop("extra", {})}
        save_manifest(self.paths.root, dataclasses.replace(manifest, extra=extra, **changes))

    def datasets(self):
        yield "train", self.task.train
        if self.task.test is not None:
            yield "test", self.task.test

    def stage_features(self, manifest: Manifest) -> None:
        """Body forward over train and test in resumable chunks: features, labels, hashes, previews."""
        for split, ds in self.datasets():
            n = len(ds)
            x0, _, _ = next(iterate(ds, range(1), 1))
            fshape = tuple(self.task.features(x0).shape[1:])
            rows = self.config.chunk_rows
            feats = ChunkedArray.open_or_create(
                self.paths.array(f"{split}_features"), shape=(n, *fshape), dtype=np.float32, chunk_rows=rows
            )
            labels = ChunkedArray.open_or_create(
                self.paths.array(f"{split}_labels"), shape=(n,), dtype=np.int64, chunk_rows=rows
            )
            missing = feats.missing_chunks()
            bar = tqdm(total=n, desc=f"features {split}", unit="ex", disable=not self.progress)
            bar.update(n - sum(feats.chunk_slice(i).stop - feats.chunk_slice(i).start for i in missing))
            for chunk in missing:
                sl = feats.chunk_slice(chunk)
                hs, ys, hashes, previews = [], [], [], []
                for x, y, raw in iterate(ds, range(sl.start, sl.stop), self.task.batch_size):
                    h = self.task.features(x)
                    if not np.isfinite(h).all():
                        first = (
                            sl.start
                            + sum(len(v) for v in ys)
                            + int(np.argmax(~np.isfinite(h).reshape(len(h), -1).all(1)))
                        )
                        raise TaskError(f"{split} dataset: example {first} gives non-finite features (NaN/inf)")
                    if (y < 0).any() or (y >= self.n_classes).any():
                        raise TaskError(
                            f"{split} dataset: labels must be in [0, {self.n_classes}), got {y.min().item()}.."
                            f"{y.max().item()}"
                        )
                    hs.append(h)
                    ys.append(y.numpy())
                    hashes.extend(example_hash(v) for v in raw)
                    previews.extend(self.task.preview(v) for v in raw)
                    bar.update(len(y))
                atomic_write_json(
                    self.paths.strings(split, chunk),
                    {"hash": hashes, "preview": previews},
                )
                labels.write_chunk(chunk, np.concatenate(ys))
                feats.write_chunk(chunk, np.concatenate(hs))
            bar.close()
        self.update_manifest(extra={"feature_shape": list(fshape)})

    def load_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        return load_array(self.paths.array(f"{split}_features")), np.asarray(
            load_array(self.paths.array(f"{split}_labels"))
        )

    def jax_head(self):
        params = self.head.params
        theta, unravel = inf.flatten_params(params)
        return params, theta, unravel

    def stage_metadata(self, manifest: Manifest) -> None:
        """Logits, predictions, losses and margins of every example -> arrays + SQLite (one transaction)."""
        import json

        params, _, _ = self.jax_head()
        meta = MetadataStore(self.paths.metadata)
        try:
            for split, ds in self.datasets():
                h, y = self.load_split(split)
                logits = np.concatenate(
                    [
                        np.asarray(inf.apply_head(self.head.spec, params, h[i : i + 4096]))
                        for i in range(0, len(h), 4096)
                    ]
                ).astype(np.float32)
                losses = np.asarray(inf.cross_entropy(logits, y))
                margins = np.asarray(inf.compute_margins(logits, y))
                preds = logits.argmax(1)
                save_array(self.paths.array(f"{split}_logits"), logits)
                ids = self.task.ids(split)
                hashes: list[str] = []
                previews: list[str] = []
                n_chunks = math.ceil(len(ds) / self.config.chunk_rows)
                for chunk in range(n_chunks):
                    strings = json.loads(self.paths.strings(split, chunk).read_text())
                    hashes.extend(strings["hash"])
                    previews.extend(strings["preview"])
                save_array(self.paths.array(f"{split}_ids"), ids)
                meta.replace_split(
                    split,
                    (
                        ExampleRecord(
                            split=split,
                            example_id=int(ids[i]),
                            label=int(y[i]),
                            prediction=int(preds[i]),
                            loss=float(losses[i]),
                            margin=float(margins[i]),
                            content_hash=hashes[i],
                            preview=previews[i],
                        )
                        for i in range(len(y))
                    ),
                )
                if split == "train":
                    train_acc = float((preds == y).mean())
                else:
                    self.update_manifest(extra={"test_accuracy": float((preds == y).mean())})
            self.update_manifest(extra={"train_accuracy": train_acc})
        finally:
            meta.close()

    def stage_grad(self, manifest: Manifest) -> None:
        """Per-example head gradients at the examples' own labels -> FAISS "grad" and "grad-unit"."""
        _, theta, unravel = self.jax_head()
        h, y = self.load_split("train")
        proj = manifest.projection
        dim = proj["dim"] if proj else self.head.n_params
        rows = min(self.config.chunk_rows, 1024)
        vectors = ChunkedArray.open_or_create(
            self.paths.array("grad_vectors"), shape=(len(h), dim), dtype=np.float32, chunk_rows=rows
        )
        missing = vectors.missing_chunks()
        for chunk in tqdm(missing, desc="gradients", unit="chunk", disable=not self.progress):
            sl = vectors.chunk_slice(chunk)
            g = inf.compute_per_example_grads(self.head.spec, unravel, theta, np.asarray(h[sl]), y[sl])
            if proj:
                g = np.asarray(inf.project(g, seed=proj["seed"], d=proj["dim"]))
            vectors.write_chunk(chunk, np.asarray(g, np.float32))
        g_all = np.ascontiguousarray(vectors.array())
        ids = self.task.ids("train")
        spaces = dict(load_manifest(self.paths.root).spaces)
        for space, vecs in (
            ("grad", g_all),
            ("grad-unit", np.asarray(inf.normalize_rows(g_all), np.float32)),
        ):
            index, spaces[space] = build_vector_index(vecs, ids, factory=self.config.factory)
            index.save(self.paths.vector(space))
        self.update_manifest(spaces=spaces)

    def representer_lambda(self) -> float:
        if self.config.representer_l2 is not None:
            return self.config.representer_l2
        return self.task.l2 / 2 if self.task.l2 > 0 else 1e-3

    def stage_representer(self, manifest: Manifest) -> None:
        """Yeh et al. 2018: L2 fine-tune of the last linear layer, alpha_i, embeddings vec(alpha_i phi_i^T)."""
        params, _, _ = self.jax_head()
        h, y = self.load_split("train")
        phi = inf.augment_features(np.asarray(inf.penultimate_features(self.head.spec, params, h), np.float64))
        last = self.head.params[inf.last_linear_index(self.head.spec)]
        bias = last.get("bias", np.zeros(last["weight"].shape[0], last["weight"].dtype))
        theta0 = np.concatenate([last["weight"], bias[:, None]], axis=1).astype(np.float64)
        lam = self.representer_lambda()
        theta, alpha, grad_norm = inf.fit_representer(phi, y, theta0, lam=lam)
        alpha = np.asarray(alpha)
        save_array(self.paths.array("representer_alpha"), alpha.astype(np.float32))
        save_array(self.paths.array("representer_theta"), np.asarray(theta, np.float32))
        save_array(self.paths.array("train_phi"), phi.astype(np.float32))
        emb = np.asarray(inf.compute_representer_embeddings(alpha, phi), np.float32)
        index, representer_space = build_vector_index(emb, self.task.ids("train"), factory=self.config.factory)
        index.save(self.paths.vector("representer"))
        fidelity = None
        if self.task.test is not None:
            ht, _ = self.load_split("test")
            phi_t = inf.augment_features(np.asarray(inf.penultimate_features(self.head.spec, params, ht), np.float64))
            rep_logits = np.asarray(inf.compute_representer_logits(alpha, phi, phi_t))
            model_logits = np.asarray(inf.apply_head(self.head.spec, params, ht))
            fidelity = float(inf.compute_fidelity(rep_logits, model_logits))
        spaces = dict(load_manifest(self.paths.root).spaces)
        spaces["representer"] = representer_space
        self.update_manifest(
            spaces=spaces,
            extra={"representer": {"lambda": lam, "fidelity": fidelity, "grad_norm": float(grad_norm)}},
        )

    def stage_curvature(self, manifest: Manifest) -> None:
        """Top eigenpairs of the head curvature (deflated LiSSA, automatic scale); dense eigh for small heads."""
        _, theta, unravel = self.jax_head()
        h, y = self.load_split("train")
        extra = write_curvature(
            self.paths, self.head.spec, self.head.n_params, unravel, theta, h, y, l2=self.task.l2, config=self.config
        )
        self.update_manifest(extra=extra)

    def stage_tracin(self, manifest: Manifest) -> None:
        """TracIn self-influence sum_c eta_c ||g_i(theta_c)||^2 over the Task's checkpoints (none: nothing to do).

        Each checkpoint is loaded into the model in turn (restored afterwards, also on error); the body runs
        again when it has parameters, since the cut features move with the checkpoint.
        """
        if not self.task.checkpoints:
            return
        from .task import load_checkpoint

        model = self.task.model
        original = {k: v.detach().clone() for k, v in model.state_dict().items()}
        body_has_params = any(True for _ in self.task.body_module.parameters())
        n = len(self.task.train)
        total = np.zeros(n, np.float64)
        try:
            for state, lr in tqdm(self.task.checkpoints, desc="tracin", unit="ckpt", disable=not self.progress):
                model.load_state_dict(load_checkpoint(state))
                head = self.task.translated_head()
                theta, unravel = inf.flatten_params(head.params)
                h_cached, y = self.load_split("train")
                step = self.task.batch_size if body_has_params else 1024
                for start in range(0, n, step):
                    sl = slice(start, min(start + step, n))
                    if body_has_params:
                        x, _, _ = next(iterate(self.task.train, range(sl.start, sl.stop), step))
                        h = self.task.features(x)
                    else:
                        h = np.asarray(h_cached[sl])
                    g = inf.compute_per_example_grads(head.spec, unravel, theta, h, y[sl])
                    inf.accumulate_tracin_self_influence(total[sl], np.asarray(g), lr)
        finally:
            model.load_state_dict(original)
        save_array(self.paths.array("tracin_self_influence"), total)
        self.update_manifest(extra={"tracin": {"checkpoints": len(self.task.checkpoints)}})

    def stage_queries(self, manifest: Manifest) -> None:
        """LiSSA vectors of every stored test example, solved in blocks (`cache_queries=True` only)."""
        if not self.config.cache_queries:
            return
        from .queries import build_query_cache

        _, theta, unravel = self.jax_head()
        record = build_query_cache(
            self.paths,
            self.head.spec,
            unravel,
            theta,
            l2=self.task.l2,
            curvature=self.config.curvature,
            top_eigenvalue=float(load_manifest(self.paths.root).extra["top_eigenvalue"]),
            progress=self.progress,
        )
        if record is not None:
            self.update_manifest(extra={"query_cache": record})

    def stage_block(self, manifest: Manifest) -> None:
        """scope="last-block" only: projected last-block gradients, their curvature and FAISS spaces
        (`indexer.block`)."""
        if self.task.scope != "last-block":
            return
        from .block import build_block_space

        spaces, record = build_block_space(
            self.paths,
            self.task.block,
            self.task.train,
            self.task.test,
            self.task.ids("train"),
            l2=self.task.l2,
            dim=self.config.projection_dim,
            seed=self.config.projection_seed,
            curvature_rows=self.config.curvature_rows,
            factory=self.config.factory,
            progress=self.progress,
        )
        self.update_manifest(spaces={**load_manifest(self.paths.root).spaces, **spaces}, extra={"block": record})


def build_run(task: Task, out: str | Path, *, config: IndexConfig | None = None, progress: bool = True) -> Manifest:
    """Builds (or resumes) the run directory `out` for `task`; returns the final manifest."""
    if not isinstance(task, Task):
        raise TaskError(f"task must be an indexer.Task, got {type(task).__name__}")
    return Builder(task, out, config or IndexConfig(), progress=progress).run()
