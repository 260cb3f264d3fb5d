"""HTTP routes of data cleaning: reviewers' decisions and the review page.

`POST /decisions` records one decision (`{"example_id": int, "decision": "relabel"|"keep"|"remove",
"label": int|null}`), `GET /decisions` lists the decisions in force (`?history=true`: every one, oldest first),
`GET /decisions/file?format=csv|parquet` downloads them as a file, and `/clean` is the review page (suspects
of the label-noise job, most suspicious first, with buttons that post decisions). The data routes sit behind
the API key like every other; an optional `X-Reviewer` header names the person, stored with the decision.
Errors go through the app's handlers: unknown example 404, bad decision or label 422.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Header, Query
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field

from store import DECISIONS, MAX_REVIEWER, write_decisions

ExampleId = Annotated[int, Field(strict=True, ge=-(2**63), le=2**63 - 1)]
Label = Annotated[int, Field(strict=True, ge=0, le=2**31 - 1)]
MEDIA = {"csv": "text/csv", "parquet": "application/vnd.apache.parquet"}


class DecisionRequest(BaseModel):
    """One reviewer's decision on a training example."""

    model_config = {"extra": "forbid"}

    example_id: ExampleId = Field(description="a stored training example id")
    decision: Literal[DECISIONS] = Field(description="relabel (needs label), keep or remove")  # type: ignore[valid-type]
    label: Label | None = Field(None, description="the new class of a relabel; null otherwise")


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

    @app.post(
        "/decisions",
        response_model=DecisionOut,
        dependencies=auth,
        responses=errors(404, 422),
    )
    def decide(body: DecisionRequest, x_reviewer: str | None = reviewer_header) -> DecisionOut:
        with lock:
            record = index.decide(body.example_id, body.decision, body.label, reviewer=x_reviewer)
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
