//! The coordinator without Envoy: simulated workers (one coordinator each) over one shared
//! store and one clock. Each test plays Envoy's part: requests arrive, callouts are answered,
//! ticks and wake-ups happen, time passes.

use std::rc::Rc;
use std::time::Duration;

use super::{Coordinator, Verdict};
use crate::host::fake::{Call, FakeHost, World};
use crate::jwt::tests::make;

const T0: u64 = 1_800_000_000_000;

const HEADER_CONFIG: &str = r#"{"identity_provider_id":"wip_1","service_account_id":"sa_1",
    "token_endpoint":{"cluster":"openai_auth","timeout_ms":1000}}"#;

const KUBERNETES_CONFIG: &str = r#"{"identity_provider_id":"wip_1","service_account_id":"sa_1",
    "token_endpoint":{"cluster":"openai_auth","timeout_ms":1000},
    "subject_token":{"source":"kubernetes","cluster":"wif_token_file","timeout_ms":1000}}"#;

struct Worker {
    c: Coordinator<FakeHost>,
}

impl Worker {
    fn new(world: &Rc<World>, config: &str) -> Worker {
        let c = Coordinator::new(FakeHost::new(world.clone()), 1);
        c.configure(config.as_bytes()).unwrap();
        Worker { c }
    }

    fn host(&self) -> &FakeHost {
        self.c.host()
    }

    /// A request for api.openai.com with the client's own key and, if given, a subject token.
    fn request(&self, id: u32, subject: Option<&str>) -> Verdict {
        let mut headers: Vec<(&str, &[u8])> = vec![
            (":authority", b"api.openai.com"),
            ("authorization", b"Bearer sk-client-key"),
        ];
        if let Some(s) = subject {
            headers.push(("x-openai-subject-token", s.as_bytes()));
        }
        self.host().open(id, &headers);
        self.c.request_headers(id)
    }

    /// The root context's queue fires (requests asked for fetches).
    fn wake(&self) {
        self.c.woken(1);
    }

    fn tick(&self) {
        self.c.tick();
    }

    fn calls_to(&self, cluster: &str) -> Vec<Call> {
        self.host()
            .calls()
            .into_iter()
            .filter(|c| c.cluster == cluster)
            .collect()
    }

    fn exchanges(&self) -> Vec<Call> {
        self.calls_to("openai_auth")
    }

    /// Answers callout `call` with HTTP `status` and `body`.
    fn answer(&self, call: &Call, status: &str, body: &str) {
        self.host().set_answer(Some(status), None, body.as_bytes());
        self.c.http_answer(call.id, body.len());
    }

    fn issue(&self, call: &Call, token: &str, expires_in: u64) {
        self.answer(
            call,
            "200",
            &format!(
                r#"{{"access_token":"{token}","token_type":"Bearer","expires_in":{expires_in}}}"#
            ),
        );
    }

    fn error_code(&self, id: u32) -> Option<String> {
        let reply = self.host().reply(id)?;
        let body: serde_json::Value = serde_json::from_slice(&reply.body).ok()?;
        body["error"]["code"].as_str().map(str::to_string)
    }
}

fn subject(sub: &str, lifetime_s: u64) -> String {
    make(&format!(
        r#"{{"sub":"{sub}","exp":{}}}"#,
        T0 / 1000 + lifetime_s
    ))
}

#[test]
fn a_burst_on_two_workers_makes_exactly_one_exchange_and_everyone_gets_the_token() {
    let world = World::new(T0);
    let (a, b) = (
        Worker::new(&world, HEADER_CONFIG),
        Worker::new(&world, HEADER_CONFIG),
    );
    let token = subject("app", 3600);
    for id in 10..60 {
        assert_eq!(a.request(id, Some(&token)), Verdict::Pause);
        assert_eq!(b.request(id, Some(&token)), Verdict::Pause);
    }
    a.wake();
    b.wake();
    a.tick();
    b.tick();
    let exchanges = [a.exchanges(), b.exchanges()].concat();
    assert_eq!(exchanges.len(), 1, "single flight across workers");
    let (leader, follower) = if a.exchanges().is_empty() {
        (&b, &a)
    } else {
        (&a, &b)
    };
    let body: serde_json::Value = serde_json::from_slice(&exchanges[0].body).unwrap();
    assert_eq!(body["subject_token"], token.as_str());
    leader.issue(&exchanges[0], "at-1", 3600);
    assert_eq!(leader.host().resumed().len(), 50);
    assert!(
        follower.host().resumed().is_empty(),
        "resumed by its own tick"
    );
    world.advance(Duration::from_millis(10));
    follower.tick();
    assert_eq!(follower.host().resumed().len(), 50);
    for w in [&a, &b] {
        for id in 10..60 {
            assert_eq!(w.host().authorization(id).as_deref(), Some("Bearer at-1"));
            assert_eq!(w.host().header(id, "x-openai-subject-token"), None);
        }
        assert_eq!(
            w.c.request_body(10),
            Verdict::Continue,
            "released requests flow"
        );
    }
    // The next request is a hit: no pause, no fetch.
    assert_eq!(b.request(99, Some(&token)), Verdict::Continue);
    assert_eq!(b.host().authorization(99).as_deref(), Some("Bearer at-1"));
    assert_eq!([a.exchanges(), b.exchanges()].concat().len(), 1);
}

#[test]
fn two_identities_are_each_authorised_as_themselves() {
    let world = World::new(T0);
    let w = Worker::new(&world, HEADER_CONFIG);
    let (one, two) = (subject("one", 3600), subject("two", 3600));
    w.request(1, Some(&one));
    w.request(2, Some(&two));
    w.wake();
    let calls = w.exchanges();
    assert_eq!(calls.len(), 2);
    for call in &calls {
        let body: serde_json::Value = serde_json::from_slice(&call.body).unwrap();
        let name = if body["subject_token"] == one.as_str() {
            "at-one"
        } else {
            "at-two"
        };
        w.issue(call, name, 3600);
    }
    assert_eq!(w.host().authorization(1).as_deref(), Some("Bearer at-one"));
    assert_eq!(w.host().authorization(2).as_deref(), Some("Bearer at-two"));
}

#[test]
fn a_leader_that_vanishes_is_taken_over_after_its_lease() {
    let world = World::new(T0);
    let (a, b) = (
        Worker::new(&world, HEADER_CONFIG),
        Worker::new(&world, HEADER_CONFIG),
    );
    let token = subject("app", 3600);
    a.request(1, Some(&token));
    a.wake();
    assert_eq!(a.exchanges().len(), 1);
    // A's callout is lost and A never comes back. B's request waits on A's lease...
    b.request(2, Some(&token));
    b.wake();
    b.tick();
    assert!(b.exchanges().is_empty(), "the lease is still A's");
    // ...until it runs out (a subject fetch's and an exchange's timeout, plus a margin).
    world.advance(Duration::from_millis(2_600));
    b.tick();
    let calls = b.exchanges();
    assert_eq!(calls.len(), 1, "B took the lease over");
    b.issue(&calls[0], "at-b", 3600);
    assert_eq!(b.host().authorization(2).as_deref(), Some("Bearer at-b"));
    assert_eq!(b.host().reply(2), None);
}

#[test]
fn a_vm_that_ends_gives_its_leases_back_at_once() {
    let world = World::new(T0);
    let (a, b) = (
        Worker::new(&world, HEADER_CONFIG),
        Worker::new(&world, HEADER_CONFIG),
    );
    let token = subject("app", 3600);
    a.request(1, Some(&token));
    a.wake();
    a.c.done();
    b.request(2, Some(&token));
    b.wake();
    assert_eq!(b.exchanges().len(), 1, "no wait for the deadline");
}

#[test]
fn a_failed_exchange_answers_the_waiters_and_backs_off() {
    let world = World::new(T0);
    let (a, b) = (
        Worker::new(&world, HEADER_CONFIG),
        Worker::new(&world, HEADER_CONFIG),
    );
    let token = subject("app", 3600);
    a.request(1, Some(&token));
    b.request(2, Some(&token));
    a.wake();
    b.wake();
    let call = a.exchanges().pop().unwrap();
    a.answer(&call, "500", r#"{"error":"server_error"}"#);
    assert_eq!(a.error_code(1).as_deref(), Some("token_exchange_failed"));
    b.tick();
    assert_eq!(b.error_code(2).as_deref(), Some("token_exchange_failed"));
    // Within the backoff: refused at once, with retry-after, and OpenAI is not called again.
    assert_eq!(b.request(3, Some(&token)), Verdict::Pause);
    let reply = b.host().reply(3).unwrap();
    assert_eq!(reply.status, 502);
    assert!(reply.headers.iter().any(|(k, _)| *k == "retry-after"));
    b.wake();
    assert!(b.exchanges().is_empty());
    // After it, the next request exchanges again.
    world.advance(Duration::from_secs(2));
    b.request(4, Some(&token));
    b.wake();
    assert_eq!(b.exchanges().len(), 1);
}

#[test]
fn a_refresh_that_fails_keeps_serving_the_valid_token() {
    let world = World::new(T0);
    let w = Worker::new(&world, HEADER_CONFIG);
    let token = subject("app", 3600);
    w.request(1, Some(&token));
    w.wake();
    w.issue(&w.exchanges()[0], "at-1", 100);
    // In the last fifth of its life: the token is used and one background refresh starts.
    world.advance(Duration::from_secs(85));
    assert_eq!(w.request(2, Some(&token)), Verdict::Continue);
    assert_eq!(w.host().authorization(2).as_deref(), Some("Bearer at-1"));
    w.wake();
    assert_eq!(w.exchanges().len(), 2);
    w.answer(&w.exchanges()[1], "503", "");
    // Still valid: served; backing off: no new refresh.
    assert_eq!(w.request(3, Some(&token)), Verdict::Continue);
    assert_eq!(w.host().authorization(3).as_deref(), Some("Bearer at-1"));
    w.wake();
    assert_eq!(w.exchanges().len(), 2);
    assert_eq!(w.host().counter("requests_denied"), 0);
}

#[test]
fn a_token_is_never_used_at_or_after_its_expiry() {
    let world = World::new(T0);
    let w = Worker::new(&world, HEADER_CONFIG);
    let token = subject("app", 3600);
    w.request(1, Some(&token));
    w.wake();
    w.issue(&w.exchanges()[0], "at-1", 10);
    world.advance(Duration::from_secs(10));
    assert_eq!(
        w.request(2, Some(&token)),
        Verdict::Pause,
        "expired: a miss"
    );
    assert_ne!(w.host().authorization(2).as_deref(), Some("Bearer at-1"));
}

#[test]
fn a_wait_that_outlives_its_budget_is_answered_with_a_timeout() {
    let world = World::new(T0);
    let w = Worker::new(&world, HEADER_CONFIG);
    let token = subject("app", 3600);
    w.request(1, Some(&token));
    w.wake();
    // The callout never comes back; the lease expires and the tick takes it over again and
    // again, until the request's wait budget (twice the lease) is spent.
    for _ in 0..60 {
        world.advance(Duration::from_millis(100));
        w.tick();
    }
    assert_eq!(w.error_code(1).as_deref(), Some("token_wait_timeout"));
}

#[test]
fn a_request_that_ends_while_waiting_is_forgotten() {
    let world = World::new(T0);
    let w = Worker::new(&world, HEADER_CONFIG);
    let token = subject("app", 3600);
    w.request(1, Some(&token));
    w.request(2, Some(&token));
    w.wake();
    w.host().close(1);
    w.c.request_done(1);
    w.issue(&w.exchanges()[0], "at-1", 3600);
    assert_eq!(w.host().resumed(), vec![2]);
    assert!(w.c.requests.borrow().keys().all(|id| *id == 2));
    w.c.request_done(2);
    assert!(w.c.requests.borrow().is_empty() && w.c.waiting.borrow().is_empty());
    assert_eq!(
        w.host().tick_period(),
        Some(super::SLOW_TICK),
        "no waiters, slow tick"
    );
}

#[test]
fn the_gateway_identity_warms_up_on_the_first_tick_and_serves_every_request() {
    let world = World::new(T0);
    let w = Worker::new(&world, KUBERNETES_CONFIG);
    w.tick();
    let fetch = w.calls_to("wif_token_file");
    assert_eq!(fetch.len(), 1, "the subject is fetched at start-up");
    w.answer(
        &fetch[0],
        "200",
        &format!("{}\n", subject("system:serviceaccount:gw:gw", 3600)),
    );
    let exchange = w.exchanges();
    assert_eq!(exchange.len(), 1);
    w.issue(&exchange[0], "at-gw", 3600);
    assert_eq!(w.request(1, None), Verdict::Continue);
    assert_eq!(w.host().authorization(1).as_deref(), Some("Bearer at-gw"));
    // A second worker finds it in shared data: no fetch of its own.
    let other = Worker::new(&world, KUBERNETES_CONFIG);
    other.tick();
    assert!(other.host().calls().is_empty());
    assert_eq!(other.request(2, None), Verdict::Continue);
    assert_eq!(
        other.host().authorization(2).as_deref(),
        Some("Bearer at-gw")
    );
}

#[test]
fn a_401_from_openai_drops_the_token_once_per_interval() {
    let world = World::new(T0);
    let w = Worker::new(&world, HEADER_CONFIG);
    let token = subject("app", 3600);
    w.request(1, Some(&token));
    w.wake();
    w.issue(&w.exchanges()[0], "at-1", 3600);
    let refused = |id: u32| {
        w.host().enter(id);
        w.host().set_response_status(id, "401");
        w.c.response_headers(id);
    };
    assert_eq!(w.request(2, Some(&token)), Verdict::Continue);
    refused(2);
    assert_eq!(w.host().counter("tokens_invalidated"), 1);
    // Dropped: the next request exchanges again...
    assert_eq!(w.request(3, Some(&token)), Verdict::Pause);
    w.wake();
    w.issue(&w.exchanges()[1], "at-2", 3600);
    assert_eq!(w.host().authorization(3).as_deref(), Some("Bearer at-2"));
    // ...and OpenAI's next 401s within the interval go back to the caller as they are.
    refused(3);
    for id in 4..8 {
        assert_eq!(w.request(id, Some(&token)), Verdict::Continue);
        assert_eq!(w.host().authorization(id).as_deref(), Some("Bearer at-2"));
        refused(id);
    }
    assert_eq!(w.exchanges().len(), 2);
    assert_eq!(w.host().counter("tokens_invalidated"), 1);
}

#[test]
fn credentials_never_pass_and_odd_authorities_are_refused() {
    let world = World::new(T0);
    let w = Worker::new(&world, HEADER_CONFIG);
    let token = subject("app", 3600);
    w.host().open(
        1,
        &[
            (":authority", b"api.openai.com:443:443"),
            ("authorization", b"Bearer sk-client-key"),
            ("x-openai-subject-token", token.as_bytes()),
        ],
    );
    assert_eq!(w.c.request_headers(1), Verdict::Pause);
    assert_eq!(w.error_code(1).as_deref(), Some("invalid_authority"));
    // Another host keeps its own credential but never the subject token; trailers too.
    w.host().open(
        2,
        &[
            (":authority", b"other.example"),
            ("authorization", b"Bearer other"),
            ("x-openai-subject-token", token.as_bytes()),
        ],
    );
    assert_eq!(w.c.request_headers(2), Verdict::Continue);
    assert_eq!(w.host().authorization(2).as_deref(), Some("Bearer other"));
    assert_eq!(w.host().header(2, "x-openai-subject-token"), None);
    w.host()
        .set_trailers(2, &[("x-openai-subject-token", token.as_bytes())]);
    assert_eq!(w.c.request_trailers(2), Verdict::Continue);
    assert_eq!(w.host().trailer(2, "x-openai-subject-token"), None);
    // A subject that is not text: a 401, not a trap.
    w.host().open(
        3,
        &[
            (":authority", b"api.openai.com"),
            ("x-openai-subject-token", b"eyJ\xff\xfe"),
        ],
    );
    assert_eq!(w.c.request_headers(3), Verdict::Pause);
    assert_eq!(w.error_code(3).as_deref(), Some("invalid_subject_token"));
    assert!(w.exchanges().is_empty());
}

#[test]
fn new_identities_beyond_the_budget_are_refused_and_known_ones_are_not() {
    let world = World::new(T0);
    let config = HEADER_CONFIG.replace(
        r#""token_endpoint""#,
        r#""limits":{"new_identities_per_s":1,"new_identities_burst":2},"token_endpoint""#,
    );
    let w = Worker::new(&world, &config);
    let known = subject("known", 3600);
    w.request(1, Some(&known));
    w.wake();
    w.issue(&w.exchanges()[0], "at-known", 3600);
    w.request(2, Some(&subject("new-1", 3600)));
    assert_eq!(w.request(3, Some(&subject("new-2", 3600))), Verdict::Pause);
    assert_eq!(w.error_code(3).as_deref(), Some("too_many_new_identities"));
    assert_eq!(w.host().reply(3).unwrap().status, 429);
    assert_eq!(
        w.request(4, Some(&known)),
        Verdict::Continue,
        "a known identity"
    );
    assert_eq!(w.host().counter("new_identities_refused"), 1);
}

const CALLERS: &str = r#""callers":[
    {"name":"inference","principals":["spiffe://cluster.local/ns/ai/sa/inference"],"service_account_id":"sa_inference"},
    {"name":"batch","principals":["spiffe://cluster.local/ns/batch/*"],"service_account_id":"sa_batch"}],"#;

impl Worker {
    /// A request from a caller that presented a certificate with this SPIFFE ID (or none).
    fn request_from(&self, id: u32, caller: Option<&str>, subject: Option<&str>) -> Verdict {
        let mut headers: Vec<(&str, &[u8])> = vec![(":authority", b"api.openai.com")];
        if let Some(s) = subject {
            headers.push(("x-openai-subject-token", s.as_bytes()));
        }
        self.host().open(id, &headers);
        if let Some(c) = caller {
            self.host().set_request_property(
                id,
                "connection.uri_san_peer_certificate",
                c.as_bytes(),
            );
        }
        self.c.request_headers(id)
    }
}

fn with_callers(config: &str) -> String {
    config.replacen('{', &format!("{{{CALLERS}"), 1)
}

fn service_account(call: &Call) -> String {
    let body: serde_json::Value = serde_json::from_slice(&call.body).unwrap();
    body["service_account_id"].as_str().unwrap().to_string()
}

#[test]
fn one_gateway_identity_serves_each_rule_as_its_own_service_account() {
    let world = World::new(T0);
    let config = with_callers(KUBERNETES_CONFIG);
    let (a, b) = (Worker::new(&world, &config), Worker::new(&world, &config));
    a.tick();
    assert!(
        a.host().calls().is_empty(),
        "with rules, nothing is fetched before a caller asks"
    );
    let inference = "spiffe://cluster.local/ns/ai/sa/inference";
    let batch = "spiffe://cluster.local/ns/batch/sa/job";
    for id in 1..20 {
        assert_eq!(a.request_from(id, Some(inference), None), Verdict::Pause);
        assert_eq!(b.request_from(id, Some(batch), None), Verdict::Pause);
        assert_eq!(
            b.request_from(100 + id, Some(inference), None),
            Verdict::Pause
        );
    }
    a.wake();
    b.wake();
    let fetches = [a.calls_to("wif_token_file"), b.calls_to("wif_token_file")].concat();
    assert_eq!(fetches.len(), 1, "one subject fetch for every account");
    let fetcher = if a.calls_to("wif_token_file").is_empty() {
        &b
    } else {
        &a
    };
    fetcher.answer(
        &fetches[0],
        "200",
        &subject("system:serviceaccount:gw:gw", 3600),
    );
    for _ in 0..3 {
        world.advance(Duration::from_millis(10));
        a.tick();
        b.tick();
    }
    let exchanges = [a.exchanges(), b.exchanges()].concat();
    let mut accounts: Vec<String> = exchanges.iter().map(service_account).collect();
    accounts.sort();
    assert_eq!(
        accounts,
        ["sa_batch", "sa_inference"],
        "one exchange per service account"
    );
    for w in [&a, &b] {
        for call in w.exchanges() {
            let token = format!("at-{}", service_account(&call));
            w.issue(&call, &token, 3600);
        }
    }
    world.advance(Duration::from_millis(10));
    a.tick();
    b.tick();
    assert_eq!(
        a.host().authorization(1).as_deref(),
        Some("Bearer at-sa_inference")
    );
    assert_eq!(
        b.host().authorization(1).as_deref(),
        Some("Bearer at-sa_batch")
    );
    assert_eq!(
        b.host().authorization(101).as_deref(),
        Some("Bearer at-sa_inference")
    );
    assert_eq!(b.host().state(1, "rule").as_deref(), Some("batch"));
    assert_eq!(b.host().state(1, "caller").as_deref(), Some(batch));
    assert_eq!(
        b.host().state(1, "service_account_id").as_deref(),
        Some("sa_batch")
    );
    assert_eq!(b.host().state(1, "cache").as_deref(), Some("miss"));
    assert_eq!(b.host().state(2, "cache").as_deref(), Some("wait"));
    // Hits afterwards, each as its own account.
    assert_eq!(a.request_from(50, Some(batch), None), Verdict::Continue);
    assert_eq!(
        a.host().authorization(50).as_deref(),
        Some("Bearer at-sa_batch")
    );
    assert_eq!(a.host().state(50, "cache").as_deref(), Some("hit"));
}

#[test]
fn callers_no_rule_names_are_refused_before_anything_is_fetched() {
    let world = World::new(T0);
    let w = Worker::new(&world, &with_callers(HEADER_CONFIG));
    let token = subject("app", 3600);
    assert_eq!(
        w.request_from(
            1,
            Some("spiffe://cluster.local/ns/other/sa/x"),
            Some(&token)
        ),
        Verdict::Pause
    );
    assert_eq!(w.error_code(1).as_deref(), Some("caller_not_allowed"));
    assert_eq!(w.host().reply(1).unwrap().status, 403);
    assert_eq!(
        w.host().state(1, "caller").as_deref(),
        Some("spiffe://cluster.local/ns/other/sa/x")
    );
    assert_eq!(
        w.host().state(1, "error").as_deref(),
        Some("caller_not_allowed")
    );
    assert_eq!(w.request_from(2, None, Some(&token)), Verdict::Pause);
    let body = String::from_utf8(w.host().reply(2).unwrap().body).unwrap();
    assert!(body.contains("no client certificate"), "{body}");
    w.wake();
    assert!(w.exchanges().is_empty());
    assert_eq!(w.host().counter("callers_refused"), 2);
    // A listed caller with the header source gets its rule's account.
    assert_eq!(
        w.request_from(
            3,
            Some("spiffe://cluster.local/ns/ai/sa/inference"),
            Some(&token)
        ),
        Verdict::Pause
    );
    w.wake();
    assert_eq!(service_account(&w.exchanges()[0]), "sa_inference");
}

#[test]
fn the_caller_comes_from_xfcc_only_when_configured() {
    let world = World::new(T0);
    let config = with_callers(HEADER_CONFIG).replacen(
        '{',
        r#"{"caller_identity":"x-forwarded-client-cert","#,
        1,
    );
    let w = Worker::new(&world, &config);
    let token = subject("app", 3600);
    w.host().open(
        1,
        &[
            (":authority", b"api.openai.com"),
            (
                "x-forwarded-client-cert",
                b"By=spiffe://gw;URI=spiffe://cluster.local/ns/batch/sa/job",
            ),
            ("x-openai-subject-token", token.as_bytes()),
        ],
    );
    assert_eq!(w.c.request_headers(1), Verdict::Pause);
    assert_eq!(w.host().state(1, "rule").as_deref(), Some("batch"));
    // Without the opt-in the header means nothing.
    let plain = Worker::new(&world, &with_callers(HEADER_CONFIG));
    plain.host().open(
        2,
        &[
            (":authority", b"api.openai.com"),
            (
                "x-forwarded-client-cert",
                b"URI=spiffe://cluster.local/ns/batch/sa/job",
            ),
            ("x-openai-subject-token", token.as_bytes()),
        ],
    );
    assert_eq!(plain.c.request_headers(2), Verdict::Pause);
    assert_eq!(plain.error_code(2).as_deref(), Some("caller_not_allowed"));
}

#[test]
fn ids_come_from_the_vm_environment_when_the_configuration_omits_them() {
    let world = World::new(T0);
    let c = Coordinator::new(FakeHost::new(world.clone()), 1);
    let config = r#"{"token_endpoint":{"cluster":"openai_auth"}}"#;
    let e = c.configure(config.as_bytes()).unwrap_err();
    assert!(
        e.contains("identity_provider_id") && e.contains("OPENAI_IDENTITY_PROVIDER_ID"),
        "{e}"
    );
    c.host().set_env("OPENAI_IDENTITY_PROVIDER_ID", "wip_env");
    c.host().set_env("OPENAI_SERVICE_ACCOUNT_ID", "sa_env");
    c.configure(config.as_bytes()).unwrap();
    let w = Worker { c };
    w.request(1, Some(&subject("app", 3600)));
    w.wake();
    let body: serde_json::Value = serde_json::from_slice(&w.exchanges()[0].body).unwrap();
    assert_eq!(
        (
            body["identity_provider_id"].as_str(),
            body["service_account_id"].as_str()
        ),
        (Some("wip_env"), Some("sa_env"))
    );
}

#[test]
fn the_x509_identity_exchanges_without_a_subject_and_fetches_nothing() {
    let world = World::new(T0);
    let config = r#"{"identity_provider_id":"wip_x","service_account_id":"sa_x",
        "subject_token":{"source":"x509"},"token_endpoint":{"cluster":"openai_auth_mtls"}}"#;
    let (a, b) = (Worker::new(&world, config), Worker::new(&world, config));
    a.tick();
    b.tick();
    let calls = [a.host().calls(), b.host().calls()].concat();
    assert_eq!(
        calls.len(),
        1,
        "one exchange, warmed up on the first tick, nothing fetched"
    );
    let call = &calls[0];
    assert_eq!(call.cluster, "openai_auth_mtls");
    assert!(call
        .headers
        .contains(&(":authority", "mtls.auth.openai.com".into())));
    let body: serde_json::Value = serde_json::from_slice(&call.body).unwrap();
    assert!(body.get("subject_token").is_none());
    assert_eq!(
        body["subject_token_type"],
        "urn:openai:params:oauth:token-type:x509"
    );
    let leader = if a.host().calls().is_empty() { &b } else { &a };
    leader.issue(call, "at-x509", 3600);
    assert_eq!(a.request(1, None), Verdict::Continue);
    assert_eq!(a.host().authorization(1).as_deref(), Some("Bearer at-x509"));
    // A refusal of the certificate names the OAuth error.
    let world = World::new(T0);
    let w = Worker::new(&world, config);
    w.tick();
    w.answer(
        &w.host().calls()[0],
        "401",
        r#"{"error":"invalid_subject_token","error_description":"certificate has expired"}"#,
    );
    assert_eq!(w.request(2, None), Verdict::Pause);
    let reply = w.host().reply(2).unwrap();
    assert_eq!(reply.status, 502);
    assert!(String::from_utf8_lossy(&reply.body)
        .contains("invalid_subject_token: certificate has expired"));
}

// The per-VM memos: each only shortcuts what shared data says, and each forgets what changed.

#[test]
fn a_token_another_worker_rewrote_is_served_in_its_new_form() {
    let world = World::new(T0);
    let (a, b) = (
        Worker::new(&world, HEADER_CONFIG),
        Worker::new(&world, HEADER_CONFIG),
    );
    let token = subject("app", 3600);
    a.request(1, Some(&token));
    a.wake();
    a.issue(&a.exchanges()[0], "at-1", 100);
    // b decodes the slot once and remembers it.
    assert_eq!(b.request(2, Some(&token)), Verdict::Continue);
    assert_eq!(b.host().authorization(2).as_deref(), Some("Bearer at-1"));
    // a refreshes: the slot's bytes change under b's memo.
    world.advance(Duration::from_secs(85));
    assert_eq!(a.request(3, Some(&token)), Verdict::Continue);
    a.wake();
    a.issue(&a.exchanges()[1], "at-2", 3600);
    assert_eq!(b.request(4, Some(&token)), Verdict::Continue);
    assert_eq!(b.host().authorization(4).as_deref(), Some("Bearer at-2"));
    // And a 401 on a drops the token for b too.
    a.request(5, Some(&token));
    a.host().enter(5);
    a.host().set_response_status(5, "401");
    a.c.response_headers(5);
    assert_eq!(b.request(6, Some(&token)), Verdict::Pause);
    assert_eq!(b.host().authorization(6), None);
}

#[test]
fn a_slot_taken_by_another_identity_never_serves_the_old_one() {
    let world = World::new(T0);
    let config = HEADER_CONFIG.replace(
        r#""token_endpoint""#,
        r#""limits":{"max_identities":1},"token_endpoint""#,
    );
    let (a, b) = (Worker::new(&world, &config), Worker::new(&world, &config));
    let (one, two) = (subject("one", 3600), subject("two", 3600));
    a.request(1, Some(&one));
    a.wake();
    a.issue(&a.exchanges()[0], "at-one", 3600);
    assert_eq!(b.request(2, Some(&one)), Verdict::Continue);
    assert_eq!(b.host().authorization(2).as_deref(), Some("Bearer at-one"));
    // One slot: the second identity's token replaces the first.
    world.advance(Duration::from_secs(1));
    a.request(3, Some(&two));
    a.wake();
    a.issue(&a.exchanges()[1], "at-two", 3600);
    assert_eq!(b.request(4, Some(&two)), Verdict::Continue);
    assert_eq!(b.host().authorization(4).as_deref(), Some("Bearer at-two"));
    assert_eq!(b.request(5, Some(&one)), Verdict::Pause, "evicted: a miss");
    assert_eq!(b.host().authorization(5), None);
}

#[test]
fn a_remembered_subject_still_expires_and_a_rotated_one_is_a_new_identity() {
    let world = World::new(T0);
    let w = Worker::new(&world, HEADER_CONFIG);
    let token = subject("app", 60);
    w.request(1, Some(&token));
    w.wake();
    w.issue(&w.exchanges()[0], "at-1", 3600);
    assert_eq!(w.request(2, Some(&token)), Verdict::Continue);
    world.advance(Duration::from_secs(60));
    assert_eq!(w.request(3, Some(&token)), Verdict::Pause);
    assert_eq!(w.error_code(3).as_deref(), Some("subject_token_expired"));
    // The workload's rotated token (same sub, new bytes) is its own identity.
    let rotated = subject("app", 3600);
    assert_ne!(rotated, token);
    assert_eq!(w.request(4, Some(&rotated)), Verdict::Pause);
    w.wake();
    assert_eq!(w.exchanges().len(), 2);
    w.issue(&w.exchanges()[1], "at-2", 3600);
    assert_eq!(w.host().authorization(4).as_deref(), Some("Bearer at-2"));
}

#[test]
fn a_refused_subject_is_refused_again_and_a_new_configuration_forgets_every_memo() {
    let world = World::new(T0);
    let w = Worker::new(&world, HEADER_CONFIG);
    for id in 1..4 {
        assert_eq!(w.request(id, Some("not-a-jwt")), Verdict::Pause);
        assert_eq!(w.error_code(id).as_deref(), Some("invalid_subject_token"));
    }
    let token = subject("app", 3600);
    w.request(4, Some(&token));
    w.wake();
    w.issue(&w.exchanges()[0], "at-1", 3600);
    assert_eq!(w.request(5, Some(&token)), Verdict::Continue);
    // Another service account: the same subject is another identity, exchanged again.
    w.c.configure(HEADER_CONFIG.replace("sa_1", "sa_2").as_bytes())
        .unwrap();
    assert_eq!(w.request(6, Some(&token)), Verdict::Pause);
    w.wake();
    let calls = w.exchanges();
    assert_eq!(calls.len(), 2);
    assert_eq!(service_account(&calls[1]), "sa_2");
}

#[test]
fn one_subject_token_sent_under_two_caller_rules_is_two_identities() {
    let world = World::new(T0);
    let w = Worker::new(&world, &with_callers(HEADER_CONFIG));
    let token = subject("shared", 3600);
    let inference = Some("spiffe://cluster.local/ns/ai/sa/inference");
    let batch = Some("spiffe://cluster.local/ns/batch/sa/job");
    assert_eq!(w.request_from(1, inference, Some(&token)), Verdict::Pause);
    w.wake();
    w.issue(&w.exchanges()[0], "at-inference", 3600);
    assert_eq!(
        w.request_from(2, inference, Some(&token)),
        Verdict::Continue
    );
    // The memo knows the token, but not yet for this rule's service account.
    assert_eq!(w.request_from(3, batch, Some(&token)), Verdict::Pause);
    w.wake();
    let calls = w.exchanges();
    assert_eq!(calls.len(), 2);
    assert_eq!(service_account(&calls[1]), "sa_batch");
    w.issue(&calls[1], "at-batch", 3600);
    assert_eq!(
        w.host().authorization(3).as_deref(),
        Some("Bearer at-batch")
    );
    assert_eq!(
        w.request_from(4, inference, Some(&token)),
        Verdict::Continue
    );
    assert_eq!(
        w.host().authorization(4).as_deref(),
        Some("Bearer at-inference")
    );
}

#[test]
fn warm_path_counts_reach_envoy_on_the_next_tick() {
    let world = World::new(T0);
    let w = Worker::new(&world, &with_callers(HEADER_CONFIG));
    let token = subject("app", 3600);
    let inference = Some("spiffe://cluster.local/ns/ai/sa/inference");
    w.request_from(1, inference, Some(&token));
    w.wake();
    w.issue(&w.exchanges()[0], "at-1", 3600);
    w.tick();
    let allowed_before = w.host().counter("rule.inference.allowed");
    for id in 2..5 {
        assert_eq!(
            w.request_from(id, inference, Some(&token)),
            Verdict::Continue
        );
    }
    assert_eq!(
        w.host().counter("cache_hit"),
        0,
        "added up, not yet handed over"
    );
    w.tick();
    assert_eq!(w.host().counter("cache_hit"), 3);
    assert_eq!(
        w.host().counter("rule.inference.allowed"),
        allowed_before + 3
    );
    w.request_from(5, inference, Some(&token));
    w.c.done();
    assert_eq!(
        w.host().counter("cache_hit"),
        4,
        "a VM that ends hands over what it holds"
    );
}

// Subject checks (`expect`): refused before any exchange, with the check named.

mod checked {
    use super::*;
    use crate::checks::tests::{public_jwk, sign, AUD, EC, ISS, RSA_NEW, RSA_OLD};
    use serde_json::{json, Value};

    fn kid(private: &str) -> Value {
        serde_json::from_str::<Value>(private).unwrap()["kid"].clone()
    }

    /// A token signed by `signer`, naming `named`'s kid, with `changes` to the good claims.
    fn token(signer: &str, named: &str, changes: Value) -> String {
        let alg = if signer == EC { "ES256" } else { "RS256" };
        let now_s = T0 / 1000;
        let mut claims = json!({"iss": ISS, "aud": AUD, "sub": "system:serviceaccount:ai:app",
            "iat": now_s - 10, "exp": now_s + 3600});
        for (k, v) in changes.as_object().unwrap() {
            claims[k] = v.clone();
        }
        sign(
            signer,
            &json!({"alg": alg, "kid": kid(named), "typ": "JWT"}),
            &claims,
        )
    }

    fn config(keys: &str) -> String {
        HEADER_CONFIG.replacen(
            '{',
            &format!(
                r#"{{"expect":{{"issuer":"{ISS}","audiences":["{AUD}"],
                "claims":{{"sub":"system:serviceaccount:ai:*"}},{keys}}},"#
            ),
            1,
        )
    }

    fn inline() -> String {
        config(&format!(r#""jwks":{{"keys":[{}]}}"#, public_jwk(RSA_OLD)))
    }

    fn message(w: &Worker, id: u32) -> String {
        let body: Value = serde_json::from_slice(&w.host().reply(id).unwrap().body).unwrap();
        body["error"]["message"].as_str().unwrap().to_string()
    }

    #[test]
    fn a_forged_or_mismatched_subject_is_refused_with_its_check_and_never_exchanged() {
        let world = World::new(T0);
        let w = Worker::new(&world, &inline());
        let cases = [
            (token(RSA_NEW, RSA_OLD, json!({})), "signature"),
            (token(RSA_NEW, RSA_NEW, json!({})), "known_key"),
            (
                token(
                    RSA_OLD,
                    RSA_OLD,
                    json!({"iss": "https://kubernetes.default.svc"}),
                ),
                "issuer",
            ),
            (token(RSA_OLD, RSA_OLD, json!({"aud": "other"})), "audience"),
            (
                token(
                    RSA_OLD,
                    RSA_OLD,
                    json!({"sub": "system:serviceaccount:batch:job"}),
                ),
                "claim",
            ),
        ];
        let mut id = 1;
        for (bad, check) in &cases {
            for _ in 0..3 {
                assert_eq!(w.request(id, Some(bad)), Verdict::Pause);
                assert_eq!(w.error_code(id).as_deref(), Some("invalid_subject_token"));
                let m = message(&w, id);
                assert!(m.contains(&format!("the {check} check")), "{check}: {m}");
                assert!(!m.contains(bad.as_str()) && !m.contains("eyJ"), "{m}");
                id += 1;
            }
        }
        let issuer = message(&w, 7);
        assert!(
            issuer.contains("https://kubernetes.default.svc") && issuer.contains(ISS),
            "observed and expected: {issuer}"
        );
        w.wake();
        assert!(
            w.exchanges().is_empty(),
            "no refused subject reaches OpenAI"
        );
        assert_eq!(
            w.host().counter("subjects_refused"),
            cases.len() as u64,
            "repeats are answered from the memo"
        );
        let good = token(RSA_OLD, RSA_OLD, json!({}));
        assert_eq!(w.request(100, Some(&good)), Verdict::Pause);
        w.wake();
        assert_eq!(w.exchanges().len(), 1);
    }

    #[test]
    fn with_expect_every_refusal_names_its_check_even_for_the_shape() {
        let world = World::new(T0);
        let w = Worker::new(&world, &inline());
        let expired = token(
            RSA_OLD,
            RSA_OLD,
            json!({"iat": T0 / 1000 - 100, "exp": T0 / 1000 - 1}),
        );
        let cases = [
            ("not-a-jwt", "invalid_subject_token", "well_formed"),
            ("e30.e30.c2ln", "invalid_subject_token", "algorithm"),
            (expired.as_str(), "subject_token_expired", "expiry"),
        ];
        for (id, (bad, code, check)) in (1..).zip(cases) {
            assert_eq!(w.request(id, Some(bad)), Verdict::Pause);
            assert_eq!(w.error_code(id).as_deref(), Some(code));
            let m = message(&w, id);
            assert!(m.contains(&format!("the {check} check")), "{check}: {m}");
        }
        assert_eq!(w.request(9, Some("")), Verdict::Pause);
        assert_eq!(w.error_code(9).as_deref(), Some("missing_subject_token"));
    }

    #[test]
    fn the_issuers_keys_are_fetched_once_for_every_worker_and_again_for_a_new_kid() {
        let world = World::new(T0);
        let keys = r#""jwks_source":{"cluster":"issuer_keys","authority":"issuer.example","path":"/openid/v1/jwks"}"#;
        let (a, b) = (
            Worker::new(&world, &config(keys)),
            Worker::new(&world, &config(keys)),
        );
        let good = token(RSA_OLD, RSA_OLD, json!({}));
        // Before the keys are there: 503 with Retry-After, nothing remembered.
        assert_eq!(a.request(1, Some(&good)), Verdict::Pause);
        assert_eq!(a.error_code(1).as_deref(), Some("subject_keys_unavailable"));
        let reply = a.host().reply(1).unwrap();
        assert!(reply
            .headers
            .iter()
            .any(|(k, v)| *k == "retry-after" && v == "1"));
        a.tick();
        b.tick();
        let fetches = [a.calls_to("issuer_keys"), b.calls_to("issuer_keys")].concat();
        assert_eq!(fetches.len(), 1, "one fetch for every worker");
        let fetcher = if a.calls_to("issuer_keys").is_empty() {
            &b
        } else {
            &a
        };
        let jwks = |keys: &[&str]| {
            json!({"keys": keys.iter().map(|k| public_jwk(k)).collect::<Vec<_>>()}).to_string()
        };
        fetcher.answer(&fetches[0], "200", &jwks(&[RSA_OLD]));
        assert_eq!(fetcher.host().counter("jwks_fetch_ok"), 1);
        // The other worker read "no keys" a moment ago; its next tick looks again, not fetches.
        world.advance(Duration::from_millis(250));
        a.tick();
        b.tick();
        let all = [a.calls_to("issuer_keys"), b.calls_to("issuer_keys")].concat();
        assert_eq!(all.len(), 1, "no second fetch at start-up");
        // The other worker reads the stored set within a second.
        world.advance(Duration::from_secs(1));
        assert_eq!(a.request(2, Some(&good)), Verdict::Pause);
        assert_eq!(b.request(3, Some(&good)), Verdict::Pause);
        assert_eq!(a.host().reply(2), None, "waits for its exchange");
        assert_eq!(b.host().reply(3), None);
        // A token from the issuer's new key, right after the fetch: refused by its kid.
        let rotated = token(RSA_NEW, RSA_NEW, json!({}));
        assert_eq!(a.request(4, Some(&rotated)), Verdict::Pause);
        assert_eq!(a.error_code(4).as_deref(), Some("invalid_subject_token"));
        assert!(message(&a, 4).contains("known_key"), "{}", message(&a, 4));
        // Once the keys may be fetched again, the new kid makes them be.
        world.advance(Duration::from_secs(6));
        assert_eq!(a.request(5, Some(&rotated)), Verdict::Pause);
        assert_eq!(a.error_code(5).as_deref(), Some("subject_keys_unavailable"));
        a.wake();
        let again = a.calls_to("issuer_keys");
        assert_eq!(again.len(), 2, "fetched again for the unknown kid");
        a.answer(&again[1], "200", &jwks(&[RSA_OLD, RSA_NEW]));
        assert_eq!(a.request(6, Some(&rotated)), Verdict::Pause);
        assert_eq!(a.host().reply(6), None, "accepted: waits for its exchange");
        assert_eq!(b.request(7, Some(&rotated)), Verdict::Pause);
        assert_eq!(
            b.host().reply(7),
            None,
            "the other worker sees the new keys"
        );
    }

    #[test]
    fn a_gateway_subject_that_fails_a_check_is_a_503_naming_it() {
        let world = World::new(T0);
        let config = KUBERNETES_CONFIG.replacen(
            '{',
            r#"{"expect":{"issuer":"https://kubernetes.default.svc"},"#,
            1,
        );
        let w = Worker::new(&world, &config);
        w.tick();
        let fetch = w.calls_to("wif_token_file");
        w.answer(&fetch[0], "200", &token(RSA_OLD, RSA_OLD, json!({})));
        assert!(w.exchanges().is_empty());
        assert_eq!(w.request(1, None), Verdict::Pause);
        assert_eq!(
            w.error_code(1).as_deref(),
            Some("subject_source_unavailable")
        );
        let m = message(&w, 1);
        assert!(m.contains("issuer check") && m.contains(ISS), "{m}");
    }

    #[test]
    fn the_endpoints_generic_refusal_is_explained_with_what_the_filter_saw() {
        let world = World::new(T0);
        let w = Worker::new(&world, &inline());
        let good = token(RSA_OLD, RSA_OLD, json!({}));
        w.request(1, Some(&good));
        w.wake();
        w.answer(&w.exchanges()[0], "500", r#"{"error":"server_error"}"#);
        assert_eq!(w.error_code(1).as_deref(), Some("token_exchange_failed"));
        let m = message(&w, 1);
        for part in [
            ISS,
            "system:serviceaccount:ai:app",
            "wip_1",
            "sa_1",
            "local checks passed",
        ] {
            assert!(m.contains(part), "{part} in {m}");
        }
        assert!(!m.contains(good.as_str()));
    }
}
