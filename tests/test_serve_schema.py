"""`ht serve`'s /openapi.json: both request bodies and every status the routes answer are
described, and schemathesis drives the running server from it (bounded in examples and time):
no 5xx, no status, content type or body the schema does not document, and the server answers
/v1/health afterwards."""

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from serving import hyper_checkpoint, served

from htcli.generate.source_maps import Steerer

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]
EXAMPLES = 25  # per operation and phase
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def api(tiny, tmp_path_factory):
    spec, pipe = tiny
    steerer = Steerer(spec, pipe=pipe, hyper=hyper_checkpoint(tmp_path_factory.mktemp("hyper")))
    with served(steerer, batch_window_ms=0, max_images=4, max_body_bytes=2**20) as (service, url):
        yield service, url


def test_openapi_documents_both_bodies_and_every_status(api):
    _, url = api
    document = httpx.get(url + "/openapi.json", timeout=TIMEOUT).json()
    for path in ("/v1/generate", "/v1/intervention"):
        operation = document["paths"][path]["post"]
        content = operation["requestBody"]["content"]
        assert set(content) == {"application/json", "multipart/form-data", "application/x-www-form-urlencoded"}
        assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/Body"}
        form = document["components"]["schemas"]["Form"]["properties"]
        assert form["reference_images"]["items"]["format"] == "binary" and form["seed"]["maximum"] == 2**63 - 1
        assert set(operation["responses"]) == {"200", "400", "403", "408", "413", "415", "422", "429", "431", "499", "500", "503"}
    body = document["components"]["schemas"]["Body"]["properties"]
    assert {"prompt", "concepts", "strength", "seed", "reference_images", "interventions", "layers"} <= set(body)
    assert body["seed"]["minimum"] == 0 and body["layers"]["items"]["maxLength"] == 200
    for path in ("/", "/v1/health", "/v1/concepts"):
        assert set(document["paths"][path]["get"]["responses"]) == {"200", "400"}


def _fuzz(operation, mode, url: str, counts: dict) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call_and_validate(base_url=url, checks=CHECKS, timeout=TIMEOUT)
        counts[response.status_code] = counts.get(response.status_code, 0) + 1

    run()


def test_api_fuzzed_from_its_schema(api):
    """Every operation, with data that fits its schema and data that does not: bounded by
    EXAMPLES per operation and mode (derandomized: the same requests every run)."""
    service, url = api
    api_schema = schemathesis.openapi.from_url(url + "/openapi.json")
    counts: dict[int, int] = {}
    for result in api_schema.get_all_operations():
        operation = result.ok()
        modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if operation.method.upper() == "POST" else \
            (GenerationMode.POSITIVE,)  # a GET takes nothing to get wrong
        for mode in modes:
            _fuzz(operation, mode, url, counts)
    assert httpx.get(url + "/v1/health", timeout=TIMEOUT).json()["status"] == "ok" and service.in_flight == 0
    assert 200 in counts and sum(counts.values()) >= 100, counts
    print(f"schemathesis: {sum(counts.values())} requests, 0 failures; statuses {dict(sorted(counts.items()))}")
