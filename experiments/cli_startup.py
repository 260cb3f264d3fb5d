"""CPU time of the command line's quick answers, beside the machine's bare Python start-up (`make bench-cli`).

Each case runs `REPEATS` times in a fresh interpreter; the CPU time (user + system) of the child comes from
`os.wait4`. Cases: `python -c pass` (the floor), `influence --help`, `influence explain --help`, an argument
error (`influence explain RUN` without `--test-id`), and for reference `import api.index` (what every command
paid before the heavy imports moved into the commands). Writes experiments/results/cli_startup.json and .png.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
REPEATS = 7
CLI = [sys.executable, "-m", "api.cli"]
CASES = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "influence --help": [*CLI, "--help"],
    "influence explain --help": [*CLI, "explain", "--help"],
    "argument error (explain RUN)": [*CLI, "explain", "RUN"],
    "import api.index (the old start-up)": [sys.executable, "-c", "import api.index"],
}


def cpu_seconds(cmd: list[str]) -> tuple[float, float]:
    """(CPU seconds user + system, wall seconds) of one run of `cmd` from the repository root."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, _, usage = os.wait4(proc.pid, 0)
    return usage.ru_utime + usage.ru_stime, time.perf_counter() - t0


def main() -> None:
    rows = {}
    for name, cmd in CASES.items():
        runs = [cpu_seconds(cmd) for _ in range(REPEATS)]
        cpu = [c for c, _ in runs]
        rows[name] = {
            "cpu_median_s": statistics.median(cpu),
            "cpu_min_s": min(cpu),
            "cpu_max_s": max(cpu),
            "wall_median_s": statistics.median(w for _, w in runs),
        }
        print(f"{name:40s} CPU {rows[name]['cpu_median_s']:.3f} s (min {min(cpu):.3f}, max {max(cpu):.3f})")
    out = {
        "repeats": REPEATS,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "cases": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cli_startup.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(rows, RESULTS / "cli_startup.png")
    print(f"wrote {RESULTS / 'cli_startup.json'}")


def plot(rows: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    med = [rows[n]["cpu_median_s"] for n in names]
    err = [
        [m - rows[n]["cpu_min_s"] for n, m in zip(names, med, strict=True)],
        [rows[n]["cpu_max_s"] - m for n, m in zip(names, med, strict=True)],
    ]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh(names, med, xerr=err, color=["0.6", "C0", "C0", "C0", "C3"])
    ax.axvline(1.0, color="k", lw=0.8, ls="--", label="target: 1 s of CPU")
    ax.set_xlabel("CPU seconds (user + system), median of runs")
    ax.invert_yaxis()
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
