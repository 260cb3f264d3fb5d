"""HTTP routes of data cleaning: reviewers' decisions and the review page.

`POST /decisions` records one decision (`{"example_id": int, "decision": "relabel"|"keep"|"remove",
"label": int|null}`), `GET /decisions` lists the decisions in force (`?history=true`: every one, oldest first),
`GET /decisions/file?format=csv|parquet` downloads them as a file, and `/clean` is the review page (suspects
of the label-noise job, most suspicious first, with buttons that post decisions; a second list from
`GET /clean/harmful`: the examples that hurt the most test predictions, read from the latest finished dump
job's per-training-example aggregates). The data routes sit behind
the API key like every other; the name of the key a request used (`api.keys`) is stored as the decision's
reviewer. The optional `X-Reviewer` header names the person instead when the server has no key or only one
unnamed key (named "default"); with named keys the key's name is stored, whatever the header says.
Errors go through the app's handlers: unknown example 404, bad decision or label 422.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field

from store import AGGREGATE_COLUMNS, DECISIONS, MAX_REVIEWER, harmful_column, read_aggregates, write_decisions

from .keys import DEFAULT_NAME

ExampleId = Annotated[int, Field(strict=True, ge=-(2**63), le=2**63 - 1)]
Label = Annotated[int, Field(strict=True, ge=0, le=2**31 - 1)]
MEDIA = {"csv": "text/csv", "parquet": "application/vnd.apache.parquet"}


class DecisionRequest(BaseModel):
    """One reviewer's decision on a training example."""

    model_config = {"extra": "forbid"}

    example_id: ExampleId = Field(description="a stored training example id")
    decision: Literal[DECISIONS] = Field(description="relabel (needs label), keep or remove")  # type: ignore[valid-type]
    label: Label | None = Field(None, description="the new class of a relabel; null otherwise")


class HarmfulOut(BaseModel):
    example_id: int
    label: int
    prediction: int
    preview: str
    suggested_label: int | None
    aggregates: dict[str, float] = Field(description="the example's per-training-example dump aggregates")


class HarmfulPage(BaseModel):
    job: str | None = Field(description="the latest finished dump job read, null when none has finished")
    by: str = Field(description="the aggregate the list is sorted by, most harmful first")
    examples: list[HarmfulOut]


class DecisionOut(BaseModel):
    example_id: int
    decision: str
    label: int | None
    decided_at: str = Field(description="ISO 8601, UTC")
    reviewer: str | None = None


def add_decision_routes(
    app: FastAPI, index: Any, lock: threading.Lock, auth: list[Any], errors: Callable[..., dict[Any, Any]]
) -> None:
    """Registers `/decisions`, `/decisions/file` and the `/clean` page on `app` (see the module docstring).

    Args:
        app: The service's app (its exception handlers map the errors to status codes).
        index: The served `api.Index`.
        lock: The lock that serialises the service's index calls.
        auth: The API-key dependencies of the data routes.
        errors: status codes -> the service's documented error responses (`api.service.errors`).
    """
    reviewer_header = Header(
        None, alias="X-Reviewer", max_length=MAX_REVIEWER, description="who decides (stored with the decision)"
    )

    @app.get("/clean", response_class=HTMLResponse, include_in_schema=False)
    def clean_page() -> HTMLResponse:
        return HTMLResponse(resources.files("api").joinpath("web/clean.html").read_text(encoding="utf-8"))

    @app.get("/clean/harmful", response_model=HarmfulPage, dependencies=auth, responses=errors(422))
    def harmful(
        limit: int = Query(24, ge=1, le=1000),
        by: Literal[AGGREGATE_COLUMNS[2:]] | None = Query(
            None, description="default: the harmful column of the dump (store.harmful_column)"
        ),  # type: ignore[valid-type]
    ) -> HarmfulPage:
        """The examples that hurt the most test predictions, from the latest finished dump job's aggregates."""
        done = [j for j in app.state.jobs.all_jobs() if j.status == "done"]
        if not done:
            return HarmfulPage(job=None, by=by or harmful_column(None), examples=[])
        job = max(done, key=lambda j: (j.finished or "", j.job))
        path = app.state.jobs.file(job.job, "aggregates")
        if by is None:  # the dump's harmful column, as read_aggregates picks it from what the dump was scored at
            import pyarrow.parquet as pq

            targets = (pq.read_schema(path).metadata or {}).get(b"targets", b"prediction").decode()
            by = harmful_column("label" if targets == "label" else None)
        order = by
        table = read_aggregates(path, by=order, top=limit).to_pylist()
        with lock:
            stored = set(index.metadata.ids("train").tolist())  # examples deleted since the dump are left out
            table = [r for r in table if r["example_id"] in stored]
            records = index.metadata.get("train", [r["example_id"] for r in table]) if table else []
        return HarmfulPage(
            job=job.job,
            by=order,
            examples=[
                HarmfulOut(
                    example_id=rec.example_id,
                    label=rec.label,
                    prediction=rec.prediction,
                    preview=rec.preview,
                    suggested_label=rec.suggested_label,
                    aggregates={k: float(v) for k, v in row.items() if k in AGGREGATE_COLUMNS[2:]},
                )
                for rec, row in zip(records, table, strict=True)
            ],
        )

    @app.post(
        "/decisions",
        response_model=DecisionOut,
        dependencies=auth,
        responses=errors(404, 422),
    )
    def decide(request: Request, body: DecisionRequest, x_reviewer: str | None = reviewer_header) -> DecisionOut:
        name = getattr(request.state, "key_name", None)  # set by the API-key check
        reviewer = x_reviewer if name in (None, DEFAULT_NAME) and x_reviewer else name
        with lock:
            record = index.decide(body.example_id, body.decision, body.label, reviewer=reviewer)
        return DecisionOut(**record.to_dict())

    @app.get("/decisions", response_model=list[DecisionOut], dependencies=auth, responses=errors(422))
    def decisions(history: bool = Query(False, description="every decision, oldest first")) -> list[DecisionOut]:
        with lock:
            records = index.decisions(history=history)
        return [DecisionOut(**r.to_dict()) for r in records]

    @app.get(
        "/decisions/file",
        response_class=Response,
        dependencies=auth,
        responses={200: {"content": {m: {} for m in MEDIA.values()}}} | errors(422),
    )
    def decisions_file(format: Literal["csv", "parquet"] = "csv") -> Response:
        with lock:
            records = index.decisions()
        buf = io.BytesIO()
        write_decisions(records, buf, fmt=format)
        return Response(
            buf.getvalue(),
            media_type=MEDIA[format],
            headers={"Content-Disposition": f'attachment; filename="decisions.{format}"'},
        )
