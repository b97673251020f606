"""The API key, route by route: with a key set, every route that docs/serve.md puts behind it
(`/v1/*` and `/metrics`) answers 401 in OpenAI's error shape to a request without the key or with a
wrong one, and serves the same request with the right one; the page, `/healthz`, `/openapi.json`
and `/static/` stay open. The routes are read from the app's own table, so a route added later is
checked too. Without a key, every route is open."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.routing import Mount  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from gpt_small.serve import create_app  # noqa: E402
from gpt_small.serve.app import ROUTES  # noqa: E402
from serve_util import make_model  # noqa: E402

NAME = "tiny-poet"
KEY = "s3cret"
DOCS_SAY = ("with a key, `/v1/*` wants `Authorization: Bearer KEY`", "`GET /metrics` (behind the key, if one is set)")

# a request each route serves with a 200 (small: one token)
REQUESTS = {
    "/": ("GET", "/", None),
    "/healthz": ("GET", "/healthz", None),
    "/metrics": ("GET", "/metrics", None),
    "/openapi.json": ("GET", "/openapi.json", None),
    "/v1/models": ("GET", "/v1/models", None),
    "/v1/models/{model:path}": ("GET", f"/v1/models/{NAME}", None),
    "/v1/completions": ("POST", "/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": 1}),
    "/v1/chat/completions": ("POST", "/v1/chat/completions",
                             {"model": NAME, "messages": [{"role": "user", "content": "a"}], "max_tokens": 1}),
    "/v1/poem": ("POST", "/v1/poem", {"prompt": "a", "max_tokens": 1}),
    "/static": ("GET", "/static/index.html", None),
}


def protected(path: str) -> bool:
    """What docs/serve.md puts behind the key."""
    return path.startswith("/v1/") or path == "/metrics"


def send(client, route: str, headers: dict[str, str]):
    method, path, body = REQUESTS[route]
    if method == "GET":
        return client.get(path, headers=headers)
    return client.post(path, json=body, headers=headers)


@pytest.fixture(scope="module")
def model_tok():
    return make_model()


def test_every_route_of_the_app_has_a_request_here():
    paths = {r.path for r in ROUTES}
    assert paths == set(REQUESTS), "a route was added or renamed: give it a request in REQUESTS"
    assert {r.path for r in ROUTES if isinstance(r, Mount)} == {"/static"}
    docs = " ".join((Path(__file__).resolve().parents[1] / "docs" / "serve.md").read_text().split())
    for phrase in DOCS_SAY:
        assert phrase in docs, f"docs/serve.md no longer says {phrase!r}"


@pytest.mark.parametrize("route", sorted(REQUESTS))
def test_each_protected_route_needs_the_key_and_the_others_stay_open(model_tok, route):
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    with TestClient(create_app(model=model, tokenizer=tok, model_name=NAME, api_key=KEY)) as c:
        right = send(c, route, {"Authorization": f"Bearer {KEY}"})
        assert right.status_code == 200, (route, right.text[:300])
        for wrong in ({}, {"Authorization": f"Bearer {KEY[:-1]}"}, {"Authorization": f"Bearer {KEY}x"},
                      {"Authorization": "Bearer "}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
            r = send(c, route, wrong)
            if protected(route):
                assert r.status_code == 401, (route, wrong, r.status_code)
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_api_key"
                assert "Authorization: Bearer" in err["message"]
            else:
                assert r.status_code == 200, (route, wrong, r.status_code)


def test_without_a_key_every_route_is_open(model_tok):
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    with TestClient(create_app(model=model, tokenizer=tok, model_name=NAME)) as c:
        for route in REQUESTS:
            r = send(c, route, {"Authorization": "Bearer anything"})
            assert r.status_code == 200, (route, r.text[:300])
            assert send(c, route, {}).status_code == 200, route


def test_the_key_is_all_after_the_scheme_and_a_refusal_says_what_to_send(model_tok):
    """The scheme in any case (RFC 9110), the key everything after the first space (a key may hold
    spaces); the 401's message in full."""
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    key = "two words"
    with TestClient(create_app(model=model, tokenizer=tok, model_name=NAME, api_key=key)) as c:
        for header in (f"Bearer {key}", f"bearer {key}", f"BEARER {key}"):
            assert c.get("/v1/models", headers={"Authorization": header}).status_code == 200, header
        for header in ("Bearer two", "Bearer words", f"Bearer{key}"):
            r = c.get("/v1/models", headers={"Authorization": header})
            assert r.status_code == 401, header
            assert r.json()["error"]["message"] == ("missing or wrong API key: send the header "
                                                    "Authorization: Bearer <key>")
