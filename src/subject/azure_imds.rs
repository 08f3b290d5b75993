//! The `azure_imds` source: a managed identity token from the Azure Instance Metadata Service
//! (virtual machines, AKS nodes with managed identity).
//!
//! `GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=…[&client_id=…]` with
//! `Metadata: true`; the JSON answer carries the JWT in `access_token`.

use std::time::Duration;

use serde::Deserialize;

use super::{get, http_body, with_query, Platform, SourceCall, SourceError, SourceResponse};
use crate::config::{authority, cluster, identifier, invalid, timeout, ConfigError};

pub const NAME: &str = "azure_imds";
const TOKEN_PATH: &str = "/metadata/identity/oauth2/token";
const API_VERSION: &str = "2018-02-01";
const DEFAULT_AUTHORITY: &str = "169.254.169.254";

/// Which user-assigned managed identity IMDS should issue a token for: the query parameter
/// and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub kind: &'static str,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub cluster: String,
    pub authority: String,
    pub resource: String,
    pub identity: Option<Identity>,
    pub timeout: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    cluster: String,
    resource: String,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    object_id: Option<String>,
    #[serde(default)]
    msi_res_id: Option<String>,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

impl Config {
    pub fn from_raw(raw: Raw) -> Result<Config, ConfigError> {
        let mut chosen = [
            ("client_id", "subject_token.client_id", raw.client_id),
            ("object_id", "subject_token.object_id", raw.object_id),
            ("msi_res_id", "subject_token.msi_res_id", raw.msi_res_id),
        ]
        .into_iter()
        .filter_map(|(kind, field, v)| v.map(|v| (kind, field, v)));
        let identity = chosen.next();
        if chosen.next().is_some() {
            return Err(invalid(
                "subject_token.client_id",
                "at most one of client_id, object_id and msi_res_id may be set".into(),
            ));
        }
        let identity = match identity {
            Some((kind, field, value)) => Some(Identity {
                kind,
                value: identifier(field, value)?,
            }),
            None => None,
        };
        Ok(Config {
            cluster: cluster("subject_token.cluster", raw.cluster)?,
            authority: authority("subject_token.authority", raw.authority, DEFAULT_AUTHORITY)?,
            resource: identifier("subject_token.resource", raw.resource)?,
            identity,
            timeout: timeout("subject_token.timeout_ms", raw.timeout_ms)?,
        })
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    access_token: Option<String>,
}

impl Platform for Config {
    fn name(&self) -> &'static str {
        NAME
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn request(&self) -> SourceCall {
        let mut query = vec![("api-version", API_VERSION), ("resource", &self.resource)];
        if let Some(id) = &self.identity {
            query.push((id.kind, &id.value));
        }
        get(
            &self.cluster,
            &self.authority,
            with_query(TOKEN_PATH, &query),
            Some(("metadata", "true")),
            self.timeout,
        )
    }

    fn token(&self, response: SourceResponse<'_>) -> Result<String, SourceError> {
        let body = http_body(NAME, response)?;
        let parsed: TokenResponse = serde_json::from_slice(body)
            .map_err(|_| SourceError::new(NAME, "the answer is not JSON"))?;
        parsed
            .access_token
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| SourceError::new(NAME, "the answer has no access_token"))
    }

    fn identity_parts(&self) -> Vec<&str> {
        let mut parts = vec![self.cluster.as_str(), &self.authority, &self.resource];
        if let Some(id) = &self.identity {
            parts.extend([id.kind, &id.value]);
        }
        parts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(identity: Option<Identity>, resource: &str) -> Config {
        Config {
            cluster: "azure_imds".into(),
            authority: "169.254.169.254".into(),
            resource: resource.into(),
            identity,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn asks_like_the_azure_guide() {
        let id = Identity {
            kind: "client_id",
            value: "c 1&".into(),
        };
        let SourceCall::Http { headers, .. } = source(Some(id), "api://app/.default").request()
        else {
            panic!()
        };
        assert!(headers.contains(&(":path", "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=api%3A%2F%2Fapp%2F.default&client_id=c+1%26".into())));
        assert!(headers.contains(&("metadata", "true".into())));
        let id = Identity {
            kind: "msi_res_id",
            value: "/sub/x".into(),
        };
        let SourceCall::Http { headers, .. } = source(Some(id), "r").request() else {
            panic!()
        };
        assert!(headers.contains(&(":path", "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=r&msi_res_id=%2Fsub%2Fx".into())));
    }

    #[test]
    fn reads_access_token() {
        let s = source(None, "api://x");
        let ok = s.token(SourceResponse::Http {
            status: Some(200),
            body: br#"{"access_token":"a.b.c","expires_in":"3599"}"#,
        });
        assert_eq!(ok.unwrap(), "a.b.c");
        let e = s
            .token(SourceResponse::Http {
                status: Some(200),
                body: br#"{"expires_in":"3599"}"#,
            })
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "could not obtain subject token from azure_imds: the answer has no access_token"
        );
        let e = s
            .token(SourceResponse::Http {
                status: Some(200),
                body: b"garbage",
            })
            .unwrap_err();
        assert!(e.to_string().ends_with("the answer is not JSON"));
        let e = s.token(SourceResponse::Http { status: Some(400), body: br#"{"error":"invalid_request","error_description":"Required metadata header not specified"}"# }).unwrap_err();
        assert!(e.to_string().starts_with("could not obtain subject token from azure_imds: HTTP 400: {\"error\":\"invalid_request\""));
    }
}
