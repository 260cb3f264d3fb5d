"""The run directory: FAISS vector spaces, SQLite metadata, arrays and the manifest.

This is the only package that touches disk. It hands out frozen records and numpy arrays, never ORM rows or
FAISS's raw ``(D, I)``.
"""

from store.arrays import ChunkedArray, load_array, load_tensors, save_array, save_tensors
from store.atomic import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temps,
    save_figure,
)
from store.decisions import (
    DECISIONS,
    MAX_REVIEWER,
    DecisionRecord,
    load_decisions,
    save_decision,
    save_decisions_table,
    write_decisions,
)
from store.dumps import (
    AGGREGATE_COLUMNS,
    TOPK_COLUMNS,
    DumpWork,
    dump_paths,
    harmful_column,
    load_dump_jobs,
    new_accumulators,
    read_aggregates,
    save_dump_job,
)
from store.errors import (
    ConfigMismatchError,
    CorruptRunError,
    RunNotFoundError,
    SchemaVersionError,
    StoreError,
    UnknownExampleError,
)
from store.layout import ARRAYS, CACHES, FIGURES, SPACES, Artifact, RunPaths
from store.manifest import SCHEMA_VERSION, HeadRecord, Manifest, ProjectionRecord, load_manifest, save_manifest
from store.metadata import ExampleRecord, MetadataStore
from store.opened import OpenedRun, Split, head_tensors, params_from_tensors
from store.run import content_hash, remove_run, verify_run
from store.shards import ShardFiles
from store.signals import load_noise_signals, save_noise_signals
from store.vectors import (
    FaissVectorIndex,
    Hits,
    NumpyVectorIndex,
    VectorIndex,
    build_vector_index,
    compute_recall,
    search_both_signs,
)

__all__ = [
    "AGGREGATE_COLUMNS",
    "ARRAYS",
    "CACHES",
    "DECISIONS",
    "FIGURES",
    "MAX_REVIEWER",
    "SCHEMA_VERSION",
    "SPACES",
    "TOPK_COLUMNS",
    "Artifact",
    "ChunkedArray",
    "ConfigMismatchError",
    "CorruptRunError",
    "DecisionRecord",
    "DumpWork",
    "ExampleRecord",
    "FaissVectorIndex",
    "HeadRecord",
    "Hits",
    "Manifest",
    "MetadataStore",
    "NumpyVectorIndex",
    "OpenedRun",
    "ProjectionRecord",
    "RunNotFoundError",
    "RunPaths",
    "SchemaVersionError",
    "ShardFiles",
    "Split",
    "StoreError",
    "UnknownExampleError",
    "VectorIndex",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "build_vector_index",
    "compute_recall",
    "content_hash",
    "dump_paths",
    "harmful_column",
    "head_tensors",
    "load_array",
    "load_decisions",
    "load_dump_jobs",
    "load_manifest",
    "load_noise_signals",
    "load_tensors",
    "new_accumulators",
    "params_from_tensors",
    "read_aggregates",
    "remove_run",
    "remove_stale_temps",
    "save_array",
    "save_decision",
    "save_decisions_table",
    "save_dump_job",
    "save_figure",
    "save_manifest",
    "save_noise_signals",
    "save_tensors",
    "search_both_signs",
    "verify_run",
    "write_decisions",
]
