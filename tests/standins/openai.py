"""OpenAI stand-in: the workload identity token endpoint and the API, on one port.

`POST /oauth/token` follows OpenAI's token exchange contract: a JSON body with grant_type,
subject_token_type, subject_token, identity_provider_id and service_account_id; the subject token is
verified against the provider's issuer, audience and JWKS, then matched against the provider's
service account mappings. Like the real endpoint it answers every problem with a bare HTTP 500; the
reason is kept in `last_rejection` for tests.

`/v1/...` accepts only access tokens this stand-in issued (and has not revoked), and records what
reached it. `/echo/...` answers with the request it received (headers and trailers).

Switches (reset by `reset()`): `set_fault(...)` for the token endpoint; `token_headers`, extra headers
on every token-endpoint answer (values are str sent as latin-1, so "\\xff" is the byte 0xff);
`api_force_401`, the API refuses every token; `answer_early`, the API answers an authorised POST with
its status and headers before it reads the request body, then sends `{"object": "upload", "bytes": n}`
once the body has arrived (an upstream that answers before the request has ended); `hold()`, every
exchange waits at the door (already counted in `exchanges`) until `release()`, so a test knows an
exchange is in flight for as long as it needs, rather than for as long as a sleep lasts;
`oauth_errors`, a refused exchange is answered with an OAuth error `{"error", "error_description"}`
(400 `invalid_grant` for the provider, service account or mapping, 400 `invalid_request` for the
request, 401 `invalid_subject_token` for the token) instead of the generic 500, as OAuth token
endpoints do. `set_provider_keys(provider_id, issuer)` makes a provider trust the issuer's key set as
it is now (after `issuer.rotate()`: the provider's JWKS refreshed).
"""

from __future__ import annotations

import secrets
import threading
import time

import jwt

from .http_server import RESET, HttpStandin, Reply, Request

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
SUBJECT_TOKEN_TYPES = ("urn:ietf:params:oauth:token-type:jwt", "urn:ietf:params:oauth:token-type:id_token")
ISSUED_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
EXCHANGE_FIELDS = ("grant_type", "subject_token_type", "subject_token", "identity_provider_id", "service_account_id")
CLOCK_SKEW_S = 5  # tolerated for nbf/iat only; exp is strict

FAULTS = (None, "500", "429", "slow", "garbage", "html", "reset", "no_expires_in", "bad_token_type", "empty_token")

GENERIC_500 = {"error": {"message": "The server had an error while processing your request.",
                         "type": "server_error", "param": None, "code": None}}

# With `oauth_errors`: the OAuth error for each kind of rejection (the rest: invalid_subject_token).
OAUTH_GRANT_REASONS = ("unknown_identity_provider", "unknown_service_account", "no_matching_mapping")
OAUTH_REQUEST_REASONS = ("bad_content_type", "bad_json", "unsupported_grant_type", "unsupported_subject_token_type")


class Rejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def provider(issuer, audience: str, mappings: list) -> dict:
    """A provider entry from an Issuer: {"issuer", "audience", "jwks", "mappings"}."""
    return {"issuer": issuer.iss, "audience": audience, "jwks": issuer.jwks(), "mappings": mappings}


def mapping(service_account_id: str, **claims) -> dict:
    return {"service_account_id": service_account_id, "claims": claims}


def claim_matches(expected, actual) -> bool:
    """A mapping value matches a claim value (or any element of a list claim).

    A string may end in one `*`, matching any value that starts with the part before it; that
    part must be non-empty and hold no other `*` (a bare `*` never matches).
    """
    values = actual if isinstance(actual, list) else [actual]
    if isinstance(expected, str) and expected.endswith("*"):
        prefix = expected[:-1]
        if not prefix or "*" in prefix:
            return False
        return any(isinstance(v, str) and v.startswith(prefix) for v in values)
    return actual is not None and any(v == expected for v in values)


def mapping_matches(claims_to_match: dict, token_claims: dict) -> bool:
    return bool(claims_to_match) and all(
        claim_matches(expected, token_claims.get(name)) for name, expected in claims_to_match.items())


def _unverified_sub(token) -> str | None:
    try:
        return jwt.decode(token, options={"verify_signature": False}).get("sub")
    except Exception:
        return None


def openai_error(message: str, code, type_="invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


class OpenAIStandin(HttpStandin):
    def __init__(self, providers: dict | None = None, default_expires_in: int = 3600):
        super().__init__()
        # provider id -> {"issuer": str, "audience": str, "jwks": {"keys": [...]},
        #                 "mappings": [{"service_account_id": str, "claims": {name: value}}]}
        self.providers = dict(providers or {})
        self.default_expires_in = default_expires_in
        self.issued: dict = {}  # access token -> {sub, service_account_id, identity_provider_id, expires_at, revoked}
        self._released = threading.Event()  # clear while exchanges are held (see hold())
        self.reset()

    def reset(self):
        """Clear faults, counters and logs (issued tokens stay valid)."""
        with self._lock:
            self.reset_faults()
            self.exchanges = 0
            self.exchanges_ok = 0
            self.exchange_log: list = []
            self.last_rejection = None
            self.rejections: list = []
            self.api_requests: list = []  # (path, authorization, headers) of each request to /v1/
            self.api_trailers: list = []  # the trailers of each, in the same order
            self.api_ok = 0
            self.api_denied = 0
            self.api_early: list = []  # (path, authorization) of requests answered before their body
            self.echo_requests: list = []

    def reset_faults(self):
        self.fault = None
        self.fault_times = None  # None: until reset; n: only for the next n exchanges
        self.retry_after = None  # seconds, sent as Retry-After with the "429" fault
        self.slow_seconds = 10.0
        self.expires_in_override = None
        # OpenAI never issues a token that outlives its subject; False answers expires_in as is,
        # to show that the gateway caps it by itself.
        self.cap_to_subject = True
        self.api_force_401 = False
        self.token_headers: list = []  # (name, value) added to every token-endpoint answer
        self.answer_early = False
        self.oauth_errors = False
        self._released.set()

    def set_fault(self, fault, times=None, **settings):
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; one of {FAULTS}")
        for name, value in settings.items():
            if not hasattr(self, name):
                raise AttributeError(name)
            setattr(self, name, value)
        self.fault, self.fault_times = fault, times

    def hold(self):
        """From now on every exchange waits, counted in `exchanges` as it arrives, until release()
        (or reset(), or stop())."""
        self._released.clear()

    def release(self):
        """The held exchanges, and those after them, go on."""
        self._released.set()

    def add_provider(self, provider_id: str, issuer, audience: str, mappings: list):
        self.providers[provider_id] = provider(issuer, audience, mappings)

    def set_provider_keys(self, provider_id: str, issuer):
        """The provider trusts the issuer's key set as it is now (its JWKS refreshed after a rotation)."""
        with self._lock:
            self.providers[provider_id] = {**self.providers[provider_id], "jwks": issuer.jwks()}

    def issue_token(self, sub: str, service_account_id: str, identity_provider_id: str, lifetime_s: float = 3600) -> str:
        token = "oaiwif_" + secrets.token_urlsafe(32)
        with self._lock:
            self.issued[token] = {"sub": sub, "service_account_id": service_account_id,
                                  "identity_provider_id": identity_provider_id,
                                  "expires_at": time.time() + lifetime_s, "revoked": False}
        return token

    def revoke(self, token: str):
        with self._lock:
            if token in self.issued:
                self.issued[token]["revoked"] = True

    def revoke_all(self):
        with self._lock:
            for record in self.issued.values():
                record["revoked"] = True

    def tokens_for(self, sub: str) -> list:
        """Access tokens issued to a subject, oldest first."""
        with self._lock:
            return [token for token, record in self.issued.items() if record["sub"] == sub]

    def exchanges_for(self, sub: str, ok_only: bool = True) -> int:
        with self._lock:
            return sum(1 for e in self.exchange_log if e["sub"] == sub and (e["ok"] or not ok_only))

    # HTTP

    def early(self, request: Request):
        if not (self.answer_early and request.method == "POST" and request.path.startswith("/v1/")):
            return None
        authorization = request.header("authorization")
        record = self._authorised(authorization)
        if record is None:
            return None  # refused as usual, once the body is read
        with self._lock:
            self.api_early.append((request.path, authorization))
        return Reply(200, b"", [("Content-Type", "application/json"), *self._identity_headers(record)])

    def handle(self, request: Request):
        if request.path == "/oauth/token":
            if request.method != "POST":
                return Reply.json(405, openai_error("Method not allowed", None))
            reply = self._token_endpoint(request)
            if isinstance(reply, Reply) and self.token_headers:
                reply.headers = list(reply.headers) + list(self.token_headers)
            return reply
        if request.path.startswith("/v1/"):
            return self._api(request)
        if request.path == "/echo" or request.path.startswith("/echo/"):
            with self._lock:
                self.echo_requests.append(request)
            return Reply.json(200, {"method": request.method, "path": request.target, "headers": request.headers,
                                    "trailers": request.trailers, "body_bytes": len(request.body)})
        return Reply.json(404, openai_error(f"Unknown path {request.path}", "not_found"))

    # Token endpoint

    def _take_fault(self):
        with self._lock:
            self.exchanges += 1
            fault = self.fault
            if fault is not None and self.fault_times is not None:
                self.fault_times -= 1
                if self.fault_times <= 0:
                    self.fault, self.fault_times = None, None
            return fault

    def _log_exchange(self, body, ok: bool, reason=None, detail=""):
        body = body if isinstance(body, dict) else {}
        entry = {"time": time.time(), "ok": ok, "reason": reason, "detail": detail,
                 "sub": _unverified_sub(body.get("subject_token")),
                 "service_account_id": body.get("service_account_id"),
                 "identity_provider_id": body.get("identity_provider_id"),
                 "fields": sorted(body), "subject_token": body.get("subject_token")}
        with self._lock:
            self.exchange_log.append(entry)
            if ok:
                self.exchanges_ok += 1
            elif reason and not reason.startswith("fault:"):
                self.last_rejection = reason
                self.rejections.append({"reason": reason, "detail": detail, "time": entry["time"]})

    def _token_endpoint(self, request: Request):
        fault = self._take_fault()
        while not self._released.wait(0.05):
            if self._stopping.is_set():
                return RESET
        body = None
        try:
            body = request.json()
        except Exception:
            pass
        if fault in ("500", "429", "garbage", "html", "reset"):
            self._log_exchange(body, False, "fault:" + fault)
            if fault == "500":
                return Reply.json(500, GENERIC_500)
            if fault == "429":
                headers = [("Retry-After", str(self.retry_after))] if self.retry_after is not None else []
                return Reply.json(429, openai_error("Rate limit reached for token exchange.",
                                                    "rate_limit_exceeded", "requests"), headers)
            if fault == "garbage":
                return Reply(200, b'{"access_token": "oaiwif_trunc', [("Content-Type", "application/json")])
            if fault == "html":
                return Reply.text(200, "<html><body><h1>Sign in to continue</h1></body></html>", "text/html")
            return RESET
        if fault == "slow" and self.pause(self.slow_seconds):
            return RESET  # the stand-in is stopping
        try:
            sub, service_account_id, provider_id, remaining = self._validate(request, body)
        except Rejected as rejection:
            self._log_exchange(body, False, rejection.reason, rejection.detail)
            if self.oauth_errors:
                return self._oauth_error(rejection)
            return Reply.json(500, GENERIC_500)

        cap = self.expires_in_override if self.expires_in_override is not None else self.default_expires_in
        expires_in = int(min(cap, remaining) if self.cap_to_subject else cap)
        token = "oaiwif_" + secrets.token_urlsafe(32)
        response = {"access_token": token, "issued_token_type": ISSUED_TOKEN_TYPE,
                    "token_type": "Bearer", "expires_in": expires_in}
        if fault == "no_expires_in":
            del response["expires_in"]
        elif fault == "bad_token_type":
            response["token_type"] = "MAC"
        elif fault == "empty_token":
            response["access_token"] = ""
        if fault not in ("bad_token_type", "empty_token"):  # a filter that accepts those must not get through
            with self._lock:
                self.issued[token] = {"sub": sub, "service_account_id": service_account_id,
                                      "identity_provider_id": provider_id,
                                      "expires_at": time.time() + expires_in, "revoked": False}
        self._log_exchange(body, fault is None or fault in ("slow", "no_expires_in"),
                           None if fault in (None, "slow") else "fault:" + fault)
        return Reply.json(200, response, [("Cache-Control", "no-store")])

    @staticmethod
    def _oauth_error(rejection: Rejected) -> Reply:
        reason = rejection.reason
        if reason in OAUTH_GRANT_REASONS:
            status, error = 400, "invalid_grant"
        elif reason in OAUTH_REQUEST_REASONS or reason.startswith("missing_field:"):
            status, error = 400, "invalid_request"
        else:
            status, error = 401, "invalid_subject_token"
        return Reply.json(status, {"error": error, "error_description": reason.replace("_", " ")})

    def _validate(self, request: Request, body):
        content_type = (request.header("content-type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise Rejected("bad_content_type", content_type)
        if not isinstance(body, dict):
            raise Rejected("bad_json")
        for name in EXCHANGE_FIELDS:
            if not isinstance(body.get(name), str) or not body[name]:
                raise Rejected("missing_field:" + name)
        if body["grant_type"] != GRANT_TYPE:
            raise Rejected("unsupported_grant_type", body["grant_type"])
        if body["subject_token_type"] not in SUBJECT_TOKEN_TYPES:
            raise Rejected("unsupported_subject_token_type", body["subject_token_type"])
        provider_id = body["identity_provider_id"]
        config = self.providers.get(provider_id)
        if config is None:
            raise Rejected("unknown_identity_provider", provider_id)
        service_account_id = body["service_account_id"]
        mappings = [m for m in config["mappings"] if m["service_account_id"] == service_account_id]
        if not mappings:
            raise Rejected("unknown_service_account", service_account_id)
        claims = self._verify(config, body["subject_token"])
        if not any(mapping_matches(m["claims"], claims) for m in mappings):
            raise Rejected("no_matching_mapping", f"sub={claims.get('sub')!r}")
        remaining = int(claims["exp"] - time.time())
        if remaining < 1:
            raise Rejected("expired", "less than a second left")
        return claims.get("sub"), service_account_id, provider_id, remaining

    @staticmethod
    def _verify(config: dict, token: str) -> dict:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as error:
            raise Rejected("malformed_token", str(error))
        if header.get("alg") != "RS256":
            raise Rejected("unsupported_alg", str(header.get("alg")))
        kid = header.get("kid")
        if not kid:
            raise Rejected("missing_kid")
        jwk = next((k for k in config["jwks"].get("keys", []) if k.get("kid") == kid), None)
        if jwk is None:
            raise Rejected("unknown_kid", kid)
        try:
            key = jwt.PyJWK(jwk, algorithm="RS256").key
            claims = jwt.decode(token, key, algorithms=["RS256"], options={
                "verify_exp": False, "verify_nbf": False, "verify_iat": False,
                "verify_aud": False, "verify_iss": False})
        except jwt.InvalidSignatureError as error:
            raise Rejected("bad_signature", str(error))
        except jwt.PyJWTError as error:
            raise Rejected("malformed_token", str(error))
        if claims.get("iss") != config["issuer"]:
            raise Rejected("wrong_issuer", repr(claims.get("iss")))
        aud = claims.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if config["audience"] not in audiences:
            raise Rejected("wrong_audience", repr(aud))
        now = time.time()
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)) or isinstance(exp, bool):
            raise Rejected("missing_exp")
        if exp <= now:
            raise Rejected("expired", f"exp {exp} <= now {int(now)}")
        for name, reason in (("nbf", "not_yet_valid"), ("iat", "issued_in_future")):
            value = claims.get(name)
            if value is not None and (not isinstance(value, (int, float)) or value > now + CLOCK_SKEW_S):
                raise Rejected(reason, f"{name} {value!r}")
        return claims

    # API

    def _api(self, request: Request):
        authorization = request.header("authorization")
        with self._lock:
            self.api_requests.append((request.path, authorization, request.headers))
            self.api_trailers.append(request.trailers)
        record = self._authorised(authorization)
        if record is None:
            with self._lock:
                self.api_denied += 1
            return Reply.json(401, openai_error(
                "Incorrect API key provided. The access token is missing, unknown, revoked or expired.",
                "invalid_api_key"))
        with self._lock:
            self.api_ok += 1
        if self.answer_early and request.method == "POST":
            return Reply.json(200, {"object": "upload", "bytes": len(request.body)})
        return Reply.json(200, self._api_body(request, record), self._identity_headers(record))

    @staticmethod
    def _identity_headers(record: dict) -> list:
        return [("x-standin-sub", str(record["sub"])), ("x-standin-service-account", record["service_account_id"])]

    def _authorised(self, authorization):
        if self.api_force_401 or not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        with self._lock:
            record = self.issued.get(token.strip())
            if record is None or record["revoked"] or record["expires_at"] <= time.time():
                return None
            return dict(record)

    @staticmethod
    def _api_body(request: Request, record: dict) -> dict:
        now = int(time.time())
        greeting = (f"Hello from the OpenAI stand-in, authorised as {record['service_account_id']} "
                    f"for {record['sub']}")
        usage = {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}
        try:
            model = request.json().get("model") or "gpt-4.1-mini"
        except Exception:
            model = "gpt-4.1-mini"
        if request.method == "POST" and request.path == "/v1/chat/completions":
            return {"id": "chatcmpl-" + secrets.token_hex(12), "object": "chat.completion", "created": now,
                    "model": model, "system_fingerprint": None,
                    "choices": [{"index": 0, "logprobs": None, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": greeting, "refusal": None}}],
                    "usage": usage}
        if request.method == "POST" and request.path == "/v1/responses":
            return {"id": "resp_" + secrets.token_hex(12), "object": "response", "created_at": now,
                    "status": "completed", "model": model, "error": None, "incomplete_details": None,
                    "instructions": None, "metadata": {}, "parallel_tool_calls": True, "temperature": 1.0,
                    "tool_choice": "auto", "tools": [], "top_p": 1.0,
                    "output": [{"type": "message", "id": "msg_" + secrets.token_hex(12), "status": "completed",
                                "role": "assistant",
                                "content": [{"type": "output_text", "text": greeting, "annotations": []}]}],
                    "usage": {"input_tokens": 9, "output_tokens": 12, "total_tokens": 21,
                              "input_tokens_details": {"cached_tokens": 0},
                              "output_tokens_details": {"reasoning_tokens": 0}}}
        if request.method == "GET" and request.path == "/v1/models":
            return {"object": "list", "data": [
                {"id": name, "object": "model", "created": 1700000000, "owned_by": "openai"}
                for name in ("gpt-4.1-mini", "gpt-4.1")]}
        return {"ok": True}
