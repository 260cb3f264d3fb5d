"""What a resumed build resumes: the stages its manifest records and how far the next one got.

Read before `indexer.build_run` starts, so that `influence index` says where it resumes instead of working
silently for a minute. Chunked arrays (`store.ChunkedArray`) keep a done mask per chunk; the first stage the
manifest does not record is reported with its written chunks and the first example still to do.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from store import ARRAYS, RunPaths, load_manifest

from .stages import STAGES


def _chunk_progress(path: Path) -> tuple[int, int, int] | None:
    """(chunks done, chunks, first row still to do) of a chunked array at `path`, None when it has none."""
    done_file, meta_file = path.with_suffix(".done.npy"), path.with_suffix(".meta.json")
    if not (done_file.is_file() and meta_file.is_file()):
        return None
    try:
        meta = json.loads(meta_file.read_text())
        done = np.load(done_file, mmap_mode="r")
    except (OSError, ValueError):
        return None
    missing = np.flatnonzero(~np.asarray(done))
    first = int(missing[0]) * int(meta["chunk_rows"]) if missing.size else int(meta["shape"][0])
    return int(done.sum()), len(done), first


def resume_status(out: str | Path) -> str | None:
    """One line on what a build of `out` resumes; None when there is nothing to resume (a new run)."""
    paths = RunPaths(Path(out))
    if not paths.manifest.is_file():
        return None
    stages = load_manifest(paths.root).stages
    if "complete" in stages:
        return f"{paths.root} is complete: nothing to build (stages {', '.join(stages[:-1])})"
    done = [s.name for s in STAGES if s.name in stages]
    todo = [s for s in STAGES if s.name not in stages]
    line = f"resuming {paths.root}: done {', '.join(done) or 'nothing yet'}"
    if todo:
        nxt = todo[0]
        parts = []
        for name in nxt.writes:
            if name in ARRAYS and (progress := _chunk_progress(paths.array(name))) is not None:
                d, n, first = progress
                parts.append(f"{name} {d} of {n} chunks, from row {first}")
        line += f"; next {nxt.name}" + (f" ({'; '.join(dict.fromkeys(parts))})" if parts else "")
    return line
