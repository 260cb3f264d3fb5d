"""The label-noise job's signals per training example, in the run's SQLite, beside the suspect scores.

Each run of the job replaces the ``noise_signals`` table's rows: one per training example, its signals as a
JSON object ``{name: value}`` (a non-finite value is stored as null). The table is created by the first job
that stores signals: a run whose job ran before it existed has no stored signals, and reads back ``{}``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import sqlalchemy as sa

from store.metadata import MetadataStore, _as_int

_meta = sa.MetaData()
SIGNALS_TABLE = sa.Table(
    "noise_signals",
    _meta,
    sa.Column("example_id", sa.BigInteger, primary_key=True),
    sa.Column("signals", sa.Text, nullable=False),
)


def save_noise_signals(metadata: MetadataStore, ids: Sequence[int], signals: Mapping[str, Any]) -> None:
    """Replaces the stored signals with ``signals`` (name -> values ``[len(ids)]``), in one transaction.

    Raises:
        ValueError: a signal whose length differs from ``ids`` (named in the message); nothing is written.
    """
    id_list = [_as_int(i, "ids") for i in np.asarray(ids).tolist()]
    columns = {str(k): np.asarray(v, np.float64).reshape(-1) for k, v in signals.items()}
    for name, values in columns.items():
        if len(values) != len(id_list):
            raise ValueError(f"signals: {name!r} has {len(values)} values for {len(id_list)} ids")
    rows = [
        {
            "example_id": i,
            "signals": json.dumps(
                {k: (float(v[j]) if math.isfinite(v[j]) else None) for k, v in columns.items()}, allow_nan=False
            ),
        }
        for j, i in enumerate(id_list)
    ]
    with metadata.session_scope() as session:
        conn = session.connection()
        conn.execute(sa.schema.CreateTable(SIGNALS_TABLE, if_not_exists=True))
        conn.execute(sa.delete(SIGNALS_TABLE))
        if rows:
            conn.execute(sa.insert(SIGNALS_TABLE), rows)


def load_noise_signals(metadata: MetadataStore, ids: Sequence[int]) -> dict[int, dict[str, float | None]]:
    """The stored signals of ``ids``: example id -> ``{name: value}``; ``{}`` for an example without any
    (a run whose label-noise job ran before signals were stored, or never ran)."""
    id_list = [_as_int(i, "ids") for i in ids]
    found: dict[int, dict[str, float | None]] = {i: {} for i in id_list}
    if not id_list:
        return found
    with metadata.session_scope() as session:
        conn = session.connection()
        if not sa.inspect(conn).has_table("noise_signals"):
            return found
        for start in range(0, len(id_list), 500):
            chunk = id_list[start : start + 500]
            stmt = sa.select(SIGNALS_TABLE).where(SIGNALS_TABLE.c.example_id.in_(chunk))
            for example_id, text in conn.execute(stmt).all():
                found[int(example_id)] = json.loads(text)
    return found
