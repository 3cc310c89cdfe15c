"""Hostile probe, round 2, item 12's "done when": schemathesis drives every operation of the server's own
/openapi.json (a bounded number of examples, in this process) and finds no 5xx and no response that breaks the
schema: status codes, content types and bodies all documented."""

import pytest
import torch

from tests.serve_utils import ENGINE_KWARGS
from weavelm.core.async_llm import AsyncLLM
from weavelm.serve.app import build_app

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

KEY = "schema-key"


@pytest.fixture(scope="module")
def app(smol_tokenizer_model):
    torch.set_num_threads(1)
    engine = AsyncLLM(model=smol_tokenizer_model, max_model_len=64, **ENGINE_KWARGS)
    yield build_app(engine, "tiny", api_key=KEY)
    engine.shutdown()


def test_the_server_keeps_its_schema(app):
    from schemathesis import checks
    from schemathesis.specs.openapi import checks as openapi_checks

    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers={"Authorization": f"Bearer {KEY}"})
    failures = []
    for op in schema.get_all_operations():
        operation = op.ok()

        @settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case):
            response = case.call(headers={"Authorization": f"Bearer {KEY}"})
            try:
                case.validate_response(response, checks=[checks.not_a_server_error,
                                                         openapi_checks.status_code_conformance,
                                                         openapi_checks.content_type_conformance,
                                                         openapi_checks.response_schema_conformance])
            except Exception as e:  # collect every operation's first failure
                failures.append(f"{operation.method.upper()} {operation.path}: {e}")
                raise

        try:
            run()
        except Exception:  # recorded in `failures` (or a strategy error, which the assertion below shows)
            if not failures or not failures[-1].startswith(f"{operation.method.upper()} {operation.path}"):
                raise
    assert not failures, "\n\n".join(failures)
