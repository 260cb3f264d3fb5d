"""Per-example metadata in SQLite through the SQLAlchemy 2.0 ORM.

One row per (split, example_id): label, prediction, loss, margin, content hash and a text preview, plus the
label-noise job's ``suspect_score`` and ``suggested_label``. The database runs in WAL mode so the HTTP
service can read while a job writes. Callers get frozen :class:`ExampleRecord` values, never ORM rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from store.errors import (
    CorruptRunError,
    RunNotFoundError,
    SchemaVersionError,
    StoreError,
    UnknownExampleError,
)

SPLITS = ("train", "test")
METADATA_SCHEMA_VERSION = 1
NUMERIC_COLUMNS = {"label": np.int64, "prediction": np.int64, "loss": np.float64, "margin": np.float64}

# SQLite's default limit on bound variables is 999 in old builds (32766 since 3.32); stay well under both.
_IN_CHUNK = 500
_INSERT_BATCH = 10_000


def check_split(split: Any, name: str = "split") -> str:
    """Returns ``split`` if it is ``"train"`` or ``"test"``, else raises ValueError naming the argument."""
    if split not in SPLITS:
        raise ValueError(f"{name}: must be one of {SPLITS}, got {split!r}")
    return split


class Base(DeclarativeBase):
    """Declarative base of the metadata tables."""


class ExampleRow(Base):
    """ORM row of the ``examples`` table (internal: callers get :class:`ExampleRecord`)."""

    __tablename__ = "examples"
    __table_args__ = (
        sa.CheckConstraint("split IN ('train', 'test')", name="ck_examples_split"),
        sa.Index("ix_examples_split_loss", "split", "loss"),
        sa.Index("ix_examples_split_suspect", "split", "suspect_score"),
    )

    split: Mapped[str] = mapped_column(sa.String(8), primary_key=True)
    example_id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, autoincrement=False)
    label: Mapped[int] = mapped_column(sa.Integer)
    prediction: Mapped[int] = mapped_column(sa.Integer)
    loss: Mapped[float] = mapped_column(sa.Float)
    margin: Mapped[float] = mapped_column(sa.Float)
    content_hash: Mapped[str] = mapped_column(sa.String(64))
    preview: Mapped[str] = mapped_column(sa.Text)
    suspect_score: Mapped[float | None] = mapped_column(sa.Float, default=None)
    suggested_label: Mapped[int | None] = mapped_column(sa.Integer, default=None)


EXAMPLES = cast(sa.Table, ExampleRow.__table__)


class StoreInfoRow(Base):
    """Key/value facts about the database itself (its schema version)."""

    __tablename__ = "store_info"

    key: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    value: Mapped[str] = mapped_column(sa.Text)


class TombstoneRow(Base):
    """A deleted example: its id is retired (never reused) and it never appears in results again.

    The table is created on the first deletion, so databases written before it existed stay readable.
    """

    __tablename__ = "tombstones"

    split: Mapped[str] = mapped_column(sa.String(8), primary_key=True)
    example_id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, autoincrement=False)
    deleted_at: Mapped[str] = mapped_column(sa.String(32))


TOMBSTONES = cast(sa.Table, TombstoneRow.__table__)


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool | np.bool_):
        raise ValueError(f"{name}: must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name}: must be an int, got {value!r}") from None


def _as_float(value: Any, name: str, *, allow_inf: bool = True) -> float:
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name}: must be a float, got {value!r}")
    out = float(value)
    if math.isnan(out) or (not allow_inf and math.isinf(out)):
        raise ValueError(f"{name}: must be {'finite' if not allow_inf else 'a number, not NaN'}, got {out!r}")
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExampleRecord:
    """Stored metadata of one example.

    Numpy scalars are converted to Python ``int`` / ``float`` so records compare and serialise plainly.

    Attributes:
        split: ``"train"`` or ``"test"``.
        example_id: Non-negative id; equals the FAISS id for training examples.
        label: The stored (possibly noisy) label.
        prediction: The model's predicted class.
        loss: The model's loss at ``label`` (may be +inf, never NaN).
        margin: Logit of ``label`` minus the largest other logit.
        content_hash: Hash of the example's content (see ``store.run.content_hash``).
        preview: Short human-readable preview of the input.
        suspect_score: Label-noise score (higher is more suspicious), once the job has run.
        suggested_label: The label the label-noise job suggests instead.
    """

    split: str
    example_id: int
    label: int
    prediction: int
    loss: float
    margin: float
    content_hash: str
    preview: str
    suspect_score: float | None = None
    suggested_label: int | None = None

    def __post_init__(self) -> None:
        check_split(self.split)
        set_ = object.__setattr__
        example_id = _as_int(self.example_id, "example_id")
        if example_id < 0:
            raise ValueError(f"example_id: must be >= 0, got {example_id!r}")
        set_(self, "example_id", example_id)
        set_(self, "label", _as_int(self.label, "label"))
        set_(self, "prediction", _as_int(self.prediction, "prediction"))
        set_(self, "loss", _as_float(self.loss, "loss"))
        set_(self, "margin", _as_float(self.margin, "margin"))
        for name in ("content_hash", "preview"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: must be a str, got {getattr(self, name)!r}")
        if self.suspect_score is not None:
            set_(self, "suspect_score", _as_float(self.suspect_score, "suspect_score", allow_inf=False))
        if self.suggested_label is not None:
            set_(self, "suggested_label", _as_int(self.suggested_label, "suggested_label"))

    def to_dict(self) -> dict[str, Any]:
        """Returns the record as a JSON-compatible dict."""
        return dataclasses.asdict(self)


_FIELDS = tuple(f.name for f in dataclasses.fields(ExampleRecord))


def _to_record(row: Any) -> ExampleRecord:
    """Builds a record from an ORM row or a Core row with the record's field names."""
    return ExampleRecord(**{name: getattr(row, name) for name in _FIELDS})


def _chunks(values: Sequence[int], size: int = _IN_CHUNK) -> Iterator[list[int]]:
    for start in range(0, len(values), size):
        yield list(values[start : start + size])


def _as_id_list(ids: Any, name: str = "ids") -> list[int]:
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"{name}: must be a 1-D sequence of ints, got shape {arr.shape}")
    if arr.size == 0:
        return []
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: must contain ints, got dtype {arr.dtype}")
    return [int(i) for i in arr]


class MetadataStore:
    """The ``examples`` table of one run, in a SQLite file.

    Args:
        path: The SQLite file (``metadata.sqlite`` in a run directory).
        create: Create the file and tables if missing. With ``create=False`` a missing file raises
            RunNotFoundError and a database without the ``examples`` table raises CorruptRunError.

    Raises:
        RunNotFoundError: ``create=False`` and the file does not exist.
        CorruptRunError: The file is not a SQLite database, or lacks the table with ``create=False``.
        SchemaVersionError: The database was written by a newer schema.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise RunNotFoundError(f"path: no metadata database at {str(self.path)!r}")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._engine = sa.create_engine(f"sqlite:///{self.path}")
        event.listen(self._engine, "connect", _on_connect)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        try:
            self._init_schema(create=create)
        except BaseException:
            self._engine.dispose()
            raise

    def _init_schema(self, *, create: bool) -> None:
        try:
            with self._engine.begin() as conn:
                tables = set(sa.inspect(conn).get_table_names())
                if "examples" not in tables:
                    if not create:
                        raise CorruptRunError(f"{self.path}: not a run metadata database (no 'examples' table)")
                    Base.metadata.create_all(conn)
                    conn.execute(
                        sa.insert(cast(sa.Table, StoreInfoRow.__table__)),
                        [{"key": "schema_version", "value": str(METADATA_SCHEMA_VERSION)}],
                    )
                    return
                if "store_info" not in tables:
                    raise CorruptRunError(f"{self.path}: metadata database has no 'store_info' table")
                version = conn.execute(
                    sa.select(StoreInfoRow.value).where(StoreInfoRow.key == "schema_version")
                ).scalar_one_or_none()
        except (SQLAlchemyError, sqlite3.DatabaseError) as e:
            raise CorruptRunError(f"{self.path}: not a valid SQLite metadata database ({e})") from e
        try:
            stored = int(version) if version is not None else None
        except ValueError:
            stored = None
        if stored is None:
            raise CorruptRunError(f"{self.path}: metadata schema_version is missing or invalid: {version!r}")
        if stored > METADATA_SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{self.path}: metadata schema_version {stored} is newer than this store supports "
                f"({METADATA_SCHEMA_VERSION})"
            )

    def __enter__(self) -> MetadataStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MetadataStore({str(self.path)!r})"

    def close(self) -> None:
        """Closes every pooled connection. The store must not be used afterwards."""
        self._engine.dispose()

    @contextlib.contextmanager
    def session_scope(self) -> Iterator[Session]:
        """A session that commits on a clean exit and rolls back on any error.

        SQLAlchemy errors are translated into :class:`StoreError` here, and only here.

        Yields:
            The session; its transaction is already begun.
        """
        session = self._sessions()
        try:
            with session.begin():
                yield session
        except SQLAlchemyError as e:
            raise StoreError(f"{self.path}: database error: {e}") from e
        finally:
            session.close()

    def replace_split(self, split: str, records: Iterable[ExampleRecord]) -> int:
        """Replaces every row of ``split`` with ``records`` in one transaction.

        If anything fails (a bad record, an exception raised by the ``records`` iterator, a crash) the
        previous rows stay as they were, so re-running a build step is idempotent.

        Args:
            split: ``"train"`` or ``"test"``.
            records: The new rows; each record's ``split`` must equal ``split`` and ids must be unique.

        Returns:
            The number of rows written.
        """
        check_split(split)
        table = EXAMPLES
        # Compile insert() once and hand the driver plain tuples: SQLAlchemy's per-row parameter
        # processing would otherwise cost as much as SQLite itself (60k rows: ~0.5 s).
        compiled = sa.insert(table).compile(dialect=self._engine.dialect)
        columns = tuple(compiled.positiontup or ())
        if sorted(columns) != sorted(_FIELDS):
            raise StoreError(f"insert columns {columns} do not match ExampleRecord fields {_FIELDS}")
        sql = str(compiled)
        seen: set[int] = set()
        n = 0
        with self.session_scope() as session:
            conn = session.connection()
            conn.execute(sa.delete(table).where(table.c.split == split))
            batch: list[tuple[Any, ...]] = []
            for record in records:
                if not isinstance(record, ExampleRecord):
                    raise ValueError(f"records: expected ExampleRecord, got {type(record).__name__}")
                if record.split != split:
                    raise ValueError(
                        f"records: record {record.example_id} has split {record.split!r}, expected {split!r}"
                    )
                if record.example_id in seen:
                    raise ValueError(f"records: duplicate example_id {record.example_id} in split {split!r}")
                seen.add(record.example_id)
                batch.append(tuple(getattr(record, name) for name in columns))
                if len(batch) >= _INSERT_BATCH:
                    conn.exec_driver_sql(sql, batch)
                    n += len(batch)
                    batch = []
            if batch:
                conn.exec_driver_sql(sql, batch)
                n += len(batch)
        return n

    def append(self, split: str, records: Iterable[ExampleRecord]) -> int:
        """Inserts new rows into ``split`` in one transaction (incremental updates); returns how many.

        Raises:
            ValueError: A record of another split, a duplicate id, or an id already stored or tombstoned;
                nothing is written.
        """
        check_split(split)
        rows = list(records)
        for record in rows:
            if not isinstance(record, ExampleRecord):
                raise ValueError(f"records: expected ExampleRecord, got {type(record).__name__}")
            if record.split != split:
                raise ValueError(f"records: record {record.example_id} has split {record.split!r}, expected {split!r}")
        ids = [r.example_id for r in rows]
        if len(set(ids)) != len(ids):
            raise ValueError("records: duplicate example_id")
        with self.session_scope() as session:
            clash = sorted(self._existing(session, split, ids) | (set(self.tombstones(split)) & set(ids)))
            if clash:
                raise ValueError(f"records: example ids already used in split {split!r}: {clash[:10]}")
            if rows:
                session.connection().execute(sa.insert(EXAMPLES), [r.to_dict() for r in rows])
        return len(rows)

    def delete(self, split: str, ids: Sequence[int], *, deleted_at: str) -> int:
        """Deletes rows of ``split`` and tombstones their ids, in one transaction; returns how many.

        Raises:
            UnknownExampleError: Some ids are not stored (the message lists them); nothing is changed.
        """
        check_split(split)
        id_list = _as_id_list(ids)
        if len(set(id_list)) != len(id_list):
            raise ValueError("ids: must be unique")
        with self.session_scope() as session:
            found = self._existing(session, split, id_list)
            missing = [i for i in id_list if i not in found]
            if missing:
                raise UnknownExampleError(split, missing)
            conn = session.connection()
            TOMBSTONES.create(conn, checkfirst=True)
            for chunk in _chunks(id_list):
                conn.execute(sa.delete(EXAMPLES).where(EXAMPLES.c.split == split, EXAMPLES.c.example_id.in_(chunk)))
            if id_list:
                conn.execute(
                    sa.insert(TOMBSTONES),
                    [{"split": split, "example_id": i, "deleted_at": deleted_at} for i in id_list],
                )
        return len(id_list)

    def tombstones(self, split: str = "train") -> np.ndarray:
        """Returns the deleted (tombstoned) example ids of ``split``, ascending, int64."""
        check_split(split)
        with self.session_scope() as session:
            if not sa.inspect(session.connection()).has_table("tombstones"):
                return np.zeros(0, np.int64)
            stmt = sa.select(TOMBSTONES.c.example_id).where(TOMBSTONES.c.split == split)
            values = sorted(session.scalars(stmt).all())
        return np.asarray(values, dtype=np.int64).reshape(-1)

    def _fetch(self, session: Session, split: str, ids: Sequence[int]) -> dict[int, ExampleRecord]:
        table = EXAMPLES
        columns = [table.c[name] for name in _FIELDS]
        found: dict[int, ExampleRecord] = {}
        for chunk in _chunks(sorted(set(ids))):
            stmt = sa.select(*columns).where(table.c.split == split, table.c.example_id.in_(chunk))
            for row in session.execute(stmt):
                record = ExampleRecord(**dict(zip(_FIELDS, row, strict=True)))
                found[record.example_id] = record
        return found

    def get(self, split: str, ids: Sequence[int]) -> list[ExampleRecord]:
        """Returns the records of ``ids`` in the order asked (repeats allowed).

        Args:
            split: ``"train"`` or ``"test"``.
            ids: Example ids (a list or a 1-D integer array).

        Raises:
            UnknownExampleError: Some ids are not stored; the message lists them.
        """
        check_split(split)
        id_list = _as_id_list(ids)
        with self.session_scope() as session:
            found = self._fetch(session, split, id_list)
        missing = [i for i in dict.fromkeys(id_list) if i not in found]
        if missing:
            raise UnknownExampleError(split, missing)
        return [found[i] for i in id_list]

    def count(self, split: str) -> int:
        """Returns the number of stored examples in ``split``."""
        check_split(split)
        with self.session_scope() as session:
            stmt = sa.select(sa.func.count()).select_from(ExampleRow).where(ExampleRow.split == split)
            return int(session.execute(stmt).scalar_one())

    def ids(self, split: str) -> np.ndarray:
        """Returns the example ids of ``split``, ascending, as int64 ``[n]``."""
        check_split(split)
        with self.session_scope() as session:
            stmt = sa.select(ExampleRow.example_id).where(ExampleRow.split == split).order_by(ExampleRow.example_id)
            values = session.scalars(stmt).all()
        return np.asarray(values, dtype=np.int64).reshape(-1)

    def column(self, split: str, name: str) -> np.ndarray:
        """Returns one numeric column of ``split`` ordered by example_id.

        Args:
            split: ``"train"`` or ``"test"``.
            name: ``"label"`` or ``"prediction"`` (int64), ``"loss"`` or ``"margin"`` (float64).
        """
        check_split(split)
        if name not in NUMERIC_COLUMNS:
            raise ValueError(f"name: must be one of {sorted(NUMERIC_COLUMNS)}, got {name!r}")
        col = getattr(ExampleRow, name)
        with self.session_scope() as session:
            stmt = sa.select(col).where(ExampleRow.split == split).order_by(ExampleRow.example_id)
            values = session.scalars(stmt).all()
        return np.asarray(values, dtype=NUMERIC_COLUMNS[name]).reshape(-1)

    def set_suspects(
        self,
        ids: Sequence[int],
        scores: Sequence[float],
        suggested_labels: Sequence[int] | None = None,
    ) -> None:
        """Stores label-noise scores for training examples, in one transaction.

        Rows not named in ``ids`` keep their previous values.

        Args:
            ids: Training example ids ``[n]``, unique.
            scores: Suspect scores ``[n]`` (finite; higher is more suspicious).
            suggested_labels: Suggested labels ``[n]``, or None to store none.

        Raises:
            UnknownExampleError: Some ids are not training examples; nothing is written.
        """
        id_list = _as_id_list(ids)
        if len(set(id_list)) != len(id_list):
            raise ValueError("ids: must be unique")
        score_arr = np.asarray(scores)
        if score_arr.shape != (len(id_list),) or not np.issubdtype(score_arr.dtype, np.number):
            raise ValueError(
                f"scores: must be numbers of shape ({len(id_list)},), got {score_arr.dtype} {score_arr.shape}"
            )
        if not np.all(np.isfinite(score_arr)):
            bad = [id_list[i] for i in np.flatnonzero(~np.isfinite(score_arr))[:10]]
            raise ValueError(f"scores: must be finite; NaN/inf for ids {bad}")
        labels: list[int | None]
        if suggested_labels is None:
            labels = [None] * len(id_list)
        else:
            labels = list(_as_id_list(suggested_labels, "suggested_labels"))
            if len(labels) != len(id_list):
                raise ValueError(f"suggested_labels: must have length {len(id_list)} like ids, got {len(labels)}")
        rows = [
            {"b_id": i, "b_score": float(s), "b_label": lab}
            for i, s, lab in zip(id_list, score_arr.tolist(), labels, strict=True)
        ]
        table = EXAMPLES
        stmt = (
            sa.update(table)
            .where(table.c.split == "train", table.c.example_id == sa.bindparam("b_id"))
            .values(suspect_score=sa.bindparam("b_score"), suggested_label=sa.bindparam("b_label"))
        )
        with self.session_scope() as session:
            found = self._existing(session, "train", id_list)
            missing = [i for i in id_list if i not in found]
            if missing:
                raise UnknownExampleError("train", missing)
            if rows:
                session.connection().execute(stmt, rows)

    def _existing(self, session: Session, split: str, ids: Sequence[int]) -> set[int]:
        found: set[int] = set()
        for chunk in _chunks(sorted(set(ids))):
            stmt = sa.select(ExampleRow.example_id).where(ExampleRow.split == split, ExampleRow.example_id.in_(chunk))
            found.update(session.scalars(stmt))
        return found

    def top_suspects(self, limit: int, offset: int = 0) -> list[ExampleRecord]:
        """Returns training examples with a suspect score, highest score first (ties: smaller id first).

        Args:
            limit: Maximum number of records (>= 0).
            offset: Number of records to skip (>= 0), for paging.
        """
        limit = _as_int(limit, "limit")
        offset = _as_int(offset, "offset")
        if limit < 0:
            raise ValueError(f"limit: must be >= 0, got {limit!r}")
        if offset < 0:
            raise ValueError(f"offset: must be >= 0, got {offset!r}")
        stmt = (
            sa.select(ExampleRow)
            .where(ExampleRow.split == "train", ExampleRow.suspect_score.is_not(None))
            .order_by(ExampleRow.suspect_score.desc(), ExampleRow.example_id)
            .limit(limit)
            .offset(offset)
        )
        with self.session_scope() as session:
            return [_to_record(row) for row in session.scalars(stmt)]


def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    """Sets per-connection pragmas: WAL for concurrent readers, foreign keys on, a busy timeout."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=5000")
    finally:
        cursor.close()
