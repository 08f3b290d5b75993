"""Google Compute Engine metadata server stand-in: the identity token endpoint.

`GET /computeMetadata/v1/instance/service-accounts/default/identity?audience=<aud>&format=full`
with `Metadata-Flavor: Google` answers 200 text/plain with a JWT for that audience. Like the real
server it refuses requests without the header (403), without an audience (400), and requests that
carry `X-Forwarded-For` (403: the metadata server does not serve proxied requests).

Faults (`fault`): an HTTP status ("500", "404", "403", "429"); "empty", "not_jwt", "expired" tokens;
"non_utf8", a token with bytes that are not UTF-8 in it; "slow", "down" (see metadata.py).
"""

from __future__ import annotations

from .http_server import CLOSE, Reply, Request
from .metadata import MetadataStandin

IDENTITY_PATH = "/computeMetadata/v1/instance/service-accounts/{account}/identity"
FAULTS = (None, "500", "404", "403", "429", "empty", "not_jwt", "expired", "non_utf8", "slow", "down")
NOT_UTF8 = b"\xff\xfe\xc3("  # bytes >= 0x80 that no UTF-8 decoder accepts

class GcpMetadataStandin(MetadataStandin):
    def __init__(self, issuer, sub: str = "110123456789012345678",
                 email: str = "openai-wif@my-project.iam.gserviceaccount.com", lifetime_s: int = 3600):
        self.sub = sub
        self.email = email
        super().__init__(issuer, lifetime_s)

    def _paths(self):
        return {IDENTITY_PATH.format(account="default"), IDENTITY_PATH.format(account=self.email)}

    def handle(self, request: Request):
        if self.begin(request) is CLOSE:
            return CLOSE
        fault = self.fault
        if fault in ("500", "404", "403", "429"):
            return Reply.text(int(fault), f"metadata server fault {fault}\n", headers=[("Metadata-Flavor", "Google")])
        if request.method != "GET":
            return Reply.text(405, "Method not allowed\n")
        if request.path not in self._paths():
            return Reply.text(404, "Not Found\n", "text/html; charset=UTF-8")
        if request.header("metadata-flavor") != "Google":
            return Reply.text(403, 'Missing required header "Metadata-Flavor": "Google"\n', "text/html; charset=UTF-8")
        if self.reject_x_forwarded_for and request.header("x-forwarded-for") is not None:
            return Reply.text(403, "Request had X-Forwarded-For header and is rejected\n", "text/html; charset=UTF-8")
        audience = request.query.get("audience", "")
        if not audience:
            return Reply.text(400, "non-empty audience parameter required\n")
        headers = [("Metadata-Flavor", "Google")]
        if fault == "empty":
            return Reply.text(200, "", headers=headers)
        if fault == "not_jwt":
            return Reply.text(200, "this-is-not-a-jwt", headers=headers)
        claims = {"azp": self.sub, "email": self.email, "email_verified": True}
        if request.query.get("format") == "full":
            claims["google"] = {"compute_engine": {"instance_id": "4242424242424242", "instance_name": "openai-wif-vm",
                                                   "project_id": "my-project", "project_number": 123456789012,
                                                   "zone": "us-central1-a"}}
        if fault == "expired":
            token = self.issuer.mint_expired(self.sub, audience, **claims)
        else:
            token = self.issuer.mint(self.sub, audience, self.lifetime_s, **claims)
        if fault == "non_utf8":
            header, payload, signature = token.encode().split(b".")
            return Reply(200, header + b"." + payload[:8] + NOT_UTF8 + payload[8:] + b"." + signature,
                         [("Content-Type", "text/plain; charset=utf-8"), *headers])
        with self._lock:
            self.tokens.append(token)
        return Reply.text(200, token, headers=headers)
