"""Start-up warm-up of a served run: the JAX programs a first request would wait on, compiled before it comes.

JAX compiles one program per input shape. The engine pads query batches to powers of two (`api.engine.pad_rows`),
so the service needs the programs for batch sizes 1, 2, 4, ... up to its largest batch; compiling them takes
seconds each on a CPU. `WarmUp` runs them once in a background thread when the service starts, holding the
index lock (a request that arrives meanwhile waits for the warm-up instead of compiling the same program
beside it), and reports its state on `/health`.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from api.engine import batch_bucket


def warm_up(index: Any, *, max_queries: int, k: int = 10) -> int:
    """Answers one explain per batch-size bucket with the default method on stored test ids, and one head
    solve per bucket (the path of raw inputs and of queries the build did not cache). Returns the buckets run.
    """
    test_ids = list(index.test_ids)
    if not test_ids:
        return 0
    engine, n = index.engine, min(max_queries, len(test_ids))
    buckets = sorted({batch_bucket(m) for m in range(1, n + 1)})
    for b in buckets:
        index.explain(test_ids=test_ids[:b], k=k)
        if engine.run.scope == "head":
            q = engine.prepare(test_ids[:b], None)
            engine.solve(engine.gradients(q.h, q.targets), "lissa")
    return len(buckets)


class WarmUp:
    """The warm-up thread and its state: "off", "running", "done" or "failed: <error>"."""

    def __init__(self, index: Any, lock: threading.Lock, *, max_queries: int, enabled: bool = True) -> None:
        self.index, self.lock, self.max_queries = index, lock, max_queries
        self.state, self.seconds = ("running" if enabled else "off"), 0.0
        self._thread = threading.Thread(target=self._run, name="warm-up", daemon=True) if enabled else None
        if self._thread is not None:
            self._thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            with self.lock:
                warm_up(self.index, max_queries=self.max_queries)
            self.state = "done"
        except Exception as err:
            self.state = f"failed: {type(err).__name__}: {err}"[:300]
        self.seconds = float(np.round(time.perf_counter() - t0, 3))

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
