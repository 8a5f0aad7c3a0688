"""Property-based fuzzing of the whole API from its own /v1/openapi.json: no input gives a 5xx."""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from prometheus_client.parser import text_string_to_metric_families
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from tests.cloud.conftest import TOKEN

pytestmark = pytest.mark.slow

EXAMPLES = 25  # per operation and mode: the whole run stays well under two minutes


def test_no_input_makes_a_server_error(cloud):
    (node,) = cloud.start(1)
    schema = schemathesis.openapi.from_url(node.url + "/v1/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    headers = {"Authorization": f"Bearer {TOKEN}"}
    checks = [not_a_server_error, status_code_conformance, response_schema_conformance]
    for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
        for operation in operations:
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def fuzz(case) -> None:
                case.call_and_validate(base_url=node.url, headers=headers, checks=checks, timeout=30)

            try:
                fuzz()
            except Unsatisfiable:
                assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label  # nothing in it to break
    codes = requests_by_code(node.url)
    assert sum(codes.values()) >= len(operations) * 10, codes
    assert not any(code.startswith("5") for code in codes), codes
    print(f"schemathesis: {sum(codes.values())} requests, by status: {dict(sorted(codes.items()))}")


def requests_by_code(url: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(requests.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "zstack_api_requests_total":
                code = sample.labels["code"]
                totals[code] = totals.get(code, 0) + sample.value
    return totals
