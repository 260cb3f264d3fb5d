"""The house rules, checked on the source: package roles, no import circles, one method registry, one layout.

These read the code as text (ast), so they fail as soon as a change breaks a rule, whatever the tests cover.
"""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("influence", "indexer", "store", "api")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of ours that `name` imports (at any depth of the file, lazy imports included)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_no_import_circles_among_the_modules_of_the_four_packages() -> None:
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                circles.append([*stack[stack.index(m) :], m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)
    # a module importing its own package's __init__ (which imports it back) is the usual Python re-export shape,
    # not a circle between modules
    real = [
        c
        for c in circles
        if not any(a == b.rpartition(".")[0] or b == a.rpartition(".")[0] for a, b in itertools.pairwise(c))
    ]
    assert real == [], "import circles: " + "; ".join(" -> ".join(c) for c in real)


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("influence", ("indexer", "store", "api", "torch", "faiss", "sqlalchemy")),
        ("store", ("indexer", "api", "torch")),
        ("indexer", ("api",)),
    ],
)
def test_package_roles(package: str, forbidden: tuple[str, ...]) -> None:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            bad += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in forbidden]
    assert bad == []


def test_method_names_are_dispatched_in_the_registry_only() -> None:
    pattern = re.compile(r"method\s*(==|!=|in)\s*[\"'(]")
    hits = [
        f"{path.relative_to(ROOT)}:{i}"
        for pkg in PACKAGES
        for path in sorted((ROOT / pkg).rglob("*.py"))
        if "scorers" not in path.parts and pkg != "influence"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == []


def test_index_is_a_thin_facade() -> None:
    assert len((ROOT / "api" / "index.py").read_text().splitlines()) <= 200


def test_every_array_name_outside_store_is_declared_in_the_layout() -> None:
    from store.layout import ARRAYS, CACHES, SPACES

    used = set()
    for pkg in ("api", "indexer"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            used |= set(re.findall(r"\.(?:array|has)\(\"([A-Za-z0-9_-]+)\"\)", path.read_text()))
            used |= {f"space:{s}" for s in re.findall(r"\.(?:vector|space)\(\"([A-Za-z0-9_-]+)\"\)", path.read_text())}
    declared = set(ARRAYS) | set(CACHES) | {f"space:{s}" for s in SPACES}
    assert used and used <= declared, sorted(used - declared)


def test_only_store_writes_files() -> None:
    """Writes into a run directory go through store/: no raw numpy/shutil/os writes elsewhere."""
    pattern = re.compile(
        r"\.savefig\(|np\.save\w*\(|open_memmap\(|shutil\.rmtree\(|os\.replace\(|\.write_bytes\(|np\.savez"
    )
    hits = [
        f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
        for pkg in ("api", "indexer", "influence")
        for path in sorted((ROOT / pkg).rglob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == []


def test_a_method_added_as_one_module_reaches_explain_dumps_and_pairwise(digits_mlp_run, tmp_path, monkeypatch):
    """The README's smallest example: a scorer class registered in one module serves every entry point."""
    import numpy as np
    import pyarrow.parquet as pq

    from api import open_index
    from api.scorers import base
    from api.scorers.head import HeadGradient

    monkeypatch.setattr(base, "METHODS_BY_SCOPE", {s: dict(m) for s, m in base.METHODS_BY_SCOPE.items()})
    monkeypatch.setattr(base, "METHOD_HELP", dict(base.METHOD_HELP))

    @base.register("grad-sign", scope="head", help="sign agreement of head gradients")
    class GradSign(HeadGradient):
        method = "grad-sign"
        space = "grad"

        def query_vectors(self, queries):
            return np.sign(self.gradients(queries)), {}

    with open_index(digits_mlp_run) as index:
        dense = index.pairwise_scores([0, 1], method="grad-sign")
        g = index.engine.train_gradients(slice(None))
        q = np.sign(index.engine.gradients(*_stored(index, [0, 1])))
        np.testing.assert_allclose(dense, q @ g.T, rtol=1e-5, atol=1e-6)
        [exp] = index.explain(test_ids=[0], k=3, method="grad-sign")
        assert [p.example_id for p in exp.proponents] == np.argsort(-dense[0], kind="stable")[:3].tolist()
        out = index.dump(tmp_path / "d.parquet", [0, 1], k=3, method="grad-sign", progress=False)
        assert set(pq.read_table(out).column("method").to_pylist()) == {"grad-sign"}


def _stored(index, ids):
    queries = index.engine.prepare(ids, None, None)
    return queries.h, queries.targets
