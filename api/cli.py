"""The `influence` command line: demo, index, explain, noise, dump, info, decisions, serve, add, delete.

Module-level imports are light (typer, `api.methods`): torch, JAX and FAISS load inside the commands that need
them, so help and argument errors answer at once (`api.cli_help`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from api.cli_help import VERBOSE, Group, friendly_errors
from api.methods import METHOD_HELP, NOISE_METHODS

RAY_HELP = "run on a Ray cluster: local | auto | HOST:PORT | ray://HOST:PORT (needs pip install '.[ray]')"

app = typer.Typer(cls=Group, add_completion=False, no_args_is_help=True, help="Training-data influence service.")


def _choices(allowed: tuple[str, ...], what: str) -> Any:
    """A typer callback refusing a value outside `allowed` at parse time (before any heavy import)."""

    def check(value: str | None) -> str | None:
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"{value!r} is not {what}; choose one of: {', '.join(allowed)}")
        return value

    return check


METHODS_HELP = "influence method, one of: " + ", ".join(METHOD_HELP)


def method_option() -> Any:
    """The `--method` option of explain, dump and demo."""
    return typer.Option(help=METHODS_HELP, metavar="METHOD", callback=_choices(tuple(METHOD_HELP), "a method"))


NOISE_METHODS_HELP = "label-noise signal, one of: " + ", ".join(NOISE_METHODS)


@app.callback()
def main_options(
    verbose: Annotated[
        bool, typer.Option("--verbose", help="errors with the detail of the library beneath them (SQL, C++, URLs)")
    ] = False,
) -> None:
    """Training-data influence service."""
    VERBOSE["on"] = verbose


def load_task(spec: str):
    """`path/to/file.py:function` or `module:function` -> the Task it returns."""
    from indexer import Task

    if ":" not in spec:
        raise ValueError(f"TASK must be 'path/to/file.py:function' or 'module:function', got {spec!r}")
    target, func = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise FileNotFoundError(f"TASK file not found: {target}")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
        sys.path.insert(0, str(path.parent.resolve()))
        mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        module = importlib.import_module(target)
    if not hasattr(module, func):
        raise ValueError(f"TASK {spec!r}: {target} has no function {func!r}")
    task = getattr(module, func)()
    if not isinstance(task, Task):
        raise ValueError(f"TASK {spec!r} returned {type(task).__name__}, not an indexer.Task")
    return task


def render_preview(preview: str) -> list[str]:
    """An image preview (a PNG thumbnail or 'row/row/...' of shades) as rows of shade characters; text as one line."""
    from api.previews import preview_pixels, shade_rows

    pixels = preview_pixels(preview)
    return shade_rows(pixels) if pixels is not None else [preview[:60]]


def format_explanation(exp, *, images: bool = True, for_label: bool = False) -> str:
    """An explanation as text: a header, then its proponents and opponents (images as character grids).

    for_label: the lists are titled for the class explained (`explain --label N`: "support label N") rather than
    for the prediction.
    """
    head = (
        f"test example {exp.test_id}: predicted {exp.prediction} "
        f"(p={max(exp.probabilities):.2f})"
        + (f", label {exp.label}" if exp.label is not None else "")
        + f"  [method {exp.method}, explaining class {exp.target}]"
    )
    lines = [head]
    target = f"label {exp.target}" if for_label else "the prediction"
    for title, group in (
        (f"proponents (support {target})", exp.proponents),
        (f"opponents (push against {target})", exp.opponents),
    ):
        lines.append(f"  {title}:")
        if not group:
            lines.append("    (none)")
        blocks = [render_preview(p.preview) for p in group] if images else []
        if images and blocks and all(len(b) > 1 for b in blocks):
            width = len(blocks[0][0])
            lines.append("    " + "  ".join(f"#{p.example_id:<{width - 1}}" for p in group))
            lines.append("    " + "  ".join(f"y={p.label:<{width - 2}}" for p in group))
            for r in range(len(blocks[0])):
                lines.append("    " + "  ".join(b[r] for b in blocks))
            lines.append("    " + "  ".join(f"{p.score:<{width}.3g}"[:width] for p in group))
        else:
            lines.append(f"    {'example_id':>10} {'score':>12} {'label':>5} {'pred':>5} {'loss':>8}  preview")
            for p in group:
                lines.append(
                    f"    {p.example_id:>10} {p.score:>12.5g} {p.label:>5} {p.prediction:>5} {p.loss:>8.3f}  "
                    f"{' '.join(p.preview.split())[:100]}"  # texts: one line, up to 100 chars
                )
    return "\n".join(lines)


@app.command()
@friendly_errors
def demo(
    out: Annotated[Path, typer.Option(help="run directory to build")] = Path("runs/demo"),
    k: Annotated[int, typer.Option(help="proponents/opponents shown")] = 5,
    n: Annotated[int, typer.Option(help="misclassified test digits explained")] = 3,
    method: Annotated[str, method_option()] = "lissa",
) -> None:
    """Digits MLP with flipped labels: index it and explain misclassified test digits."""
    from api import build_index
    from indexer.demo import digits_task

    typer.echo("training a 64-32-10 MLP on scikit-learn digits (30 training labels flipped)...")
    task = digits_task()
    if (out / "manifest.json").exists():
        from store import load_manifest

        if load_manifest(out).model_fingerprint != task.fingerprint():
            from store import remove_run

            typer.echo(f"{out} holds a demo run of another model: rebuilding it")
            remove_run(out)
    index = build_index(task, out)
    info = index.info()["extra"]
    typer.echo(
        f"run directory: {out}  (train acc {info['train_accuracy']:.3f}, test acc {info['test_accuracy']:.3f}, "
        f"representer fidelity {info['representer']['fidelity']:.4f})"
    )
    test = index.run.test
    preds = index.engine.logits(test.features[:]).argmax(1)
    wrong = [int(i) for i in test.ids[preds != test.labels]][:n]
    exps = index.explain(test_ids=wrong, k=k, method=method)
    for exp in exps:
        typer.echo("")
        typer.echo(format_explanation(exp))
    from indexer.demo import flip_labels, load_digits_split

    _, clean, _, _ = load_digits_split(0)
    _, flipped = flip_labels(clean, 30, 10, 0)
    flipped_set = set(flipped.tolist())
    shown = sorted({p.example_id for e in exps for p in e.proponents + e.opponents} & flipped_set)
    if shown:
        typer.echo(
            "\namong these, examples "
            + ", ".join(f"#{i} (labelled {index.run.train.labels[i]}, really {clean[i]})" for i in shown)
            + " are among the 30 labels the demo flipped"
        )
    suspects = index.find_label_noise(progress=False)
    found = sum(s.example_id in flipped_set for s in suspects[:30])
    typer.echo(f"label-noise job: {found} of the 30 flipped labels are in its top 30 suspects (influence noise {out})")
    png = index.paths.figure("explanations")
    save_grid(index, exps, png)
    typer.echo(f"\nsaved {png}; try: influence explain {out} --test-id {wrong[0] if wrong else 0} --method exact")


def save_grid(index, explanations, path: Path) -> None:
    """A PNG grid: each query digit, then its proponents and opponents with scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from api.previews import preview_pixels
    from store import save_figure

    def image(preview: str) -> np.ndarray:
        pixels = preview_pixels(preview)
        return pixels if pixels is not None else np.zeros((8, 8))

    if not explanations:
        return
    k = max(max(len(e.proponents), len(e.opponents)) for e in explanations)
    fig, axes = plt.subplots(
        len(explanations), 1 + 2 * k, figsize=(1.3 * (1 + 2 * k), 1.6 * len(explanations)), squeeze=False
    )
    for row, exp in zip(axes, explanations, strict=True):
        for ax in row:
            ax.axis("off")
        q = index.metadata.get("test", [exp.test_id])[0]
        row[0].imshow(image(q.preview), cmap="gray_r")
        row[0].set_title(f"test {exp.test_id}\npred {exp.prediction} y {exp.label}", fontsize=7)
        for j, p in enumerate(exp.proponents):
            row[1 + j].imshow(image(p.preview), cmap="Greens")
            row[1 + j].set_title(f"+ y={p.label}\n{p.score:.3g}", fontsize=7)
        for j, p in enumerate(exp.opponents):
            row[1 + k + j].imshow(image(p.preview), cmap="Reds")
            row[1 + k + j].set_title(f"- y={p.label}\n{p.score:.3g}", fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


@app.command()
@friendly_errors
def index(
    task: Annotated[str, typer.Argument(help="path/to/file.py:function or module:function returning a Task")],
    out: Annotated[Path, typer.Option("--out", help="run directory (resumed if it exists)")],
    curvature: Annotated[str | None, typer.Option(help="ggn (default) or hessian")] = None,
    projection_dim: Annotated[int | None, typer.Option(help="size of projected gradients (default 1024)")] = None,
    factory: Annotated[str | None, typer.Option(help="FAISS factory: Flat (default), IVF,Flat, HNSW32, ...")] = None,
    curvature_rows: Annotated[int | None, typer.Option(help="rows of the eigenpair subspace iterations")] = None,
    cache_queries: Annotated[
        bool, typer.Option("--cache-queries", help="solve LiSSA for every stored test example at build time")
    ] = False,
    ray: Annotated[str | None, typer.Option("--ray", help=RAY_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the manifest (JSON) instead of the summary")] = False,
) -> None:
    """Build (or resume) a run directory for a Task (options: `indexer.IndexConfig`; a resume needs the same)."""
    import time

    from api import build_index
    from api.ray_cluster import check_ray
    from indexer import IndexConfig
    from indexer.resume import resume_status

    check_ray(ray)  # before the Task file runs

    given = {
        "curvature": curvature,
        "projection_dim": projection_dim,
        "factory": factory,
        "curvature_rows": curvature_rows,
        "cache_queries": cache_queries or None,
    }
    config = IndexConfig(**{k: v for k, v in given.items() if v is not None})  # bad values: ValueError by name
    loaded = load_task(task)
    status = resume_status(out)
    if status is not None:
        typer.echo(status, err=True)
    t0 = time.perf_counter()
    with build_index(loaded, out, config=config, ray=ray) as idx:
        info = idx.info()
    typer.echo(json.dumps(info, indent=2, default=str) if as_json else build_summary(info, time.perf_counter() - t0))


def build_summary(info: dict[str, Any], seconds: float) -> str:
    """One summary of a built run: examples, accuracy, head and scope, parameters, spaces, build time, path."""
    task, head, extra = info.get("task", {}), info.get("head", {}), info.get("extra", {})
    acc = ", ".join(
        f"{split} accuracy {extra[f'{split}_accuracy']:.3f}"
        for split in ("train", "test")
        if isinstance(extra.get(f"{split}_accuracy"), int | float)
    )
    layers = "+".join(head.get("layers", [])) or "?"
    projection = info.get("projection")
    projected = f", projected to {projection['dim']}" if isinstance(projection, dict) and "dim" in projection else ""
    return (
        f"built {info.get('path')} in {seconds:.1f} s: {task.get('n_train', '?')} train / {task.get('n_test', 0)} "
        f"test examples" + (f", {acc}" if acc else "") + f"; scope {task.get('scope', 'head')}, head {layers} "
        f"({head.get('n_params', '?'):,} parameters{projected}, {head.get('n_classes', '?')} classes); "
        f"spaces {', '.join(info.get('spaces', {})) or 'none'}"
    )


@app.command()
@friendly_errors
def explain(
    run: Annotated[Path, typer.Argument(help="run directory")],
    test_id: Annotated[list[int], typer.Option("--test-id", help="stored test example id (repeatable)")],
    k: Annotated[int, typer.Option(help="number of proponents and of opponents")] = 10,
    method: Annotated[str, method_option()] = "lissa",
    label: Annotated[int | None, typer.Option(help="explain this class instead of the prediction")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Why did the model predict this test example? Proponents and opponents."""
    from api import open_index

    with open_index(run) as idx:
        targets = None if label is None else [label] * len(test_id)
        exps = idx.explain(test_ids=test_id, k=k, method=method, targets=targets)
    if as_json:
        typer.echo(json.dumps([e.to_dict() for e in exps], indent=2))
    else:
        typer.echo("\n\n".join(format_explanation(e, for_label=label is not None) for e in exps))


@app.command()
@friendly_errors
def noise(
    run: Annotated[Path, typer.Argument(help="run directory")],
    top: Annotated[int, typer.Option(help="suspects shown")] = 20,
    method: Annotated[
        str,
        typer.Option(help=NOISE_METHODS_HELP, metavar="METHOD", callback=_choices(NOISE_METHODS, "a noise method")),
    ] = "fused",
    out: Annotated[Path | None, typer.Option(help="write every suspect to .csv, .parquet or .json")] = None,
    png: Annotated[Path | None, typer.Option(help="also draw the result to this PNG (default: no PNG)")] = None,
    known_wrong: Annotated[
        Path | None,
        typer.Option(
            help="text file of example ids known to be mislabeled: prints how many the top suspects hold (and the "
            "PNG shows found vs checked)"
        ),
    ] = None,
    oos_refit: Annotated[
        str,
        typer.Option(
            help="auto|last-layer|whole-head: out-of-sample refits (auto: whole head if it has hidden layers)"
        ),
    ] = "auto",
    oos_repeats: Annotated[
        int | None, typer.Option(help="K-fold runs averaged (default: 2 for whole-head refits, 1 for last-layer)")
    ] = None,
    ray: Annotated[str | None, typer.Option("--ray", help=RAY_HELP)] = None,
) -> None:
    """Rank training examples by how likely their label is wrong (most suspicious first)."""
    from api import open_index
    from api.noise import plot_suspects
    from api.previews import preview_pixels

    wrong: set[int] | None = None
    if known_wrong is not None:
        try:
            wrong = {int(v) for v in known_wrong.read_text().split()}
        except (OSError, ValueError) as e:
            raise ValueError(
                f"--known-wrong must be a readable file of integer ids, got {str(known_wrong)!r}: {e}"
            ) from e
    with open_index(run) as idx:
        suspects = idx.find_label_noise(method=method, oos_refit=oos_refit, oos_repeats=oos_repeats, ray=ray)
    if out is not None:
        write_suspects(suspects, out)
    if png is not None:
        typer.echo(f"wrote {plot_suspects(suspects, png, wrong)}")
    typer.echo(f"{'rank':>4} {'example_id':>10} {'score':>10} {'label':>5} {'suggested':>9}  preview")
    for rank, s in enumerate(suspects[:top], 1):
        preview = s.preview if preview_pixels(s.preview) is None else "(image)"
        typer.echo(f"{rank:>4} {s.example_id:>10} {s.score:>10.4g} {s.label:>5} {s.suggested_label:>9}  {preview[:50]}")
    if out is not None:
        typer.echo(f"wrote {len(suspects)} suspects to {out}")
    if wrong is not None:
        typer.echo(found_line(suspects, wrong, top))


def found_line(suspects, wrong: set[int], top: int) -> str:
    """How many known-wrong labels the ranking puts first: found x of y in the top y suspects (y = the known-wrong
    ids that are training examples of the run), and in the top `top` shown."""
    ranked = [s.example_id for s in suspects]
    known = wrong & set(ranked)
    if not known:
        raise ValueError("--known-wrong: none of these ids is a training example of this run")
    y = len(known)
    found = len(known & set(ranked[:y]))
    shown = len(known & set(ranked[:top]))
    ignored = f"; {len(wrong) - y} ids of the file are not training examples of the run" if len(wrong) > y else ""
    return (
        f"known wrong: found {found} of {y} in the top {y} suspects ({100 * found / y:.0f}%), "
        f"{shown} of {y} in the top {min(top, len(ranked))} shown{ignored}"
    )


def write_suspects(suspects, out: Path) -> None:
    """Suspects to .csv / .parquet / .json (atomically)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from store import atomic_path, atomic_write_json

    rows = [s.to_dict() for s in suspects]
    if out.suffix == ".json":
        atomic_write_json(out, rows)
        return
    if out.suffix not in (".csv", ".parquet"):
        raise ValueError(f"--out must end in .csv, .parquet or .json, got {str(out)!r}")
    flat = [
        {k: v for k, v in r.items() if k != "signals"} | {f"signal_{k}": v for k, v in r["signals"].items()}
        for r in rows
    ]
    table = pa.Table.from_pylist(flat)
    with atomic_path(out) as tmp:
        (pq.write_table if out.suffix == ".parquet" else pacsv.write_csv)(table, tmp)


@app.command()
@friendly_errors
def dump(
    run: Annotated[Path, typer.Argument(help="run directory")],
    out: Annotated[Path, typer.Option("--out", help="Parquet file to write")],
    k: Annotated[int, typer.Option(help="proponents and opponents kept per query")] = 100,
    method: Annotated[str, method_option()] = "lissa",
    targets: Annotated[
        str | None, typer.Option(help="'label': score each query at its true label (default: its prediction)")
    ] = None,
    dense: Annotated[bool, typer.Option(help="also write every score to <stem>.dense.npy")] = False,
    aggregates: Annotated[
        bool, typer.Option(help="also write per-training-example sums and counts to <stem>.aggregates.parquet")
    ] = True,
    block_size: Annotated[int, typer.Option(help="queries per block (memory and checkpoint unit)")] = 256,
    ray: Annotated[str | None, typer.Option("--ray", help=RAY_HELP)] = None,
) -> None:
    """Stream top-k scores of every stored test example to Parquet (resumable: re-run the same command)."""
    from api import open_index
    from api.dump import dump_paths

    with open_index(run) as idx:
        path = idx.dump(
            out, k=k, method=method, targets=targets, dense=dense, aggregates=aggregates, block_size=block_size, ray=ray
        )
    typer.echo(f"wrote {path}")
    extra = dump_paths(path)
    for name in ("aggregates", "dense", "dense_ids"):
        if (name == "aggregates" and aggregates) or (name != "aggregates" and dense):
            typer.echo(f"wrote {extra[name]}")


@app.command()
@friendly_errors
def info(
    run: Annotated[Path, typer.Argument(help="run directory")],
    verify: Annotated[bool, typer.Option(help="check FAISS and SQLite agree")] = False,
) -> None:
    """Show a run directory's manifest summary."""
    from api import open_index
    from store import verify_run

    with open_index(run) as idx:
        out = idx.info()
    if verify:
        problems = verify_run(run)
        out["verify"] = problems or "ok"
        if problems:
            typer.echo(json.dumps(out, indent=2, default=str))
            raise typer.Exit(1)
    typer.echo(json.dumps(out, indent=2, default=str))


@app.command()
@friendly_errors
def decisions(
    run: Annotated[Path, typer.Argument(help="run directory")],
    out: Annotated[Path, typer.Option(help="FILE.csv or FILE.parquet")],
    history: Annotated[bool, typer.Option(help="every decision ever recorded, not only those in force")] = False,
) -> None:
    """Export reviewers' decisions (relabel / keep / remove, from the /clean page or POST /decisions)."""
    from store import MetadataStore, RunPaths, load_decisions, save_decisions_table

    if out.suffix.lower() not in (".csv", ".parquet"):
        raise ValueError(f"--out must end with .csv or .parquet, got {str(out)!r}")
    with MetadataStore(RunPaths(run).metadata, create=False) as meta:
        records = load_decisions(meta, history=history)
    save_decisions_table(records, out)
    counts = {d: sum(r.decision == d for r in records) for d in ("relabel", "keep", "remove")}
    typer.echo(f"wrote {len(records)} decisions ({', '.join(f'{n} {d}' for d, n in counts.items())}) to {out}")


@app.command()
@friendly_errors
def serve(
    run: Annotated[Path, typer.Argument(help="run directory")],
    host: Annotated[str, typer.Option(help="bind address (an API key is required off loopback)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="required X-API-Key: one key, or name:key,name2:key2 (the name is stored with decisions); or INFLUENCE_API_KEY"
        ),
    ] = None,
    task: Annotated[
        str | None, typer.Option(help="TASK (file.py:function) of the run, to explain raw inputs in /explain")
    ] = None,
    max_body: Annotated[int, typer.Option(help="request bodies over this many bytes get 413")] = 1 << 20,
) -> None:
    """Serve the run directory over HTTP (FastAPI): web page at /, /health, /examples, /explain, /noise,
    /dumps, OpenAPI at /docs."""
    from api.service import check_bind
    from api.service import serve as run_service

    check_bind(host, api_key)  # before loading anything
    loaded = None if task is None else load_task(task)
    run_service(run, host=host, port=port, api_key=api_key, task=loaded, max_body_bytes=max_body)


@app.command()
@friendly_errors
def add(
    run: Annotated[Path, typer.Argument(help="run directory (built for the TASK's model)")],
    task: Annotated[str, typer.Argument(help="path/to/file.py:function or module:function returning the Task")],
    keep_curvature: Annotated[
        bool,
        typer.Option("--keep-curvature", help="keep the stored curvature (noted as stale) instead of recomputing it"),
    ] = False,
) -> None:
    """Add the TASK's training examples whose ids the run neither stores nor has deleted (as POST /examples)."""
    import numpy as np
    from torch.utils.data import Subset

    from api import open_index
    from api.routes_examples import pending_train_examples
    from indexer.update import add_examples

    loaded = load_task(task)
    with open_index(run) as idx:
        positions, new_ids = pending_train_examples(loaded, np.asarray(idx.train_ids), idx.metadata.tombstones("train"))
    if len(positions) == 0:
        typer.echo(f"nothing to add: {run} holds (or has deleted) every training example of {task}")
        return
    typer.echo(f"adding {len(positions)} training examples of {task} to {run}")
    report = add_examples(
        loaded,
        run,
        Subset(loaded.train, positions.tolist()),
        ids=new_ids,
        refresh_curvature=not keep_curvature,
        progress=True,
    )
    typer.echo(update_line(report))


def _ids_option(ctx: typer.Context, ids: list[int] | None) -> list[int]:
    """`--ids 1 2 3` (the values after the first, which the option parser leaves over) or `--ids 1 --ids 2`."""
    out = list(ids or [])
    for value in ctx.args:
        try:
            out.append(int(value))
        except ValueError:
            raise ValueError(f"--ids: example ids must be integers, got {value!r}") from None
    if not out:
        raise ValueError("--ids: give the example ids to delete, e.g. --ids 3 17 42")
    return out


@app.command(context_settings={"allow_extra_args": True})
@friendly_errors
def delete(
    ctx: typer.Context,
    run: Annotated[Path, typer.Argument(help="run directory")],
    ids: Annotated[list[int] | None, typer.Option("--ids", help="training example ids to delete: --ids 1 2 3")] = None,
    keep_curvature: Annotated[
        bool,
        typer.Option("--keep-curvature", help="keep the stored curvature (noted as stale) instead of recomputing it"),
    ] = False,
    task: Annotated[
        str | None,
        typer.Option(
            "--task", help="the run's TASK (file.py:function or module:function): a scope='model' run needs it"
        ),
    ] = None,
) -> None:
    """Delete training examples: they never appear in results again (their ids are retired)."""
    wanted = _ids_option(ctx, ids)
    from indexer.update import delete_examples

    loaded = None if task is None else load_task(task)
    typer.echo(update_line(delete_examples(run, wanted, refresh_curvature=not keep_curvature, task=loaded)))


def update_line(report) -> str:
    """One line for an incremental update: what changed, the training set after it, what was refreshed."""
    ids = report.example_ids
    shown = ", ".join(str(i) for i in ids[:10]) + (f", ... ({len(ids)} in all)" if len(ids) > 10 else "")
    verb = "added" if report.op == "add" else "deleted"
    stale = f"; kept (stale): {', '.join(report.stale)}" if report.stale else ""
    return (
        f"{verb} {len(ids)} training examples (ids {shown}); {report.n_train} training examples now; "
        f"refreshed: {', '.join(report.refreshed) or 'nothing'}{stale}; {report.seconds:.1f} s"
    )


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
