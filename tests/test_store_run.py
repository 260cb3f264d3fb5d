"""Run directory layout, hashes and the consistency check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from store.errors import RunNotFoundError
from store.manifest import Manifest, save_manifest
from store.metadata import ExampleRecord, MetadataStore
from store.run import RunPaths, content_hash, verify_run
from store.vectors import FaissVectorIndex


def test_paths(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path / "run")
    paths.create_dirs()
    assert paths.vectors_dir.is_dir() and paths.arrays_dir.is_dir()
    assert paths.manifest.name == "manifest.json" and paths.metadata.name == "metadata.sqlite"
    assert paths.vector("grad") == tmp_path / "run" / "vectors" / "grad.faiss"
    assert paths.array("train_features") == tmp_path / "run" / "arrays" / "train_features.npy"
    assert paths.head.name == "head.safetensors" and paths.lock.parent == paths.root
    with pytest.raises(ValueError, match="space"):
        paths.vector("../escape")
    with pytest.raises(ValueError, match="not in the run layout"):
        paths.array("undeclared")  # every artifact is declared once, in store.layout


def test_hashes() -> None:
    assert content_hash(b"abc") == "ba7816bf8f01cfea"


def _build_run(root: Path, n: int = 20, dim: int = 8) -> RunPaths:
    paths = RunPaths(root)
    paths.create_dirs()
    index = FaissVectorIndex.create(dim)
    index.add(np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32), np.arange(n))
    index.save(paths.vector("grad"))
    with MetadataStore(paths.metadata) as meta:
        meta.replace_split(
            "train",
            [
                ExampleRecord(
                    split="train",
                    example_id=i,
                    label=0,
                    prediction=0,
                    loss=0.0,
                    margin=0.0,
                    content_hash="",
                    preview="",
                )
                for i in range(n)
            ],
        )
    save_manifest(
        root,
        Manifest(
            model_fingerprint="abc",
            task={},
            methods={},
            head={"spec": [], "n_classes": 2, "n_params": 0},
            projection=None,
            spaces={"grad": {"dim": dim, "ntotal": n, "factory": "Flat", "metric": "ip"}},
        ),
    )
    return paths


def test_verify_run(tmp_path: Path) -> None:
    paths = _build_run(tmp_path / "run")
    assert verify_run(paths.root) == []

    index = FaissVectorIndex.load(paths.vector("grad"))
    index.add(np.zeros((1, 8), np.float32), np.array([99]))
    index.save(paths.vector("grad"))
    problems = verify_run(paths.root)
    assert any("ntotal 21" in p for p in problems)
    assert any("ids differ" in p and "[99]" in p for p in problems)

    paths.vector("grad").unlink()
    assert any("grad.faiss" in p and "missing" in p for p in verify_run(paths.root))

    paths.manifest.write_text("{")
    assert any("manifest.json" in p for p in verify_run(paths.root))
    with pytest.raises(RunNotFoundError):
        verify_run(tmp_path / "nope")
