//! The `gcp_metadata` source: an identity token from the Google metadata server
//! (Compute Engine, Cloud Run, GKE with Workload Identity).
//!
//! `GET /computeMetadata/v1/instance/service-accounts/default/identity?audience=…&format=full`
//! with `Metadata-Flavor: Google`; the body is the Google-signed JWT.

use std::time::Duration;

use super::{get, http_body, with_query, SourceCall, SourceError, SourceResponse};
use crate::config::SubjectSource;

const IDENTITY_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/identity";

pub(super) fn request(
    cluster: &str,
    authority: &str,
    audience: &str,
    timeout: Duration,
) -> SourceCall {
    let path = with_query(IDENTITY_PATH, &[("audience", audience), ("format", "full")]);
    get(
        cluster,
        authority,
        path,
        Some(("metadata-flavor", "Google")),
        timeout,
    )
}

pub(super) fn token(
    source: &SubjectSource,
    response: SourceResponse<'_>,
) -> Result<String, SourceError> {
    let body = http_body(source, response)?;
    String::from_utf8(body.to_vec()).map_err(|_| SourceError::new(source, "the answer is not text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_like_the_google_guide() {
        let SourceCall::Http { headers, .. } = request(
            "gcp_metadata",
            "metadata.google.internal",
            "https://api.openai.com/v1",
            Duration::from_secs(1),
        ) else {
            panic!()
        };
        assert!(headers.contains(&(":path", "/computeMetadata/v1/instance/service-accounts/default/identity?audience=https%3A%2F%2Fapi.openai.com%2Fv1&format=full".into())));
        assert!(headers.contains(&("metadata-flavor", "Google".into())));
        assert!(headers.contains(&(":authority", "metadata.google.internal".into())));
    }
}
