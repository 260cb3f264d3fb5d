"""The files of a bulk dump (`api.dump`): its outputs, its resumable work directory, and every write to them.

A dump to ``<path>`` (``.parquet``) writes, when complete::

    <path>                          top-k proponents and opponents per query (TOPK_SCHEMA), one row per kept pair
    <stem>.aggregates.parquet       per-training-example sums and counts over the queries (AGGREGATE_SCHEMA)
    <stem>.dense.npy                every score [n_queries, n_train] float32 (dense=True)
    <stem>.dense-ids.npz            test_ids [n_queries] and train_ids [n_train] of its rows and columns

and, while it runs, its work directory ``<path>.partial/``::

    dump.json                       the dump's fingerprint and arguments (a resume with others starts over)
    state.npz                       done_blocks and the aggregate accumulators: the commit point of each block
    part-NNNNNN.parquet             the top-k rows of block NNNNNN
    dense.npy                       the dense scores being filled (a memmap), moved out when complete

`DumpWork` makes each write durable in the order that makes a killed dump resumable: a block's part file and
dense rows first, then its state (atomically), so the state never counts a block whose rows are not on disk.
The final files appear atomically, the top-k file last: its appearance means the dump is complete.

The dump jobs of the HTTP service (`api.jobs`) keep their records in the run directory, ``dumps/<job>.json``
(`store.layout.RunPaths.dump_job`), written by `save_dump_job`; their dumps go to ``dumps/<job>.parquet``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from store.atomic import atomic_path, atomic_write_json
from store.layout import RunPaths

#: columns of the top-k file, in order
TOPK_COLUMNS = ("test_id", "kind", "rank", "example_id", "score", "label", "method")
#: columns of the aggregates file, in order; every column after "label" is an accumulator over the queries
AGGREGATE_COLUMNS = (
    "example_id",
    "label",
    "sum_positive",
    "sum_negative",
    "n_top_proponent",
    "n_top_opponent",
    "sum_positive_misclassified",
    "sum_negative_misclassified",
    "n_top_proponent_misclassified",
    "n_top_opponent_misclassified",
)
ACCUMULATORS = AGGREGATE_COLUMNS[2:]

SPEC_NAME = "dump.json"
STATE_NAME = "state.npz"
DENSE_NAME = "dense.npy"


def dump_paths(path: str | os.PathLike[str]) -> dict[str, Path]:
    """Where a dump to `path` writes: the top-k file, aggregates, dense memmap and ids, and the work dir."""
    path = Path(path)
    stem = path.with_suffix("")
    return {
        "topk": path,
        "aggregates": Path(f"{stem}.aggregates.parquet"),
        "dense": Path(f"{stem}.dense.npy"),
        "dense_ids": Path(f"{stem}.dense-ids.npz"),
        "work": Path(f"{path}.partial"),
    }


def topk_schema() -> Any:
    """The pyarrow schema of the top-k file (TOPK_COLUMNS)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("test_id", pa.int64()),
            ("kind", pa.string()),
            ("rank", pa.int32()),
            ("example_id", pa.int64()),
            ("score", pa.float32()),
            ("label", pa.int64()),
            ("method", pa.string()),
        ]
    )


def aggregate_schema() -> Any:
    """The pyarrow schema of the aggregates file (AGGREGATE_COLUMNS)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("example_id", pa.int64()),
            ("label", pa.int64()),
            ("sum_positive", pa.float64()),
            ("sum_negative", pa.float64()),
            ("n_top_proponent", pa.int64()),
            ("n_top_opponent", pa.int64()),
            ("sum_positive_misclassified", pa.float64()),
            ("sum_negative_misclassified", pa.float64()),
            ("n_top_proponent_misclassified", pa.int64()),
            ("n_top_opponent_misclassified", pa.int64()),
        ]
    )


def new_accumulators(n_train: int) -> dict[str, np.ndarray]:
    """Zeroed aggregate accumulators [n_train]: int64 counts (``n_*``), float64 sums."""
    return {name: np.zeros(n_train, np.int64 if name.startswith("n_") else np.float64) for name in ACCUMULATORS}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DumpWork:
    """The work directory ``<path>.partial/`` of one dump to `path`, and the dump's final files.

    Args:
        path: The dump's top-k ``.parquet`` file; its companions and work directory are named by `dump_paths`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.paths = dump_paths(path)
        self.dir = self.paths["work"]

    @property
    def dense_path(self) -> Path:
        return self.dir / DENSE_NAME

    def part(self, block: int) -> Path:
        """``part-NNNNNN.parquet``: the top-k rows of one block."""
        return self.dir / f"part-{block:06d}.parquet"

    # ------------------------------------------------------------------------------------------- state
    def resume(self, fingerprint: str, n_train: int) -> tuple[int, dict[str, np.ndarray]] | None:
        """(finished blocks, accumulators) committed by a dump with this fingerprint, or None to start over."""
        if not self.dir.is_dir():
            return None
        try:
            spec = json.loads((self.dir / SPEC_NAME).read_text())
            if spec.get("fingerprint") != fingerprint:
                return None
            with np.load(self.dir / STATE_NAME, allow_pickle=False) as z:
                state = {name: np.array(z[name]) for name in z.files}
        except (OSError, ValueError, KeyError):
            return None
        done = int(state.pop("done_blocks"))
        if any(state.get(name, np.zeros(0)).shape != (n_train,) for name in ACCUMULATORS):
            return None
        return done, state

    def start(self, spec: dict[str, Any]) -> None:
        """Starts over: removes any previous work directory, creates it and records `spec` (with its
        ``fingerprint``) in ``dump.json``."""
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir()
        atomic_write_json(self.dir / SPEC_NAME, spec)

    def save_state(self, done: int, accumulators: dict[str, np.ndarray]) -> None:
        """Commits `done` finished blocks with their accumulators (atomically: the commit point of a block)."""
        with atomic_path(self.dir / STATE_NAME) as tmp, open(tmp, "wb") as f:
            np.savez(f, done_blocks=np.int64(done), **accumulators)  # type: ignore[arg-type]  # numpy stubs

    # ------------------------------------------------------------------------------------------- blocks
    def open_dense(self, shape: tuple[int, int], *, fresh: bool) -> np.memmap:
        """The dense scores memmap ``dense.npy`` [n_queries, n_train] float32: a new one when `fresh`, else the
        one being filled (open for writing)."""
        if fresh:
            return np.lib.format.open_memmap(self.dense_path, mode="w+", dtype=np.float32, shape=shape)
        return np.load(self.dense_path, mmap_mode="r+")

    def write_block(self, block: int, columns: dict[str, Any], dense: np.memmap | None = None) -> None:
        """Makes one block durable: its top-k rows as ``part-NNNNNN.parquet`` (atomically) and, with `dense`, the
        memmap's rows flushed and fsynced. Its state is committed afterwards by `save_state`."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        with atomic_path(self.part(block)) as tmp:
            pq.write_table(pa.table(columns, schema=topk_schema()), tmp)
        if dense is not None:
            dense.flush()
            _fsync(self.dense_path)

    # ------------------------------------------------------------------------------------------- finish
    def finish(
        self,
        n_blocks: int,
        *,
        dense_ids: tuple[np.ndarray, np.ndarray] | None = None,
        aggregates: dict[str, np.ndarray] | None = None,
        targets: str | None = None,
    ) -> Path:
        """Writes the final files and removes the work directory; returns the top-k path.

        Companions first, the top-k file (the concatenated part files) last, each atomically.

        Args:
            n_blocks: Blocks of the dump (every part file is on disk).
            dense_ids: (test_ids, train_ids) when the dump is dense: ``dense.npy`` moves to ``<stem>.dense.npy``.
            aggregates: The AGGREGATE_COLUMNS of ``<stem>.aggregates.parquet``, when written.
            targets: What the queries were scored at (None: the predictions; "label"), recorded in the
                aggregates file's schema metadata so that `read_aggregates` picks the harmful column.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = self.paths
        if dense_ids is not None:
            test_ids, train_ids = dense_ids
            with atomic_path(out["dense_ids"]) as tmp, open(tmp, "wb") as f:
                np.savez(f, test_ids=test_ids, train_ids=train_ids)
            os.replace(self.dense_path, out["dense"])
        if aggregates is not None:
            schema = aggregate_schema().with_metadata({"targets": targets or "prediction"})
            with atomic_path(out["aggregates"]) as tmp:
                pq.write_table(pa.table(aggregates, schema=schema), tmp)
        schema = topk_schema()
        with atomic_path(out["topk"]) as tmp, pq.ParquetWriter(tmp, schema) as writer:
            for b in range(n_blocks):
                writer.write_table(pq.read_table(self.part(b), schema=schema))
        shutil.rmtree(self.dir, ignore_errors=True)
        return out["topk"]


def harmful_column(targets: str | None) -> str:
    """The aggregate that ranks "the training examples that hurt the most test predictions" in a dump scored at
    `targets`.

    A misclassified query predicts a wrong class. Scored at its prediction (`targets=None`), a positive score
    supports that wrong prediction, so the harmful examples are its top proponents; scored at its true label
    (`targets="label"`), they oppose the correct class: its top opponents.
    """
    return "n_top_opponent_misclassified" if targets == "label" else "n_top_proponent_misclassified"


def read_aggregates(path: str | os.PathLike[str], *, by: str | None = None, top: int | None = None):
    """Reads `<stem>.aggregates.parquet` of a dump at `path` as a pyarrow Table sorted by `by`, largest first.

    Args:
        path: The dump's top-k `.parquet` path (or the aggregates file itself).
        by: An aggregate column; None = the harmful list (`harmful_column` of the dump's targets, as recorded
            in the file: `n_top_proponent_misclassified` for a dump at the predictions). `sum_negative*` columns
            sort ascending (largest magnitude first), the others descending; ties by example id.
        top: Keep only this many rows.
    """
    import pyarrow.parquet as pq

    p = Path(path)
    agg = p if p.name.endswith(".aggregates.parquet") else dump_paths(p)["aggregates"]
    if by is not None and by not in AGGREGATE_COLUMNS:
        raise ValueError(f"by must be one of {AGGREGATE_COLUMNS} or None (the harmful list), got {by!r}")
    table = pq.read_table(agg)
    if by is None:
        targets = (table.schema.metadata or {}).get(b"targets", b"prediction").decode()
        by = harmful_column("label" if targets == "label" else None)
    if by not in table.column_names:
        raise ValueError(f"by: {agg} has no column {by!r} (a dump from an older version): re-run the dump")
    order = "ascending" if by.startswith("sum_negative") else "descending"
    table = table.sort_by([(by, order), ("example_id", "ascending")])
    return table if top is None else table.slice(0, top)


# ----------------------------------------------------------------------------------- dump jobs of a run
def save_dump_job(paths: RunPaths, job: str, record: dict[str, Any]) -> Path:
    """Writes the record of dump job `job` to ``<run>/dumps/<job>.json`` atomically (creating ``dumps/``)."""
    target = paths.dump_job(job, ".json")
    paths.dumps_dir.mkdir(exist_ok=True)
    atomic_write_json(target, record)
    return target


def load_dump_jobs(paths: RunPaths) -> dict[str, dict[str, Any]]:
    """Every readable dump job record under ``<run>/dumps/``, job id -> record, in job-id order.

    Files whose name is not a job id or whose content is not a JSON object are skipped (never served).
    """
    out: dict[str, dict[str, Any]] = {}
    if not paths.dumps_dir.is_dir():
        return out
    for path in sorted(paths.dumps_dir.glob("*.json")):
        try:
            target = paths.dump_job(path.stem, ".json")
        except ValueError:
            continue
        try:
            record = json.loads(target.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            out[path.stem] = record
    return out
