"""Reviewers' decisions on training examples: the Python side of data cleaning.

A person reviewing the label-noise job's suspects records, per training example, ``relabel`` (to a class),
``keep`` or ``remove``. Decisions live in the run's SQLite (`store.decisions`): every one is kept with its time
and reviewer, the latest per example is in force. `Index` gets `decide` and `decisions` from `Decisions`;
the HTTP routes (`api.routes_decisions`) and the CLI (`influence decisions`) call the same functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from store import DecisionRecord, load_decisions, save_decision, save_decisions_table

if TYPE_CHECKING:
    from store import OpenedRun

__all__ = ["Decisions", "cleaned_ids", "export_decisions"]


class Decisions:
    """The decision methods of `api.Index` (a mixin: it reads the index's `run`)."""

    run: OpenedRun

    def decide(
        self, example_id: int, decision: str, label: int | None = None, *, reviewer: str | None = None
    ) -> DecisionRecord:
        """Records a reviewer's decision on a training example; the latest decision per example wins.

        Args:
            example_id: A stored training example id.
            decision: ``"relabel"`` (needs ``label``), ``"keep"`` or ``"remove"``.
            label: The new class of a ``relabel``, in ``[0, n_classes)``; None otherwise.
            reviewer: Who decided (at most 64 characters), stored with the decision.

        Returns:
            The stored decision, with its time (UTC).

        Raises:
            UnknownExampleError: ``example_id`` is not a stored training example.
            ValueError: A bad ``decision``, ``label`` or ``reviewer`` (the message names it).
        """
        return save_decision(
            self.run.metadata, example_id, decision, label, n_classes=self.run.n_classes, reviewer=reviewer
        )

    def decisions(self, *, history: bool = False) -> list[DecisionRecord]:
        """Reviewers' decisions on suspects: the one in force per example, by example id.

        ``history=True`` gives every decision ever recorded, oldest first.
        """
        return load_decisions(self.run.metadata, history=history)


def export_decisions(index: Any, out: str | Path) -> Path:
    """Writes the decisions in force to ``out`` (``.csv`` or ``.parquet``); returns the path."""
    return save_decisions_table(index.decisions(), out)


def cleaned_ids(index: Any) -> tuple[list[int], dict[int, int]]:
    """The training set after the decisions: ids to keep (``remove`` dropped) and the new labels of relabels.

    Returns:
        ``(ids, relabels)``: stored training ids without the removed ones, ascending, and
        ``{example_id: new label}``.
    """
    latest = index.decisions()
    removed = {d.example_id for d in latest if d.decision == "remove"}
    ids = [int(i) for i in index.train_ids if int(i) not in removed]
    return ids, {d.example_id: int(d.label) for d in latest if d.decision == "relabel"}
