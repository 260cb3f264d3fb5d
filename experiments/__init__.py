"""Benchmarks and fidelity studies of the influence service (not part of the installed package).

Run each script from the repository root as a module, `python -m experiments.<name>` (or through its `make`
target); shared helpers live in `experiments.common` and `experiments.fidelity_common`. See experiments/README.md.
"""
