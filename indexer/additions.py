"""Which training examples of a Task a built run does not hold yet (`influence add RUN TASK`).

An example is identified by its content hash (`indexer.examples.example_hash`, stored per example in SQLite).
The run holds an example when a stored training example has its hash, or when the run's build indexed it (the
build's hashes, `arrays/train_strings_NNNNN.json`): an example deleted since the build stays deleted. An example
added by an update and deleted later is not remembered and would be added again.
"""

from __future__ import annotations

import json
from pathlib import Path

from store import OpenedRun

from .examples import example_hash
from .task import Task


def held_hashes(run: OpenedRun) -> set[str]:
    """The content hashes of the training examples the run holds or its build indexed."""
    hashes = {r.content_hash for r in run.metadata.get("train", run.train.ids.tolist())}
    chunk = 0
    while (path := run.paths.strings("train", chunk)).exists():
        hashes.update(json.loads(path.read_text())["hash"])
        chunk += 1
    return hashes


def new_train_positions(task: Task, run: str | Path) -> list[int]:
    """Positions in `task.train` of the examples the run does not hold (see the module docstring), in order;
    a content repeated in the dataset is added once."""
    with OpenedRun(run, fingerprint=task.fingerprint()) as opened:
        held = held_hashes(opened)
    out = []
    for i in range(len(task.train)):
        h = example_hash(task.train[i][0])
        if h not in held:
            held.add(h)
            out.append(i)
    return out
