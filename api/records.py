"""Frozen result records returned by the API (the HTTP schemas wrap these)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class Influencer:
    """One training example in an explanation. `score > 0` supports the prediction."""

    example_id: int
    score: float
    label: int
    prediction: int
    loss: float
    preview: str
    content_hash: str
    suspect_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class Explanation:
    """Why the model made one prediction: the training examples that pushed towards and against it.

    Attributes:
        test_id: the stored test example's id (None for a raw input).
        prediction: the model's predicted class.
        label: the query's true label when known.
        target: the class whose loss gradient was explained (the prediction unless a label was given).
        method: the scorer ("lissa", "exact", "representer", "grad-dot", "grad-cos").
        proponents: highest scores first (removing them would raise the query's loss).
        opponents: lowest scores first (removing them would lower it).
        diagnostics: solver diagnostics (e.g. LiSSA residual ||(H + dI)x - g|| / ||g||).
    """

    test_id: int | None
    prediction: int
    label: int | None
    target: int
    method: str
    proponents: tuple[Influencer, ...]
    opponents: tuple[Influencer, ...]
    probabilities: tuple[float, ...] = ()
    diagnostics: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["proponents"] = [p.to_dict() for p in self.proponents]
        out["opponents"] = [p.to_dict() for p in self.opponents]
        out["probabilities"] = list(self.probabilities)
        return out


@dataclass(frozen=True, kw_only=True)
class Suspect:
    """A training example whose label may be wrong; most suspicious first."""

    example_id: int
    score: float
    label: int
    suggested_label: int
    signals: dict[str, float]
    preview: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
