"""Schemathesis against the service's own OpenAPI schema, over a real uvicorn server on loopback.

Every operation gets schema-valid and schema-invalid requests (bounded: `EXAMPLES` each, derandomized), with
the API key set so that auth is exercised too. Every response must be a non-5xx answer with a documented
status code, content type and headers, matching its documented schema; invalid requests must be refused.

One check is left out: `positive_data_acceptance` (a schema-valid request must get 2xx/404/409) cannot hold
here, because some rules depend on the run and are not expressible in the schema: `targets` must be classes
of this model and one per query, and raw `inputs` need a server started with the task. Those requests get a
422 that says so, which the tests in test_service.py check.
"""

import shutil
import socket
import threading
import time

import hypothesis
import pytest
import schemathesis
import uvicorn
from schemathesis.checks import positive_data_acceptance
from schemathesis.generation import GenerationMode

from api.service import create_app

pytestmark = pytest.mark.slow

KEY = "fuzz-key"
EXAMPLES = 40
OPERATIONS = [
    ("GET", "/health"),
    ("GET", "/examples"),
    ("GET", "/examples/{example_id}"),
    ("POST", "/explain"),
    ("GET", "/noise"),
    ("GET", "/dumps"),
    ("POST", "/dumps"),
    ("GET", "/dumps/{job}"),
    ("GET", "/dumps/{job}/file"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def api_schema(digits_mlp_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("fuzz") / "run"
    shutil.copytree(digits_mlp_run, run, ignore=shutil.ignore_patterns("dumps"))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(run, api_key=KEY), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{port}/openapi.json")

    @schema.auth()
    class KeyAuth:
        def get(self, case, context):
            return KEY

        def set(self, case, data, context):
            case.headers = {**(case.headers or {}), "X-API-Key": data}

    yield schema
    server.should_exit = True
    thread.join(60)


def test_every_route_is_fuzzed(api_schema):
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_5xx_and_every_response_matches_the_schema(api_schema, method, path, mode):
    operation = api_schema[path][method]

    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    def check(case):
        case.call_and_validate(excluded_checks=[positive_data_acceptance])

    try:
        check()
    except hypothesis.errors.Unsatisfiable:
        assert mode is GenerationMode.NEGATIVE, "no valid request could be generated"
        pytest.skip(f"{method} {path} takes no input that could be made invalid")
