"""Reviewers' decisions on training examples (relabel / keep / remove), in the run's SQLite.

Every decision is a new row of the ``decisions`` table: the history is kept, and the latest decision per
example (the highest ``seq``) is the one in force. Inserts are single-row transactions on a WAL database with a
busy timeout, so concurrent reviewers (threads of one service, or several processes) never lose a decision.
The table is created on the first decision: a run built before it existed opens as usual and has no
decisions. Callers get frozen :class:`DecisionRecord` values, never ORM rows.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from store.atomic import atomic_path
from store.errors import UnknownExampleError
from store.metadata import EXAMPLES, MetadataStore, _as_int

DECISIONS = ("relabel", "keep", "remove")
EXPORT_COLUMNS = ("example_id", "decision", "label", "decided_at", "reviewer")
EXPORT_SUFFIXES = (".csv", ".parquet")
MAX_REVIEWER = 64

_meta = sa.MetaData()
DECISIONS_TABLE = sa.Table(
    "decisions",
    _meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("example_id", sa.BigInteger, nullable=False, index=True),
    sa.Column("decision", sa.String(8), nullable=False),
    sa.Column("label", sa.Integer, nullable=True),
    sa.Column("decided_at", sa.String(32), nullable=False),
    sa.Column("reviewer", sa.String(MAX_REVIEWER), nullable=True),
    sa.CheckConstraint("decision IN ('relabel', 'keep', 'remove')", name="ck_decisions_decision"),
    sa.CheckConstraint("(decision = 'relabel') = (label IS NOT NULL)", name="ck_decisions_label"),
    sqlite_autoincrement=True,
)


def _create_table(conn: sa.Connection) -> None:
    # IF NOT EXISTS: two reviewers' first decisions may race to create it
    conn.execute(sa.schema.CreateTable(DECISIONS_TABLE, if_not_exists=True))
    for index in DECISIONS_TABLE.indexes:
        conn.execute(sa.schema.CreateIndex(index, if_not_exists=True))


def check_decision(decision: Any, label: Any, n_classes: int | None = None) -> tuple[str, int | None]:
    """Validates a decision and its label; returns them normalised.

    Raises:
        ValueError: ``decision`` is not one of DECISIONS; ``relabel`` without a label or with one outside
            ``[0, n_classes)``; a label given with ``keep`` / ``remove``. The message names the argument.
    """
    if not isinstance(decision, str) or decision not in DECISIONS:
        raise ValueError(f"decision: must be one of {DECISIONS}, got {decision!r}")
    if decision != "relabel":
        if label is not None:
            raise ValueError(f"label: only a 'relabel' decision takes a label, got label={label!r} with {decision!r}")
        return decision, None
    if label is None:
        raise ValueError("label: a 'relabel' decision needs the new class, got None")
    value = _as_int(label, "label")
    if value < 0 or (n_classes is not None and value >= n_classes):
        bound = f"[0, {n_classes})" if n_classes is not None else ">= 0"
        raise ValueError(f"label: must be a class in {bound}, got {value!r}")
    return decision, value


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecisionRecord:
    """One reviewer's decision on a training example.

    Attributes:
        example_id: The training example.
        decision: ``"relabel"``, ``"keep"`` or ``"remove"``.
        label: The new class of a ``relabel``, else None.
        decided_at: When it was recorded, ISO 8601 in UTC (``2026-01-02T03:04:05.123456+00:00``).
        reviewer: Who recorded it (e.g. the name the service's caller gave), or None.
    """

    example_id: int
    decision: str
    label: int | None
    decided_at: str
    reviewer: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "example_id", _as_int(self.example_id, "example_id"))
        _, label = check_decision(self.decision, self.label)
        object.__setattr__(self, "label", label)
        if not isinstance(self.decided_at, str):
            raise ValueError(f"decided_at: must be an ISO 8601 str, got {self.decided_at!r}")
        if self.reviewer is not None and (not isinstance(self.reviewer, str) or len(self.reviewer) > MAX_REVIEWER):
            raise ValueError(f"reviewer: must be a str of at most {MAX_REVIEWER} characters, got {self.reviewer!r}")

    def to_dict(self) -> dict[str, Any]:
        """Returns the record as a JSON-compatible dict."""
        return dataclasses.asdict(self)


def save_decision(
    metadata: MetadataStore,
    example_id: Any,
    decision: Any,
    label: Any = None,
    *,
    n_classes: int | None = None,
    reviewer: str | None = None,
) -> DecisionRecord:
    """Records one decision on a stored training example, in one transaction; returns it.

    Args:
        metadata: The run's metadata store.
        example_id: A stored (not deleted) training example id.
        decision: ``"relabel"``, ``"keep"`` or ``"remove"``.
        label: The new class for ``relabel`` (in ``[0, n_classes)``); None otherwise.
        n_classes: The run's number of classes, to check ``label``.
        reviewer: Who decided (at most 64 characters), or None.

    Raises:
        ValueError: A bad decision, label, reviewer or id type (named in the message); nothing is written.
        UnknownExampleError: ``example_id`` is not a stored training example; nothing is written.
    """
    example_id = _as_int(example_id, "example_id")
    decision, label = check_decision(decision, label, n_classes)
    record = DecisionRecord(
        example_id=example_id,
        decision=decision,
        label=label,
        decided_at=dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"),
        reviewer=reviewer,
    )
    with metadata.session_scope() as session:
        conn = session.connection()
        stored = conn.execute(
            sa.select(EXAMPLES.c.example_id).where(EXAMPLES.c.split == "train", EXAMPLES.c.example_id == example_id)
        ).first()
        if stored is None:
            raise UnknownExampleError("train", [example_id])
        _create_table(conn)
        conn.execute(sa.insert(DECISIONS_TABLE), [record.to_dict()])
    return record


def load_decisions(metadata: MetadataStore, *, history: bool = False) -> list[DecisionRecord]:
    """The decisions of a run: the latest per example, by example id (``history=True``: every one, oldest first).

    Decisions on examples deleted since are left out (their ids are tombstoned). A run without the table
    (built before decisions existed, or never reviewed) has none.
    """
    t = DECISIONS_TABLE
    columns = [t.c[name] for name in EXPORT_COLUMNS]
    with metadata.session_scope() as session:
        conn = session.connection()
        if not sa.inspect(conn).has_table("decisions"):
            return []
        live = sa.select(EXAMPLES.c.example_id).where(EXAMPLES.c.split == "train")
        stmt = sa.select(*columns).where(t.c.example_id.in_(live))
        if history:
            stmt = stmt.order_by(t.c.seq)
        else:
            latest = sa.select(sa.func.max(t.c.seq)).group_by(t.c.example_id)
            stmt = stmt.where(t.c.seq.in_(latest)).order_by(t.c.example_id)
        rows = conn.execute(stmt).all()
    return [DecisionRecord(**dict(zip(EXPORT_COLUMNS, row, strict=True))) for row in rows]


def save_decisions_table(records: Sequence[DecisionRecord], path: str | os.PathLike[str]) -> Path:
    """Writes decisions to ``path`` as CSV or Parquet (by its suffix), atomically; returns the path.

    Columns: ``example_id`` (int64), ``decision`` (str), ``label`` (int64, empty unless relabel),
    ``decided_at`` (ISO 8601 str), ``reviewer`` (str or empty).

    Raises:
        ValueError: The suffix is not ``.csv`` or ``.parquet``.
    """
    path = Path(path)
    if path.suffix.lower() not in EXPORT_SUFFIXES:
        raise ValueError(f"out: must end with one of {EXPORT_SUFFIXES}, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        write_decisions(records, tmp, fmt=path.suffix.lower().lstrip("."))
    return path


def write_decisions(records: Sequence[DecisionRecord], sink: Any, *, fmt: str) -> None:
    """Writes decisions to a file path or a binary buffer as ``fmt`` (``"csv"`` or ``"parquet"``)."""
    import pyarrow as pa

    if fmt not in ("csv", "parquet"):
        raise ValueError(f"format: must be 'csv' or 'parquet', got {fmt!r}")
    schema = pa.schema(
        [
            ("example_id", pa.int64()),
            ("decision", pa.string()),
            ("label", pa.int64()),
            ("decided_at", pa.string()),
            ("reviewer", pa.string()),
        ]
    )
    table = pa.Table.from_pylist([r.to_dict() for r in records], schema=schema)
    if fmt == "csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, sink)
    else:
        import pyarrow.parquet as pq

        pq.write_table(table, sink)
