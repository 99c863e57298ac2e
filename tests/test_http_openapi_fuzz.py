"""The OpenAPI document tells the truth: schemathesis, reading only /openapi.json, sends
schema-valid and schema-invalid requests to every operation of the Artifacts API and the
OpenAI Files API on a real server on loopback, and every check it has must pass (no server
error, no valid request refused, no invalid one accepted, responses as documented, 405 with
``Allow``).

Bounded and derandomized: each operation gets its coverage cases (boundaries, each declared
constraint broken, methods it does not take) and a fixed small number of generated examples,
the same ones every run. ARTIFACTFS_TORTURE_SCALE multiplies the examples.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, cast

import httpx
import pytest
import schemathesis
from conftest import SCALE
from httputil import server_in_thread
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS, load_all_checks

from artifactfs.http.app import create_app
from artifactfs.store import ArtifactStore

load_all_checks()
ALL_CHECKS = list(CHECKS.get_all())
EXAMPLES = 10 * SCALE

# The document is built from the app's routes alone (no route runs while it is made), so it is
# known when pytest collects the operations; test_served_document_is_the_one_fuzzed checks
# that the server serves this very document.
DOCUMENT: dict[str, Any] = create_app(cast(ArtifactStore, None)).openapi()
schema = schemathesis.openapi.from_dict(copy.deepcopy(DOCUMENT))  # it edits what it is given


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with server_in_thread(tmp_path_factory.mktemp("openapi-fuzz")) as url:
        yield url


@schema.parametrize()
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_every_operation_keeps_to_the_document(case: schemathesis.Case, server_url: str
                                               ) -> None:
    if _past_int64(case.body) or _past_int64(case.query):
        # schemathesis checks integers against bounds in floating point, where 2**63 + 190
        # is 2**63 - 1: it calls such a size valid, and the server rightly refuses it.
        return
    case.call_and_validate(base_url=server_url, checks=ALL_CHECKS)


def test_stateful_workflows_keep_to_the_document(server_url: str) -> None:
    """Sequences of calls that follow what one response names into the next request (a file
    created, then fetched, downloaded, deleted, fetched again), with the same checks and those
    about created and deleted resources (a created file is there; a deleted one is gone)."""
    stateful = schemathesis.openapi.from_dict(copy.deepcopy(DOCUMENT))
    stateful.config.update(base_url=server_url)

    class Workflow(stateful.as_state_machine()):  # type: ignore[misc]
        def validate_response(self, response: Any, case: schemathesis.Case,
                              additional_checks: Any = None, **kwargs: Any) -> None:
            if _past_int64(case.body) or _past_int64(case.query):
                return  # see test_every_operation_keeps_to_the_document
            case.validate_response(response, checks=ALL_CHECKS,
                                   transport_kwargs=kwargs or None, recorder=self.recorder)

    Workflow.run(settings=settings(max_examples=EXAMPLES, derandomize=True, deadline=None,
                                   database=None, stateful_step_count=6,
                                   suppress_health_check=list(HealthCheck)))


def _past_int64(value: object) -> bool:
    """Whether ``value`` holds an integer of 2**63 or more, anywhere inside it."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value >= 2**63
    if isinstance(value, dict):
        return any(_past_int64(v) for v in value.values())
    if isinstance(value, list):
        return any(_past_int64(v) for v in value)
    return False


def test_served_document_is_the_one_fuzzed(server_url: str) -> None:
    assert httpx.get(f"{server_url}/openapi.json").json() == DOCUMENT
    labels = {f"{method.upper()} {path}" for path, ops in DOCUMENT["paths"].items()
              for method in ops}
    # Both APIs are in it, so the fuzzing above reaches both.
    assert {"POST /v1/artifacts", "GET /v1/artifacts/{key}", "POST /v1/files",
            "GET /v1/files", "GET /v1/files/{file_id}/content",
            "DELETE /v1/files/{file_id}"} <= labels
