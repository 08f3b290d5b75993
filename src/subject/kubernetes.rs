//! The `kubernetes` source: the projected service account token file (Kubernetes, GKE, AKS).
//!
//! A proxy-wasm module cannot open files, so Envoy serves the file: a listener whose route
//! answers with `direct_response` from `{filename, watched_directory}`, which follows kubelet's
//! atomic `..data` symlink swaps. The filter GETs it like any other source.

use std::time::Duration;

use super::{get, http_body, SourceCall, SourceError, SourceResponse};
use crate::config::SubjectSource;

pub(super) fn request(cluster: &str, authority: &str, path: &str, timeout: Duration) -> SourceCall {
    get(cluster, authority, path.to_string(), None, timeout)
}

pub(super) fn token(
    source: &SubjectSource,
    response: SourceResponse<'_>,
) -> Result<String, SourceError> {
    let body = http_body(source, response)?;
    let text = std::str::from_utf8(body)
        .map_err(|_| SourceError::new(source, "the token file is not text"))?;
    if text.trim().is_empty() {
        return Err(SourceError::new(source, "the token file is empty"));
    }
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> SubjectSource {
        SubjectSource::Kubernetes {
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
        } = crate::subject::request(&source()).unwrap()
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
        let e = token(
            &source(),
            SourceResponse::Http {
                status: Some(200),
                body: b" \n",
            },
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "could not obtain subject token from kubernetes: the token file is empty"
        );
        let e = token(
            &source(),
            SourceResponse::Http {
                status: Some(404),
                body: b"",
            },
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "could not obtain subject token from kubernetes: HTTP 404"
        );
    }
}
