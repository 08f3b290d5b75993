//! Where subject tokens come from.
//!
//! With the `header` source each workload sends its own token ([`header`]). Every other source
//! gives the gateway its own identity, fetched from the platform with one callout: the
//! Kubernetes projected token file (served by Envoy itself), the Google metadata server, Azure
//! IMDS, or the SPIFFE Workload API. For each, [`request`] builds the callout and [`parse`] reads
//! the answer; both are pure, and the root context runs the callout.

pub mod azure_imds;
pub mod gcp_metadata;
pub mod header;
pub mod kubernetes;
pub mod spiffe;
pub mod x509;

use std::time::Duration;

use serde::Deserialize;

use crate::config::ConfigError;
use crate::jwt::{self, JwtError};
use crate::reply::{Code, Failure};
use crate::secret::Secret;

/// Where subject tokens come from: the one list of sources. Each variant's module holds the
/// source's configuration (parsed and validated from the raw JSON), its request, its answer's
/// parser and its identity. A new source is one module, a variant here and in [`RawSource`],
/// and an arm in [`SubjectSource::from_raw`] and [`SubjectSource::platform`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubjectSource {
    Header(header::Config),
    Kubernetes(kubernetes::Config),
    GcpMetadata(gcp_metadata::Config),
    AzureImds(azure_imds::Config),
    Spiffe(spiffe::Config),
    /// No subject token: the token endpoint reads the certificate the cluster presents.
    X509(x509::Config),
}

/// `subject_token` as written, tagged by `source`.
#[derive(Deserialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum RawSource {
    Header(header::Raw),
    Kubernetes(kubernetes::Raw),
    GcpMetadata(gcp_metadata::Raw),
    AzureImds(azure_imds::Raw),
    Spiffe(spiffe::Raw),
    X509(x509::Raw),
}

impl SubjectSource {
    /// The validated source; without a `subject_token`, the header source's defaults.
    pub fn from_raw(raw: Option<RawSource>) -> Result<SubjectSource, ConfigError> {
        Ok(
            match raw.unwrap_or(RawSource::Header(header::Raw::default())) {
                RawSource::Header(r) => SubjectSource::Header(header::Config::from_raw(r)?),
                RawSource::Kubernetes(r) => {
                    SubjectSource::Kubernetes(kubernetes::Config::from_raw(r)?)
                }
                RawSource::GcpMetadata(r) => {
                    SubjectSource::GcpMetadata(gcp_metadata::Config::from_raw(r)?)
                }
                RawSource::AzureImds(r) => {
                    SubjectSource::AzureImds(azure_imds::Config::from_raw(r)?)
                }
                RawSource::Spiffe(r) => SubjectSource::Spiffe(spiffe::Config::from_raw(r)?),
                RawSource::X509(r) => SubjectSource::X509(x509::Config::from_raw(r)?),
            },
        )
    }

    /// The platform a gateway's subject token is fetched from; `None` for the header source
    /// (per request) and for x509 (no subject token at all).
    pub fn platform(&self) -> Option<&dyn Platform> {
        match self {
            SubjectSource::Header(_) | SubjectSource::X509(_) => None,
            SubjectSource::Kubernetes(c) => Some(c),
            SubjectSource::GcpMetadata(c) => Some(c),
            SubjectSource::AzureImds(c) => Some(c),
            SubjectSource::Spiffe(c) => Some(c),
        }
    }

    /// The name used in configuration, logs and error messages.
    pub fn name(&self) -> &'static str {
        match self {
            SubjectSource::Header(_) => header::NAME,
            SubjectSource::X509(_) => x509::NAME,
            _ => self.platform().map_or(header::NAME, |p| p.name()),
        }
    }

    /// True when the identity belongs to the gateway rather than to each request.
    pub fn is_gateway_identity(&self) -> bool {
        !matches!(self, SubjectSource::Header(_))
    }

    /// True when there is no subject token: the certificate is the credential.
    pub fn is_certificate(&self) -> bool {
        matches!(self, SubjectSource::X509(_))
    }

    /// How long a fetch from the source may take.
    pub fn timeout(&self) -> Duration {
        self.platform().map_or(Duration::ZERO, |p| p.timeout())
    }
}

/// A source that gives the gateway its own identity, fetched with one callout.
pub trait Platform {
    fn name(&self) -> &'static str;
    fn timeout(&self) -> Duration;
    /// The callout that fetches the subject token.
    fn request(&self) -> SourceCall;
    /// The subject token in the callout's answer (checked further by [`parse`]).
    fn token(&self, response: SourceResponse<'_>) -> Result<String, SourceError>;
    /// What names this identity besides the exchange parameters (see [`crate::identity`]).
    fn identity_parts(&self) -> Vec<&str>;
    /// How often the subject is read again although it is still valid (a rotated file).
    fn reread_interval(&self) -> Option<Duration> {
        None
    }
}

/// A callout to a platform source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceCall {
    Http {
        cluster: String,
        headers: Vec<(&'static str, String)>,
        timeout: Duration,
    },
    Grpc {
        cluster: String,
        service: &'static str,
        method: &'static str,
        metadata: Vec<(&'static str, Vec<u8>)>,
        message: Vec<u8>,
        timeout: Duration,
    },
}

/// What came back from a source callout.
#[derive(Debug, Clone, Copy)]
pub enum SourceResponse<'a> {
    /// `status` is absent when the callout failed (timeout, reset, no cluster).
    Http { status: Option<u16>, body: &'a [u8] },
    /// gRPC status code (0 is OK) and the response message.
    Grpc { status: u32, message: &'a [u8] },
}

/// A subject token fetched from a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub subject: Secret,
    /// The token's `exp` in seconds, when it has one.
    pub exp_s: Option<u64>,
}

/// Why a source gave no usable token. The message names the source and never the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("could not obtain subject token from {source_name}: {reason}")]
pub struct SourceError {
    pub source_name: &'static str,
    pub reason: String,
}

impl SourceError {
    pub fn new(source_name: &'static str, reason: impl Into<String>) -> Self {
        SourceError {
            source_name,
            reason: reason.into(),
        }
    }

    pub fn failure(&self) -> Failure {
        Failure::new(Code::SubjectSourceUnavailable, self.to_string())
    }
}

/// A fetched token with no more life than this left is as good as expired: an exchange with it
/// would race its expiry. One second, not more: with whole-second `exp` and `now`, a larger
/// margin refuses subjects that still have seconds to live (half the life of a 4 s token).
pub const MIN_SUBJECT_LIFETIME_S: u64 = 1;

/// Largest answer read from a source.
pub const MAX_SOURCE_RESPONSE_BYTES: usize = 64 * 1024;

/// The callout that fetches the gateway's subject token; `None` for the header source.
pub fn request(source: &SubjectSource) -> Option<SourceCall> {
    source.platform().map(|p| p.request())
}

/// Reads a source's answer into a subject token that is usable at `now_s`.
pub fn parse(
    source: &SubjectSource,
    response: SourceResponse<'_>,
    now_s: u64,
) -> Result<Fetched, SourceError> {
    let Some(platform) = source.platform() else {
        return Err(SourceError::new(
            header::NAME,
            "the header source is not fetched",
        ));
    };
    let token = platform.token(response)?;
    checked(platform.name(), token, now_s)
}

/// Checks that a fetched token is a JWT that has not expired.
fn checked(source: &'static str, token: String, now_s: u64) -> Result<Fetched, SourceError> {
    let token = token.trim().to_string();
    let claims = jwt::inspect(&token).map_err(|e| match e {
        JwtError::Empty => SourceError::new(source, "the token is empty"),
        other => SourceError::new(source, format!("the answer is not a usable JWT ({other})")),
    })?;
    if claims
        .exp
        .is_some_and(|exp| exp <= now_s + MIN_SUBJECT_LIFETIME_S)
    {
        return Err(SourceError::new(source, "the token has already expired"));
    }
    Ok(Fetched {
        subject: Secret::new(token),
        exp_s: claims.exp,
    })
}

/// The body of a successful HTTP answer, or why there is none.
fn http_body<'a>(
    source: &'static str,
    response: SourceResponse<'a>,
) -> Result<&'a [u8], SourceError> {
    match response {
        SourceResponse::Http { status: None, .. } => Err(SourceError::new(
            source,
            "no answer (timeout, connection failure or no such cluster)",
        )),
        SourceResponse::Http {
            status: Some(200),
            body,
        } => {
            if body.len() > MAX_SOURCE_RESPONSE_BYTES {
                Err(SourceError::new(source, "the answer is too large"))
            } else {
                Ok(body)
            }
        }
        SourceResponse::Http {
            status: Some(status),
            body,
        } => Err(SourceError::new(
            source,
            format!("HTTP {status}{}", detail(body)),
        )),
        SourceResponse::Grpc { .. } => Err(SourceError::new(source, "unexpected gRPC answer")),
    }
}

/// A short, printable excerpt of an error body, to say why a source refused. Error bodies of
/// metadata services carry reasons, not tokens; a body with anything token-shaped in it (a
/// dotted base64url word, however its header is spelt, or a long base64url run, which could be
/// a piece of one) is not echoed at all.
fn detail(body: &[u8]) -> String {
    if carries_a_token(body) {
        return String::new();
    }
    let text: String = String::from_utf8_lossy(body)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// True when `body` holds a word that could be a token or a piece of one: `eyJ` (the start of
/// any JSON object in base64url), a dotted base64 word with a long part, or a long base64 run.
pub(crate) fn carries_a_token(body: &[u8]) -> bool {
    // Either base64 alphabet: a token may be mangled into the other one.
    let base64 = |b: &u8| b.is_ascii_alphanumeric() || b"-_+/=".contains(b);
    if body.windows(3).any(|w| w == b"eyJ") {
        return true;
    }
    body.split(|b| !(base64(b) || *b == b'.')).any(|word| {
        // A JWT header alone is some 20 characters; host names and addresses have short labels.
        let dotted = word.iter().filter(|&&b| b == b'.').count() >= 2
            && word.split(|&b| b == b'.').any(|part| part.len() >= 12);
        let long_run = word.split(|&b| b == b'.').any(|run| run.len() >= 40);
        dotted || long_run
    })
}

/// A GET to a platform source: the shape every HTTP source shares.
fn get(
    cluster: &str,
    authority: &str,
    path: String,
    extra: Option<(&'static str, &str)>,
    timeout: Duration,
) -> SourceCall {
    let mut headers = vec![
        (":method", "GET".to_string()),
        (":path", path),
        (":authority", authority.to_string()),
    ];
    if let Some((name, value)) = extra {
        headers.push((name, value.to_string()));
    }
    SourceCall::Http {
        cluster: cluster.to_string(),
        headers,
        timeout,
    }
}

/// Appends `key=value` pairs, URL-encoded, to `path`.
fn with_query(path: &str, pairs: &[(&str, &str)]) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        q.append_pair(k, v);
    }
    format!("{path}?{}", q.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::tests::make;

    fn gcp() -> SubjectSource {
        SubjectSource::GcpMetadata(gcp_metadata::Config {
            cluster: "gcp".into(),
            authority: "metadata.google.internal".into(),
            audience: "aud".into(),
            timeout: Duration::from_secs(1),
        })
    }

    #[test]
    fn fetched_tokens_must_be_unexpired_jwts() {
        let s = gcp();
        let good = make(r#"{"exp":2000}"#);
        let ok = parse(
            &s,
            SourceResponse::Http {
                status: Some(200),
                body: format!("{good}\n").as_bytes(),
            },
            1000,
        )
        .unwrap();
        assert_eq!(ok.exp_s, Some(2000));
        assert_eq!(ok.subject.expose(), good);
        let e = parse(
            &s,
            SourceResponse::Http {
                status: Some(200),
                body: good.as_bytes(),
            },
            2000,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "could not obtain subject token from gcp_metadata: the token has already expired"
        );
        let e = parse(
            &s,
            SourceResponse::Http {
                status: Some(200),
                body: b"",
            },
            0,
        )
        .unwrap_err();
        assert!(e.to_string().ends_with("the token is empty"));
        let e = parse(
            &s,
            SourceResponse::Http {
                status: Some(200),
                body: b"<html>",
            },
            0,
        )
        .unwrap_err();
        assert!(e.to_string().contains("not a usable JWT"));
    }

    #[test]
    fn errors_name_source_and_status_but_never_a_token() {
        let s = gcp();
        let e = parse(
            &s,
            SourceResponse::Http {
                status: None,
                body: b"",
            },
            0,
        )
        .unwrap_err();
        assert!(e.to_string().contains("gcp_metadata: no answer"));
        let e = parse(
            &s,
            SourceResponse::Http {
                status: Some(403),
                body: b"Missing Metadata-Flavor:Google header.",
            },
            0,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "could not obtain subject token from gcp_metadata: HTTP 403: Missing Metadata-Flavor:Google header.");
        let leaky = format!("bad {}", make("{}"));
        let e = parse(
            &s,
            SourceResponse::Http {
                status: Some(500),
                body: leaky.as_bytes(),
            },
            0,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "could not obtain subject token from gcp_metadata: HTTP 500"
        );
        assert_eq!(e.failure().code, Code::SubjectSourceUnavailable);
    }

    #[test]
    fn error_bodies_with_anything_token_shaped_are_not_echoed() {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine;
        for header in [
            &br#"{"alg":"RS256"}"#[..],
            br#" {"alg":"RS256"}"#,
            br#"{ "alg":"RS256"}"#,
        ] {
            let token = format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode(header),
                URL_SAFE_NO_PAD.encode(b"{}"),
                URL_SAFE_NO_PAD.encode(b"signature")
            );
            assert_eq!(detail(format!("error: {token} (bad)").as_bytes()), "");
            assert_eq!(
                detail(&token.as_bytes()[..token.len() - 4]),
                "",
                "a piece of one"
            );
        }
        assert_eq!(detail(&[b'A'; 64]), "", "a long base64url run");
        assert_eq!(
            detail(b"Identity not found. Try api-version=2018-02-01 on 169.254.169.254."),
            ": Identity not found. Try api-version=2018-02-01 on 169.254.169.254."
        );
        assert_eq!(
            detail(b"Missing Metadata-Flavor:Google header."),
            ": Missing Metadata-Flavor:Google header."
        );
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(
            with_query("/p", &[("a", "https://x/y z"), ("b", "1")]),
            "/p?a=https%3A%2F%2Fx%2Fy+z&b=1"
        );
    }

    #[test]
    fn header_source_has_no_callout() {
        let header = SubjectSource::Header(header::Config { header: "x".into() });
        assert_eq!(request(&header), None);
        assert!(parse(
            &header,
            SourceResponse::Http {
                status: Some(200),
                body: b""
            },
            0
        )
        .is_err());
    }
}
