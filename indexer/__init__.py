"""Offline indexer (torch): Task, head translation to JAX, and the resumable build of a run directory."""

from .build import build_run
from .config import IndexConfig
from .errors import HeadMismatchError, IndexerError, TaskError, UnsupportedLayerError
from .task import Task
from .translate import TranslatedHead, split_sequential, translate_head

__all__ = [
    "HeadMismatchError",
    "IndexConfig",
    "IndexerError",
    "Task",
    "TaskError",
    "TranslatedHead",
    "UnsupportedLayerError",
    "build_run",
    "split_sequential",
    "translate_head",
]
