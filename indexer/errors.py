"""Errors of the indexer: each names the argument or layer at fault."""


class IndexerError(Exception):
    """Base class of indexer errors."""


class UnsupportedLayerError(IndexerError, ValueError):
    """A head layer has no JAX translation."""


class HeadMismatchError(IndexerError, ValueError):
    """The JAX head does not reproduce the torch head's logits."""


class TaskError(IndexerError, ValueError):
    """A Task argument is invalid (names the argument and the value)."""
