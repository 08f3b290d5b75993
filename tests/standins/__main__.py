"""Run the stand-ins as a process (for the demo).

    python -m tests.standins --config out.json [--all --workdir DIR] [--port N]

Starts an issuer and the OpenAI stand-in with provider `wip_demo` (service account `sa_demo`,
mapped for subjects `system:serviceaccount:demo:*`), writes the JSON description (ports, provider,
subject tokens) to --config once everything listens, prints it on one line, and serves until
SIGTERM or SIGINT. With --all it also starts the platform stand-ins of `Standins` (their providers
are registered on the same OpenAI stand-in).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading

from . import OPENAI_AUDIENCE, Standins
from .issuer import Issuer
from .openai import OpenAIStandin, mapping

DEMO_PROVIDER = "wip_demo"
DEMO_SERVICE_ACCOUNT = "sa_demo"
DEMO_ISSUER = "https://issuer.demo.example.com"
DEMO_SUBJECT = "system:serviceaccount:demo:chat-app"
DEMO_OTHER_SUBJECT = "system:serviceaccount:demo:batch-job"
DEMO_UNMAPPED_SUBJECT = "system:serviceaccount:other:intruder"


def _write_atomically(path: str, text: str):
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".standins-")
    with os.fdopen(fd, "w") as file:
        file.write(text)
    os.replace(temporary, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.standins", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="where to write the JSON description")
    parser.add_argument("--port", type=int, default=0, help="port of the OpenAI stand-in (default: ephemeral)")
    parser.add_argument("--all", action="store_true", help="also start the platform stand-ins")
    parser.add_argument("--workdir", help="directory for the projected token and the SPIFFE socket (with --all)")
    parser.add_argument("--subject-lifetime", type=int, default=24 * 3600, help="lifetime of the demo subject tokens")
    parser.add_argument("--expires-in", type=int, default=3600, help="access token lifetime cap (expires_in)")
    args = parser.parse_args(argv)

    standins = None
    own_workdir = None
    if args.all:
        workdir = args.workdir or tempfile.mkdtemp(prefix="wif-standins-")
        own_workdir = None if args.workdir else workdir
        standins = Standins(workdir)
        openai = standins.openai
    else:
        openai = OpenAIStandin()
    openai.default_expires_in = args.expires_in
    openai.port = args.port or None
    issuer = Issuer(DEMO_ISSUER)
    openai.add_provider(DEMO_PROVIDER, issuer, OPENAI_AUDIENCE,
                        [mapping(DEMO_SERVICE_ACCOUNT, sub="system:serviceaccount:demo:*")])

    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())

    if standins:
        standins.start()
    else:
        openai.start()
    try:
        description = {
            "pid": os.getpid(),
            "openai": {"port": openai.port, "url": openai.url},
            "identity_provider_id": DEMO_PROVIDER,
            "service_account_id": DEMO_SERVICE_ACCOUNT,
            "issuer": DEMO_ISSUER,
            "audience": OPENAI_AUDIENCE,
            "jwks": issuer.jwks(),
            "subject": DEMO_SUBJECT,
            "subject_token": issuer.mint(DEMO_SUBJECT, OPENAI_AUDIENCE, args.subject_lifetime),
            "subject_tokens": {sub: issuer.mint(sub, OPENAI_AUDIENCE, args.subject_lifetime)
                               for sub in (DEMO_SUBJECT, DEMO_OTHER_SUBJECT, DEMO_UNMAPPED_SUBJECT)},
            "unmapped_subject": DEMO_UNMAPPED_SUBJECT,
        }
        if standins:
            description.update({
                "gcp_metadata": {"port": standins.gcp.port},
                "azure_imds": {"port": standins.azure.port},
                "spiffe": {"socket": standins.spiffe.socket_path},
                "token_dir": standins.token_dir.root,
                "wiring": {name: vars(wiring) for name, wiring in standins.wiring.items()},
            })
        text = json.dumps(description, indent=2)
        _write_atomically(args.config, text)
        print(json.dumps(description), flush=True)
        stopped.wait()
    finally:
        if standins:
            standins.stop_all()
        else:
            openai.stop()
        if own_workdir:
            shutil.rmtree(own_workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
