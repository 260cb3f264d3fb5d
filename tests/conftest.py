import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every Ray instance of the tests stays on 127.0.0.1: without this Ray resolves 127.0.0.1 to the machine's address.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("INFLUENCE_WARM", "0")  # the service's start-up compile; tests/test_warmup.py turns it on

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


@pytest.fixture(scope="session")
def loopback_uvicorn():
    """Serves an ASGI app on a real uvicorn server on 127.0.0.1 (a free port) in a daemon thread.

    Usage: `with loopback_uvicorn(app) as base_url: ...`; the server is stopped and joined on exit.
    """
    import contextlib
    import socket
    import threading
    import time

    import uvicorn

    @contextlib.contextmanager
    def serve(app, *, start_timeout: float = 30.0, stop_timeout: float = 60.0):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + start_timeout
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(stop_timeout)

    return serve


@pytest.fixture(scope="module")
def ray_cluster():
    """A two-node Ray cluster on loopback (one CPU each), this process connected to it; shut down after the
    module. Skips when Ray (the optional extra) is not installed."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
