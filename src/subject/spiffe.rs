//! The `spiffe` source: a JWT-SVID from the SPIFFE Workload API (SPIRE, Defakto agents).
//!
//! gRPC `SpiffeWorkloadAPI/FetchJWTSVID` over the agent's unix socket, with the metadata
//! `workload.spiffe.io: true` that every Workload API call must carry.

use std::time::Duration;

use prost::Message;

use serde::Deserialize;

use super::{Platform, SourceCall, SourceError, SourceResponse, MAX_SOURCE_RESPONSE_BYTES};
use crate::config::{cluster, identifier, invalid, timeout, ConfigError};

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

pub const NAME: &str = "spiffe";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub cluster: String,
    pub audience: String,
    /// Which of the workload's SVIDs to use; the first one when unset.
    pub spiffe_id: Option<String>,
    pub timeout: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    cluster: String,
    audience: String,
    #[serde(default)]
    spiffe_id: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

impl Config {
    pub fn from_raw(raw: Raw) -> Result<Config, ConfigError> {
        let spiffe_id = match raw.spiffe_id {
            None => None,
            Some(id) => {
                let id = identifier("subject_token.spiffe_id", id)?;
                if !id.starts_with("spiffe://") || id.len() <= "spiffe://".len() {
                    return Err(invalid(
                        "subject_token.spiffe_id",
                        "must be a SPIFFE ID such as spiffe://example.org/workload".into(),
                    ));
                }
                Some(id)
            }
        };
        Ok(Config {
            cluster: cluster("subject_token.cluster", raw.cluster)?,
            audience: identifier("subject_token.audience", raw.audience)?,
            spiffe_id,
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
        let message = JwtSvidRequest {
            audience: vec![self.audience.clone()],
            spiffe_id: self.spiffe_id.clone().unwrap_or_default(),
        };
        SourceCall::Grpc {
            cluster: self.cluster.clone(),
            service: "SpiffeWorkloadAPI",
            method: "FetchJWTSVID",
            metadata: vec![("workload.spiffe.io", b"true".to_vec())],
            message: message.encode_to_vec(),
            timeout: self.timeout,
        }
    }

    fn token(&self, response: SourceResponse<'_>) -> Result<String, SourceError> {
        let message = match response {
            SourceResponse::Grpc { status: 0, message } => message,
            SourceResponse::Grpc { status, .. } => {
                return Err(SourceError::new(
                    NAME,
                    format!("gRPC status {status} ({})", status_name(status)),
                ))
            }
            SourceResponse::Http { .. } => {
                return Err(SourceError::new(NAME, "unexpected HTTP answer"))
            }
        };
        if message.len() > MAX_SOURCE_RESPONSE_BYTES {
            return Err(SourceError::new(NAME, "the answer is too large"));
        }
        let response = JwtSvidResponse::decode(message)
            .map_err(|_| SourceError::new(NAME, "the answer is not a JWTSVIDResponse"))?;
        let svid = match &self.spiffe_id {
            Some(id) => response.svids.into_iter().find(|s| &s.spiffe_id == id),
            None => response.svids.into_iter().next(),
        };
        svid.map(|s| s.svid)
            .ok_or_else(|| SourceError::new(NAME, "the Workload API returned no JWT-SVID"))
    }

    fn identity_parts(&self) -> Vec<&str> {
        vec![
            &self.cluster,
            &self.audience,
            self.spiffe_id.as_deref().unwrap_or(""),
        ]
    }
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

    fn source(spiffe_id: Option<&str>) -> Config {
        Config {
            cluster: "spiffe_workload_api".into(),
            audience: "aud".into(),
            spiffe_id: spiffe_id.map(str::to_string),
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
        } = Config {
            audience: "https://api.openai.com/v1".into(),
            ..source(Some("spiffe://ex.org/w"))
        }
        .request()
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
        let any = source(None)
            .token(SourceResponse::Grpc {
                status: 0,
                message: &r,
            })
            .unwrap();
        assert_eq!(any, "A");
        let b = source(Some("spiffe://ex.org/b"))
            .token(SourceResponse::Grpc {
                status: 0,
                message: &r,
            })
            .unwrap();
        assert_eq!(b, "B");
        let e = source(Some("spiffe://ex.org/c"))
            .token(SourceResponse::Grpc {
                status: 0,
                message: &r,
            })
            .unwrap_err();
        assert!(e.to_string().ends_with("no JWT-SVID"));
    }

    #[test]
    fn errors() {
        let e = source(None)
            .token(SourceResponse::Grpc {
                status: 14,
                message: b"",
            })
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "could not obtain subject token from spiffe: gRPC status 14 (UNAVAILABLE)"
        );
        let e = source(None)
            .token(SourceResponse::Grpc {
                status: 0,
                message: b"",
            })
            .unwrap_err();
        assert!(e.to_string().ends_with("no JWT-SVID"));
        let e = source(None)
            .token(SourceResponse::Grpc {
                status: 0,
                message: b"\xff\xff\xff",
            })
            .unwrap_err();
        assert!(e.to_string().ends_with("not a JWTSVIDResponse"));
    }
}
