//! Filter configuration: parsed once, validated, then frozen.
//!
//! The JSON arrives as Envoy's `configuration` (or Istio's `pluginConfig`). It is read into
//! the raw serde structs below, which reject unknown fields, and then converted into
//! [`Config`], whose every value has been checked. A bad configuration is refused with a
//! [`ConfigError`] naming the field, and the filter does not start.

use std::time::Duration;

use serde::Deserialize;

pub mod json_path;

pub use crate::subject::SubjectSource;
use crate::subject::{self, RawSource};

/// The validated configuration, shared read-only by every context of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The OpenAI identity the gateway acts as without caller rules. With rules, each request
    /// takes its rule's account, and the service account here may be left empty.
    pub account: Account,
    /// Which of the account's ids came from the VM's environment (for the startup log).
    pub account_from_env: Vec<&'static str>,
    /// Caller rules; `None` when any caller may use `account`.
    pub callers: Option<Vec<crate::callers::Rule>>,
    pub caller_source: crate::callers::CallerSource,
    pub subject: SubjectSource,
    pub subject_token_type: SubjectTokenType,
    pub token_endpoint: TokenEndpoint,
    /// Which requests get a token.
    pub scope: Scope,
    /// When set, a request the filter authorises must be routed to one of these clusters
    /// (Envoy's `xds.cluster_name`); a route that leads elsewhere gets no token.
    pub upstream_clusters: Option<Vec<String>>,
    pub limits: Limits,
    /// What subject tokens must look like, checked before any exchange; `None` when not
    /// configured (and always with the x509 source, which has no subject token).
    pub expect: Option<crate::checks::Expect>,
}

/// An OpenAI Workload Identity Provider and a service account: what an exchange asks for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Account {
    pub identity_provider_id: String,
    pub service_account_id: String,
}

/// The environment variables the OpenAI guides use for the two ids.
pub const PROVIDER_ENV: &str = "OPENAI_IDENTITY_PROVIDER_ID";
pub const SERVICE_ACCOUNT_ENV: &str = "OPENAI_SERVICE_ACCOUNT_ID";

/// Which requests the filter authorises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Requests whose `:authority` names one of these hosts (lower case, no trailing dot).
    /// Others pass untouched; an authority that does not parse is refused.
    Hosts(Vec<String>),
    /// Every request the filter sees: the route decides, with the filter disabled per route
    /// (`FilterConfig{disabled: true}`) wherever no token may go. Cannot disagree with routing.
    All,
}

/// Bounds that hold whatever callers send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Exchanges per second, gateway-wide, for identities without a cache record.
    pub new_identities_per_s: u32,
    /// How many such exchanges may happen at once before the rate applies.
    pub new_identities_burst: u32,
    /// Cache records kept in shared data; beyond it the least valuable is replaced.
    pub max_identities: u32,
    /// At most one invalidation per identity in this interval after OpenAI answers 401.
    pub invalidate_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            new_identities_per_s: 20,
            new_identities_burst: 100,
            max_identities: 10_000,
            invalidate_interval: Duration::from_secs(30),
        }
    }
}

/// What the filter does with a request, decided from its `:authority`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handling {
    Authorise,
    PassThrough,
    Refuse(crate::authority::AuthorityError),
}

impl Config {
    /// Whether a request with this `:authority` (raw bytes; `None` when absent) gets a token.
    /// `authority` reads the request's `:authority`; only host scopes need it.
    pub fn handling(&self, authority: impl FnOnce() -> Option<Vec<u8>>) -> Handling {
        let Scope::Hosts(hosts) = &self.scope else {
            return Handling::Authorise;
        };
        match crate::authority::host(authority().as_deref().unwrap_or_default()) {
            Ok(host) if hosts.contains(&host) => Handling::Authorise,
            Ok(_) => Handling::PassThrough,
            Err(e) => Handling::Refuse(e),
        }
    }

    /// True when a token may go to `cluster` (the request's upstream cluster, `None` when it
    /// has none): any cluster unless `upstream_clusters` is set.
    pub fn may_send_to(&self, cluster: Option<&[u8]>) -> bool {
        match &self.upstream_clusters {
            None => true,
            Some(allowed) => cluster.is_some_and(|c| allowed.iter().any(|a| a.as_bytes() == c)),
        }
    }

    /// The header that carries a workload's subject token: removed from every request, since
    /// it is a credential for this gateway alone.
    pub fn subject_header(&self) -> &str {
        match &self.subject {
            SubjectSource::Header(h) => &h.header,
            _ => subject::header::default_header(),
        }
    }

    /// The longest a request may wait for a token: a subject fetch and an exchange, twice
    /// (a lost leader's lease runs out once), plus a margin.
    pub fn wait_budget(&self) -> Duration {
        self.lease_duration() * 2
    }

    /// How long a worker holds an identity's lease while it fetches.
    pub fn lease_duration(&self) -> Duration {
        self.subject.timeout() + self.token_endpoint.timeout + Duration::from_millis(500)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEndpoint {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectTokenType {
    Jwt,
    IdToken,
    /// The x509 source: the client certificate, no subject token.
    X509,
}

impl SubjectTokenType {
    /// The URN sent as `subject_token_type` in the exchange.
    pub fn urn(self) -> &'static str {
        match self {
            SubjectTokenType::Jwt => "urn:ietf:params:oauth:token-type:jwt",
            SubjectTokenType::IdToken => "urn:ietf:params:oauth:token-type:id_token",
            SubjectTokenType::X509 => subject::x509::SUBJECT_TOKEN_TYPE,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("configuration is not valid JSON for this filter at `{field}`: {reason}")]
    Syntax { field: String, reason: String },
    #[error("configuration field `{field}` {reason}")]
    Invalid { field: String, reason: String },
}

const DEFAULT_TOKEN_AUTHORITY: &str = "auth.openai.com";
const DEFAULT_TOKEN_PATH: &str = "/oauth/token";
const DEFAULT_TIMEOUT_MS: u64 = 5000;
const MAX_TIMEOUT_MS: u64 = 60_000;
const DEFAULT_HOST: &str = "api.openai.com";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig<'a> {
    #[serde(default)]
    identity_provider_id: Option<String>,
    #[serde(default)]
    service_account_id: Option<String>,
    #[serde(default)]
    callers: Option<Vec<crate::callers::RawRule>>,
    #[serde(default)]
    caller_identity: Option<String>,
    /// Read on its own (see [`subject_token`]); kept as text so that its errors, which serde
    /// reports without a position, can still be named.
    #[serde(default, borrow)]
    subject_token: Option<&'a serde_json::value::RawValue>,
    #[serde(default)]
    subject_token_type: Option<String>,
    token_endpoint: RawTokenEndpoint,
    #[serde(default)]
    hosts: Option<Vec<String>>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    limits: Option<RawLimits>,
    #[serde(default)]
    upstream_clusters: Option<Vec<String>>,
    #[serde(default)]
    expect: Option<crate::checks::RawExpect>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default)]
    new_identities_per_s: Option<u32>,
    #[serde(default)]
    new_identities_burst: Option<u32>,
    #[serde(default)]
    max_identities: Option<u32>,
    #[serde(default)]
    invalidate_interval_s: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokenEndpoint {
    cluster: String,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

impl Config {
    /// Parses and validates the plugin configuration, with no environment to fall back on.
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        Self::parse_with_env(bytes, &|_| None)
    }

    /// Parses and validates the plugin configuration; ids it omits come from `env` (the VM's
    /// environment variables).
    pub fn parse_with_env(
        bytes: &[u8],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = serde_json::from_slice(bytes).map_err(|e| ConfigError::Syntax {
            field: json_path::field(bytes, &e),
            reason: e.to_string(),
        })?;
        let subject_token = raw
            .subject_token
            .map(|text| subject_token(bytes, text.get().as_bytes()))
            .transpose()?;
        Self::validate(raw, subject_token, env)
    }

    fn validate(
        raw: RawConfig,
        subject_token: Option<RawSource>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut account_from_env = Vec::new();
        // `required: false` lets a missing id be empty: the top-level service account, when
        // every request takes the account of the caller rule it matches.
        let mut id = |field: &'static str,
                      value: Option<String>,
                      var: &'static str,
                      required: bool| {
            let value = match (value, env(var)) {
                (Some(v), _) => v,
                (None, Some(v)) => {
                    account_from_env.push(var);
                    v
                }
                (None, None) if !required => return Ok(String::new()),
                (None, None) => {
                    return Err(invalid(
                        field,
                        format!("is required (in the configuration or as the VM environment variable {var})"),
                    ))
                }
            };
            identifier(field, value)
        };
        let identity_provider_id = id(
            "identity_provider_id",
            raw.identity_provider_id,
            PROVIDER_ENV,
            true,
        )?;
        let callers = raw
            .callers
            .map(|rules| crate::callers::rules(rules, &identity_provider_id))
            .transpose()?;
        let account = Account {
            identity_provider_id,
            service_account_id: id(
                "service_account_id",
                raw.service_account_id,
                SERVICE_ACCOUNT_ENV,
                callers.is_none(),
            )?,
        };
        let caller_source = match raw.caller_identity.as_deref() {
            None | Some("peer_certificate") => crate::callers::CallerSource::PeerCertificate,
            Some("x-forwarded-client-cert") => crate::callers::CallerSource::ForwardedClientCert,
            Some(other) => {
                return Err(invalid(
                    "caller_identity",
                    format!(
                    "must be \"peer_certificate\" or \"x-forwarded-client-cert\", not {other:?}"
                ),
                ))
            }
        };
        let subject = SubjectSource::from_raw(subject_token)?;
        let subject_token_type = match raw.subject_token_type.as_deref() {
            None | Some("x509") if subject.is_certificate() => SubjectTokenType::X509,
            _ if subject.is_certificate() => {
                return Err(invalid(
                    "subject_token_type",
                    "must be left out with the x509 source (its type is urn:openai:params:oauth:token-type:x509)".into(),
                ))
            }
            None | Some("jwt") => SubjectTokenType::Jwt,
            Some("id_token") => SubjectTokenType::IdToken,
            Some(other) => {
                return Err(invalid(
                    "subject_token_type",
                    format!("must be \"jwt\" or \"id_token\", not {other:?}"),
                ))
            }
        };
        let token_endpoint = TokenEndpoint {
            cluster: cluster("token_endpoint.cluster", raw.token_endpoint.cluster)?,
            authority: authority(
                "token_endpoint.authority",
                raw.token_endpoint.authority,
                if subject.is_certificate() {
                    subject::x509::TOKEN_AUTHORITY
                } else {
                    DEFAULT_TOKEN_AUTHORITY
                },
            )?,
            path: path(
                "token_endpoint.path",
                raw.token_endpoint.path,
                DEFAULT_TOKEN_PATH,
            )?,
            timeout: timeout("token_endpoint.timeout_ms", raw.token_endpoint.timeout_ms)?,
        };
        let scope = match raw.scope.as_deref() {
            None | Some("hosts") => Scope::Hosts(hosts(raw.hosts)?),
            Some("all") if raw.hosts.is_some() => {
                return Err(invalid(
                    "hosts",
                    "must not be set with \"scope\": \"all\" (every request the filter sees gets a token)".into(),
                ))
            }
            Some("all") => Scope::All,
            Some(other) => {
                return Err(invalid(
                    "scope",
                    format!("must be \"hosts\" or \"all\", not {other:?}"),
                ))
            }
        };
        let limits = limits(raw.limits.unwrap_or_default())?;
        let upstream_clusters = match raw.upstream_clusters {
            None => None,
            Some(list) if list.is_empty() => {
                return Err(invalid(
                    "upstream_clusters",
                    "must list at least one cluster, or be left out".into(),
                ))
            }
            Some(list) => Some(
                list.into_iter()
                    .map(|c| cluster("upstream_clusters", c))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let expect = match raw.expect {
            Some(_) if subject.is_certificate() => {
                return Err(invalid(
                    "expect",
                    "must be left out with the x509 source: there is no subject token to check"
                        .into(),
                ))
            }
            raw => raw.map(crate::checks::Expect::from_raw).transpose()?,
        };
        Ok(Config {
            account,
            account_from_env,
            callers,
            caller_source,
            subject,
            subject_token_type,
            token_endpoint,
            scope,
            upstream_clusters,
            limits,
            expect,
        })
    }
}

/// `subject_token`, whose text `value` lies in the configuration `config`. The source is an
/// internally tagged enum: serde reads the object before the variant, so an error in the
/// variant's fields has no position; it is named `subject_token`, as it would be at the end of
/// the object. Other errors are named by their position in `value`, and reported with their
/// position in `config`.
fn subject_token(config: &[u8], value: &[u8]) -> Result<RawSource, ConfigError> {
    serde_json::from_slice(value).map_err(|e| {
        let within = json_path::error_offset(value, &e);
        let path = json_path::path(value, within, json_path::is_eof(&e));
        let field = match path.as_bytes().first() {
            None => "subject_token".to_string(),
            Some(b'[') => format!("subject_token{path}"),
            Some(_) => format!("subject_token.{path}"),
        };
        let mut reason = e.to_string();
        if e.line() != 0 {
            let relative = format!(" at line {} column {}", e.line(), e.column());
            if let Some(message) = reason.strip_suffix(&relative) {
                reason = message.to_string();
            }
        }
        // `value` borrows from `config`: where it starts there.
        let start = (value.as_ptr() as usize)
            .checked_sub(config.as_ptr() as usize)
            .filter(|&s| s <= config.len())
            .unwrap_or(0);
        let (line, column) = json_path::position(config, start.saturating_add(within));
        ConfigError::Syntax {
            field,
            reason: format!("{reason} at line {line} column {column}"),
        }
    })
}

pub(crate) fn invalid(field: &str, reason: String) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        reason,
    }
}

/// An id, audience or resource: printable ASCII without spaces, at most 1024 bytes.
pub(crate) fn identifier(field: &str, value: String) -> Result<String, ConfigError> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty".into()));
    }
    if value.len() > 1024 {
        return Err(invalid(field, "must be at most 1024 bytes".into()));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            field,
            "must be printable ASCII without spaces".into(),
        ));
    }
    Ok(value)
}

pub(crate) fn cluster(field: &str, value: String) -> Result<String, ConfigError> {
    if value.trim().is_empty() {
        return Err(invalid(field, "must name an Envoy cluster".into()));
    }
    identifier(field, value)
}

pub(crate) fn authority(
    field: &str,
    value: Option<String>,
    default: &str,
) -> Result<String, ConfigError> {
    let value = value.unwrap_or_else(|| default.to_string());
    let ok = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b));
    if !ok {
        return Err(invalid(
            field,
            format!("must be a host name with an optional port, not {value:?}"),
        ));
    }
    Ok(value)
}

pub(crate) fn path(
    field: &str,
    value: Option<String>,
    default: &str,
) -> Result<String, ConfigError> {
    let value = value.unwrap_or_else(|| default.to_string());
    if !value.starts_with('/') || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            field,
            format!("must start with '/' and contain no spaces, not {value:?}"),
        ));
    }
    Ok(value)
}

pub(crate) fn timeout(field: &str, value: Option<u64>) -> Result<Duration, ConfigError> {
    let ms = value.unwrap_or(DEFAULT_TIMEOUT_MS);
    if !(1..=MAX_TIMEOUT_MS).contains(&ms) {
        return Err(invalid(
            field,
            format!("must be between 1 and {MAX_TIMEOUT_MS} milliseconds, not {ms}"),
        ));
    }
    Ok(Duration::from_millis(ms))
}

pub(crate) fn header_name(field: &str, value: String) -> Result<String, ConfigError> {
    let token = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if !token {
        return Err(invalid(
            field,
            format!("must be a lower-case HTTP header name, not {value:?}"),
        ));
    }
    if value == "authorization" || value == "host" {
        return Err(invalid(
            field,
            format!("must not be {value:?}: the filter owns that header"),
        ));
    }
    Ok(value)
}

fn hosts(value: Option<Vec<String>>) -> Result<Vec<String>, ConfigError> {
    let hosts = value.unwrap_or_else(|| vec![DEFAULT_HOST.to_string()]);
    if hosts.is_empty() {
        return Err(invalid("hosts", "must list at least one host".into()));
    }
    let mut out: Vec<String> = Vec::with_capacity(hosts.len());
    for h in hosts {
        let normal = crate::authority::configured_host(&h).ok_or_else(|| {
            invalid(
                "hosts",
                format!("entries must be host names without port or scheme, not {h:?}"),
            )
        })?;
        if !out.contains(&normal) {
            out.push(normal);
        }
    }
    Ok(out)
}

fn limits(raw: RawLimits) -> Result<Limits, ConfigError> {
    let d = Limits::default();
    let within = |field: &str, value: Option<u32>, default: u32, max: u32| {
        let v = value.unwrap_or(default);
        if (1..=max).contains(&v) {
            Ok(v)
        } else {
            Err(invalid(
                field,
                format!("must be between 1 and {max}, not {v}"),
            ))
        }
    };
    let invalidate_s = raw
        .invalidate_interval_s
        .unwrap_or(d.invalidate_interval.as_secs());
    if invalidate_s > 3600 {
        return Err(invalid(
            "limits.invalidate_interval_s",
            format!("must be between 0 and 3600 seconds, not {invalidate_s}"),
        ));
    }
    Ok(Limits {
        new_identities_per_s: within(
            "limits.new_identities_per_s",
            raw.new_identities_per_s,
            d.new_identities_per_s,
            100_000,
        )?,
        new_identities_burst: within(
            "limits.new_identities_burst",
            raw.new_identities_burst,
            d.new_identities_burst,
            100_000,
        )?,
        max_identities: within(
            "limits.max_identities",
            raw.max_identities,
            d.max_identities,
            1_000_000,
        )?,
        invalidate_interval: Duration::from_secs(invalidate_s),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Config, ConfigError> {
        Config::parse(json.as_bytes())
    }

    const MINIMAL: &str = r#"{"identity_provider_id":"wip_1","service_account_id":"sa_1",
        "token_endpoint":{"cluster":"openai_auth"}}"#;

    #[test]
    fn minimal_config_takes_the_documented_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(
            c.subject,
            SubjectSource::Header(subject::header::Config {
                header: "x-openai-subject-token".into()
            })
        );
        assert_eq!(c.subject_token_type, SubjectTokenType::Jwt);
        assert_eq!(c.token_endpoint.authority, "auth.openai.com");
        assert_eq!(c.token_endpoint.path, "/oauth/token");
        assert_eq!(c.token_endpoint.timeout, Duration::from_millis(5000));
        assert_eq!(c.scope, Scope::Hosts(vec!["api.openai.com".into()]));
        assert_eq!(c.limits, Limits::default());
    }

    #[test]
    fn full_header_config() {
        let c = parse(
            r#"{"identity_provider_id":"wip_1","service_account_id":"sa_1",
            "subject_token":{"source":"header","header":"x-id"},
            "subject_token_type":"id_token",
            "token_endpoint":{"cluster":"c","authority":"auth.example:8443","path":"/t","timeout_ms":250},
            "hosts":["API.openai.com","gateway.internal"]}"#,
        )
        .unwrap();
        assert_eq!(
            c.subject_token_type.urn(),
            "urn:ietf:params:oauth:token-type:id_token"
        );
        assert_eq!(
            c.scope,
            Scope::Hosts(vec!["api.openai.com".into(), "gateway.internal".into()])
        );
        assert_eq!(c.token_endpoint.timeout, Duration::from_millis(250));
    }

    #[test]
    fn every_platform_source_parses() {
        let base = |s: &str| {
            format!(
                r#"{{"identity_provider_id":"w","service_account_id":"s",
                "token_endpoint":{{"cluster":"a"}},"subject_token":{s}}}"#
            )
        };
        let k = parse(&base(
            r#"{"source":"kubernetes","cluster":"wif_token_file","path":"/token"}"#,
        ))
        .unwrap();
        assert!(
            matches!(k.subject, SubjectSource::Kubernetes(subject::kubernetes::Config { ref authority, refresh_interval, .. })
            if authority == "localhost" && refresh_interval == Duration::from_secs(30))
        );
        let g = parse(&base(
            r#"{"source":"gcp_metadata","cluster":"gcp","audience":"https://api.openai.com/v1"}"#,
        ))
        .unwrap();
        assert!(
            matches!(g.subject, SubjectSource::GcpMetadata(subject::gcp_metadata::Config { ref authority, .. }) if authority == "metadata.google.internal")
        );
        let a = parse(&base(
            r#"{"source":"azure_imds","cluster":"imds","resource":"api://x","object_id":"o"}"#,
        ))
        .unwrap();
        assert!(
            matches!(a.subject, SubjectSource::AzureImds(subject::azure_imds::Config { identity: Some(subject::azure_imds::Identity { kind: "object_id", value: ref o }), ref authority, .. })
            if o == "o" && authority == "169.254.169.254")
        );
        let s = parse(&base(r#"{"source":"spiffe","cluster":"spire","audience":"aud","spiffe_id":"spiffe://ex.org/w"}"#)).unwrap();
        assert!(s.subject.is_gateway_identity());
        assert_eq!(s.subject.name(), "spiffe");
    }

    #[test]
    fn host_matching_ignores_port_and_case_and_refuses_what_does_not_parse() {
        let c = parse(r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"hosts":["api.openai.com","localhost","gateway.internal."]}"#).unwrap();
        let handling = |a: &str| c.handling(|| Some(a.as_bytes().to_vec()));
        for yes in [
            "api.openai.com",
            "API.OpenAI.com",
            "api.openai.com:443",
            "api.openai.com.",
            "localhost:10000",
            "gateway.internal",
        ] {
            assert_eq!(handling(yes), Handling::Authorise, "{yes}");
        }
        for no in [
            "openai.com",
            "api.openai.com.evil.example",
            "evil.example",
            "api.openai.co",
            "xapi.openai.com",
        ] {
            assert_eq!(handling(no), Handling::PassThrough, "{no}");
        }
        for refused in [
            "",
            "api.openai.com:443:443",
            "api.openai.com::",
            "api.openai.com:]",
            "api.openai.com:1,x:2",
            "API.OPENAI.COM:443:80",
            "localhost:1:1",
        ] {
            assert!(
                matches!(handling(refused), Handling::Refuse(_)),
                "{refused}"
            );
        }
        assert!(matches!(c.handling(|| None), Handling::Refuse(_)));
        assert!(matches!(
            c.handling(|| Some(b"api.openai.com\xff".to_vec())),
            Handling::Refuse(_)
        ));
        let c = parse(r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"hosts":["[::1]"]}"#).unwrap();
        assert_eq!(
            c.handling(|| Some(b"[::1]:8080".to_vec())),
            Handling::Authorise
        );
        assert_eq!(c.handling(|| Some(b"[::1]".to_vec())), Handling::Authorise);
    }

    #[test]
    fn scope_all_authorises_every_request_and_takes_no_hosts() {
        let c = parse(r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"scope":"all"}"#).unwrap();
        assert_eq!(c.scope, Scope::All);
        for a in [None, Some(&b"api.openai.com:443:443"[..]), Some(b"\xff")] {
            assert_eq!(c.handling(|| a.map(<[u8]>::to_vec)), Handling::Authorise);
        }
    }

    #[test]
    fn upstream_clusters_restrict_where_tokens_go() {
        let c = parse(MINIMAL).unwrap();
        assert!(c.may_send_to(None) && c.may_send_to(Some(b"anything")));
        let c = parse(r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"upstream_clusters":["outbound|443||api.openai.com"]}"#).unwrap();
        assert!(c.may_send_to(Some(b"outbound|443||api.openai.com")));
        assert!(!c.may_send_to(Some(b"outbound|443||evil.example")));
        assert!(!c.may_send_to(None), "no route, no token");
        let e = parse(r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"upstream_clusters":[]}"#).unwrap_err();
        assert!(e.to_string().contains("upstream_clusters"));
    }

    #[test]
    fn caller_rules_make_the_top_level_service_account_optional() {
        let c = parse(r#"{"identity_provider_id":"wip_1","token_endpoint":{"cluster":"a"},
            "callers":[{"name":"a","principals":["spiffe://td/ns/a/*"],"service_account_id":"sa_a"}]}"#).unwrap();
        assert_eq!(c.account.service_account_id, "");
        let rule = &c.callers.as_ref().unwrap()[0];
        assert_eq!(rule.account.identity_provider_id, "wip_1");
        assert!(
            parse(r#"{"identity_provider_id":"wip_1","token_endpoint":{"cluster":"a"}}"#)
                .unwrap_err()
                .to_string()
                .contains("service_account_id")
        );
    }

    #[test]
    fn limits_parse_with_defaults() {
        let c = parse(r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"limits":{"new_identities_per_s":5,"max_identities":16,"invalidate_interval_s":0}}"#).unwrap();
        assert_eq!(
            c.limits,
            Limits {
                new_identities_per_s: 5,
                new_identities_burst: 100,
                max_identities: 16,
                invalidate_interval: Duration::ZERO,
            }
        );
    }

    #[test]
    fn expect_parses_with_defaults_and_is_absent_unless_configured() {
        use crate::checks::{Algorithm, Keys, Pattern};
        assert_eq!(parse(MINIMAL).unwrap().expect, None);
        let c = parse(r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},
            "expect":{"issuer":"https://container.googleapis.com/v1/projects/p/locations/l/clusters/c",
                      "audiences":["https://api.openai.com/v1"],"algorithms":["RS256","ES256","RS256"],"leeway_s":10,
                      "claims":{"sub":"system:serviceaccount:istio-system:*","tid":"t1"},
                      "jwks_source":{"cluster":"gke_oidc","authority":"container.googleapis.com",
                                     "path":"/v1/projects/p/locations/l/clusters/c/jwks"}}}"#).unwrap();
        let e = c.expect.unwrap();
        assert_eq!(
            e.issuer.as_deref(),
            Some("https://container.googleapis.com/v1/projects/p/locations/l/clusters/c")
        );
        assert_eq!(
            e.audiences,
            Some(vec!["https://api.openai.com/v1".to_string()])
        );
        assert_eq!(e.algorithms, [Algorithm::Rs256, Algorithm::Es256]);
        assert_eq!(e.leeway_s, 10);
        assert_eq!(
            e.claims,
            [
                (
                    "sub".to_string(),
                    Pattern::Prefix("system:serviceaccount:istio-system:".into())
                ),
                ("tid".to_string(), Pattern::Exact("t1".into())),
            ]
        );
        let Keys::Source(source) = e.keys else {
            panic!("expected a jwks_source")
        };
        assert_eq!(source.cluster, "gke_oidc");
        assert_eq!(source.refresh_interval, Duration::from_secs(3600));
        assert_eq!(source.timeout, Duration::from_millis(5000));
        let e = parse(r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"expect":{}}"#)
            .unwrap()
            .expect
            .unwrap();
        assert_eq!(e, crate::checks::Expect::default());
        assert_eq!(e.algorithms, Algorithm::ALL);
        assert_eq!(e.leeway_s, 30);
    }

    #[test]
    fn expect_takes_an_inline_jwks() {
        let jwk = crate::checks::tests::public_jwk(crate::checks::tests::RSA_OLD);
        let c = parse(&format!(
            r#"{{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{{"cluster":"a"}},
            "expect":{{"jwks":{{"keys":[{jwk},{{"kty":"RSA","use":"enc","kid":"e","n":"AQAB","e":"AQAB"}}]}}}}}}"#
        ))
        .unwrap();
        let Some(crate::checks::Keys::Inline(jwks)) = c.expect.map(|e| e.keys) else {
            panic!("expected an inline JWKS")
        };
        assert_eq!(jwks.kids(), ["old-2024"]);
        assert_eq!(jwks.skipped().len(), 1);
    }

    #[test]
    fn expect_errors_name_the_field() {
        let base = |expect: &str| {
            format!(
                r#"{{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{{"cluster":"a"}},"expect":{expect}}}"#
            )
        };
        let source = r#""jwks_source":{"cluster":"k","authority":"kubernetes.default.svc","path":"/openid/v1/jwks"}"#;
        let cases = [
            (r#"{"issuer":""}"#.to_string(), "expect.issuer"),
            (r#"{"issuer":"https://a b"}"#.into(), "expect.issuer"),
            (r#"{"audiences":[]}"#.into(), "expect.audiences"),
            (r#"{"audiences":["ok",""]}"#.into(), "expect.audiences[1]"),
            (r#"{"algorithms":[]}"#.into(), "expect.algorithms"),
            (r#"{"algorithms":["RS256","none"]}"#.into(), "expect.algorithms[1]"),
            (r#"{"algorithms":["HS256"]}"#.into(), "HMAC"),
            (r#"{"algorithms":["ES384"]}"#.into(), "expect.algorithms[0]"),
            (r#"{"leeway_s":301}"#.into(), "expect.leeway_s"),
            (r#"{"leeway_s":-1}"#.into(), "expect.leeway_s"),
            (r#"{"claims":{"sub":"*"}}"#.into(), "expect.claims.sub"),
            (r#"{"claims":{"sub":"a*b"}}"#.into(), "expect.claims.sub"),
            (r#"{"claims":{"sub":"*a"}}"#.into(), "expect.claims.sub"),
            (r#"{"claims":{"sub":""}}"#.into(), "expect.claims.sub"),
            (r#"{"claims":{"sub":7}}"#.into(), "expect.claims.sub"),
            (r#"{"claims":{"":"x"}}"#.into(), "expect.claims"),
            (r#"{"issuers":["x"]}"#.into(), "issuers"),
            (r#"{"jwks":{"keys":[]}}"#.into(), "expect.jwks"),
            (r#"{"jwks":{"keys":[{"kty":"oct","kid":"h","k":"c2VjcmV0"}]}}"#.into(), "symmetric"),
            (r#"{"jwks":[]}"#.into(), "expect.jwks"),
            (format!(r#"{{"jwks":{{"keys":[]}},{source}}}"#), "expect.jwks_source"),
            (r#"{"jwks_source":{"authority":"a","path":"/j"}}"#.into(), "cluster"),
            (r#"{"jwks_source":{"cluster":"","authority":"a","path":"/j"}}"#.into(), "expect.jwks_source.cluster"),
            (r#"{"jwks_source":{"cluster":"k","authority":"a/b","path":"/j"}}"#.into(), "expect.jwks_source.authority"),
            (r#"{"jwks_source":{"cluster":"k","authority":"a","path":"j"}}"#.into(), "expect.jwks_source.path"),
            (r#"{"jwks_source":{"cluster":"k","authority":"a","path":"/j","refresh_interval_s":59}}"#.into(), "expect.jwks_source.refresh_interval_s"),
            (r#"{"jwks_source":{"cluster":"k","authority":"a","path":"/j","timeout_ms":0}}"#.into(), "expect.jwks_source.timeout_ms"),
            (r#"{"jwks_source":{"cluster":"k","authority":"a","path":"/j","url":"x"}}"#.into(), "url"),
        ];
        for (expect, field) in cases {
            let json = base(&expect);
            let err = parse(&json).expect_err(&json).to_string();
            assert!(err.contains(field), "{json}: {err} should name {field}");
        }
        let x509 = r#"{"identity_provider_id":"w","service_account_id":"s","subject_token":{"source":"x509"},
            "token_endpoint":{"cluster":"a"},"expect":{}}"#;
        let err = parse(x509).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { field, .. } if field == "expect"),
            "{err}"
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                r#"{"identity_provider_id":"w","service_account_id":"s"}"#,
                "token_endpoint",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a","timeout":5}}"#,
                "timeout",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"extra":1}"#,
                "extra",
            ),
            (
                r#"{"identity_provider_id":"","service_account_id":"s","token_endpoint":{"cluster":"a"}}"#,
                "identity_provider_id",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":""}}"#,
                "token_endpoint.cluster",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a","timeout_ms":0}}"#,
                "token_endpoint.timeout_ms",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a","timeout_ms":"5"}}"#,
                "token_endpoint.timeout_ms",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a","path":"oauth"}}"#,
                "token_endpoint.path",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"subject_token_type":"saml"}"#,
                "subject_token_type",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"hosts":[]}"#,
                "hosts",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"hosts":["api.openai.com:443"]}"#,
                "hosts",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"subject_token":{"source":"header","header":"Authorization"}}"#,
                "subject_token.header",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"subject_token":{"source":"header","header":"authorization"}}"#,
                "subject_token.header",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"subject_token":{"source":"ldap"}}"#,
                "subject_token",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"subject_token":{"source":"gcp_metadata","cluster":"g"}}"#,
                "audience",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"subject_token":{"source":"azure_imds","cluster":"i","resource":"r","client_id":"c","object_id":"o"}}"#,
                "subject_token.client_id",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"subject_token":{"source":"spiffe","cluster":"i","audience":"a","spiffe_id":"example.org/w"}}"#,
                "subject_token.spiffe_id",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"subject_token":{"source":"kubernetes","cluster":"k","refresh_interval_s":0}}"#,
                "subject_token.refresh_interval_s",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"subject_token":{"source":"kubernetes","cluster":"k","audience":"x"}}"#,
                "audience",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"hosts":["api.openai.com.."]}"#,
                "hosts",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"hosts":["*"]}"#,
                "hosts",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"scope":"all","hosts":["a"]}"#,
                "hosts",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"scope":"route"}"#,
                "scope",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"limits":{"max_identities":0}}"#,
                "limits.max_identities",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"limits":{"new_identities_per_s":-1}}"#,
                "limits.new_identities_per_s",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"limits":{"burst":1}}"#,
                "burst",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"limits":{"invalidate_interval_s":7200}}"#,
                "limits.invalidate_interval_s",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"callers":[{"name":"a","principals":["x*y"],"service_account_id":"s"}]}"#,
                "callers[0].principals[0]",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"callers":[]}"#,
                "callers",
            ),
            (
                r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"caller_identity":"header"}"#,
                "caller_identity",
            ),
            (
                r#"{"service_account_id":"s","token_endpoint":{"cluster":"a"}}"#,
                "identity_provider_id",
            ),
            ("not json", "(top level)"),
            ("", "(top level)"),
        ];
        for (json, field) in cases {
            let err = parse(json).expect_err(json).to_string();
            assert!(err.contains(field), "{json}: {err} should name {field}");
        }
    }

    #[test]
    fn subject_token_errors_give_their_position_in_the_configuration() {
        let json = "{\"token_endpoint\":{\"cluster\":\"a\"},\n \"subject_token\": {\"source\": \"kubernetes\",\n   \"cluster\": 7}}";
        let err = Config::parse(json.as_bytes()).unwrap_err();
        assert_eq!(
            err,
            ConfigError::Syntax {
                field: "subject_token".into(),
                reason: "invalid type: integer `7`, expected a string at line 3 column 16".into(),
            }
        );
        let json = "{\"token_endpoint\":{\"cluster\":\"a\"},\n \"subject_token\": {\"source\": \"spiffe\",\n   \"cluster\": }}";
        let err = Config::parse(json.as_bytes()).unwrap_err();
        assert_eq!(
            err,
            ConfigError::Syntax {
                field: "subject_token.cluster".into(),
                reason: "expected value at line 3 column 15".into(),
            }
        );
    }

    /// Syntax and type errors name the field they are in. The table was checked against the
    /// paths serde_path_to_error gave before it was replaced. They differ on purpose in three
    /// ways: text after the configuration is refused (it was ignored); where it named an
    /// unfinished key `?` (`limits.?`) the object is named (`limits`); and a duplicate field is
    /// named (`limits`), not its object.
    #[test]
    fn syntax_errors_name_the_field() {
        let base = r#""identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"}"#;
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (format!(r#"{{{base},"extra":1}}"#).into_bytes(), "extra"),
            (format!(r#"{{{base},"limits":{{"burst":1}}}}"#).into_bytes(), "limits.burst"),
            (format!(r#"{{{base},"expect":{{"jwks_source":{{"cluster":"k","authority":"a","path":"/j","url":"x"}}}}}}"#).into_bytes(), "expect.jwks_source.url"),
            (format!(r#"{{{base},"callers":[{{"name":"a","principals":[],"service_account_id":"s"}},{{"name":1}}]}}"#).into_bytes(), "callers[1].name"),
            (format!(r#"{{{base},"callers":[{{"name":"a","principals":[],"service_account_id":"s"}},{{"name":"b","principals":["x",2],"service_account_id":"s"}}]}}"#).into_bytes(), "callers[1].principals[1]"),
            (format!(r#"{{{base},"callers":[{{"name":"a","principals":[],"service_account_id":"s","x":1}}]}}"#).into_bytes(), "callers[0].x"),
            (format!(r#"{{{base},"callers":[{{"name":"a","principals":[]}}]}}"#).into_bytes(), "callers[0]"),
            (br#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a","timeout_ms":"5"}}"#.to_vec(), "token_endpoint.timeout_ms"),
            (br#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"timeout_ms":5}}"#.to_vec(), "token_endpoint"),
            (br#"{"identity_provider_id":"w","service_account_id":"s"}"#.to_vec(), "(top level)"),
            (br#"{"identity_provider_id":7,"service_account_id":"s"}"#.to_vec(), "identity_provider_id"),
            (format!(r#"{{{base},"subject_token":{{"source":"ldap"}}}}"#).into_bytes(), "subject_token.source"),
            (format!(r#"{{"subject_token":{{"source":"ldap"}},{base}}}"#).into_bytes(), "subject_token.source"),
            (format!(r#"{{{base},"subject_token":{{"source":"kubernetes","cluster":"k","audience":"x"}}}}"#).into_bytes(), "subject_token"),
            (format!(r#"{{"subject_token":{{"source":"kubernetes","cluster":"k","audience":"x"}},{base}}}"#).into_bytes(), "subject_token"),
            (format!(r#"{{"subject_token":{{"source":"kubernetes","cluster":"k","audience":"x"}} ,{base}}}"#).into_bytes(), "subject_token"),
            (format!(r#"{{{base},"subject_token":{{"source":"gcp_metadata","cluster":"g"}}}}"#).into_bytes(), "subject_token"),
            (format!(r#"{{{base},"subject_token":{{"source":"header","header":5}}}}"#).into_bytes(), "subject_token"),
            (format!(r#"{{{base},"subject_token":{{"header":"x"}}}}"#).into_bytes(), "subject_token"),
            (format!(r#"{{{base},"subject_token":{{"source":7}}}}"#).into_bytes(), "subject_token.source"),
            (format!(r#"{{{base},"subject_token":"header"}}"#).into_bytes(), "subject_token"),
            (format!(r#"{{{base},"hosts":["a",3]}}"#).into_bytes(), "hosts[1]"),
            (format!(r#"{{{base},"hosts":"a"}}"#).into_bytes(), "hosts"),
            (format!(r#"{{{base},"expect":{{"claims":{{"sub":7}}}}}}"#).into_bytes(), "expect.claims.sub"),
            (format!(r#"{{{base},"expect":{{"leeway_s":-1}}}}"#).into_bytes(), "expect.leeway_s"),
            (format!(r#"{{{base},"expect":{{"audiences":["a",{{}}]}}}}"#).into_bytes(), "expect.audiences[1]"),
            (format!(r#"{{{base},"expect":{{"jwks":{{"keys":[1,]}}}}}}"#).into_bytes(), "expect.jwks.keys"),
            (format!(r#"{{{base},"limits":{{"max_identities":4294967296}}}}"#).into_bytes(), "limits.max_identities"),
            (format!(r#"{{{base},"limits":{{"max_identities":1.5}}}}"#).into_bytes(), "limits.max_identities"),
            (format!(r#"{{{base}}} trailing"#).into_bytes(), "(top level)"),
            (format!(r#"{{{base}}}}}"#).into_bytes(), "(top level)"),
            (format!(r#"{{{base},"hosts":["a"}}"#).into_bytes(), "hosts"),
            (format!(r#"{{{base},"limits":{{"max_identities":1,}}}}"#).into_bytes(), "limits"),
            (format!(r#"{{{base},"limits":{{"max_identities" 1}}}}"#).into_bytes(), "limits"),
            (format!(r#"{{{base},"limits":{{"max_identities":}}}}"#).into_bytes(), "limits.max_identities"),
            (format!(r#"{{{base},"limits":{{"max_identities":1"#).into_bytes(), "limits"),
            (format!(r#"{{{base},"limits":{{"max_identities":"#).into_bytes(), "limits.max_identities"),
            (format!(r#"{{{base},"limits":{{"max_"#).into_bytes(), "limits"),
            (format!(r#"{{{base},"limits":["#).into_bytes(), "limits"),
            (format!(r#"{{{base},"hosts":["a","#).into_bytes(), "hosts"),
            (format!(r#"{{{base},"hosts":["a",,"b"]}}"#).into_bytes(), "hosts[1]"),
            (format!(r#"{{{base},"hosts":["a\u00e9\xff"]}}"#).into_bytes(), "hosts[0]"),
            (b"{\"identity_provider_id\":\"w\xff\",\"service_account_id\":\"s\"}".to_vec(), "identity_provider_id"),
            (b"{\"ident\xffity\":\"w\"}".to_vec(), "(top level)"),
            (br#"{"a\u00e9\"":1}"#.to_vec(), "aé\""),
            (format!("{{\n  {base},\n  \"limits\": {{\n    \"max_identities\": \"x\"\n  }}\n}}").into_bytes(), "limits.max_identities"),
            (b"not json".to_vec(), "(top level)"),
            (b"".to_vec(), "(top level)"),
            (b"[]".to_vec(), "(top level)"),
            (b"null".to_vec(), "(top level)"),
            (b"  {".to_vec(), "(top level)"),
            (b"{\"token_endpoint\":{\"cluster\":\"a\"}".to_vec(), "(top level)"),
            (format!(r#"{{{base},"expect":{{"jwks":{{"keys":[{{"a":[1,2,{{"b":tru}}]}}]}}}}}}"#).into_bytes(), "expect.jwks.keys[0].a[2].b"),
            (format!(r#"{{{base},"limits":null,"limits":{{}}}}"#).into_bytes(), "limits"),
        ];
        for (json, field) in cases {
            match Config::parse(&json) {
                Err(ConfigError::Syntax { field: got, .. }) if got == field => {}
                other => panic!(
                    "{}: {other:?}, expected a syntax error at {field}",
                    json.escape_ascii()
                ),
            }
        }
    }
}
