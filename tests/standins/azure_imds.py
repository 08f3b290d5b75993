"""Azure Instance Metadata Service stand-in: managed identity tokens.

`GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=<uri>[&client_id|object_id|msi_res_id=..]`
with `Metadata: true` answers like IMDS: JSON with an Entra-style access token (a JWT whose aud is
the resource), and the numbers as strings. Without the header, without api-version or resource, with
more than one identity selector, with an unknown identity, or with several identities and no
selector, it answers 400 with IMDS's `{"error", "error_description"}` shape.

Faults (`fault`): an HTTP status ("500", "404", "403", "429"); "empty", "garbage", "no_token",
"not_jwt", "expired" answers; "non_utf8", an access_token with bytes that are not UTF-8 in it;
"slow", "down" (see metadata.py).
"""

from __future__ import annotations

import json
import re
import time

from .http_server import CLOSE, Reply, Request
from .metadata import MetadataStandin

TOKEN_PATH = "/metadata/identity/oauth2/token"
SELECTORS = ("client_id", "object_id", "msi_res_id")
FAULTS = (None, "500", "404", "403", "429", "empty", "not_jwt", "expired", "slow", "down", "no_token", "garbage",
          "non_utf8")
NOT_UTF8 = b"\xff\xfe\xc3("  # bytes >= 0x80 that no UTF-8 decoder accepts

DEFAULT_TENANT = "11111111-2222-3333-4444-555555555555"
DEFAULT_IDENTITY = {
    "client_id": "22222222-3333-4444-5555-666666666666",
    "object_id": "33333333-4444-5555-6666-777777777777",
    "msi_res_id": "/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/my-resource-group/"
                  "providers/Microsoft.ManagedIdentity/userAssignedIdentities/openai-wif",
}

def _error(status: int, error: str, description: str) -> Reply:
    return Reply.json(status, {"error": error, "error_description": description})


class AzureImdsStandin(MetadataStandin):
    def __init__(self, issuer, tid: str = DEFAULT_TENANT, identities: list | None = None, lifetime_s: int = 3600):
        """identities: dicts with client_id, object_id, msi_res_id. With one identity, requests
        without a selector get it; with several, a selector is required."""
        self.tid = tid
        self.identities = list(identities or [DEFAULT_IDENTITY])
        super().__init__(issuer, lifetime_s)

    def _select_identity(self, query: dict):
        given = [(name, query[name]) for name in SELECTORS if name in query]
        if len(given) > 1:
            return _error(400, "invalid_request", "Only one of client_id, object_id or msi_res_id may be specified")
        if not given:
            if len(self.identities) == 1:
                return self.identities[0]
            return _error(400, "invalid_request",
                          "Multiple user assigned identities exist, please specify the clientId / resourceId "
                          "of the identity in the token request")
        name, value = given[0]
        for identity in self.identities:
            if identity.get(name, "").lower() == value.lower():
                return identity
        return _error(400, "invalid_request", "Identity not found")

    def handle(self, request: Request):
        if self.begin(request) is CLOSE:
            return CLOSE
        fault = self.fault
        if fault in ("500", "404", "403", "429"):
            return _error(int(fault), "fault", f"IMDS fault {fault}")
        if request.path != TOKEN_PATH:
            return _error(404, "not_found", "Not found")
        if request.method != "GET":
            return _error(405, "invalid_request", "Method not allowed")
        if (request.header("metadata") or "").lower() != "true":
            return _error(400, "invalid_request", "Required metadata header not specified")
        if self.reject_x_forwarded_for and request.header("x-forwarded-for") is not None:
            return _error(400, "invalid_request", "Request has X-Forwarded-For header and is rejected")
        if "api-version" not in request.query:
            return _error(400, "invalid_request", "Required query variable 'api-version' is missing")
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", request.query["api-version"]):
            return _error(400, "invalid_request", "Invalid api-version")
        resource = request.query.get("resource", "")
        if not resource:
            return _error(400, "invalid_request", "Required audience parameter not specified")
        identity = self._select_identity(request.query)
        if isinstance(identity, Reply):
            return identity
        if fault == "empty":
            return Reply(200, b"", [("Content-Type", "application/json; charset=utf-8")])
        if fault == "garbage":
            return Reply(200, b'{"access_token": "eyJ', [("Content-Type", "application/json; charset=utf-8")])

        now = int(time.time())
        lifetime = -60 if fault == "expired" else int(self.lifetime_s)
        claims = {"tid": self.tid, "appid": identity["client_id"], "appidacr": "2", "idtyp": "app",
                  "oid": identity["object_id"], "xms_mirid": identity["msi_res_id"], "ver": "2.0"}
        if fault == "expired":
            claims.update(iat=now - 3660, nbf=now - 3660)
        if fault == "not_jwt":
            token = "this-is-not-a-jwt"
        else:
            token = self.issuer.mint(identity["object_id"], resource, lifetime, **claims)
        body = {"access_token": token, "client_id": identity["client_id"],
                "expires_in": str(max(lifetime, 0)), "expires_on": str(now + lifetime),
                "ext_expires_in": str(max(lifetime, 0)), "not_before": str(now),
                "resource": resource, "token_type": "Bearer"}
        if fault == "no_token":
            del body["access_token"]
        elif fault == "non_utf8":
            placeholder = "NOT-UTF-8"
            body["access_token"] = token[:20] + placeholder + token[20:]
            raw = json.dumps(body).encode().replace(placeholder.encode(), NOT_UTF8)
            return Reply(200, raw, [("Content-Type", "application/json; charset=utf-8")])
        else:
            with self._lock:
                self.tokens.append(token)
        return Reply.json(200, body)
