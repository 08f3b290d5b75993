//! The `spiffe` source: a JWT-SVID from the SPIFFE Workload API (SPIRE, Defakto agents).
//!
//! gRPC `SpiffeWorkloadAPI/FetchJWTSVID` over the agent's unix socket, with the metadata
//! `workload.spiffe.io: true` that every Workload API call must carry.

use std::time::Duration;

use prost::Message;

use super::{SourceCall, SourceError, SourceResponse, MAX_SOURCE_RESPONSE_BYTES};
use crate::config::SubjectSource;

/// `JWTSVIDRequest` from the SPIFFE Workload API's `workload.proto`.
#[derive(Clone, PartialEq, Message)]
pub struct JwtSvidRequest {
    #[prost(string, repeated, tag = "1")]
    pub audience: Vec<String>,
    #[prost(string, tag = "2")]
    pub spiffe_id: String,
}

/// `JWTSVID`.
#[derive(Clone, PartialEq, Message)]
pub struct JwtSvid {
    #[prost(string, tag = "1")]
    pub spiffe_id: String,
    #[prost(string, tag = "2")]
    pub svid: String,
    #[prost(string, tag = "3")]
    pub hint: String,
}

/// `JWTSVIDResponse`.
#[derive(Clone, PartialEq, Message)]
pub struct JwtSvidResponse {
    #[prost(message, repeated, tag = "1")]
    pub svids: Vec<JwtSvid>,
}

pub(super) fn request(
    cluster: &str,
    audience: &str,
    spiffe_id: Option<&str>,
    timeout: Duration,
) -> SourceCall {
    let message = JwtSvidRequest {
        audience: vec![audience.to_string()],
        spiffe_id: spiffe_id.unwrap_or_default().to_string(),
    };
    SourceCall::Grpc {
        cluster: cluster.to_string(),
        service: "SpiffeWorkloadAPI",
        method: "FetchJWTSVID",
        metadata: vec![("workload.spiffe.io", b"true".to_vec())],
        message: message.encode_to_vec(),
        timeout,
    }
}

pub(super) fn token(
    source: &SubjectSource,
    spiffe_id: Option<&str>,
    response: SourceResponse<'_>,
) -> Result<String, SourceError> {
    let message = match response {
        SourceResponse::Grpc { status: 0, message } => message,
        SourceResponse::Grpc { status, .. } => {
            return Err(SourceError::new(
                source,
                format!("gRPC status {status} ({})", status_name(status)),
            ))
        }
        SourceResponse::Http { .. } => {
            return Err(SourceError::new(source, "unexpected HTTP answer"))
        }
    };
    if message.len() > MAX_SOURCE_RESPONSE_BYTES {
        return Err(SourceError::new(source, "the answer is too large"));
    }
    let response = JwtSvidResponse::decode(message)
        .map_err(|_| SourceError::new(source, "the answer is not a JWTSVIDResponse"))?;
    let svid = match spiffe_id {
        Some(id) => response.svids.into_iter().find(|s| s.spiffe_id == id),
        None => response.svids.into_iter().next(),
    };
    svid.map(|s| s.svid)
        .ok_or_else(|| SourceError::new(source, "the Workload API returned no JWT-SVID"))
}

fn status_name(code: u32) -> &'static str {
    match code {
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        16 => "UNAUTHENTICATED",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> SubjectSource {
        SubjectSource::Spiffe {
            cluster: "spiffe_workload_api".into(),
            audience: "aud".into(),
            spiffe_id: None,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn request_follows_the_workload_api() {
        let SourceCall::Grpc {
            service,
            method,
            metadata,
            message,
            ..
        } = request(
            "spiffe_workload_api",
            "https://api.openai.com/v1",
            Some("spiffe://ex.org/w"),
            Duration::from_secs(1),
        )
        else {
            panic!()
        };
        assert_eq!((service, method), ("SpiffeWorkloadAPI", "FetchJWTSVID"));
        assert_eq!(metadata, vec![("workload.spiffe.io", b"true".to_vec())]);
        let decoded = JwtSvidRequest::decode(message.as_slice()).unwrap();
        assert_eq!(decoded.audience, vec!["https://api.openai.com/v1"]);
        assert_eq!(decoded.spiffe_id, "spiffe://ex.org/w");
        // Field numbers as in workload.proto: audience = 1 (repeated string), spiffe_id = 2.
        assert_eq!(message[0], 0x0a);
    }

    #[test]
    fn picks_the_requested_svid() {
        let r = JwtSvidResponse {
            svids: vec![
                JwtSvid {
                    spiffe_id: "spiffe://ex.org/a".into(),
                    svid: "A".into(),
                    hint: String::new(),
                },
                JwtSvid {
                    spiffe_id: "spiffe://ex.org/b".into(),
                    svid: "B".into(),
                    hint: "x".into(),
                },
            ],
        }
        .encode_to_vec();
        let any = token(
            &source(),
            None,
            SourceResponse::Grpc {
                status: 0,
                message: &r,
            },
        )
        .unwrap();
        assert_eq!(any, "A");
        let b = token(
            &source(),
            Some("spiffe://ex.org/b"),
            SourceResponse::Grpc {
                status: 0,
                message: &r,
            },
        )
        .unwrap();
        assert_eq!(b, "B");
        let e = token(
            &source(),
            Some("spiffe://ex.org/c"),
            SourceResponse::Grpc {
                status: 0,
                message: &r,
            },
        )
        .unwrap_err();
        assert!(e.to_string().ends_with("no JWT-SVID"));
    }

    #[test]
    fn errors() {
        let e = token(
            &source(),
            None,
            SourceResponse::Grpc {
                status: 14,
                message: b"",
            },
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "could not obtain subject token from spiffe: gRPC status 14 (UNAVAILABLE)"
        );
        let e = token(
            &source(),
            None,
            SourceResponse::Grpc {
                status: 0,
                message: b"",
            },
        )
        .unwrap_err();
        assert!(e.to_string().ends_with("no JWT-SVID"));
        let e = token(
            &source(),
            None,
            SourceResponse::Grpc {
                status: 0,
                message: b"\xff\xff\xff",
            },
        )
        .unwrap_err();
        assert!(e.to_string().ends_with("not a JWTSVIDResponse"));
    }
}
