"""Bulk dumps as background jobs of the HTTP service, recorded on disk so that a restarted server knows them.

A job is named by its request: `job = sha256(canonical JSON of {test_ids, k, method})[:16]`, so the same
request twice is the same job, and a job's files are `<run>/dumps/<job>.json` (its status, written atomically),
`<run>/dumps/<job>.parquet` (top-k proponents and opponents per query) and `<job>.aggregates.parquet`
(per-training-example sums and counts), both written by `api.dump.dump`; the paths come from the run layout
(`store.layout.RunPaths.dump_job`), the writes go through `store.dumps`. Job ids are checked against
`^[0-9a-f]{16}$` before any path is built, so no request can name a file outside `<run>/dumps/`.

One worker thread runs the queue with its own opened run and `api.engine.Engine` (its own SQLite connection).
A server killed while a job runs leaves that job "running" on disk; the next server re-queues it, and the dump
with the same arguments resumes (or restarts) the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import queue
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from store import OpenedRun, RunPaths, dump_paths, load_dump_jobs, save_dump_job

from .dump import dump
from .engine import Engine

JobStatus = Literal["queued", "running", "done", "failed"]
JOB_ID = re.compile(r"^[0-9a-f]{16}$")
PARTS = ("topk", "aggregates")
#: queries per durable block of a job's dump (its resume and progress unit; fixed, so a restart resumes)
BLOCK_SIZE = 64


class UnknownJobError(KeyError):
    """No dump job with this id."""


class JobNotDoneError(ValueError):
    """The job's file is asked for before the job finished."""


class NoiseNotRunError(JobNotDoneError):
    """The label-noise job's suspects are asked for before the job has run on this run."""


class _Stop(Exception):
    """Raised from the progress callback when the server shuts down mid-dump (the job resumes next time)."""


def job_id_of(test_ids: Sequence[int] | None, k: int, method: str) -> str:
    """The job id of a dump request: the first 16 hex digits of the SHA-256 of its canonical JSON."""
    canon = json.dumps({"test_ids": None if test_ids is None else [int(v) for v in test_ids], "k": k, "method": method})
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def check_job_id(job: str) -> str:
    if not isinstance(job, str) or not JOB_ID.match(job):
        raise ValueError(f"job must be 16 lowercase hex digits, got {job!r}")
    return job


@dataclasses.dataclass(frozen=True, kw_only=True)
class DumpJob:
    """The on-disk record of one dump job."""

    job: str
    status: JobStatus
    test_ids: list[int] | None
    k: int
    method: str
    done: int = 0
    total: int = 0
    error: str | None = None
    created: float = 0.0
    finished: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class DumpJobs:
    """The queue of dump jobs of one run directory."""

    def __init__(self, run: str | Path, *, n_test: int) -> None:
        self.run = Path(run)
        self.paths = RunPaths(self.run)
        self.n_test = n_test
        self._jobs: dict[str, DumpJob] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._engine: Engine | None = None
        self._recover()

    # ------------------------------------------------------------------------------------------ records
    def record_path(self, job: str) -> Path:
        return self.paths.dump_job(check_job_id(job), ".json")

    def file_path(self, job: str, part: str = "topk") -> Path:
        """`part` is "topk" (the dump) or "aggregates" (per-training-example sums and counts)."""
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        return dump_paths(self.paths.dump_job(check_job_id(job), ".parquet"))[part]

    def _save(self, rec: DumpJob) -> None:
        with self._lock:
            self._jobs[rec.job] = rec
        save_dump_job(self.paths, rec.job, rec.to_dict())

    def _recover(self) -> None:
        """Reads the job records of a previous server: finished ones are kept, unfinished ones re-queued."""
        for record in load_dump_jobs(self.paths).values():
            try:
                rec = DumpJob(**record)
            except (ValueError, TypeError):
                continue  # not one of ours; never served
            if rec.status == "done" and not all(self.file_path(rec.job, p).is_file() for p in PARTS):
                rec = dataclasses.replace(rec, status="queued", done=0, finished=None)
            self._jobs[rec.job] = rec
            if rec.status in ("queued", "running"):
                self._queue.put(rec.job)

    # ------------------------------------------------------------------------------------------ public
    def submit(self, test_ids: Sequence[int] | None, k: int, method: str) -> tuple[DumpJob, bool]:
        """Queues a dump (ids already validated by the caller). Returns (job, created); a finished or
        running job with the same request is returned as it is, a failed one is retried."""
        job = job_id_of(test_ids, k, method)
        with self._lock:
            old = self._jobs.get(job)
        if old is not None and old.status != "failed":
            return old, False
        total = self.n_test if test_ids is None else len(test_ids)
        rec = DumpJob(
            job=job,
            status="queued",
            test_ids=None if test_ids is None else [int(v) for v in test_ids],
            k=k,
            method=method,
            total=total,
            created=time.time(),
        )
        self._save(rec)
        self._queue.put(job)
        self.start()
        return rec, True

    def get(self, job: str) -> DumpJob:
        check_job_id(job)
        with self._lock:
            rec = self._jobs.get(job)
        if rec is None:
            raise UnknownJobError(f"unknown dump job {job!r}")
        return rec

    def all_jobs(self) -> list[DumpJob]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda r: r.created)

    def file(self, job: str, part: str = "topk") -> Path:
        rec = self.get(job)
        if rec.status != "done":
            raise JobNotDoneError(f"dump job {job} is {rec.status} ({rec.done}/{rec.total} queries), not done")
        return self.file_path(job, part)

    # ------------------------------------------------------------------------------------------ worker
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._work, name="dump-jobs", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stops after the current block; an unfinished job stays queued on disk and resumes on restart."""
        self._stop.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        if self._engine is not None:
            self._engine.run.close()
            self._engine = None

    def wait(self, job: str, timeout: float = 60.0) -> DumpJob:
        """Blocks until the job is done or failed (for tests and scripts)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rec = self.get(job)
            if rec.status in ("done", "failed"):
                return rec
            time.sleep(0.05)
        raise TimeoutError(f"dump job {job} still {self.get(job).status} after {timeout} s")

    def reset_engine(self) -> None:
        """Drops the cached engine (the run changed: an incremental update); the next job opens the run again."""
        with self._lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.run.close()

    def _work(self) -> None:
        while not self._stop.is_set():
            job = self._queue.get()
            if job is None or self._stop.is_set():
                return
            rec = self.get(job)
            if rec.status not in ("queued", "running"):
                continue
            self._run(rec)

    def _run(self, rec: DumpJob) -> None:
        rec = dataclasses.replace(rec, status="running")
        self._save(rec)
        try:
            if self._engine is None:
                self._engine = Engine(OpenedRun(self.run))
            dump(
                self._engine,
                self.file_path(rec.job),
                rec.test_ids,
                k=rec.k,
                method=rec.method,
                block_size=BLOCK_SIZE,
                progress=False,
                on_block=lambda done, total: self._progress(rec.job, done, total),
            )
        except _Stop:
            return  # stays "running" on disk: the next server resumes it
        except Exception as err:
            self._save(dataclasses.replace(self.get(rec.job), status="failed", error=f"{type(err).__name__}: {err}"))
            return
        done = self.get(rec.job)
        self._save(dataclasses.replace(done, status="done", done=done.total, finished=time.time()))

    def _progress(self, job: str, done: int, total: int) -> None:
        with contextlib.suppress(UnknownJobError):
            self._save(dataclasses.replace(self.get(job), done=int(done), total=int(total)))
        if self._stop.is_set():
            raise _Stop
