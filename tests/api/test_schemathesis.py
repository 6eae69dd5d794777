"""Schemathesis against the live app's /openapi.json (a real uvicorn on a loopback port over a tiny checkpoint):
every documented operation, a bounded number of generated requests each, no 5xx, and every response conforms to
the document (status code documented, content type, body schema; errors in the OpenAI envelope)."""
from __future__ import annotations

import pytest

pytest.importorskip("schemathesis", reason="schemathesis is in the `test` extra")

import schemathesis  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,  # noqa: E402
                                               response_schema_conformance, status_code_conformance)

from model.config import PRESETS  # noqa: E402
from tests.api.conftest import make_app, uvicorn_thread  # noqa: E402
from tests.utils import make_tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 30
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
BODY_OPERATIONS = {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"}


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, demo_tokenizer_vocab):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("schemathesis"),
                                PRESETS["tiny"].with_(vocab_size=demo_tokenizer_vocab))
    # A short context keeps generated requests (n up to 128, max_tokens defaulting to the rest) cheap on a CPU.
    with uvicorn_thread(make_app(path, max_model_len=64, num_kv_blocks=512)) as base:
        yield base


@pytest.fixture(scope="module")
def schema(base_url):
    return schemathesis.openapi.from_url(base_url + "/openapi.json")


def test_request_bodies_are_documented(schema):
    raw = schema.raw_schema
    for path in BODY_OPERATIONS:
        post = raw["paths"][path]["post"]
        ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.rsplit("/", 1)[-1] in raw["components"]["schemas"]
        assert "422" not in post["responses"] and "400" in post["responses"]


def _operations(schema):
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors_and_responses_conform(schema, base_url, mode):
    operations = _operations(schema)
    assert BODY_OPERATIONS <= {op.path for op in operations}
    statuses = {}
    for operation in operations:
        if mode == GenerationMode.NEGATIVE and operation.method.lower() != "post":
            continue   # the GET routes take no input to make invalid
        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case):
            response = case.call(base_url=base_url, timeout=30)
            key = f"{operation.method.upper()} {operation.path}"
            statuses.setdefault(key, {}).setdefault(response.status_code, 0)
            statuses[key][response.status_code] += 1
            case.validate_response(response, checks=CHECKS)   # raises with a curl line to reproduce

        run()
    print(mode, statuses)
    # The generated bodies reach the handlers: valid ones succeed and invalid ones are answered 400.
    if mode == GenerationMode.POSITIVE:
        assert all(200 in statuses.get(f"POST {path}", {}) for path in BODY_OPERATIONS), statuses
