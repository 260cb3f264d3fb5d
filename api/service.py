"""The HTTP service: the same calls as the Python API, over FastAPI.

Routes: `GET /health`, `GET /examples` (a page of stored examples), `GET /examples/{example_id}` (train
split; `?split=test` for test examples), `POST /explain`, `GET /noise` (paged suspects; 409 until the
label-noise job has run), `POST /examples` and `DELETE /examples/{id}` (incremental updates,
`api.routes_examples`), `POST /dumps` and `GET /dumps/{job}` (bulk dumps as background jobs,
`GET /dumps/{job}/file` for the Parquet file), and a web page at `/` ("why this prediction"). The OpenAPI
schema is at `/openapi.json`, its viewers at `/docs` (Swagger UI) and `/redoc`, with their assets served by
the service itself (works offline).

Request/response models are separate from the store's records. Every error class maps to one status code,
with a JSON body `{"error": <class>, "detail": <what was wrong>}`: 401 missing/wrong API key, 404 unknown id
or job, 409 mismatched run or unfinished job, 413 body over the limit (refused before it is read past the
limit), 422 bad input. Bad input never gets a 500.

Security: an `X-API-Key` header (`--api-key` or `INFLUENCE_API_KEY`) is required on every data route when a
key is set, and a key is required to bind anything but loopback; no request names a file path (dump files
are named by job ids checked against a pattern); SQL goes through SQLAlchemy's bound parameters.
"""

from __future__ import annotations

import ipaddress
import os
import threading
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from concurrent.futures import Future
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from store import ConfigMismatchError, CorruptRunError, StoreError, UnknownExampleError, load_noise_signals

from .index import Index, open_index
from .jobs import JOB_ID, DumpJobs, JobNotDoneError, NoiseNotRunError, UnknownJobError
from .keys import check_keys, key_name, parse_keys
from .routes_decisions import add_decision_routes
from .routes_examples import add_example_routes
from .scorers import METHODS
from .warmup import WarmUp

MethodName = Literal[METHODS]  # type: ignore[valid-type]  # the scorer registry's methods

INT64 = {"ge": -(2**63), "le": 2**63 - 1}
ExampleId = Annotated[int, Field(strict=True, **INT64)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
JobId = Annotated[str, PathParam(pattern=JOB_ID.pattern, description="16 lowercase hex digits")]


MAX_K = 1000  # proponents and opponents per query
MAX_BATCH = 64  # queries per /explain request
MAX_DUMP_QUERIES = 100_000  # queries per dump job
MAX_BODY_BYTES = 1 << 20  # default body limit; over it -> 413 before the body is read


# ---------------------------------------------------------------------------------------- request models
class ExplainRequest(BaseModel):
    """One explain call: stored test ids, or raw inputs when the server was started with the task."""

    model_config = {
        "extra": "forbid",
        "json_schema_extra": {  # exactly one of the two query kinds
            "oneOf": [
                {"required": ["test_ids"], "properties": {"test_ids": {"type": "array"}}},
                {"required": ["inputs"], "properties": {"inputs": {"type": "array"}}},
            ]
        },
    }

    test_ids: list[ExampleId] | None = Field(
        None, min_length=1, max_length=MAX_BATCH, description="stored test example ids"
    )
    inputs: list[list[FiniteFloat]] | list[str] | None = Field(
        None,
        min_length=1,
        max_length=MAX_BATCH,
        description="raw inputs (flattened feature rows, or texts for text tasks); needs `serve --task`",
    )
    k: int = Field(10, ge=1, le=MAX_K, strict=True, description="proponents and opponents returned per query")
    method: MethodName = "lissa"
    targets: list[Annotated[int, Field(ge=0, le=2**31 - 1, strict=True)]] | None = Field(
        None, max_length=MAX_BATCH, description="classes to explain instead of the predictions"
    )

    @model_validator(mode="after")
    def one_query_kind(self) -> ExplainRequest:
        if (self.test_ids is None) == (self.inputs is None):
            raise ValueError("pass exactly one of test_ids or inputs")
        return self


class DumpRequest(BaseModel):
    """A bulk dump: top-k proponents and opponents of many stored test examples, written to Parquet."""

    model_config = {"extra": "forbid"}

    test_ids: list[ExampleId] | None = Field(
        None, min_length=1, max_length=MAX_DUMP_QUERIES, description="null = every stored test example"
    )
    k: int = Field(100, ge=1, le=MAX_K, strict=True)
    method: MethodName = "lissa"


# --------------------------------------------------------------------------------------- response models
class InfluencerOut(BaseModel):
    example_id: int
    score: float
    label: int
    prediction: int
    loss: float
    preview: str
    content_hash: str
    suspect_score: float | None = None


class ExplanationOut(BaseModel):
    test_id: int | None
    prediction: int
    label: int | None
    target: int
    method: str
    probabilities: list[float]
    proponents: list[InfluencerOut]
    opponents: list[InfluencerOut]
    diagnostics: dict[str, float] | None = None


class AffectedOut(BaseModel):
    test_id: int
    score: float = Field(description="the training example's score on this query: > 0 supports, < 0 opposes")
    prediction: int
    label: int | None
    preview: str


class ExampleInfluenceOut(BaseModel):
    example_id: int
    method: str
    supports: list[AffectedOut] = Field(description="the test predictions it supports most, highest score first")
    opposes: list[AffectedOut] = Field(description="the test predictions it opposes most, lowest score first")


class ExampleOut(BaseModel):
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


class ExamplePage(BaseModel):
    split: str
    total: int
    offset: int
    examples: list[ExampleOut]


class SuspectOut(BaseModel):
    example_id: int
    label: int
    prediction: int
    loss: float
    preview: str
    suspect_score: float | None
    suggested_label: int | None
    signals: dict[str, float | None] = Field(
        default_factory=dict,
        description="the label-noise job's signals behind the rank, name -> value ({} if none stored)",
    )


class LimitsOut(BaseModel):
    max_k: int
    max_batch: int
    max_dump_queries: int
    max_body_bytes: int


class Health(BaseModel):
    status: str
    run: str
    n_train: int
    n_test: int
    n_classes: int
    methods: list[str]
    accepts_inputs: bool
    key_required: bool
    limits: LimitsOut
    warm: str = Field(description='start-up compile of the query programs: "off", "running", "done" or "failed: ..."')


class DumpJobOut(BaseModel):
    job: str
    status: Literal["queued", "running", "done", "failed"]
    k: int
    method: str
    n_queries: int
    done: int
    total: int
    error: str | None
    file: str | None = Field(None, description="URL of the top-k Parquet file once the job is done")
    aggregates: str | None = Field(None, description="URL of the per-training-example aggregates once done")


class FieldErrorOut(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorOut(BaseModel):
    error: str = Field(description="the error class")
    detail: str = Field(description="what was wrong")
    errors: list[FieldErrorOut] | None = Field(None, description="per-field problems of a 422")


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorOut} for c in codes}


# ------------------------------------------------------------------------------------------ helpers
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def error_response(status: int, err: Exception | str, *, name: str | None = None, **extra: Any) -> JSONResponse:
    if isinstance(err, Exception):
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        name = name or type(err).__name__
    else:
        msg = err
    body = ErrorOut(error=name or "Error", detail=str(msg), **extra)
    return JSONResponse(status_code=status, content=body.model_dump(exclude_none=True))


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]


class BodyLimit:
    """ASGI middleware: refuses a body over `max_bytes` with 413, by its Content-Length header before
    reading anything, or (chunked) as soon as the bytes read pass the limit; never buffers more."""

    def __init__(self, app: Callable[..., Awaitable[None]], max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]], send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = error_response(413, f"request body over the limit of {self.max_bytes} bytes", name="RequestTooLarge")
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                await error_response(422, f"bad Content-Length {length!r}", name="ValidationError")(
                    scope, receive, send
                )
                return
            if n > self.max_bytes:
                await too_big(scope, receive, send)
                return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await too_big(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class ExplainBatcher:
    """Micro-batching of concurrent `/explain` requests on stored test ids.

    Requests that arrive while the index is busy wait in a queue; when it is free, every queued request with
    the same `(method, k)` (up to `max_queries` queries in all) is answered by one `Index.explain` call, whose
    cost is dominated by one pass over the stored train vectors (FAISS scan, LiSSA's HVPs over the cached
    features) whatever the number of queries. A lone request runs at once: no waiting window. Each query's
    answer is the same as alone (every step is per query), except that `diagnostics` (e.g. LiSSA's
    `residual_max`) describe the whole batch. If the batched call fails, each request is retried alone, so
    an error reaches only the request that caused it.
    """

    def __init__(self, index: Index, lock: threading.Lock, *, max_queries: int = MAX_BATCH) -> None:
        self.index, self.lock, self.max_queries = index, lock, max_queries
        self._cv = threading.Condition()
        self._queue: list[tuple[tuple[str, int], list[int], Future[list[Any]]]] = []
        self._stopped = False
        self._thread = threading.Thread(target=self._work, name="explain-batcher", daemon=True)
        self._thread.start()

    def explain(self, test_ids: list[int], *, k: int, method: str) -> list[Any]:
        future: Future[list[Any]] = Future()
        with self._cv:
            if self._stopped:
                raise RuntimeError("the service is shutting down")
            self._queue.append(((method, k), list(test_ids), future))
            self._cv.notify()
        return future.result()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(60)

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopped:
                    self._cv.wait()
                if not self._queue:
                    return
                key, batch, rest, n = self._queue[0][0], [], [], 0
                for item in self._queue:
                    if item[0] == key and n + len(item[1]) <= self.max_queries:
                        batch.append(item)
                        n += len(item[1])
                    else:
                        rest.append(item)
                self._queue = rest
            self._answer(key, batch)

    def _answer(self, key: tuple[str, int], batch: list[tuple[tuple[str, int], list[int], Future[list[Any]]]]) -> None:
        method, k = key
        try:
            with self.lock:
                exps = self.index.explain(test_ids=[i for _, ids, _ in batch for i in ids], k=k, method=method)
        except Exception as err:
            if len(batch) == 1:
                batch[0][2].set_exception(err)
            else:
                for item in batch:
                    self._answer(key, [item])
            return
        start = 0
        for _, ids, future in batch:
            future.set_result(exps[start : start + len(ids)])
            start += len(ids)


# ------------------------------------------------------------------------------------------------ app
def create_app(
    run: str | Path,
    *,
    api_key: str | Mapping[str, str] | None = None,
    task: Any = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    warm: bool | None = None,
) -> FastAPI:
    """The FastAPI app over one run directory (opened once; index calls are serialised by a lock, and
    concurrent `/explain` requests on stored test ids are answered in micro-batches, see `ExplainBatcher`).

    Args:
        run: a built run directory.
        api_key: required `X-API-Key` on data routes: one key (named "default") or a mapping name -> key;
            the name of the key a request used is stored as the reviewer of its decisions (default:
            `INFLUENCE_API_KEY`, one key or `name:key,name2:key2`; none = open).
        task: the run's Task, to accept raw `inputs` in `/explain`.
        max_body_bytes: bodies over this size are refused with 413 before being read.
        warm: compile the JAX programs of every query-batch size in a background thread at start-up
            (`api.warmup`), so no request waits on a compile; `/health` reports its state (default:
            `INFLUENCE_WARM`, on unless it is "0"; the test suite turns it off, tests/test_warmup.py on).
    """
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be a positive int, got {max_body_bytes!r}")
    index: Index = open_index(run, task=task)
    lock = threading.Lock()
    batcher = ExplainBatcher(index, lock)
    if warm is None:
        warm = os.environ.get("INFLUENCE_WARM", "1") != "0"
    warmup = WarmUp(index, lock, max_queries=MAX_BATCH, enabled=bool(warm))
    keys = check_keys(api_key) if api_key is not None else parse_keys(os.environ.get("INFLUENCE_API_KEY"))
    jobs = DumpJobs(index.paths.root, n_test=len(index.test_ids))
    jobs.start()
    ids = {"train": np.asarray(index.train_ids), "test": np.asarray(index.test_ids)}

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        warmup.join(timeout=60.0)  # the index closes below: let a running warm-up finish first
        batcher.stop()
        jobs.stop()
        index.close()

    def query_names(dependant: Any) -> set[str]:
        return {p.alias for p in dependant.query_params}.union(*(query_names(d) for d in dependant.dependencies))

    def strict_query(request: Request) -> None:
        """Unknown query parameters are a mistake (a typo'd `limt=`): 422, not silently ignored."""
        route = request.scope.get("route")
        allowed = query_names(route.dependant) if route is not None and hasattr(route, "dependant") else set()
        unknown = sorted(set(request.query_params) - allowed)
        if unknown:
            raise RequestValidationError(
                [
                    {"loc": ("query", name), "msg": "unknown query parameter", "type": "extra_forbidden"}
                    for name in unknown
                ]
            )

    # Swagger UI and ReDoc from the installed fastapi-offline package (served under /static-offline-docs):
    # /docs works without a network, where FastAPI's default page loads its script and CSS from a CDN.
    app = FastAPIOffline(
        title="influence-service",
        version="0.1.0",
        description=__doc__,
        lifespan=lifespan,
        responses=errors(401, 413, 422),
        dependencies=[Depends(strict_query)],
    )
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.state.index, app.state.jobs = index, jobs
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="required when the server has a key")

    def check_key(request: Request, x_api_key: str | None = Depends(header)) -> None:
        if keys is not None:
            request.state.key_name = key_name(keys, x_api_key)  # stored as the reviewer of decisions
            if request.state.key_name is None:
                raise StarletteHTTPException(status_code=401, detail="missing or wrong X-API-Key header")

    auth = [Depends(check_key)]

    # One handler per error class -> one status.
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = [
            FieldErrorOut(
                loc=[p if isinstance(p, int) else str(p) for p in e.get("loc", ())], msg=e["msg"], type=e["type"]
            )
            for e in err.errors()
        ]
        detail = "; ".join(f"{'.'.join(map(str, p.loc))}: {p.msg}" for p in problems[:5])
        return error_response(422, detail, name="ValidationError", errors=problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == 400:  # a body FastAPI cannot parse (e.g. not UTF-8) is bad input like any other
            return error_response(422, str(err.detail), name="ValidationError")
        names = {401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed"}
        return error_response(err.status_code, str(err.detail), name=names.get(err.status_code, "HTTPError"))

    @app.exception_handler(UnknownExampleError)
    @app.exception_handler(UnknownJobError)
    async def unknown(_: Request, err: KeyError) -> JSONResponse:
        return error_response(404, err)

    @app.exception_handler(ConfigMismatchError)
    @app.exception_handler(CorruptRunError)
    @app.exception_handler(JobNotDoneError)
    async def conflict(_: Request, err: Exception) -> JSONResponse:
        return error_response(409, err)

    @app.exception_handler(ValueError)
    async def bad_input(_: Request, err: ValueError) -> JSONResponse:
        return error_response(422, err)

    @app.exception_handler(StoreError)
    async def store_error(_: Request, err: StoreError) -> JSONResponse:
        return error_response(409, err)

    # --------------------------------------------------------------------------------------- routes
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(resources.files("api").joinpath("web/index.html").read_text(encoding="utf-8"))

    app.mount("/web", StaticFiles(directory=str(resources.files("api").joinpath("web"))), name="web")

    @app.get("/health", response_model=Health)
    def health() -> Health:
        return Health(
            status="ok",
            run=str(index.paths.root),
            n_train=len(ids["train"]),
            n_test=len(ids["test"]),
            n_classes=index.n_classes,
            methods=list(METHODS),
            accepts_inputs=index.engine.task is not None,
            key_required=keys is not None,
            warm=warmup.state,
            limits=LimitsOut(
                max_k=MAX_K, max_batch=MAX_BATCH, max_dump_queries=MAX_DUMP_QUERIES, max_body_bytes=max_body_bytes
            ),
        )

    @app.get("/examples", response_model=ExamplePage, dependencies=auth, responses=errors(422))
    def examples(
        split: Literal["train", "test"] = "test",
        offset: int = Query(0, ge=0, le=2**62),
        limit: int = Query(50, ge=1, le=1000),
    ) -> ExamplePage:
        page_ids = ids[split][offset : offset + limit].tolist()
        with lock:
            records = index.metadata.get(split, page_ids) if page_ids else []
        return ExamplePage(
            split=split, total=len(ids[split]), offset=offset, examples=[ExampleOut(**r.to_dict()) for r in records]
        )

    @app.get("/examples/{example_id}", response_model=ExampleOut, dependencies=auth, responses=errors(404, 422))
    def example(
        example_id: Annotated[int, PathParam(**INT64)], split: Literal["train", "test"] = "train"
    ) -> ExampleOut:
        with lock:
            [record] = index.metadata.get(split, [example_id])
        return ExampleOut(**record.to_dict())

    @app.get(
        "/examples/{example_id}/influence",
        response_model=ExampleInfluenceOut,
        dependencies=auth,
        responses=errors(404, 422),
    )
    def example_influence(
        example_id: Annotated[int, PathParam(**INT64)],
        k: int = Query(5, ge=1, le=MAX_K),
        method: MethodName = "lissa",
    ) -> dict[str, Any]:
        """The stored test predictions a training example supports most and opposes most (`api.support`)."""
        with lock:
            return index.example_influence(example_id, k=k, method=method).to_dict()

    @app.post("/explain", response_model=list[ExplanationOut], dependencies=auth, responses=errors(404, 409, 422))
    def explain(body: ExplainRequest) -> list[dict[str, Any]]:
        n = len(body.test_ids or body.inputs or ())
        if body.targets is not None and len(body.targets) != n:
            raise ValueError(f"targets must have one class per query ({n}), got {len(body.targets)}")
        inputs: Any = body.inputs
        if inputs is not None and not isinstance(inputs[0], str):
            widths = {len(row) for row in inputs}
            if len(widths) != 1:
                raise ValueError(f"inputs rows must all have the same length, got lengths {sorted(widths)}")
            inputs = np.asarray(inputs, np.float32)
        if body.test_ids is not None and body.targets is None:
            exps = batcher.explain(body.test_ids, k=body.k, method=body.method)
        else:
            with lock:
                exps = index.explain(
                    test_ids=body.test_ids, inputs=inputs, k=body.k, method=body.method, targets=body.targets
                )
        return [e.to_dict() for e in exps]

    @app.get("/noise", response_model=list[SuspectOut], dependencies=auth, responses=errors(409, 422))
    def noise(limit: int = Query(50, ge=1, le=1000), offset: int = Query(0, ge=0, le=2**62)) -> list[SuspectOut]:
        """The label-noise job's suspects, most suspicious first; 409 until the job has run (not `[]`, which
        would read as "no suspects")."""
        with lock:
            records = index.metadata.top_suspects(limit, offset)
            signals = load_noise_signals(index.metadata, [r.example_id for r in records])
            if not records and (offset == 0 or not index.metadata.top_suspects(1, 0)):
                raise NoiseNotRunError(
                    f"the label-noise job has not run on {index.paths.root.name}: run `influence noise "
                    f"{index.paths.root}` (or Index.find_label_noise()) first"
                )
        fields = set(SuspectOut.model_fields) - {"signals"}
        return [
            SuspectOut(**{k: v for k, v in r.to_dict().items() if k in fields}, signals=signals[r.example_id])
            for r in records
        ]

    def job_out(rec: Any) -> DumpJobOut:
        return DumpJobOut(
            job=rec.job,
            status=rec.status,
            k=rec.k,
            method=rec.method,
            n_queries=rec.total,
            done=rec.done,
            total=rec.total,
            error=rec.error,
            file=f"/dumps/{rec.job}/file" if rec.status == "done" else None,
            aggregates=f"/dumps/{rec.job}/file?part=aggregates" if rec.status == "done" else None,
        )

    @app.post(
        "/dumps",
        response_model=DumpJobOut,
        status_code=202,
        dependencies=auth,
        responses={200: {"model": DumpJobOut, "description": "the same request's existing job"}} | errors(404, 422),
    )
    def start_dump(body: DumpRequest) -> JSONResponse:
        if body.test_ids is not None:
            index.engine.test_rows(body.test_ids)  # unknown ids -> 404 now, not a failed job later
        rec, created = jobs.submit(body.test_ids, body.k, body.method)
        return JSONResponse(
            status_code=202 if created else 200,
            content=job_out(rec).model_dump(),
            headers={"Location": f"/dumps/{rec.job}"},
        )

    @app.get("/dumps", response_model=list[DumpJobOut], dependencies=auth)
    def list_dumps() -> list[DumpJobOut]:
        return [job_out(r) for r in jobs.all_jobs()]

    @app.get("/dumps/{job}", response_model=DumpJobOut, dependencies=auth, responses=errors(404, 422))
    def dump_status(job: JobId) -> DumpJobOut:
        return job_out(jobs.get(job))

    @app.get(
        "/dumps/{job}/file",
        response_class=FileResponse,
        dependencies=auth,
        responses={200: {"content": {"application/vnd.apache.parquet": {}}}} | errors(404, 409, 422),
    )
    def dump_file(job: JobId, part: Literal["topk", "aggregates"] = "topk") -> FileResponse:
        return FileResponse(
            jobs.file(job, part), media_type="application/vnd.apache.parquet", filename=f"dump-{job}-{part}.parquet"
        )

    add_decision_routes(app, index, lock, auth, errors)
    add_example_routes(app, index, lock, auth, errors, ids=ids, jobs=jobs)
    return app


def check_bind(host: str, api_key: str | Mapping[str, str] | None) -> dict[str, str] | None:
    """The API keys to use, name -> key (argument, else `INFLUENCE_API_KEY`; a str is one key or
    `name:key,name2:key2`); refuses a non-loopback host without one."""
    given = api_key or os.environ.get("INFLUENCE_API_KEY") or None
    key = parse_keys(given) if isinstance(given, str) or given is None else check_keys(given)
    if not is_loopback(host) and not key:
        raise ValueError(f"host={host!r} is not loopback: set --api-key or INFLUENCE_API_KEY to serve on it")
    return key


def serve(
    run: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | Mapping[str, str] | None = None,
    task: Any = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    log_level: str = "info",
) -> None:
    """Runs the service with uvicorn; a non-loopback bind without an API key refuses to start."""
    import uvicorn

    key = check_bind(host, api_key)
    uvicorn.run(
        create_app(run, api_key=key, task=task, max_body_bytes=max_body_bytes),
        host=host,
        port=port,
        log_level=log_level,
    )
