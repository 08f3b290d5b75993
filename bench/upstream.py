"""A fast stand-in for the OpenAI API: a second Envoy that answers from a `direct_response`.

The Python stand-in would cap the gateway at a few hundred requests per second and hide the
filter's cost; this Envoy answers in microseconds. It still checks what the gateway forwards, so a
measured run cannot count a request the filter mishandled as a success:

- a request that still carries the subject-token header gets 400 (the filter must remove it),
- a request without `Authorization: Bearer ...` gets 401,
- anything else gets 200 with a small JSON body (the shape of GET /v1/models).
"""

from __future__ import annotations

import json

import yaml

from tools.envoy_config import SUBJECT_HEADER

LISTENER = "api"
STAT_PREFIX = "api"  # the listener's HTTP stats: http.api.downstream_rq_2xx, ...
BODY = json.dumps({"object": "list", "data": [
    {"id": "gpt-4.1-mini", "object": "model", "created": 1744316542, "owned_by": "system"}]})


def _error(message: str, code: str) -> str:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}})


def _answer(status: int, body: str, headers: list | None = None) -> dict:
    route = {"match": {"prefix": "/", "headers": headers or []},
             "direct_response": {"status": status, "body": {"inline_string": body}}}
    if not headers:
        del route["match"]["headers"]
    return route


def bootstrap() -> dict:
    routes = [
        _answer(400, _error("the subject token reached the API", "subject_token_leaked"),
                [{"name": SUBJECT_HEADER, "present_match": True}]),
        _answer(200, BODY, [{"name": "authorization", "string_match": {"prefix": "Bearer "}}]),
        _answer(401, _error("no bearer token", "invalid_api_key")),
    ]
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": STAT_PREFIX,
        "codec_type": "AUTO",
        "route_config": {"name": "api", "virtual_hosts": [{"name": "api", "domains": ["*"], "routes": routes}],
                         "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"},
                                                      "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": [{
            "name": LISTENER,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}],
        }]},
    }


def render() -> str:
    return yaml.safe_dump(bootstrap(), sort_keys=False)
