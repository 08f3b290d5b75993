//! Which identity a token belongs to: the cache key.
//!
//! Per-request identities are keyed by a SHA-256 over the whole subject token plus the exchange
//! parameters, never by a claim: the filter does not verify signatures, so a forged token that
//! copies another workload's `sub` must land on a key of its own. Gateway identities are keyed
//! by the source's configuration, since the subject token changes with every rotation.

use std::rc::Rc;

use sha2::{Digest, Sha256};

use crate::config::{Account, Config, SubjectSource};
use crate::secret::{hex, Secret};

/// Hex SHA-256 naming one identity's cache entry and lease. Shared, not copied: requests,
/// waiters and the per-VM memos hold the same key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityKey(Rc<str>);

impl IdentityKey {
    /// Key for a subject token sent by a workload, exchanged for `account`.
    pub fn for_subject(config: &Config, account: &Account, subject: &Secret) -> Self {
        Self::digest(&["request", subject.expose()], Some((config, account)))
    }

    /// Key for the gateway's own identity under `config.subject`, exchanged for `account`.
    pub fn for_gateway(config: &Config, account: &Account) -> Self {
        Self::digest(&Self::source_parts(config), Some((config, account)))
    }

    /// Key for the gateway's subject itself, whatever it is exchanged for: one subject fetch
    /// serves every service account the caller rules select.
    pub fn for_source(config: &Config) -> Self {
        let mut parts = Self::source_parts(config);
        parts.insert(0, "source");
        Self::digest(&parts, None)
    }

    /// Key for the issuer's key set (`expect.jwks_source`): its fetch's lease.
    pub fn for_keys(source: &crate::checks::JwksSource) -> Self {
        Self::digest(
            &["jwks", &source.cluster, &source.authority, &source.path],
            None,
        )
    }

    fn source_parts(config: &Config) -> Vec<&str> {
        let mut parts: Vec<&str> = vec!["gateway", config.subject.name()];
        match (&config.subject, config.subject.platform()) {
            (SubjectSource::Header(h), _) => parts.push(&h.header),
            // The certificate behind the cluster is the identity.
            (SubjectSource::X509(_), _) => parts.push(&config.token_endpoint.cluster),
            (_, Some(platform)) => parts.extend(platform.identity_parts()),
            (_, None) => {}
        }
        parts
    }

    fn digest(parts: &[&str], exchange: Option<(&Config, &Account)>) -> Self {
        let mut h = Sha256::new();
        let exchange = exchange.map(|(config, account)| {
            [
                account.identity_provider_id.as_str(),
                &account.service_account_id,
                config.subject_token_type.urn(),
            ]
        });
        for part in parts.iter().chain(exchange.iter().flatten()) {
            // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        IdentityKey(Rc::from(hex(&h.finalize())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A number from the key's first 16 hex digits: where the identity lives in the cache table.
    pub fn home(&self) -> u64 {
        let digits = self.0.get(..16).unwrap_or(&self.0);
        u64::from_str_radix(digits, 16).unwrap_or(0)
    }

    /// A prefix for logs: enough to correlate, too short to matter.
    pub fn short(&self) -> &str {
        &self.0[..12.min(self.0.len())]
    }

    #[cfg(test)]
    pub fn from_raw(s: &str) -> Self {
        IdentityKey(Rc::from(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::parse(
            format!(
                r#"{{"identity_provider_id":"wip_1","service_account_id":"sa_1",
                "token_endpoint":{{"cluster":"a"}}{extra}}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn each_input_changes_the_key() {
        let c = config("");
        let t = Secret::new("h.p.s");
        let k = IdentityKey::for_subject(&c, &c.account, &t);
        assert_eq!(
            k,
            IdentityKey::for_subject(&c, &c.account, &Secret::new("h.p.s"))
        );
        assert_eq!(k.as_str().len(), 64);
        assert_ne!(
            k,
            IdentityKey::for_subject(&c, &c.account, &Secret::new("h.p.t"))
        );
        let other_sa = Config::parse(br#"{"identity_provider_id":"wip_1","service_account_id":"sa_2","token_endpoint":{"cluster":"a"}}"#).unwrap();
        assert_ne!(
            k,
            IdentityKey::for_subject(&other_sa, &other_sa.account, &t)
        );
        let other_idp = Config::parse(br#"{"identity_provider_id":"wip_2","service_account_id":"sa_1","token_endpoint":{"cluster":"a"}}"#).unwrap();
        assert_ne!(
            k,
            IdentityKey::for_subject(&other_idp, &other_idp.account, &t)
        );
        let id_token = config(r#","subject_token_type":"id_token""#);
        assert_ne!(
            k,
            IdentityKey::for_subject(&id_token, &id_token.account, &t)
        );
    }

    #[test]
    fn gateway_keys_follow_the_source() {
        let a = config(
            r#","subject_token":{"source":"gcp_metadata","cluster":"g","audience":"aud-1"}"#,
        );
        let b = config(
            r#","subject_token":{"source":"gcp_metadata","cluster":"g","audience":"aud-2"}"#,
        );
        assert_ne!(
            IdentityKey::for_gateway(&a, &a.account),
            IdentityKey::for_gateway(&b, &b.account)
        );
        assert_eq!(
            IdentityKey::for_gateway(&a, &a.account),
            IdentityKey::for_gateway(&a.clone(), &a.account)
        );
        let x = config(
            r#","subject_token":{"source":"azure_imds","cluster":"i","resource":"r","client_id":"c"}"#,
        );
        let y = config(
            r#","subject_token":{"source":"azure_imds","cluster":"i","resource":"r","object_id":"c"}"#,
        );
        assert_ne!(
            IdentityKey::for_gateway(&x, &x.account),
            IdentityKey::for_gateway(&y, &y.account)
        );
    }

    #[test]
    fn one_subject_many_accounts() {
        let c = config(r#","subject_token":{"source":"kubernetes","cluster":"k"}"#);
        let other = Account {
            identity_provider_id: "wip_1".into(),
            service_account_id: "sa_team_b".into(),
        };
        assert_ne!(
            IdentityKey::for_gateway(&c, &c.account),
            IdentityKey::for_gateway(&c, &other)
        );
        let source = IdentityKey::for_source(&c);
        assert_ne!(source, IdentityKey::for_gateway(&c, &c.account));
        let d = config(
            r#","subject_token":{"source":"kubernetes","cluster":"k"},"subject_token_type":"id_token""#,
        );
        assert_eq!(
            source,
            IdentityKey::for_source(&d),
            "the subject does not depend on the exchange"
        );
    }
}
