"""Property-based fuzzing of the whole OpenAPI schema against the real app (real
database, real auth) with schemathesis: no input may cause a 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from appliance.db.engine import session_scope
from appliance.services import nodes
from tests.services import free_port, metrics_store

from .conftest import Api, build_api
from .test_resources import INVENTORY

pytestmark = pytest.mark.functional


@pytest.fixture(scope="module")
def fuzz_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    from appliance.services import tasks

    tasks.set_dispatcher(lambda *a: None)
    tmp = tmp_path_factory.mktemp("fuzz")
    gen = build_api(tmp, f"sqlite:///{tmp / 'cairn.db'}")
    api = next(gen)
    with session_scope(api.settings.resolved_database_url) as session:
        nodes.register(session, "node-1", INVENTORY, {"cpu": 16, "memory_bytes": 1 << 30})
    with metrics_store(api.settings):  # the history routes query it (fuzzed names reach PromQL)
        yield api
    gen.close()


@pytest.fixture(scope="module")
def live_url(fuzz_api: Api) -> Iterator[str]:
    """The app served by uvicorn on a loopback port, for real HTTP requests."""
    import threading
    import time

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(fuzz_api.client.app, host="127.0.0.1", port=port,
                                          log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def api_schema(live_url: str) -> Any:
    return schemathesis.openapi.from_url(f"{live_url}/api/v1/openapi.json")


# The event stream never ends by design; it has its own tests (test_live_stack).
schema = schemathesis.pytest.from_fixture("api_schema").exclude(path_regex=r"/events$")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_causes_a_server_error(case: Any, fuzz_api: Api) -> None:
    for headers in (fuzz_api.admin, {}):
        case.call_and_validate(headers={**(case.headers or {}), **headers}, checks=[not_a_server_error])


def test_the_schema_is_served_and_complete(fuzz_api: Api) -> None:
    doc = fuzz_api.client.get("/api/v1/openapi.json").json()
    assert doc["info"]["title"] == "Cairn API"
    assert len(doc["paths"]) >= 20
    assert Path(__file__).exists()
