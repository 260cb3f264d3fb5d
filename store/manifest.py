"""The run manifest: ``manifest.json``, the one file that says what a run directory holds.

It records the schema version, the model fingerprint (a reopen with another model is refused), the task
and method configs, the head spec, the projection seed, one entry per vector space and the build stages
already completed (so an interrupted build resumes where it stopped).
"""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from store.atomic import atomic_write_json
from store.errors import CorruptRunError, RunNotFoundError, SchemaVersionError
from store.layout import MANIFEST_NAME

SCHEMA_VERSION = 1


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _check_space(name: str, spec: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"spaces: space name must be a non-empty string, got {name!r}")
    if not isinstance(spec, dict):
        raise ValueError(f"spaces[{name!r}]: must be a dict, got {type(spec).__name__}")
    for key in ("dim", "ntotal"):
        value = spec.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"spaces[{name!r}][{key!r}]: must be a non-negative int, got {value!r}")
    for key in ("factory", "metric"):
        if key in spec and not isinstance(spec[key], str):
            raise ValueError(f"spaces[{name!r}][{key!r}]: must be a str, got {spec[key]!r}")


def _check_count(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{owner}[{name!r}]: must be a non-negative int, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeadRecord:
    """The head as plain data (`influence.head`): its layers, classes and parameter count.

    Attributes:
        spec: One dict per layer (kind, shapes, activation, ...).
        n_classes: Width of the logits.
        n_params: Parameters of the head.
    """

    spec: list[dict[str, Any]]
    n_classes: int
    n_params: int

    def __post_init__(self) -> None:
        if not isinstance(self.spec, list) or not all(isinstance(layer, dict) for layer in self.spec):
            raise ValueError(f"head['spec']: must be a list of layer dicts, got {self.spec!r}")
        _check_count("head", "n_classes", self.n_classes)
        _check_count("head", "n_params", self.n_params)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProjectionRecord:
    """The seeded Gaussian projection of head gradients (`influence.project`), when the head is large.

    Attributes:
        seed: Seed of the projection matrix (the same on every machine).
        dim: Projected dimension d.
        n_params: Dimension p of the gradients projected.
    """

    seed: int
    dim: int
    n_params: int

    def __post_init__(self) -> None:
        for name in ("seed", "dim", "n_params"):
            _check_count("projection", name, getattr(self, name))


def _record(cls: type, name: str, value: Any) -> Any:
    """``value`` as the record ``cls`` (a dict is converted; a wrong type names the field)."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{name}: must be a dict, got {type(value).__name__} {value!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    if set(value) != fields:
        raise ValueError(f"{name}: must have the fields {sorted(fields)}, got {sorted(value)}")
    return cls(**value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Manifest:
    """What a run directory holds; saved as ``manifest.json``.

    Attributes:
        schema_version: Version of this layout; a run newer than ``SCHEMA_VERSION`` is refused.
        model_fingerprint: Hash of the model's parameters; a reopen with another model is refused.
        task: The task config as JSON (split sizes, l2, ...).
        methods: Method configs as JSON, keyed by method name.
        head: The head (`HeadRecord`; a dict of its fields is converted).
        projection: The gradient projection (`ProjectionRecord`) when gradients are projected, else None.
        spaces: Vector space name -> ``{"dim": int, "ntotal": int, "factory": str, "metric": "ip"}``.
        stages: Names of completed build stages, in completion order.
        created_at: ISO-8601 UTC timestamp.
        extra: Free-form JSON for anything else.
    """

    schema_version: int = SCHEMA_VERSION
    model_fingerprint: str
    task: dict[str, Any]
    methods: dict[str, Any]
    head: HeadRecord
    projection: ProjectionRecord | None
    spaces: dict[str, dict[str, Any]]
    stages: tuple[str, ...] = ()
    created_at: str = dataclasses.field(default_factory=_now)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.schema_version, int) or isinstance(self.schema_version, bool):
            raise ValueError(f"schema_version: must be an int, got {self.schema_version!r}")
        if self.schema_version < 1:
            raise ValueError(f"schema_version: must be >= 1, got {self.schema_version!r}")
        if not isinstance(self.model_fingerprint, str) or not self.model_fingerprint:
            raise ValueError(f"model_fingerprint: must be a non-empty str, got {self.model_fingerprint!r}")
        for name in ("task", "methods", "spaces", "extra"):
            value = getattr(self, name)
            if not isinstance(value, dict):
                raise ValueError(f"{name}: must be a dict, got {type(value).__name__} {value!r}")
        object.__setattr__(self, "head", _record(HeadRecord, "head", self.head))
        if self.projection is not None:
            object.__setattr__(self, "projection", _record(ProjectionRecord, "projection", self.projection))
        for space, spec in self.spaces.items():
            _check_space(space, spec)
        if isinstance(self.stages, list):
            object.__setattr__(self, "stages", tuple(self.stages))
        if not isinstance(self.stages, tuple) or not all(isinstance(s, str) for s in self.stages):
            raise ValueError(f"stages: must be a tuple of str, got {self.stages!r}")
        if not isinstance(self.created_at, str):
            raise ValueError(f"created_at: must be an ISO-8601 str, got {self.created_at!r}")

    def with_stage(self, name: str) -> Manifest:
        """Returns a copy with ``name`` added to the completed stages (unchanged if already there).

        Args:
            name: The stage that just completed.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"name: must be a non-empty str, got {name!r}")
        if name in self.stages:
            return self
        return dataclasses.replace(self, stages=(*self.stages, name))

    def to_dict(self) -> dict[str, Any]:
        """Returns the manifest as plain JSON-compatible data."""
        d = dataclasses.asdict(self)
        d["stages"] = list(self.stages)
        return d

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "manifest") -> Manifest:
        """Builds a manifest from :meth:`to_dict` output.

        Args:
            d: The decoded JSON object.
            source: What to call the data in error messages (e.g. the file path).

        Raises:
            SchemaVersionError: ``schema_version`` is newer than this code's ``SCHEMA_VERSION``.
            CorruptRunError: A field is missing or has the wrong type.
        """
        if not isinstance(d, dict):
            raise CorruptRunError(f"{source}: expected a JSON object, got {type(d).__name__}")
        version = d.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise CorruptRunError(f"{source}: schema_version must be an int, got {version!r}")
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{source}: schema_version {version} is newer than this store supports "
                f"({SCHEMA_VERSION}); upgrade the package to open this run"
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = [
            name
            for name, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in d]
        if missing:
            raise CorruptRunError(f"{source}: missing fields {missing}")
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise CorruptRunError(f"{source}: unknown fields {unknown}")
        kwargs = dict(d)
        if "stages" in kwargs and isinstance(kwargs["stages"], list):
            kwargs["stages"] = tuple(kwargs["stages"])
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise CorruptRunError(f"{source}: {e}") from e


def save_manifest(run_dir: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Writes ``manifest`` to ``run_dir/manifest.json`` atomically.

    Args:
        run_dir: The run directory; created if missing.
        manifest: The manifest to write.

    Returns:
        The path written.
    """
    if not isinstance(manifest, Manifest):
        raise TypeError(f"manifest: expected a Manifest, got {type(manifest).__name__}")
    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / MANIFEST_NAME
    atomic_write_json(path, manifest.to_dict())
    return path


def load_manifest(run_dir: str | os.PathLike[str]) -> Manifest:
    """Reads ``run_dir/manifest.json``.

    Args:
        run_dir: The run directory.

    Raises:
        RunNotFoundError: The directory or its manifest does not exist.
        CorruptRunError: The manifest is not valid JSON or lacks a field.
        SchemaVersionError: The run was written by a newer schema.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise RunNotFoundError(f"run_dir: no run directory at {str(root)!r}")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise RunNotFoundError(f"run_dir: {str(root)!r} has no {MANIFEST_NAME} (not a run directory?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptRunError(f"{path}: not valid JSON ({e})") from e
    return Manifest.from_dict(data, source=str(path))
