"""Schemathesis against /openapi.json: generated requests for every route (bounded), each
answered without a 5xx and with a body that matches its documented schema."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    missing_required_header,
    response_schema_conformance,
    status_code_conformance,
)

from hpsearch.api import Settings, create_app
from hpsearch.service.studies import submit_study
from hpsearch.service.tokens import hash_token
from hpsearch.spec import parse_spec
from hpsearch.storage import Store

# Generated requests to every route, through the service to a real database: slow.
pytestmark = pytest.mark.integration

DATABASE = Path(tempfile.mkdtemp(prefix="hpsearch-schema-")) / "schema.db"
URL = f"sqlite:///{DATABASE}"
# A study for the generated ids and names to hit now and then.
submit_study(
    Store.open(URL),
    parse_spec(
        {
            "name": "digits",
            "dataset": {"source": "builtin", "name": "iris"},
            "budget": {"n_trials": 2},
        }
    ),
)
TOKEN = "hps_schema-test-token"
app = create_app(Settings(database_url=URL, env_token_hashes=(hash_token(TOKEN),)))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


# What the API promises: no server error for any input, only documented statuses and media
# types, and bodies that match their schemas. (Whether a schema-valid request is also
# semantically valid, e.g. an empty CSV file, is the routes' business: those are 422s.)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    missing_required_header,
]


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_route_answers_within_its_schema(case: schemathesis.Case) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS)
