//! The `kubernetes` source: the projected service account token file (Kubernetes, GKE, AKS).
//!
//! A proxy-wasm module cannot open files, so Envoy serves the file: a listener whose route
//! answers with `direct_response` from `{filename, watched_directory}`, which follows kubelet's
//! atomic `..data` symlink swaps. The filter GETs it like any other source, and re-reads it every
//! `refresh_interval_s` so a rotated file is picked up.

use std::time::Duration;

use serde::Deserialize;

use super::{get, http_body, Platform, SourceCall, SourceError, SourceResponse};
use crate::config::{authority, cluster, invalid, path, timeout, ConfigError};

pub const NAME: &str = "kubernetes";
const DEFAULT_AUTHORITY: &str = "localhost";
const DEFAULT_PATH: &str = "/token";
const DEFAULT_REFRESH_S: u64 = 30;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub timeout: Duration,
    pub refresh_interval: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    cluster: String,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    refresh_interval_s: Option<u64>,
}

impl Config {
    pub fn from_raw(raw: Raw) -> Result<Config, ConfigError> {
        let refresh = raw.refresh_interval_s.unwrap_or(DEFAULT_REFRESH_S);
        if !(1..=3600).contains(&refresh) {
            return Err(invalid(
                "subject_token.refresh_interval_s",
                format!("must be between 1 and 3600 seconds, not {refresh}"),
            ));
        }
        Ok(Config {
            cluster: cluster("subject_token.cluster", raw.cluster)?,
            authority: authority("subject_token.authority", raw.authority, DEFAULT_AUTHORITY)?,
            path: path("subject_token.path", raw.path, DEFAULT_PATH)?,
            timeout: timeout("subject_token.timeout_ms", raw.timeout_ms)?,
            refresh_interval: Duration::from_secs(refresh),
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
        get(
            &self.cluster,
            &self.authority,
            self.path.clone(),
            None,
            self.timeout,
        )
    }

    fn token(&self, response: SourceResponse<'_>) -> Result<String, SourceError> {
        let body = http_body(NAME, response)?;
        let text = std::str::from_utf8(body)
            .map_err(|_| SourceError::new(NAME, "the token file is not text"))?;
        if text.trim().is_empty() {
            return Err(SourceError::new(NAME, "the token file is empty"));
        }
        Ok(text.to_string())
    }

    fn identity_parts(&self) -> Vec<&str> {
        vec![&self.cluster, &self.authority, &self.path]
    }

    fn reread_interval(&self) -> Option<Duration> {
        Some(self.refresh_interval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> Config {
        Config {
            cluster: "wif_token_file".into(),
            authority: "localhost".into(),
            path: "/token".into(),
            timeout: Duration::from_millis(500),
            refresh_interval: Duration::from_secs(30),
        }
    }

    #[test]
    fn gets_the_file() {
        let SourceCall::Http {
            cluster,
            headers,
            timeout,
        } = source().request()
        else {
            panic!()
        };
        assert_eq!(cluster, "wif_token_file");
        assert_eq!(
            headers,
            vec![
                (":method", "GET".into()),
                (":path", "/token".into()),
                (":authority", "localhost".into())
            ]
        );
        assert_eq!(timeout, Duration::from_millis(500));
    }

    #[test]
    fn empty_or_missing_file() {
        let e = source()
            .token(SourceResponse::Http {
                status: Some(200),
                body: b" \n",
            })
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "could not obtain subject token from kubernetes: the token file is empty"
        );
        let e = source()
            .token(SourceResponse::Http {
                status: Some(404),
                body: b"",
            })
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "could not obtain subject token from kubernetes: HTTP 404"
        );
    }
}
