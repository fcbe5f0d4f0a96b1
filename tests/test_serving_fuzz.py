"""Schemathesis over the served OpenAPI schema: no generated request gets a 5xx, every response
matches its documented status, content type and schema, and requests that break the schema are refused.

The requests go to the real app on the tiny bundle, lifespan included (schemathesis' ASGI transport
starts it once, on its own event loop; the fixture stops it). The schema is read at import from an app
with the same routes: the schema does not depend on the bundle, and schemathesis' fixture-based lazy
schema does not run under pytest 9 (it reads the removed ``Node._nodeid``).

``positive_data_acceptance`` is not among the checks: a clip can fit the schema and still be refused
for what JSON Schema cannot say (no body in it, a coordinate beyond 50 m, more than max_frames).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from serving.app import create_app
from serving.settings import Settings
from tests.pose_helpers import pose_export

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


# POST /v1/predict also takes .npy bytes: generated as raw bytes, like an octet stream
schemathesis.serializer.alias("application/x-npy", "application/octet-stream")
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(Settings(api_key=None)))


@pytest.fixture(scope="module")
def fuzzed_app(tiny_bundle, tmp_path_factory):
    pose_dir = pose_export(tmp_path_factory).dir  # the video route fuzzed with a pose model loaded
    yield create_app(
        Settings(
            bundle_dir=tiny_bundle.bundle_dir,
            pose_dir=pose_dir,
            video_bundle_dir=None,
            api_key=None,
            max_frames=300,
            max_batch=4,
        )
    )
    asgi.shutdown_lifespans()


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, fuzzed_app):
    response = case.call_and_validate(app=fuzzed_app, checks=CHECKS)
    assert response.status_code < 500
