"""Local stand-ins for OpenAI's token endpoint and API and for the platforms that issue subject tokens.

`Standins.start_all(workdir)` starts every stand-in and registers one OpenAI Workload Identity
Provider per platform, so the token endpoint accepts subject tokens from each of them:

    platform  provider     service account  subject tokens come from
    header    wip_header   sa_header        standins.subject_token(sub) (any system:serviceaccount:default:*)
    k8s       wip_k8s      sa_k8s           standins.token_dir (projected token files)
    gcp       wip_gcp      sa_gcp           standins.gcp (metadata server)
    azure     wip_azure    sa_azure         standins.azure (IMDS)
    spiffe    wip_spiffe   sa_spiffe        standins.spiffe (Workload API on a unix socket)

Per-team service accounts (the gateway's caller rules give each team its own):

    provider       service account  mapped for
    wip_k8s        sa_inference     the gateway's projected token (K8S_SUB)
    wip_k8s        sa_batch         the gateway's projected token (K8S_SUB)
    wip_k8s_batch  sa_batch         the gateway's projected token (K8S_SUB): a second provider for
                                    the same issuer, for rules that name their own provider
    wip_header     sa_inference     subject tokens of system:serviceaccount:ai:*
    wip_header     sa_batch         subject tokens of system:serviceaccount:batch:*
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

from .azure_imds import DEFAULT_IDENTITY, DEFAULT_TENANT, AzureImdsStandin
from .gcp_metadata import GcpMetadataStandin
from .issuer import Issuer
from .jwks import JwksStandin
from .kubelet import ProjectedTokenDir
from .openai import OpenAIStandin, mapping
from .spiffe import MAX_UNIX_SOCKET_PATH, SpiffeStandin

OPENAI_AUDIENCE = "https://api.openai.com/v1"
AZURE_RESOURCE = "api://00000000-1111-2222-3333-444444444444"
GCP_SUB = "110123456789012345678"
GCP_EMAIL = "openai-wif@my-project.iam.gserviceaccount.com"
K8S_SUB = "system:serviceaccount:default:openai-wif"
SPIFFE_ID = "spiffe://example.com/ns/inference/sa/worker"
TEAM_ACCOUNTS = ("sa_inference", "sa_batch")
BATCH_PROVIDER = "wip_k8s_batch"


@dataclass(frozen=True)
class Wiring:
    """What a filter configuration needs to use one platform's provider."""
    identity_provider_id: str
    service_account_id: str
    audience: str
    issuer: str


class Standins:
    def __init__(self, workdir: str):
        self.workdir = str(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.issuers = {
            "header": Issuer("https://issuer.example.com"),
            "k8s": Issuer("https://kubernetes.example.com"),
            "gcp": Issuer("https://accounts.google.com"),
            "azure": Issuer(f"https://login.microsoftonline.com/{DEFAULT_TENANT}/v2.0"),
            "spiffe": Issuer("https://oidc.spiffe.example.com"),
        }
        self.issuer = self.issuers["header"]
        self.wiring = {
            "header": Wiring("wip_header", "sa_header", OPENAI_AUDIENCE, self.issuers["header"].iss),
            "k8s": Wiring("wip_k8s", "sa_k8s", OPENAI_AUDIENCE, self.issuers["k8s"].iss),
            "gcp": Wiring("wip_gcp", "sa_gcp", OPENAI_AUDIENCE, self.issuers["gcp"].iss),
            "azure": Wiring("wip_azure", "sa_azure", AZURE_RESOURCE, self.issuers["azure"].iss),
            "spiffe": Wiring("wip_spiffe", "sa_spiffe", OPENAI_AUDIENCE, self.issuers["spiffe"].iss),
        }
        mappings = {
            "header": [mapping("sa_header", sub="system:serviceaccount:default:*"),
                       mapping("sa_inference", sub="system:serviceaccount:ai:*"),
                       mapping("sa_batch", sub="system:serviceaccount:batch:*")],
            "k8s": [mapping("sa_k8s", sub=K8S_SUB), mapping("sa_inference", sub=K8S_SUB),
                    mapping("sa_batch", sub=K8S_SUB)],
            "gcp": [mapping("sa_gcp", sub=GCP_SUB)],
            "azure": [mapping("sa_azure", appid=DEFAULT_IDENTITY["client_id"], tid=DEFAULT_TENANT)],
            "spiffe": [mapping("sa_spiffe", sub="spiffe://example.com/ns/inference/sa/*")],
        }
        self.openai = OpenAIStandin()
        for platform, wiring in self.wiring.items():
            self.openai.add_provider(wiring.identity_provider_id, self.issuers[platform], wiring.audience,
                                     mappings[platform])
        self.openai.add_provider(BATCH_PROVIDER, self.issuers["k8s"], OPENAI_AUDIENCE,
                                 [mapping("sa_batch", sub=K8S_SUB)])
        self.gcp = GcpMetadataStandin(self.issuers["gcp"], GCP_SUB, GCP_EMAIL)
        self.azure = AzureImdsStandin(self.issuers["azure"], DEFAULT_TENANT, [DEFAULT_IDENTITY])
        self.token_dir = ProjectedTokenDir(os.path.join(self.workdir, "serviceaccount"), self.issuers["k8s"],
                                           K8S_SUB, OPENAI_AUDIENCE)
        self._socket_dir = None
        socket_path = os.path.join(self.workdir, "spiffe.sock")
        if len(os.fsencode(socket_path)) > MAX_UNIX_SOCKET_PATH:
            self._socket_dir = tempfile.mkdtemp(prefix="wif-", dir="/tmp")
            socket_path = os.path.join(self._socket_dir, "agent.sock")
        self.spiffe = SpiffeStandin(self.issuers["spiffe"], socket_path, SPIFFE_ID)

    @classmethod
    def start_all(cls, workdir) -> "Standins":
        standins = cls(workdir)
        try:
            standins.start()
        except BaseException:
            standins.stop_all()
            raise
        return standins

    def servers(self) -> list:
        return [self.openai, self.gcp, self.azure, self.spiffe]

    def start(self):
        for server in self.servers():
            server.start()
        return self

    def stop_all(self):
        for server in self.servers():
            server.stop()
        if self._socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def reset(self):
        """Clear every fault, counter and log (between tests sharing one set of stand-ins)."""
        for server in self.servers():
            server.reset()

    def subject_token(self, sub: str = "system:serviceaccount:default:app", lifetime_s: float = 3600, **claims) -> str:
        """A subject token for the header provider (mapped for any system:serviceaccount:default:*)."""
        return self.issuer.mint(sub, OPENAI_AUDIENCE, lifetime_s, **claims)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop_all()


__all__ = ["Standins", "Wiring", "Issuer", "JwksStandin", "OpenAIStandin", "GcpMetadataStandin",
           "AzureImdsStandin", "SpiffeStandin", "ProjectedTokenDir", "OPENAI_AUDIENCE", "AZURE_RESOURCE",
           "TEAM_ACCOUNTS", "BATCH_PROVIDER", "K8S_SUB"]
