"""Reviewers' decisions (store.decisions, Index.decide / decisions): history kept, the latest wins, bad input
refused by name, old runs without the table, concurrent reviewers, and the CSV / Parquet export."""

import dataclasses
import sqlite3
import threading

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from store import (
    DecisionRecord,
    ExampleRecord,
    MetadataStore,
    UnknownExampleError,
    load_decisions,
    save_decision,
    save_decisions_table,
)

N = 20


def _records(split, n):
    return [
        ExampleRecord(
            split=split,
            example_id=i,
            label=i % 3,
            prediction=i % 3,
            loss=0.1,
            margin=1.0,
            content_hash=f"{i:016x}",
            preview=f"row {i}",
        )
        for i in range(n)
    ]


@pytest.fixture
def meta(tmp_path):
    with MetadataStore(tmp_path / "metadata.sqlite") as m:
        m.replace_split("train", _records("train", N))
        m.replace_split("test", _records("test", 5))
        yield m


def test_the_latest_decision_per_example_wins_and_the_history_is_kept(meta):
    assert load_decisions(meta) == []
    first = save_decision(meta, 3, "relabel", 2, n_classes=3, reviewer="ann")
    save_decision(meta, 7, "remove", n_classes=3)
    last = save_decision(meta, 3, "keep", n_classes=3, reviewer="bob")
    latest = load_decisions(meta)
    assert [(d.example_id, d.decision, d.label) for d in latest] == [(3, "keep", None), (7, "remove", None)]
    assert latest[0] == last and latest[0].reviewer == "bob"
    history = load_decisions(meta, history=True)
    assert [(d.example_id, d.decision) for d in history] == [(3, "relabel"), (7, "remove"), (3, "keep")]
    assert history[0] == first and first.label == 2 and first.decided_at <= last.decided_at
    assert first.decided_at.endswith("+00:00")
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.decision = "keep"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((1, "delete", None), ["decision", "'delete'"]),
        ((1, "RELABEL", 1), ["decision"]),
        ((1, None, None), ["decision"]),
        ((1, "relabel", None), ["label", "None"]),
        ((1, "relabel", 3), ["label", "[0, 3)", "3"]),
        ((1, "relabel", -1), ["label", "-1"]),
        ((1, "relabel", 1.0), ["label", "1.0"]),
        ((1, "relabel", True), ["label", "True"]),
        ((1, "keep", 1), ["label", "keep"]),
        ((1, "remove", 0), ["label", "remove"]),
        (("1", "keep", None), ["example_id", "'1'"]),
        ((1.5, "keep", None), ["example_id", "1.5"]),
    ],
)
def test_bad_decisions_are_refused_by_name_and_nothing_is_written(meta, args, words):
    with pytest.raises(ValueError) as err:
        save_decision(meta, *args, n_classes=3)
    for w in words:
        assert w in str(err.value), (w, str(err.value))
    assert load_decisions(meta, history=True) == []


def test_a_reviewer_name_is_bounded(meta):
    with pytest.raises(ValueError, match="reviewer"):
        save_decision(meta, 1, "keep", reviewer="x" * 65)
    assert load_decisions(meta, history=True) == []


def test_unknown_ids_test_ids_and_deleted_examples(meta):
    for bad in (N, 10**12, -1):
        with pytest.raises(UnknownExampleError) as err:
            save_decision(meta, bad, "keep")
        assert str(bad) in str(err.value) and "train" in str(err.value)
    save_decision(meta, 4, "remove")
    save_decision(meta, 5, "keep")
    meta.delete("train", [4], deleted_at="2026-01-01T00:00:00+00:00")
    # a deleted example's decisions leave the list, and it takes no new ones
    assert [d.example_id for d in load_decisions(meta)] == [5]
    with pytest.raises(UnknownExampleError):
        save_decision(meta, 4, "keep")
    assert [d.example_id for d in load_decisions(meta, history=True)] == [5]


def test_a_database_from_before_decisions_opens_reads_none_and_takes_decisions(meta, tmp_path):
    path = meta.path
    save_decision(meta, 1, "keep")
    meta.close()
    with sqlite3.connect(path) as conn:  # what a run built before the table existed holds
        conn.execute("DROP TABLE decisions")
    with MetadataStore(path, create=False) as old:
        assert load_decisions(old) == [] and load_decisions(old, history=True) == []
        save_decision(old, 2, "relabel", 0, n_classes=3)
        assert [(d.example_id, d.label) for d in load_decisions(old)] == [(2, 0)]
    with MetadataStore(path, create=False) as reopened:  # survives a restart
        assert [d.example_id for d in load_decisions(reopened)] == [2]


def test_concurrent_reviewers_lose_no_decision(meta, tmp_path):
    """Threads with their own connections (two stores on one file) race, including to create the table."""
    other = MetadataStore(meta.path, create=False)
    stores = [meta, other]
    errors = []
    barrier = threading.Barrier(8)

    def review(worker):
        try:
            barrier.wait()
            for j in range(15):
                save_decision(stores[worker % 2], (worker * 15 + j) % N, "keep", reviewer=f"r{worker}")
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=review, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other.close()
    assert errors == []
    history = load_decisions(meta, history=True)
    assert len(history) == 8 * 15
    assert sorted((d.reviewer, d.example_id) for d in history) == sorted(
        (f"r{w}", (w * 15 + j) % N) for w in range(8) for j in range(15)
    )
    assert len(load_decisions(meta)) == N


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_export_holds_exactly_the_decisions_in_force(meta, tmp_path, suffix):
    save_decision(meta, 2, "relabel", 1, n_classes=3, reviewer="ann")
    save_decision(meta, 9, "remove")
    save_decision(meta, 2, "relabel", 0, n_classes=3)
    save_decision(meta, 11, "keep")
    out = save_decisions_table(load_decisions(meta), tmp_path / "sub" / f"decisions{suffix}")
    as_text = pcsv.ConvertOptions(
        column_types={"decided_at": pa.string(), "reviewer": pa.string()}, strings_can_be_null=True
    )
    table = pcsv.read_csv(out, convert_options=as_text) if suffix == ".csv" else pq.read_table(out)
    rows = table.to_pylist()
    assert [(r["example_id"], r["decision"], r["label"]) for r in rows] == [
        (2, "relabel", 0),
        (9, "remove", None),
        (11, "keep", None),
    ]
    assert [DecisionRecord(**r) for r in rows] == load_decisions(meta)
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_export_refuses_an_unknown_format(meta, tmp_path):
    with pytest.raises(ValueError, match="out"):
        save_decisions_table([], tmp_path / "decisions.xlsx")
    assert list(tmp_path.glob("decisions*")) == []


def test_an_empty_export_has_the_columns(meta, tmp_path):
    table = pq.read_table(save_decisions_table([], tmp_path / "d.parquet"))
    assert table.num_rows == 0 and table.column_names == ["example_id", "decision", "label", "decided_at", "reviewer"]
    assert np.asarray(table.column("example_id")).dtype == np.int64


def test_noise_signals_round_trip_replace_and_refuse_bad_lengths(meta):
    from store import load_noise_signals, save_noise_signals

    assert load_noise_signals(meta, [0, 1]) == {0: {}, 1: {}}  # no job yet: no table, no error
    save_noise_signals(meta, [0, 1, 2], {"loss": [0.5, float("nan"), 2.0], "margin": np.array([1, 2, 3])})
    got = load_noise_signals(meta, [2, 0, 1])
    assert got == {2: {"loss": 2.0, "margin": 3.0}, 0: {"loss": 0.5, "margin": 1.0}, 1: {"loss": None, "margin": 2.0}}
    save_noise_signals(meta, [1], {"loss": [7.0]})  # a new job replaces the old signals
    assert load_noise_signals(meta, [0, 1]) == {0: {}, 1: {"loss": 7.0}}
    with pytest.raises(ValueError, match="'loss' has 1 values for 2 ids"):
        save_noise_signals(meta, [0, 1], {"loss": [1.0]})
    assert load_noise_signals(meta, [1]) == {1: {"loss": 7.0}}
