"""The token stand-in, extended on the bench side for Envoy's native peer.

`ClientCredentialsStandin` is the project's OpenAI stand-in (tests/standins/openai.py) that also
answers an RFC 6749 client credentials grant (section 4.4) on the same `POST /oauth/token`: a form
body `grant_type=client_credentials`, the client authenticated with HTTP Basic (section 2.3.1, what
Envoy's `envoy.http.injected_credentials.oauth2` sends by default) or with `client_id` and
`client_secret` in the body. It answers `{"access_token", "token_type": "Bearer", "expires_in"}`; the
token is one the stand-in's API accepts. Grants are counted in `client_credentials_grants`, apart from
the token exchanges (`exchanges`), so a warm run of the filter still sees no exchange at all.
Everything else is the stand-in unchanged.
"""

from __future__ import annotations

import base64
from urllib.parse import parse_qsl, unquote

from tests.standins import OpenAIStandin
from tests.standins.http_server import Reply, Request

CLIENT_ID = "bench-native-peer"
CLIENT_SECRET = "bench-native-secret-0123456789"
GRANT_LIFETIME_S = 3600

class ClientCredentialsStandin(OpenAIStandin):
    def reset(self):
        super().reset()
        with self._lock:
            self.client_credentials_grants = 0
            self.client_credentials_refused = 0

    def handle(self, request: Request):
        content_type = (request.header("content-type") or "").split(";")[0].strip().lower()
        if request.path == "/oauth/token" and request.method == "POST" \
                and content_type == "application/x-www-form-urlencoded":
            return self._client_credentials(request)
        return super().handle(request)

    def _client(self, request: Request, form: dict):
        authorization = request.header("authorization") or ""
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(encoded.strip()).decode().partition(":")
            except ValueError:
                return None, None
            return unquote(user), unquote(password)  # RFC 6749 2.3.1: form-urlencoded, then Basic
        return form.get("client_id"), form.get("client_secret")

    def _client_credentials(self, request: Request):
        form = dict(parse_qsl(request.body.decode("latin-1"), keep_blank_values=True))
        client_id, secret = self._client(request, form)
        if form.get("grant_type") != "client_credentials" or (client_id, secret) != (CLIENT_ID, CLIENT_SECRET):
            with self._lock:
                self.client_credentials_refused += 1
            return Reply.json(401, {"error": "invalid_client"} if form.get("grant_type") == "client_credentials"
                              else {"error": "unsupported_grant_type"})
        token = self.issue_token(client_id, "sa_native_peer", "client_credentials", GRANT_LIFETIME_S)
        with self._lock:
            self.client_credentials_grants += 1
        return Reply.json(200, {"access_token": token, "token_type": "Bearer", "expires_in": GRANT_LIFETIME_S},
                          [("Cache-Control", "no-store")])

def install(standins) -> ClientCredentialsStandin:
    """Replaces the (not yet started) OpenAI stand-in of a `tests.standins.Standins` by this one,
    with the same providers."""
    replacement = ClientCredentialsStandin(providers=standins.openai.providers,
                                           default_expires_in=standins.openai.default_expires_in)
    standins.openai = replacement
    return replacement

__all__ = ["ClientCredentialsStandin", "CLIENT_ID", "CLIENT_SECRET", "install"]
