"""Schema-driven fuzzing of the gateway (Schemathesis over its own OpenAPI schema, in process,
with Triton unreachable): whatever a client sends, valid or not, the answer is a status the schema
declares, with a body of the declared shape, never a 500, and the gateway answers normally after.
``make fuzz`` runs it with many more examples (FUZZ_EXAMPLES)."""

from __future__ import annotations

import os
from typing import Any

import hypothesis
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from pipeline.deploy.openai.app import create_app
from tests.unit.test_gateway_errors import call, settings

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
app = create_app(settings())
schema = schemathesis.openapi.from_asgi("/openapi.json", app)
TALLY = {"requests": 0, "server_errors": 0}


@schema.parametrize()
@hypothesis.settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
def test_no_request_gets_a_500_or_an_undeclared_answer(case: Any) -> None:
    response = case.call()
    TALLY["requests"] += 1
    if response.status_code in (503, 504):  # Triton is down: what a valid request must get
        assert case.path == "/health" or "retry-after" in response.headers or response.status_code == 504
    else:
        TALLY["server_errors"] += response.status_code >= 500
        case.validate_response(response, checks=[not_a_server_error])
    case.validate_response(response, checks=[status_code_conformance, response_schema_conformance])


def test_the_gateway_answers_normally_after_the_fuzzing() -> None:
    response = call("GET", "/v1/models")
    assert response.status_code == 200 and response.json()["data"][0]["id"] == "m"
    print(f"gateway fuzz: {TALLY['requests']} requests, {TALLY['server_errors']} server errors")
