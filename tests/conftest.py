import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def digits_mlp_task():
    from indexer.demo import digits_task

    return digits_task(n_flips=30, seed=0)


@pytest.fixture(scope="session")
def digits_mlp_run(tmp_path_factory, digits_mlp_task):
    from api import build_index

    path = tmp_path_factory.mktemp("runs") / "digits-mlp"
    build_index(digits_mlp_task, path, progress=False).close()
    return path


@pytest.fixture(scope="session")
def digits_logreg_task():
    from indexer.demo import digits_logreg_task

    return digits_logreg_task(seed=0, l2=1e-2)


@pytest.fixture(scope="session")
def digits_logreg_run(tmp_path_factory, digits_logreg_task):
    from api import build_index

    path = tmp_path_factory.mktemp("runs") / "digits-logreg"
    build_index(digits_logreg_task, path, progress=False).close()
    return path
