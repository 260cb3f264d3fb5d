"""Decisions through the Python API (Index.decide / decisions) and HTTP (POST|GET /decisions, the file) on a
real digits run: validation by name, 404 / 422 / 401 never 500, survival across restarts, the export."""

import io
import shutil

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from api import open_index
from api.decisions import cleaned_ids
from api.service import create_app
from store import UnknownExampleError

pytestmark = pytest.mark.slow
KEY = "decisions-key"
H = {"X-API-Key": KEY}


@pytest.fixture
def run(digits_mlp_run, tmp_path):
    path = tmp_path / "run"
    shutil.copytree(digits_mlp_run, path, ignore=shutil.ignore_patterns("dumps"))
    return path


def test_index_decide_and_decisions(run):
    with open_index(run) as index:
        assert index.decisions() == []
        n = index.n_classes
        index.decide(5, "relabel", n - 1, reviewer="ann")
        index.decide(6, "remove")
        index.decide(5, "keep")
        with pytest.raises(UnknownExampleError, match="99999"):
            index.decide(99999, "keep")
        with pytest.raises(ValueError, match=f"label: must be a class in \\[0, {n}\\)"):
            index.decide(5, "relabel", n)
        with pytest.raises(ValueError, match="decision"):
            index.decide(5, "fix")
        assert [(d.example_id, d.decision) for d in index.decisions()] == [(5, "keep"), (6, "remove")]
        assert len(index.decisions(history=True)) == 3
        index.decide(7, "relabel", 0)
        ids, relabels = cleaned_ids(index)
    assert 6 not in ids and len(ids) == len(index.train_ids) - 1 and relabels == {7: 0}
    with open_index(run) as reopened:  # stored in the run's SQLite
        assert [(d.example_id, d.decision) for d in reopened.decisions()] == [
            (5, "keep"),
            (6, "remove"),
            (7, "relabel"),
        ]


def test_http_decisions_round_trip_and_survive_a_restart(run):
    with TestClient(create_app(run, api_key=KEY)) as client:
        assert client.get("/decisions", headers=H).json() == []
        r = client.post("/decisions", json={"example_id": 3, "decision": "relabel", "label": 1}, headers=H)
        assert r.status_code == 200, r.text
        assert r.json()["label"] == 1 and r.json()["decided_at"].endswith("+00:00")
        r = client.post(
            "/decisions", json={"example_id": 4, "decision": "remove", "label": None}, headers=H | {"X-Reviewer": "bob"}
        )
        assert r.status_code == 200 and r.json()["reviewer"] == "bob"
        assert client.post("/decisions", json={"example_id": 3, "decision": "keep"}, headers=H).status_code == 200
        assert "/decisions" in client.get("/openapi.json").json()["paths"]
    with TestClient(create_app(run, api_key=KEY)) as client:
        got = client.get("/decisions", headers=H).json()
        assert [(d["example_id"], d["decision"], d["label"], d["reviewer"]) for d in got] == [
            (3, "keep", None, "default"),  # one unnamed key: its name, or X-Reviewer when given
            (4, "remove", None, "bob"),
        ]
        assert len(client.get("/decisions?history=true", headers=H).json()) == 3
        csv = client.get("/decisions/file?format=csv", headers=H)
        assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
        table = pcsv.read_csv(io.BytesIO(csv.content))
        assert table.column("example_id").to_pylist() == [3, 4]
        assert table.column("decision").to_pylist() == ["keep", "remove"]
        parquet = client.get("/decisions/file?format=parquet", headers=H)
        assert pq.read_table(io.BytesIO(parquet.content)).to_pylist() == got
    with open_index(run) as index:
        assert [d.to_dict() for d in index.decisions()] == got


def test_decisions_are_stored_under_the_name_of_the_key_used(run, monkeypatch):
    keys = {"ann": "ann-key", "bob": "bob-key"}
    with TestClient(create_app(run, api_key=keys)) as client:
        for example_id, name in ((3, "ann"), (4, "bob"), (5, "ann")):
            headers = {"X-API-Key": keys[name], "X-Reviewer": "someone-else"}  # the key's name wins
            r = client.post("/decisions", json={"example_id": example_id, "decision": "keep"}, headers=headers)
            assert r.status_code == 200 and r.json()["reviewer"] == name, r.text
        wrong = {"X-API-Key": "ann-key-not"}
        assert client.post("/decisions", json={"example_id": 6, "decision": "keep"}, headers=wrong).status_code == 401
        assert client.get("/decisions", headers=wrong).status_code == 401
        got = client.get("/decisions", headers={"X-API-Key": "bob-key"}).json()
    assert [(d["example_id"], d["reviewer"]) for d in got] == [(3, "ann"), (4, "bob"), (5, "ann")]
    monkeypatch.setenv("INFLUENCE_API_KEY", "carol:c-key,dan:d-key")  # the CLI / environment form
    with TestClient(create_app(run)) as client:
        r = client.post("/decisions", json={"example_id": 7, "decision": "remove"}, headers={"X-API-Key": "d-key"})
        assert r.status_code == 200 and r.json()["reviewer"] == "dan"
        assert client.get("/decisions", headers={"X-API-Key": "ann-key"}).status_code == 401
    for bad in ({}, {"": "k"}, {"a": ""}, {"a": "k", "b": "k"}, {"x" * 65: "k"}, ""):
        with pytest.raises(ValueError, match="api_key"):
            create_app(run, api_key=bad)


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"example_id": 99999, "decision": "keep"}, 404, ["99999"]),
        ({"example_id": -1, "decision": "keep"}, 404, ["-1"]),
        ({"example_id": 1, "decision": "delete"}, 422, ["decision"]),
        ({"example_id": 1, "decision": "relabel"}, 422, ["label"]),
        ({"example_id": 1, "decision": "relabel", "label": 10}, 422, ["label", "10"]),
        ({"example_id": 1, "decision": "relabel", "label": -2}, 422, ["label"]),
        ({"example_id": 1, "decision": "relabel", "label": 1.5}, 422, ["label"]),
        ({"example_id": 1, "decision": "relabel", "label": "3"}, 422, ["label"]),
        ({"example_id": 1, "decision": "keep", "label": 2}, 422, ["label", "keep"]),
        ({"example_id": "1", "decision": "keep"}, 422, ["example_id"]),
        ({"example_id": True, "decision": "keep"}, 422, ["example_id"]),
        ({"example_id": 2**70, "decision": "keep"}, 422, ["example_id"]),
        ({"decision": "keep"}, 422, ["example_id"]),
        ({"example_id": 1, "decision": "keep", "why": "x"}, 422, ["why"]),
        ([1], 422, ["body"]),
    ],
)
def test_bad_decisions_get_404_or_422_never_500(run, body, status, words):
    with TestClient(create_app(run, api_key=KEY)) as client:
        r = client.post("/decisions", json=body, headers=H)
        assert r.status_code == status, r.text
        for w in words:
            assert w in r.text, (w, r.text)
        assert client.get("/decisions?history=true", headers=H).json() == []


def test_decisions_need_the_key_and_check_their_query(run):
    with TestClient(create_app(run, api_key=KEY)) as client:
        assert client.post("/decisions", json={"example_id": 1, "decision": "keep"}).status_code == 401
        assert client.get("/decisions").status_code == 401
        assert client.get("/decisions/file").status_code == 401
        assert client.get("/decisions/file?format=xlsx", headers=H).status_code == 422
        assert client.get("/decisions?limt=3", headers=H).status_code == 422
        long = client.post(
            "/decisions", json={"example_id": 1, "decision": "keep"}, headers=H | {"X-Reviewer": "x" * 65}
        )
        assert long.status_code == 422
        assert client.get("/decisions?history=true", headers=H).json() == []


def test_the_review_page_is_served_open_like_the_other_page(run):
    with TestClient(create_app(run, api_key=KEY)) as client:
        page = client.get("/clean")
        assert page.status_code == 200 and "/web/clean.js" in page.text and "/web/preview.js" in page.text
        for name in ("clean.js", "preview.js", "clean.css"):
            assert client.get(f"/web/{name}").status_code == 200


def test_cli_exports_the_decisions_in_force_as_csv_or_parquet(run, tmp_path):
    from typer.testing import CliRunner

    from api.cli import app

    with open_index(run) as index:
        index.decide(10, "relabel", 2, reviewer="ann")
        index.decide(11, "remove")
        index.decide(10, "relabel", 3)
        wanted = [d.to_dict() for d in index.decisions()]
    runner = CliRunner()
    for name in ("d.csv", "d.parquet"):
        result = runner.invoke(app, ["decisions", str(run), "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        assert "wrote 2 decisions (1 relabel, 0 keep, 1 remove)" in result.output
    as_text = pcsv.ConvertOptions(
        column_types={"decided_at": pa.string(), "reviewer": pa.string()}, strings_can_be_null=True
    )
    assert pcsv.read_csv(tmp_path / "d.csv", convert_options=as_text).to_pylist() == wanted
    assert pq.read_table(tmp_path / "d.parquet").to_pylist() == wanted
    result = runner.invoke(app, ["decisions", str(run), "--out", str(tmp_path / "h.csv"), "--history"])
    assert result.exit_code == 0 and "wrote 3 decisions" in result.output
    for args, words in [
        (["--out", str(tmp_path / "d.xlsx")], ["--out", "d.xlsx"]),
        (["--out", str(tmp_path / "x.csv")], ["nowhere"]),
    ]:
        target = str(tmp_path / "nowhere") if "nowhere" in words else str(run)
        result = runner.invoke(app, ["decisions", target, *args])
        assert result.exit_code == 2, result.output
        assert all(w in result.output for w in words), result.output
    assert not (tmp_path / "d.xlsx").exists() and not (tmp_path / "x.csv").exists()


def test_the_harmful_list_reads_the_latest_finished_dumps_aggregates(run):
    import time

    from store import read_aggregates

    with TestClient(create_app(run, api_key=KEY)) as client:
        empty = client.get("/clean/harmful", headers=H).json()
        assert empty["job"] is None and empty["examples"] == []
        started = client.post("/dumps", json={"test_ids": list(range(20)), "k": 5}, headers=H).json()
        deadline = time.monotonic() + 600
        while client.get(f"/dumps/{started['job']}", headers=H).json()["status"] != "done":
            assert time.monotonic() < deadline, "the dump did not finish"
            time.sleep(0.5)
        page = client.get("/clean/harmful?limit=5", headers=H).json()
        agg = read_aggregates(run / "dumps" / f"{started['job']}.parquet", by=page["by"], top=5).to_pylist()
        assert page["job"] == started["job"]
        assert page["by"] == "n_top_proponent_misclassified"  # the dump is at the predictions
        default = read_aggregates(run / "dumps" / f"{started['job']}.parquet", top=5).to_pylist()
        assert [e["example_id"] for e in page["examples"]] == [r["example_id"] for r in default]
        assert [e["example_id"] for e in page["examples"]] == [r["example_id"] for r in agg]
        assert [e["aggregates"][page["by"]] for e in page["examples"]] == [float(r[page["by"]]) for r in agg]
        with open_index(run) as index:
            records = index.metadata.get("train", [r["example_id"] for r in agg])
        assert [e["preview"] for e in page["examples"]] == [r.preview for r in records]
        by_sum = client.get("/clean/harmful?limit=3&by=sum_negative", headers=H).json()
        agg = read_aggregates(run / "dumps" / f"{started['job']}.parquet", by="sum_negative", top=3).to_pylist()
        assert [e["example_id"] for e in by_sum["examples"]] == [r["example_id"] for r in agg]
        assert client.get("/clean/harmful?by=example_id", headers=H).status_code == 422
        assert client.get("/clean/harmful").status_code == 401
