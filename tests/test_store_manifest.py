"""Manifest round trip and refusal of bad files; atomic writes leave nothing half-written."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from store.atomic import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text
from store.errors import CorruptRunError, RunNotFoundError, SchemaVersionError
from store.manifest import SCHEMA_VERSION, Manifest, load_manifest, save_manifest


def _manifest(**overrides) -> Manifest:
    fields = {
        "model_fingerprint": "ab12" * 16,
        "task": {"n_train": 100, "n_test": 20, "l2": 1e-3},
        "methods": {"lissa": {"depth": 500, "scale": 10.0, "damping": 0.01}},
        "head": {"spec": [{"type": "linear", "in": 16, "out": 10}], "n_classes": 10, "n_params": 170},
        "projection": {"seed": 0, "dim": 1024, "n_params": 123456},
        "spaces": {"grad": {"dim": 1024, "ntotal": 100, "factory": "Flat", "metric": "ip"}},
        "created_at": "2026-01-01T00:00:00+00:00",
    }
    fields.update(overrides)
    return Manifest(**fields)


def test_round_trip(tmp_path: Path) -> None:
    manifest = _manifest().with_stage("features").with_stage("grad")
    save_manifest(tmp_path, manifest)
    loaded = load_manifest(tmp_path)
    assert loaded == manifest
    assert loaded.stages == ("features", "grad") and loaded.schema_version == SCHEMA_VERSION
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    # The file is plain sorted JSON.
    text = (tmp_path / "manifest.json").read_text()
    assert list(json.loads(text)) == sorted(json.loads(text))


def test_variants_and_stages() -> None:
    base = _manifest(projection=None)
    assert base.with_stage("a").with_stage("a").stages == ("a",)
    assert base.stages == ()  # frozen: with_stage returns a new manifest
    other = dataclasses.replace(base, model_fingerprint="ff")
    assert other.model_fingerprint == "ff" and base.model_fingerprint != "ff"
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.stages = ("x",)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "argument"),
    [
        ({"model_fingerprint": ""}, "model_fingerprint"),
        ({"task": [1, 2]}, "task"),
        ({"projection": 5}, "projection"),
        ({"spaces": {"grad": {"dim": -1, "ntotal": 0}}}, "spaces"),
        ({"stages": ("a", 3)}, "stages"),
    ],
)
def test_invalid_fields_raise_naming_argument(overrides: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        _manifest(**overrides)


def test_newer_schema_refused(tmp_path: Path) -> None:
    data = _manifest().to_dict() | {"schema_version": SCHEMA_VERSION + 1}
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(SchemaVersionError, match=str(SCHEMA_VERSION + 1)):
        load_manifest(tmp_path)


def test_corrupt_json_refused_naming_file(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"schema_version": 1, "model_')
    with pytest.raises(CorruptRunError, match=r"manifest.json"):
        load_manifest(tmp_path)


def test_missing_or_ill_typed_fields_refused(tmp_path: Path) -> None:
    data = _manifest().to_dict()
    del data["spaces"]
    with pytest.raises(CorruptRunError, match="spaces"):
        Manifest.from_dict(data)
    data = _manifest().to_dict() | {"head": "linear"}
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CorruptRunError, match=r"manifest\.json.*head"):
        load_manifest(tmp_path)


def test_missing_run_dir_or_manifest(tmp_path: Path) -> None:
    with pytest.raises(RunNotFoundError):
        load_manifest(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"manifest\.json"):
        load_manifest(tmp_path)


def test_atomic_writes_leave_no_temp_files(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "b.txt", "héllo")
    atomic_write_json(tmp_path / "c.json", {"b": 1, "a": [1, 2]})
    atomic_write_json(tmp_path / "c.json", {"z": 0})  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "c.json"]
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo"
    assert json.loads((tmp_path / "c.json").read_text()) == {"z": 0}


def test_remove_stale_temps_removes_only_killed_writes(tmp_path: Path) -> None:
    from store.atomic import _temp_path, remove_stale_temps

    (tmp_path / "arrays").mkdir()
    stale = [_temp_path(tmp_path / "arrays" / "x.npy"), _temp_path(tmp_path / "manifest.json")]
    keep = [tmp_path / "arrays" / "x.npy", tmp_path / "notes.tmp", tmp_path / ".hidden", tmp_path / "a.b.c.tmp"]
    for path in keep:
        path.write_bytes(b"kept")
    assert sorted(remove_stale_temps(tmp_path)) == sorted(stale)
    assert not any(p.exists() for p in stale) and all(p.read_bytes() == b"kept" for p in keep)


def test_exception_inside_atomic_path_leaves_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"half-writ")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]

    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_atomic_json_refuses_nan(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "x.json", {"a": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_atomic_json_converts_numpy(tmp_path: Path) -> None:
    import numpy as np

    atomic_write_json(tmp_path / "x.json", {"a": np.float32(0.5), "b": np.arange(3), "c": np.int64(7)})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 0.5, "b": [0, 1, 2], "c": 7}
    with pytest.raises(TypeError, match="obj"):
        atomic_write_json(tmp_path / "y.json", {"a": object()})
    assert not (tmp_path / "y.json").exists()
