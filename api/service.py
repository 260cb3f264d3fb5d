"""The HTTP service: the same calls as the Python API, over FastAPI.

Routes: `GET /health`, `GET /examples/{example_id}` (train split; `?split=test` for test examples),
`POST /explain`, `GET /noise` (paged suspects). Request/response models are separate from the store's
records; every library error maps to one status code in one handler (404 unknown id, 422 bad input,
409 mismatched run), with a JSON body saying what was wrong.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import threading
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from store import ConfigMismatchError, CorruptRunError, UnknownExampleError

from .index import MAX_K, METHODS, Index, open_index

MAX_BATCH = 64


class ExplainRequest(BaseModel):
    test_ids: list[int] = Field(min_length=1, max_length=MAX_BATCH, description="stored test example ids")
    k: int = Field(10, ge=1, le=1000)
    method: Literal["lissa", "exact", "representer", "grad-dot", "grad-cos"] = "lissa"
    targets: list[int] | None = Field(None, description="classes to explain instead of the predictions")


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


class SuspectOut(BaseModel):
    example_id: int
    label: int
    prediction: int
    loss: float
    preview: str
    suspect_score: float | None
    suggested_label: int | None


class Health(BaseModel):
    status: str
    run: str
    n_train: int
    n_test: int
    methods: list[str]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(run: str | Path, *, api_key: str | None = None) -> FastAPI:
    """The FastAPI app over one run directory (opened once; queries are serialised by a lock)."""
    index: Index = open_index(run)
    lock = threading.Lock()
    key = api_key or os.environ.get("INFLUENCE_API_KEY") or None
    app = FastAPI(title="influence-service", version="0.1.0", description=__doc__)

    def check_key(x_api_key: str | None = Header(default=None)) -> None:
        if key is not None and (x_api_key is None or not hmac.compare_digest(x_api_key, key)):
            raise HTTPException(status_code=401, detail="missing or wrong X-API-Key header")

    def error(status: int, err: Exception) -> JSONResponse:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        return JSONResponse(status_code=status, content={"error": type(err).__name__, "detail": str(msg)})

    @app.exception_handler(UnknownExampleError)
    async def unknown(_: Request, err: UnknownExampleError) -> JSONResponse:
        return error(404, err)

    @app.exception_handler(ConfigMismatchError)
    async def mismatch(_: Request, err: ConfigMismatchError) -> JSONResponse:
        return error(409, err)

    @app.exception_handler(CorruptRunError)
    async def corrupt(_: Request, err: CorruptRunError) -> JSONResponse:
        return error(409, err)

    @app.exception_handler(ValueError)
    async def bad_input(_: Request, err: ValueError) -> JSONResponse:
        return error(422, err)

    @app.get("/health", response_model=Health)
    def health() -> Health:
        return Health(
            status="ok",
            run=str(index.paths.root),
            n_train=len(index.train_ids),
            n_test=len(index.test_ids),
            methods=list(METHODS),
        )

    @app.get("/examples/{example_id}", response_model=ExampleOut, dependencies=[Depends(check_key)])
    def example(example_id: int, split: Literal["train", "test"] = "train") -> ExampleOut:
        with lock:
            [record] = index.metadata.get(split, [example_id])
        return ExampleOut(**record.to_dict())

    @app.post("/explain", response_model=list[ExplanationOut], dependencies=[Depends(check_key)])
    def explain(body: ExplainRequest) -> list[dict[str, Any]]:
        with lock:
            exps = index.explain(test_ids=body.test_ids, k=min(body.k, MAX_K), method=body.method, targets=body.targets)
        return [e.to_dict() for e in exps]

    @app.get("/noise", response_model=list[SuspectOut], dependencies=[Depends(check_key)])
    def noise(limit: int = Query(50, ge=1, le=1000), offset: int = Query(0, ge=0)) -> list[SuspectOut]:
        with lock:
            records = index.metadata.top_suspects(limit, offset)
        return [SuspectOut(**{k: v for k, v in r.to_dict().items() if k in SuspectOut.model_fields}) for r in records]

    return app


def serve(run: str | Path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None) -> None:
    """Runs the service with uvicorn; a non-loopback bind without an API key refuses to start."""
    import uvicorn

    key = api_key or os.environ.get("INFLUENCE_API_KEY")
    if not is_loopback(host) and not key:
        raise ValueError(f"host={host!r} is not loopback: set --api-key or INFLUENCE_API_KEY to serve on it")
    uvicorn.run(create_app(run, api_key=key), host=host, port=port, log_level="info")
