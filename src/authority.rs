//! `:authority` parsing, strict enough that the filter never disagrees with Envoy's routing.
//!
//! Envoy routes by virtual host domains such as `api.openai.com:*`, which match whatever follows
//! the first colon. A lenient parser that took "everything after the last `:`" as the port saw
//! `api.openai.com:443:443` as a different host, let the request through untouched, and the
//! client's own key reached OpenAI. So an authority is accepted only in the RFC 3986 form
//! `host [":" port]`: a registered name (letters, digits, `-`, `_`, `.`) or a bracketed IPv6
//! literal, and a port of 1 to 5 digits no larger than 65535. Anything else is refused outright
//! and the request answered locally, never passed on.

/// Longest authority accepted (a DNS name is at most 253 bytes).
pub const MAX_AUTHORITY_BYTES: usize = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    #[error("the request has no host")]
    Empty,
    #[error("the request's host is not of the form host[:port]")]
    Malformed,
    #[error("the request's port is not a number from 0 to 65535")]
    BadPort,
}

/// The host of `authority`, lower-cased, with one trailing dot removed; IPv6 literals keep
/// their brackets. The port, if any, is checked and dropped.
pub fn host(authority: &[u8]) -> Result<String, AuthorityError> {
    if authority.is_empty() {
        return Err(AuthorityError::Empty);
    }
    if authority.len() > MAX_AUTHORITY_BYTES {
        return Err(AuthorityError::Malformed);
    }
    let (host, port) = if authority[0] == b'[' {
        let close = authority
            .iter()
            .position(|&b| b == b']')
            .ok_or(AuthorityError::Malformed)?;
        let literal = &authority[1..close];
        let ipv6 = !literal.is_empty()
            && literal
                .iter()
                .all(|b| b.is_ascii_hexdigit() || *b == b':' || *b == b'.')
            && literal.contains(&b':');
        if !ipv6 {
            return Err(AuthorityError::Malformed);
        }
        let rest = &authority[close + 1..];
        let port = match rest {
            [] => None,
            [b':', port @ ..] => Some(port),
            _ => return Err(AuthorityError::Malformed),
        };
        (&authority[..=close], port)
    } else {
        match authority.iter().position(|&b| b == b':') {
            Some(i) => (&authority[..i], Some(&authority[i + 1..])),
            None => (authority, None),
        }
    };
    if let Some(port) = port {
        let digits = !port.is_empty() && port.len() <= 5 && port.iter().all(u8::is_ascii_digit);
        let value = std::str::from_utf8(port)
            .ok()
            .and_then(|p| p.parse::<u32>().ok());
        if !digits || value.is_none_or(|p| p > 65_535) {
            return Err(AuthorityError::BadPort);
        }
    }
    if host.first() == Some(&b'[') {
        return Ok(String::from_utf8_lossy(host).to_ascii_lowercase());
    }
    let host = host.strip_suffix(b".").unwrap_or(host);
    if !is_registered_name(host) {
        return Err(AuthorityError::Malformed);
    }
    Ok(String::from_utf8_lossy(host).to_ascii_lowercase())
}

/// Letters, digits, `-`, `_` and `.`, with no empty label: what a host name in `hosts` and on a
/// request may be.
pub fn is_registered_name(host: &[u8]) -> bool {
    !host.is_empty()
        && host
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_' || *b == b'.')
        && host.split(|&b| b == b'.').all(|label| !label.is_empty())
}

/// A host name as written in configuration, normalised as [`host`] normalises a request's:
/// lower case, one trailing dot removed. `None` when it is not a bare host name.
pub fn configured_host(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    if bytes.first() == Some(&b'[') {
        return match host(bytes) {
            Ok(h) if h.len() == bytes.len() => Some(h),
            _ => None,
        };
    }
    let name = bytes.strip_suffix(b".").unwrap_or(bytes);
    is_registered_name(name).then(|| String::from_utf8_lossy(name).to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_host_and_port() {
        for (authority, want) in [
            ("api.openai.com", "api.openai.com"),
            ("API.OpenAI.com", "api.openai.com"),
            ("api.openai.com:443", "api.openai.com"),
            ("api.openai.com.", "api.openai.com"),
            ("api.openai.com.:443", "api.openai.com"),
            ("localhost:10000", "localhost"),
            ("127.0.0.1:8080", "127.0.0.1"),
            ("[::1]", "[::1]"),
            ("[::1]:8080", "[::1]"),
            ("[2001:DB8::1]:443", "[2001:db8::1]"),
            ("[::ffff:127.0.0.1]", "[::ffff:127.0.0.1]"),
            ("my_host:0", "my_host"),
            ("a:65535", "a"),
        ] {
            assert_eq!(
                host(authority.as_bytes()),
                Ok(want.to_string()),
                "{authority}"
            );
        }
    }

    #[test]
    fn refuses_what_routing_could_read_differently() {
        use AuthorityError::*;
        for (authority, want) in [
            ("", Empty),
            ("api.openai.com:443:443", BadPort),
            ("api.openai.com::", BadPort),
            ("api.openai.com:]", BadPort),
            ("api.openai.com:1,x:2", BadPort),
            ("API.OPENAI.COM:443:80", BadPort),
            ("localhost:1:1", BadPort),
            ("api.openai.com:", BadPort),
            ("api.openai.com:99999", BadPort),
            ("api.openai.com:000443", BadPort),
            ("api.openai.com:+443", BadPort),
            ("api.openai.com: 443", BadPort),
            ("api.openai.com..", Malformed),
            (".api.openai.com", Malformed),
            ("api..openai.com", Malformed),
            ("a b", Malformed),
            ("api.openai.com/x", Malformed),
            ("user@api.openai.com", Malformed),
            ("api.openai.com\u{0}", Malformed),
            (":443", Malformed),
            ("[::1", Malformed),
            ("[]", Malformed),
            ("[::1]x", Malformed),
            ("[::1]:", BadPort),
            ("[::1]:1:2", BadPort),
            ("[zz::1]", Malformed),
            ("[127.0.0.1]", Malformed),
            ("api.openai.com,evil.example", Malformed),
        ] {
            assert_eq!(host(authority.as_bytes()), Err(want), "{authority:?}");
        }
        assert_eq!(host(b"api.openai.com\xff"), Err(Malformed));
        assert_eq!(host(b"eyJ\xff\xfe:443"), Err(Malformed));
        assert_eq!(
            host("a".repeat(MAX_AUTHORITY_BYTES + 1).as_bytes()),
            Err(Malformed)
        );
    }

    #[test]
    fn configured_hosts_normalise_like_requests() {
        assert_eq!(
            configured_host("API.openai.com."),
            Some("api.openai.com".into())
        );
        assert_eq!(configured_host("[::1]"), Some("[::1]".into()));
        for bad in [
            "",
            ".",
            "api.openai.com:443",
            "https://api.openai.com",
            "a b",
            "[::1]:80",
            "a..b",
            "*",
        ] {
            assert_eq!(configured_host(bad), None, "{bad}");
        }
    }
}
