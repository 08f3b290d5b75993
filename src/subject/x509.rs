//! The `x509` source: the gateway's (or sidecar's) own mTLS certificate is the credential.
//!
//! OpenAI's X.509 workload identity federation takes no subject token: the exchange goes to
//! `mtls.auth.openai.com` through a cluster that presents the workload's certificate in the TLS
//! handshake (Istio's SDS certificate, SPIRE's X.509-SVID, a mounted Secret), with
//! `subject_token_type` `urn:openai:params:oauth:token-type:x509` and no `subject_token`. The
//! filter never sees or caches the certificate: each exchange is a new callout, so one made after
//! a rotation presents the new certificate.

use serde::Deserialize;

use crate::config::ConfigError;

pub const NAME: &str = "x509";
/// The token endpoint that reads the client certificate.
pub const TOKEN_AUTHORITY: &str = "mtls.auth.openai.com";
pub const SUBJECT_TOKEN_TYPE: &str = "urn:openai:params:oauth:token-type:x509";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Raw {}

impl Config {
    pub fn from_raw(_raw: Raw) -> Result<Config, ConfigError> {
        Ok(Config)
    }
}
