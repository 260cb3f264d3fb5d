"""The package declares the torch range it supports; the exact build of these machines is pinned in constraints."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_declares_a_torch_range_and_constraints_pin_the_machines_build():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [torch] = [d for d in deps if re.match(r"torch\b", d)]
    assert "==" not in torch and ">=" in torch, torch
    pins = [line.strip() for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("torch")]
    assert pins and pins[0].startswith("torch==")
    # the project's own install (not the peers' --target installs) runs under the constraints
    install = [line for line in (ROOT / "Makefile").read_text().splitlines() if "pip install" in line and "-e " in line]
    assert install and all("-c constraints.txt" in line for line in install)
