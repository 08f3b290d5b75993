//! openai-wif-check: the filter's subject checks, run on the host on one token.
//!
//! What an operator runs on a pod's token before opening a ticket: the very checks the filter
//! makes before an exchange, each with pass, FAIL and why, or skip and why, then what the
//! filter would report about the token if the token endpoint refused it. The token itself is
//! never printed.
//!
//! Exit status: 0 when every check that ran passed, 1 when one failed, 2 for a usage,
//! configuration or file error.

use std::io::{Read, Write};

use openai_wif::checks::{self, Facts, Jwks, Keys, Outcome};
use openai_wif::config::Config;

const USAGE: &str = "usage: openai-wif-check --config FILE --token-file FILE|- [--jwks-file FILE] [--now UNIX_SECONDS]

  --config      the filter's JSON configuration (Envoy's configuration, Istio's pluginConfig);
                ids it omits come from the environment, as in the filter
  --token-file  the subject token, or - for standard input (e.g. kubectl exec POD -- cat TOKEN)
  --jwks-file   the issuer's JWKS, used instead of the configured keys
                (e.g. kubectl get --raw /openid/v1/jwks)
  --now         the time to check at, in seconds since the epoch (default: now)";

#[derive(Debug, PartialEq, Eq)]
struct Args {
    config: String,
    token_file: String,
    jwks_file: Option<String>,
    now_s: Option<u64>,
}

/// `Ok(None)` for `--help`.
fn parse_args(args: &[String]) -> Result<Option<Args>, String> {
    let (mut config, mut token_file, mut jwks_file, mut now_s) = (None, None, None, None);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            return Ok(None);
        }
        let slot = match flag.as_str() {
            "--config" => &mut config,
            "--token-file" => &mut token_file,
            "--jwks-file" => &mut jwks_file,
            "--now" => &mut now_s,
            other => return Err(format!("unknown argument {other:?}")),
        };
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        if slot.replace(value.clone()).is_some() {
            return Err(format!("{flag} is given twice"));
        }
    }
    let now_s = now_s
        .map(|n| {
            n.parse::<u64>()
                .map_err(|_| format!("--now must be seconds since the epoch, not {n:?}"))
        })
        .transpose()?;
    Ok(Some(Args {
        config: config.ok_or("--config is required")?,
        token_file: token_file.ok_or("--token-file is required")?,
        jwks_file,
        now_s,
    }))
}

/// Reads a file, or standard input for `-`.
type ReadFile<'a> = &'a dyn Fn(&str) -> std::io::Result<Vec<u8>>;

/// The checker: prints to `out` and returns the exit status.
fn run(
    args: &[String],
    read: ReadFile<'_>,
    env: &dyn Fn(&str) -> Option<String>,
    clock_s: u64,
    out: &mut dyn Write,
) -> std::io::Result<i32> {
    let args = match parse_args(args) {
        Ok(Some(a)) => a,
        Ok(None) => {
            writeln!(out, "{USAGE}")?;
            return Ok(0);
        }
        Err(e) => {
            writeln!(out, "openai-wif-check: {e}\n{USAGE}")?;
            return Ok(2);
        }
    };
    let load = |path: &str, what: &str| {
        read(path).map_err(|e| format!("cannot read the {what} {path:?}: {e}"))
    };
    let prepared = load(&args.config, "configuration")
        .and_then(|bytes| Config::parse_with_env(&bytes, env).map_err(|e| e.to_string()))
        .and_then(|config| {
            if config.subject.is_certificate() {
                return Err("the x509 source has no subject token to check".to_string());
            }
            let jwks = match &args.jwks_file {
                None => None,
                Some(path) => Some(
                    load(path, "JWKS")
                        .and_then(|b| Jwks::parse(&b).map_err(|e| format!("{path}: {e}")))?,
                ),
            };
            let token = load(&args.token_file, "token").and_then(|b| {
                String::from_utf8(b).map_err(|_| "the token file is not text".to_string())
            })?;
            Ok((config, jwks, token))
        });
    let (config, jwks, token) = match prepared {
        Ok(p) => p,
        Err(e) => {
            writeln!(out, "openai-wif-check: {e}")?;
            return Ok(2);
        }
    };
    let now_s = args.now_s.unwrap_or(clock_s);
    let expect = config.expect.clone().unwrap_or_default();
    if config.expect.is_none() {
        writeln!(
            out,
            "note: the configuration has no expect: only what OpenAI requires of every token is checked"
        )?;
    }
    let keys = match (&jwks, &expect.keys) {
        (Some(j), _) => Some(("--jwks-file", j)),
        (None, Keys::Inline(j)) => Some(("expect.jwks", j)),
        _ => None,
    };
    if let Some((from, j)) = keys {
        writeln!(
            out,
            "keys: {from}, kids {}",
            checks::diagnose::list(&j.kids())
        )?;
        for s in j.skipped() {
            let kid = s.kid.as_deref().map(checks::diagnose::quote);
            writeln!(
                out,
                "  keys[{}]{} not used: {}",
                s.index,
                kid.map(|k| format!(" kid {k}")).unwrap_or_default(),
                s.reason
            )?;
        }
    }
    let report = checks::report(&token, &expect, jwks.as_ref(), now_s);
    let mut failed = false;
    for (check, outcome) in &report {
        let line = match outcome {
            Outcome::Pass => "pass".to_string(),
            Outcome::Fail(m) => {
                failed = true;
                format!("FAIL {m}")
            }
            Outcome::Skip(why) => format!("skip {why}"),
        };
        writeln!(out, "{:<16} {line}", check.name())?;
    }
    match Facts::read(&token) {
        Some(facts) => writeln!(
            out,
            "{}; provider {}, service account {}",
            facts.summary(now_s),
            config.account.identity_provider_id,
            display_id(&config.account.service_account_id)
        )?,
        None => writeln!(out, "subject token unreadable")?,
    }
    Ok(if failed { 1 } else { 0 })
}

/// The top-level service account may be empty when caller rules choose it.
fn display_id(id: &str) -> &str {
    if id.is_empty() {
        "(from the caller rules)"
    } else {
        id
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let read = |path: &str| -> std::io::Result<Vec<u8>> {
        if path == "-" {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf)?;
            Ok(buf)
        } else {
            std::fs::read(path)
        }
    };
    let clock_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let code = run(
        &args,
        &read,
        &|var| std::env::var(var).ok(),
        clock_s,
        &mut std::io::stdout().lock(),
    )
    .unwrap_or(2);
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use std::collections::HashMap;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn arguments() {
        assert_eq!(
            parse_args(&args(
                "--config c.json --token-file - --jwks-file j --now 5"
            )),
            Ok(Some(Args {
                config: "c.json".into(),
                token_file: "-".into(),
                jwks_file: Some("j".into()),
                now_s: Some(5),
            }))
        );
        assert_eq!(parse_args(&args("--token-file t --help")), Ok(None));
        for (bad, why) in [
            ("", "--config is required"),
            ("--config c", "--token-file is required"),
            ("--config c --token-file", "--token-file needs a value"),
            ("--config c --config d --token-file t", "twice"),
            ("--config c --token-file t --now yesterday", "--now"),
            ("--config c --token-file t --verbose", "unknown argument"),
        ] {
            let e = parse_args(&args(bad)).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    const NOW: u64 = 1_716_235_500;

    fn token(claims: &str, sig: &[u8]) -> String {
        let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","kid":"k1","typ":"JWT"}"#);
        format!(
            "{h}.{}.{}",
            URL_SAFE_NO_PAD.encode(claims),
            URL_SAFE_NO_PAD.encode(sig)
        )
    }

    fn claims(iss: &str) -> String {
        format!(
            r#"{{"iss":"{iss}","aud":"https://api.openai.com/v1","sub":"system:serviceaccount:ns:sa","iat":{},"exp":{}}}"#,
            NOW - 10,
            NOW + 100
        )
    }

    const CONFIG: &str = r#"{"identity_provider_id":"idp_1","token_endpoint":{"cluster":"a"},
        "expect":{"issuer":"https://issuer.example","audiences":["https://api.openai.com/v1"]}}"#;

    fn check(files: &[(&str, &str)], argv: &str) -> (i32, String) {
        let files: HashMap<String, Vec<u8>> = files
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect();
        let read = |p: &str| {
            files
                .get(p)
                .cloned()
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
        };
        let env = |var: &str| (var == "OPENAI_SERVICE_ACCOUNT_ID").then(|| "sa_env".to_string());
        let mut out = Vec::new();
        let code = run(&args(argv), &read, &env, NOW, &mut out).unwrap();
        (code, String::from_utf8(out).unwrap())
    }

    #[test]
    fn prints_every_check_and_the_facts_and_never_the_token() {
        let t = token(&claims("https://issuer.example"), b"signature-bytes");
        let (code, out) = check(
            &[("f.json", CONFIG), ("tok", &t)],
            "--config f.json --token-file tok",
        );
        assert_eq!(code, 0, "{out}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "well_formed      pass");
        assert!(out.contains("signature        skip no JWKS configured"));
        assert!(out.contains("issuer           pass"));
        assert!(out.contains("claim            skip expect.claims is not configured"));
        assert!(lines
            .last()
            .unwrap()
            .starts_with("subject iss \"https://issuer.example\""));
        assert!(out.ends_with("exp in 100 s; provider idp_1, service account sa_env\n"));
        assert_eq!(lines.len(), 13);
        assert!(!out.contains(&t[..20]) && !out.contains(t.rsplit('.').next().unwrap()));
    }

    #[test]
    fn a_failing_check_exits_1() {
        let t = token(&claims("https://kubernetes.default.svc"), b"sig");
        let (code, out) = check(
            &[("f.json", CONFIG), ("tok", &t)],
            "--config f.json --token-file tok",
        );
        assert_eq!(code, 1);
        assert!(out.contains("issuer           FAIL subject token iss is \"https://kubernetes.default.svc\", the provider expects \"https://issuer.example\""), "{out}");
        // A JWKS on the command line checks the signature the configuration leaves unchecked.
        let t = token(&claims("https://issuer.example"), b"sig");
        let jwks = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","x":"0t3LUEjLs7ix2TG8GjhnEFU1wdTl-Uif9hw2Qjz1Oh4","y":"66swB1QUdwpLUjJtCNYL3dGnoR9HU7HKJvUA6Zgt-JY"},{"kty":"oct","kid":"h","k":"AA"}]}"#;
        let (code, out) = check(
            &[("f.json", CONFIG), ("tok", &t), ("j.json", jwks)],
            "--config f.json --token-file tok --jwks-file j.json",
        );
        assert_eq!(code, 1, "{out}");
        assert!(out.contains("keys: --jwks-file, kids [\"k1\"]"), "{out}");
        assert!(
            out.contains("keys[1] kid \"h\" not used: a symmetric key"),
            "{out}"
        );
        assert!(
            out.contains("known_key        FAIL kid \"k1\" names a P-256 key"),
            "{out}"
        );
    }

    #[test]
    fn usage_configuration_and_file_errors_exit_2() {
        let t = token(&claims("https://issuer.example"), b"sig");
        let cases = [
            ("--config f.json", "--token-file is required"),
            (
                "--config missing.json --token-file tok",
                "cannot read the configuration",
            ),
            ("--config bad.json --token-file tok", "token_endpoint"),
            ("--config x509.json --token-file tok", "x509"),
            ("--config f.json --token-file none", "cannot read the token"),
            (
                "--config f.json --token-file tok --jwks-file bad.jwks",
                "not a JSON object with a \"keys\" array",
            ),
        ];
        let x509 = r#"{"identity_provider_id":"w","service_account_id":"s","subject_token":{"source":"x509"},"token_endpoint":{"cluster":"a"}}"#;
        for (argv, why) in cases {
            let (code, out) = check(
                &[
                    ("f.json", CONFIG),
                    ("bad.json", "{}"),
                    ("x509.json", x509),
                    ("tok", &t),
                    ("bad.jwks", "[]"),
                ],
                argv,
            );
            assert_eq!(code, 2, "{argv}: {out}");
            assert!(out.contains(why), "{argv}: {out}");
        }
        assert_eq!(check(&[], "--help").0, 0);
    }

    #[test]
    fn a_configuration_without_expect_still_checks_what_openai_requires() {
        let config = r#"{"identity_provider_id":"i","service_account_id":"s","token_endpoint":{"cluster":"a"}}"#;
        let t = token(&claims("https://anything"), b"sig");
        let (code, out) = check(
            &[("f.json", config), ("tok", &t)],
            "--config f.json --token-file tok --now 99999999999",
        );
        assert_eq!(code, 1);
        assert!(out.starts_with("note: the configuration has no expect"));
        assert!(out.contains("expiry           FAIL subject token expired"));
    }
}
