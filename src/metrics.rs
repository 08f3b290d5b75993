//! Counters, exported through proxy-wasm metrics (Envoy shows them as `wasmcustom.openai_wif.*`).
//! Counters count events; they never carry a token or an identity.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    ExchangesOk,
    ExchangesFailed,
    CacheHit,
    CacheMiss,
    RequestsDenied,
    SubjectFetchOk,
    SubjectFetchFailed,
    TokensInvalidated,
    NewIdentitiesRefused,
    AuthoritiesRefused,
    CallersRefused,
    SubjectsRefused,
    JwksFetchOk,
    JwksFetchFailed,
}

impl Counter {
    pub const ALL: [Counter; 14] = [
        Counter::ExchangesOk,
        Counter::ExchangesFailed,
        Counter::CacheHit,
        Counter::CacheMiss,
        Counter::RequestsDenied,
        Counter::SubjectFetchOk,
        Counter::SubjectFetchFailed,
        Counter::TokensInvalidated,
        Counter::NewIdentitiesRefused,
        Counter::AuthoritiesRefused,
        Counter::CallersRefused,
        Counter::SubjectsRefused,
        Counter::JwksFetchOk,
        Counter::JwksFetchFailed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Counter::ExchangesOk => "openai_wif.exchanges_ok",
            Counter::ExchangesFailed => "openai_wif.exchanges_failed",
            Counter::CacheHit => "openai_wif.cache_hit",
            Counter::CacheMiss => "openai_wif.cache_miss",
            Counter::RequestsDenied => "openai_wif.requests_denied",
            Counter::SubjectFetchOk => "openai_wif.subject_fetch_ok",
            Counter::SubjectFetchFailed => "openai_wif.subject_fetch_failed",
            Counter::TokensInvalidated => "openai_wif.tokens_invalidated",
            Counter::NewIdentitiesRefused => "openai_wif.new_identities_refused",
            Counter::AuthoritiesRefused => "openai_wif.authorities_refused",
            Counter::CallersRefused => "openai_wif.callers_refused",
            Counter::SubjectsRefused => "openai_wif.subjects_refused",
            Counter::JwksFetchOk => "openai_wif.jwks_fetch_ok",
            Counter::JwksFetchFailed => "openai_wif.jwks_fetch_failed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The host's ids for each counter, defined once per VM.
#[derive(Debug, Default)]
pub struct Metrics {
    ids: [Option<u32>; Counter::ALL.len()],
}

impl Metrics {
    /// Defines every counter with `define`; a counter the host refuses is simply not counted.
    pub fn define(mut define: impl FnMut(&str) -> Option<u32>) -> Metrics {
        let mut m = Metrics::default();
        for c in Counter::ALL {
            m.ids[c.index()] = define(c.name());
        }
        m
    }

    pub fn id(&self, counter: Counter) -> Option<u32> {
        self.ids[counter.index()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_is_defined_once_with_a_distinct_name() {
        let mut names = Vec::new();
        let m = Metrics::define(|n| {
            names.push(n.to_string());
            Some(names.len() as u32)
        });
        assert_eq!(names.len(), Counter::ALL.len());
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Counter::ALL.len());
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(m.id(*c), Some(i as u32 + 1));
            assert!(c.name().starts_with("openai_wif."));
        }
    }
}
