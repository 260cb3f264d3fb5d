"""The command line answers help and argument errors without loading torch, JAX or FAISS, readably, on one line.

Timings are measured by `experiments/cli_startup.py` (`make bench-cli`), not asserted here.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from api.cli import app
from api.methods import METHOD_HELP, NOISE_METHODS

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "jax", "faiss", "sqlalchemy", "matplotlib")
runner = CliRunner()


def _loaded_after(code: str) -> list[str]:
    """The heavy modules loaded after running `code` in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_importing_the_cli_loads_no_heavy_library():
    assert _loaded_after("import api.cli") == []


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["explain", "--help"],
        ["index", "--help"],
        ["explain", "RUN"],
        ["explain", "RUN", "--test-id", "1", "--method", "nope"],
        ["noise", "RUN", "--method", "nope"],
        ["nosuchcommand"],
    ],
)
def test_help_and_argument_errors_load_no_heavy_library(args):
    code = f"from typer.testing import CliRunner\nfrom api.cli import app\nCliRunner().invoke(app, {args!r})"
    assert _loaded_after(code) == []


def test_help_shows_every_choice_in_full_and_no_type_tags():
    explain = runner.invoke(app, ["explain", "--help"], terminal_width=80)
    noise = runner.invoke(app, ["noise", "--help"], terminal_width=80)
    top = runner.invoke(app, ["--help"], terminal_width=80)
    for result in (explain, noise, top):
        assert result.exit_code == 0, result.output
        assert "<" + "bool>" not in result.output and "<int>" not in result.output and "<list" not in result.output
        assert "…" not in result.output  # rich cuts a long cell with an ellipsis
    words = explain.output.replace(",", " ").split()
    assert all(m in words for m in METHOD_HELP), explain.output
    words = noise.output.replace(",", " ").split()
    assert all(m in words for m in NOISE_METHODS), noise.output
    assert "--verbose" in top.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["explain", "RUN"], "--test-id"),
        (["explain", "RUN", "--test-id", "x"], "--test-id"),
        (["explain", "RUN", "--test-id", "1", "--method", "nope"], "nope"),
        (["nosuchcommand"], "nosuchcommand"),
        (["--nosuchoption"], "--nosuchoption"),
    ],
)
def test_an_argument_error_is_one_line_naming_the_argument(args, needle):
    result = runner.invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output


def test_the_method_registry_of_the_scorers_is_the_declared_one():
    from api.scorers import METHODS, base

    assert tuple(METHOD_HELP) == METHODS
    assert {m: base.METHOD_HELP[m] for m in METHOD_HELP} == METHOD_HELP


@pytest.mark.slow
@pytest.mark.parametrize(
    ("damage", "detail"),
    [
        ("metadata.sqlite", "sqlalche.me"),  # SQLAlchemy's URL under the SQLite error
        ("vectors/grad.faiss", "faiss::"),  # FAISS's C++ signature
    ],
)
def test_a_corrupt_run_is_one_line_and_the_library_detail_only_under_verbose(
    digits_logreg_run, tmp_path, damage, detail
):
    run = tmp_path / "run"
    shutil.copytree(digits_logreg_run, run)
    target = run / damage
    target.write_bytes(target.read_bytes()[:100] if damage.endswith(".faiss") else b"not a database")
    quiet = runner.invoke(app, ["explain", str(run), "--test-id", "1"])
    lines = [line for line in quiet.output.splitlines() if line.strip()]
    assert quiet.exit_code == 2 and len(lines) == 1, quiet.output
    assert damage.split("/")[-1] in lines[0] and detail not in quiet.output and "--verbose" in lines[0]
    loud = runner.invoke(app, ["--verbose", "explain", str(run), "--test-id", "1"])
    assert loud.exit_code == 2 and detail in loud.output and "Traceback" not in loud.output
