"""`make demo`: the OpenAI Python SDK, without an API key, through an Envoy gateway running the filter.

Starts a local stand-in for OpenAI (token endpoint and API) and a gateway on loopback, mints a
Kubernetes-style projected service account token, and calls the gateway twice with the real OpenAI
SDK, which sends that token in x-openai-subject-token and a placeholder API key. The gateway
exchanges the token once, caches the access token, and replaces the SDK's Authorization header.
Prints what happened and exits non-zero if anything is not as expected.
"""

from __future__ import annotations

import sys
import tempfile
import time
import uuid
from pathlib import Path

from tests.harness import Envoy, EnvoyError, ModuleMissing, module_path
from tests.standins.issuer import Issuer
from tests.standins.openai import OpenAIStandin, mapping
from tools import envoy_config

PROVIDER = "wip_demo"
SERVICE_ACCOUNT = "sa_demo"
ISSUER = "https://kubernetes.default.svc.cluster.local"
AUDIENCE = "https://api.openai.com/v1"
SUBJECT = "system:serviceaccount:default:openai-wif"
PLACEHOLDER_KEY = "placeholder-not-a-secret"
SUBJECT_HEADER = envoy_config.SUBJECT_HEADER


class Checks:
    def __init__(self):
        self.failed: list = []
        self.count = 0

    def expect(self, condition: bool, what: str) -> bool:
        self.count += 1
        if not condition:
            self.failed.append(what)
            print(f"  ✗ {what}")
        return condition


def projected_token(issuer: Issuer) -> str:
    """What the kubelet would mount for the pod's service account (audience: OpenAI)."""
    return issuer.mint(SUBJECT, [AUDIENCE], 3600, **{"kubernetes.io": {
        "namespace": "default",
        "serviceaccount": {"name": "openai-wif", "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, SUBJECT))},
        "pod": {"name": "chat-app-7d4b9c8f6-x2x9q", "uid": str(uuid.uuid4())},
    }})


def redacted(authorization: str | None) -> str:
    if not authorization:
        return "(none)"
    scheme, _, token = authorization.partition(" ")
    prefix = token.split("_", 1)[0] + "_" if "_" in token else ""
    return f"{scheme} {prefix}… ({len(token)} characters, redacted)"


def run(workdir: Path) -> int:
    started = time.monotonic()
    module = module_path()
    issuer = Issuer(ISSUER)
    openai = OpenAIStandin()
    openai.add_provider(PROVIDER, issuer, AUDIENCE, [mapping(SERVICE_ACCOUNT, sub=SUBJECT)])
    envoy = None
    try:
        openai.start()
        hosts = envoy_config.params("local").api_hosts
        config = envoy_config.filter_config("header", PROVIDER, SERVICE_ACCOUNT, hosts=hosts)
        envoy = Envoy(envoy_config.render("local", "header", openai_port=openai.port, module=str(module),
                                          filter_config=config),
                      workdir, log_level="warning", name="gateway").start()
        base_url = f"http://localhost:{envoy.port}/v1"
        print("Started")
        print(f"  OpenAI stand-in (token endpoint and API)  {openai.url}")
        print(f"  Envoy gateway with the openai-wif filter   {base_url}  (admin 127.0.0.1:{envoy.admin_port})")
        print(f"  Workload Identity Provider {PROVIDER}: issuer {ISSUER}, audience {AUDIENCE},")
        print(f"    sub {SUBJECT} -> service account {SERVICE_ACCOUNT}")
        token = projected_token(issuer)
        print(f"Subject token: a projected service account token for {SUBJECT} (expires in 1 h)")
        print()

        from openai import OpenAI  # imported late: the SDK takes a moment to load

        client = OpenAI(base_url=base_url, api_key=PLACEHOLDER_KEY, default_headers={SUBJECT_HEADER: token},
                        max_retries=0, timeout=15)
        print(f'OpenAI(base_url="{base_url}", api_key="{PLACEHOLDER_KEY}",')
        print(f'       default_headers={{"{SUBJECT_HEADER}": <subject token>}})')
        answers = []
        for attempt in (1, 2):
            completion = client.chat.completions.create(
                model="gpt-4.1-mini", messages=[{"role": "user", "content": "Who am I talking as?"}])
            answers.append(completion.choices[0].message.content)
            print(f"client.chat.completions.create(...) #{attempt}: {answers[-1]!r}")
        print()

        checks = Checks()
        stats = envoy.stats()
        api = list(openai.api_requests)
        print("What the OpenAI stand-in saw")
        print(f"  token exchanges: {openai.exchanges}")
        print(f"  API requests: {len(api)}, each with Authorization: {redacted(api[0][1] if api else None)}")
        saw_placeholder = any(PLACEHOLDER_KEY in (authorization or "") for _, authorization, _ in api)
        saw_subject = any(SUBJECT_HEADER in headers or token in str(headers) for _, _, headers in api)
        print(f"  the placeholder API key: {'SEEN' if saw_placeholder else 'never'}; "
              f"the {SUBJECT_HEADER} header: {'SEEN' if saw_subject else 'never'}")
        print("Filter counters (Envoy admin /stats, wasmcustom.openai_wif.*)")
        for name in sorted(stats):
            print(f"  {name} {stats[name]}")
        print()

        print("Checks")
        checks.expect(len(answers) == 2 and all(SERVICE_ACCOUNT in a and SUBJECT in a for a in answers),
                      f"both answers say they were authorised as {SERVICE_ACCOUNT} for {SUBJECT}")
        checks.expect(openai.exchanges == 1, f"exactly one token exchange (saw {openai.exchanges})")
        checks.expect(len(api) == 2 and all((a or "").startswith("Bearer oaiwif_") for _, a, _ in api),
                      "the API saw the exchanged access token on both requests")
        checks.expect(len(api) == 2 and api[0][1] == api[1][1], "both requests carried the same (cached) access token")
        checks.expect(not saw_placeholder, "the API never saw the placeholder API key")
        checks.expect(not saw_subject, "the API never saw the subject token")
        checks.expect(stats.get("exchanges_ok") == 1, f"filter counted 1 exchange (exchanges_ok={stats.get('exchanges_ok')})")
        checks.expect(stats.get("cache_hit", 0) >= 1, f"the second call was a cache hit (cache_hit={stats.get('cache_hit')})")
        if checks.failed:
            print(f"FAILED: {len(checks.failed)} check(s). Gateway log: {envoy.log_path}")
            print(envoy.log_tail(20))
            return 1
        print(f"  all {checks.count} passed in {time.monotonic() - started:.1f} s")
        return 0
    finally:
        if envoy is not None:
            envoy.stop()
        openai.stop()


def main() -> int:
    print("openai-wif demo: keyless OpenAI access through an Envoy gateway\n")
    try:
        with tempfile.TemporaryDirectory(prefix="openai-wif-demo-") as workdir:
            return run(Path(workdir))
    except ModuleMissing as missing:
        print(f"error: {missing}")
        return 1
    except EnvoyError as error:
        print(f"error: the gateway did not start: {error}")
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; everything stopped")
        return 130
    except Exception as error:  # an SDK error (e.g. the gateway's local reply) ends the demo readably
        print(f"FAILED: {type(error).__name__}: {error}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
