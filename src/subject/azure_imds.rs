//! The `azure_imds` source: a managed identity token from the Azure Instance Metadata Service
//! (virtual machines, AKS nodes with managed identity).
//!
//! `GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=…[&client_id=…]` with
//! `Metadata: true`; the JSON answer carries the JWT in `access_token`.

use std::time::Duration;

use serde::Deserialize;

use super::{get, http_body, with_query, SourceCall, SourceError, SourceResponse};
use crate::config::{AzureIdentity, SubjectSource};

const TOKEN_PATH: &str = "/metadata/identity/oauth2/token";
const API_VERSION: &str = "2018-02-01";

pub(super) fn request(
    cluster: &str,
    authority: &str,
    resource: &str,
    identity: Option<&AzureIdentity>,
    timeout: Duration,
) -> SourceCall {
    let mut query = vec![("api-version", API_VERSION), ("resource", resource)];
    match identity {
        Some(AzureIdentity::ClientId(v)) => query.push(("client_id", v)),
        Some(AzureIdentity::ObjectId(v)) => query.push(("object_id", v)),
        Some(AzureIdentity::MsiResId(v)) => query.push(("msi_res_id", v)),
        None => {}
    }
    get(
        cluster,
        authority,
        with_query(TOKEN_PATH, &query),
        Some(("metadata", "true")),
        timeout,
    )
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    access_token: Option<String>,
}

pub(super) fn token(
    source: &SubjectSource,
    response: SourceResponse<'_>,
) -> Result<String, SourceError> {
    let body = http_body(source, response)?;
    let parsed: TokenResponse = serde_json::from_slice(body)
        .map_err(|_| SourceError::new(source, "the answer is not JSON"))?;
    parsed
        .access_token
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| SourceError::new(source, "the answer has no access_token"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> SubjectSource {
        SubjectSource::AzureImds {
            cluster: "azure_imds".into(),
            authority: "169.254.169.254".into(),
            resource: "api://x".into(),
            identity: None,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn asks_like_the_azure_guide() {
        let id = AzureIdentity::ClientId("c 1&".into());
        let SourceCall::Http { headers, .. } = request(
            "azure_imds",
            "169.254.169.254",
            "api://app/.default",
            Some(&id),
            Duration::from_secs(1),
        ) else {
            panic!()
        };
        assert!(headers.contains(&(":path", "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=api%3A%2F%2Fapp%2F.default&client_id=c+1%26".into())));
        assert!(headers.contains(&("metadata", "true".into())));
        let SourceCall::Http { headers, .. } = request(
            "i",
            "a",
            "r",
            Some(&AzureIdentity::MsiResId("/sub/x".into())),
            Duration::from_secs(1),
        ) else {
            panic!()
        };
        assert!(headers.contains(&(":path", "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=r&msi_res_id=%2Fsub%2Fx".into())));
    }

    #[test]
    fn reads_access_token() {
        let ok = token(
            &source(),
            SourceResponse::Http {
                status: Some(200),
                body: br#"{"access_token":"a.b.c","expires_in":"3599"}"#,
            },
        );
        assert_eq!(ok.unwrap(), "a.b.c");
        let e = token(
            &source(),
            SourceResponse::Http {
                status: Some(200),
                body: br#"{"expires_in":"3599"}"#,
            },
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "could not obtain subject token from azure_imds: the answer has no access_token"
        );
        let e = token(
            &source(),
            SourceResponse::Http {
                status: Some(200),
                body: b"garbage",
            },
        )
        .unwrap_err();
        assert!(e.to_string().ends_with("the answer is not JSON"));
        let e = token(&source(), SourceResponse::Http { status: Some(400), body: br#"{"error":"invalid_request","error_description":"Required metadata header not specified"}"# }).unwrap_err();
        assert!(e.to_string().starts_with("could not obtain subject token from azure_imds: HTTP 400: {\"error\":\"invalid_request\""));
    }
}
