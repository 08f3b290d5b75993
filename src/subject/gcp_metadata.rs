//! The `gcp_metadata` source: an identity token from the Google metadata server
//! (Compute Engine, Cloud Run, GKE with Workload Identity).
//!
//! `GET /computeMetadata/v1/instance/service-accounts/default/identity?audience=…&format=full`
//! with `Metadata-Flavor: Google`; the body is the Google-signed JWT.

use std::time::Duration;

use serde::Deserialize;

use super::{get, http_body, with_query, Platform, SourceCall, SourceError, SourceResponse};
use crate::config::{authority, cluster, identifier, timeout, ConfigError};

pub const NAME: &str = "gcp_metadata";
const IDENTITY_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/identity";
const DEFAULT_AUTHORITY: &str = "metadata.google.internal";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub cluster: String,
    pub authority: String,
    pub audience: String,
    pub timeout: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    cluster: String,
    audience: String,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

impl Config {
    pub fn from_raw(raw: Raw) -> Result<Config, ConfigError> {
        Ok(Config {
            cluster: cluster("subject_token.cluster", raw.cluster)?,
            authority: authority("subject_token.authority", raw.authority, DEFAULT_AUTHORITY)?,
            audience: identifier("subject_token.audience", raw.audience)?,
            timeout: timeout("subject_token.timeout_ms", raw.timeout_ms)?,
        })
    }
}

impl Platform for Config {
    fn name(&self) -> &'static str {
        NAME
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn request(&self) -> SourceCall {
        let path = with_query(
            IDENTITY_PATH,
            &[("audience", &self.audience), ("format", "full")],
        );
        get(
            &self.cluster,
            &self.authority,
            path,
            Some(("metadata-flavor", "Google")),
            self.timeout,
        )
    }

    fn token(&self, response: SourceResponse<'_>) -> Result<String, SourceError> {
        let body = http_body(NAME, response)?;
        String::from_utf8(body.to_vec())
            .map_err(|_| SourceError::new(NAME, "the answer is not text"))
    }

    fn identity_parts(&self) -> Vec<&str> {
        vec![&self.cluster, &self.authority, &self.audience]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_like_the_google_guide() {
        let source = Config {
            cluster: "gcp_metadata".into(),
            authority: "metadata.google.internal".into(),
            audience: "https://api.openai.com/v1".into(),
            timeout: Duration::from_secs(1),
        };
        let SourceCall::Http { headers, .. } = source.request() else {
            panic!()
        };
        assert!(headers.contains(&(":path", "/computeMetadata/v1/instance/service-accounts/default/identity?audience=https%3A%2F%2Fapi.openai.com%2Fv1&format=full".into())));
        assert!(headers.contains(&("metadata-flavor", "Google".into())));
        assert!(headers.contains(&(":authority", "metadata.google.internal".into())));
    }
}
