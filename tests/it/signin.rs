//! SSO sign-in through the Claude Code gateway protocol, against the fake OIDC IdP: the device
//! flow driven as Claude Code drives it (metadata → device authorization → the verification
//! page and the IdP round trip in a scripted browser → token polling → refresh → revoke), the
//! id_token checks, deprovisioning at refresh, sessions across a restart and from the CLI,
//! the gateway's own endpoints (managed settings, usage, telemetry), auto-provisioning, and
//! the real Claude Code on a signed-in bearer.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::billing::BillingFake;
use common::control::{self, FakeControl};
use common::idp::{FakeIdp, Identity, Tamper};
use common::*;
use http::Method;
use serde_json::{Value, json};

const CLIENT_ID: &str = "bedrock-gate";
/// With characters client_secret_basic must encode.
const SECRET: &str = "s3cret:&+/x";
const ALICE_EMAIL: &str = "alice@corp.example";
const USER_AGENT: &str = "claude-code/2.1.332";

struct Gate {
    proxy: Proxy,
    idp: FakeIdp,
    fake: FakeBedrock,
}

fn alice() -> Identity {
    Identity::new("sub-alice", "Alice@Corp.Example", &["dev"])
}

fn config(port: u16, fake: &str, idp: &FakeIdp, oidc_extra: &str, extra: &str) -> String {
    format!(
        r#"public_url = "http://127.0.0.1:{port}"
[aws]
region = "us-east-1"
runtime_endpoint = "{fake}"
control_endpoint = "{fake}"
[oidc]
issuer = "{issuer}"
client_id = "{CLIENT_ID}"
groups_claim = "groups"
sign_ins_per_ip_per_minute = 1000
timeout_secs = 2
{oidc_extra}
[users.alice]
keys = ["{ka}"]
emails = ["{ALICE_EMAIL}"]
[users.alice.models]
"{SONNET}" = "{a_sonnet}"
[users.bob]
keys = ["{kb}"]
subjects = ["sub-bob"]
[users.bob.models]
"{SONNET}" = "{b_sonnet}"
{extra}
"#,
        issuer = idp.issuer(),
        ka = hash(ALICE_KEY),
        kb = hash(BOB_KEY),
        a_sonnet = alice_sonnet(),
        b_sonnet = bob_sonnet(),
    )
}

async fn start_proxy(config: &str, port: u16) -> Proxy {
    let listen = format!("127.0.0.1:{port}");
    Proxy::start_with_env(
        config,
        &["--listen", &listen],
        &[("BEDROCK_GATE_OIDC_CLIENT_SECRET", SECRET)],
    )
    .await
}

async fn start(oidc_extra: &str, extra: &str) -> Gate {
    let fake = FakeBedrock::start().await;
    let idp = FakeIdp::start(CLIENT_ID, SECRET).await;
    idp.sign_in_as(alice());
    let port = free_port();
    let proxy = start_proxy(&config(port, &fake.url(), &idp, oidc_extra, extra), port).await;
    Gate { proxy, idp, fake }
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

/// A form POST as Claude Code sends its OAuth requests.
async fn form_post(url: &str, pairs: &[(&str, &str)]) -> Reply {
    send(request(
        Method::POST,
        url,
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("user-agent", USER_AGENT),
        ],
        form(pairs),
    ))
    .await
}

async fn get(url: &str, headers: &[(&str, &str)]) -> Reply {
    send(request(Method::GET, url, headers, "")).await
}

fn text(r: &Reply) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

fn location(r: &Reply) -> String {
    r.headers["location"].to_str().unwrap().to_string()
}

/// The endpoints as Claude Code reads them from the metadata.
struct Endpoints {
    device: String,
    token: String,
    revoke: String,
}

async fn discover(proxy: &Proxy) -> Endpoints {
    let m = get(
        &format!("{}/.well-known/oauth-authorization-server", proxy.url()),
        &[("user-agent", USER_AGENT)],
    )
    .await;
    assert_eq!(m.status, 200, "{}", text(&m));
    let m = m.json();
    assert_eq!(m["issuer"], proxy.url());
    assert!(
        m["grant_types_supported"]
            .as_array()
            .unwrap()
            .contains(&json!("urn:ietf:params:oauth:grant-type:device_code"))
    );
    assert!(m.get("authorization_endpoint").is_none());
    let e = |k: &str| {
        let url = m[k].as_str().unwrap().to_string();
        assert!(
            url.starts_with(&proxy.url()),
            "{k} must be on the same origin: {url}"
        );
        url
    };
    Endpoints {
        device: e("device_authorization_endpoint"),
        token: e("token_endpoint"),
        revoke: e("revocation_endpoint"),
    }
}

struct Device {
    device_code: String,
    user_code: String,
    complete: String,
}

async fn device_start(ep: &Endpoints) -> Device {
    let r = form_post(&ep.device, &[("surface", "claude_code")]).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let v = r.json();
    let device_code = v["device_code"].as_str().unwrap().to_string();
    assert!(device_code.len() >= 43, "≥ 256 bits: {device_code}");
    let user_code = v["user_code"].as_str().unwrap().to_string();
    assert!(
        user_code
            .bytes()
            .all(|b| b == b'-' || b"BCDFGHJKLMNPQRSTVWXZ".contains(&b)),
        "base-20: {user_code}"
    );
    assert!(v["expires_in"].as_u64().unwrap() >= 300);
    assert_eq!(v["interval"], 5);
    let complete = v["verification_uri_complete"].as_str().unwrap().to_string();
    assert!(complete.starts_with(v["verification_uri"].as_str().unwrap()));
    Device {
        device_code,
        user_code,
        complete,
    }
}

async fn poll(ep: &Endpoints, device_code: &str) -> Reply {
    form_post(
        &ep.token,
        &[
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", device_code),
        ],
    )
    .await
}

fn oauth_error(r: &Reply) -> String {
    r.json()["error"].as_str().unwrap_or_default().to_string()
}

/// What a person does in the browser: open the link, check the code, continue, sign in at the
/// IdP (scripted), come back. Returns the last page.
async fn browser(proxy: &Proxy, dev: &Device) -> Reply {
    let page = get(&dev.complete, &[]).await;
    assert_eq!(page.status, 200, "{}", text(&page));
    let html = text(&page);
    assert!(
        html.contains(&format!("value=\"{}\"", dev.user_code)),
        "{html}"
    );
    assert!(
        !html.contains("<script"),
        "the page never submits the code by itself"
    );
    let origin = proxy.url();
    let to_idp = send(request(
        Method::POST,
        &format!("{}/device", proxy.url()),
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("origin", &origin),
        ],
        form(&[("user_code", &dev.user_code.to_lowercase())]),
    ))
    .await;
    assert_eq!(to_idp.status, 303, "{}", text(&to_idp));
    let cookie = to_idp.headers["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let at_idp = get(&location(&to_idp), &[]).await;
    assert_eq!(at_idp.status, 302, "{}", text(&at_idp));
    let back = location(&at_idp);
    assert!(
        back.starts_with(&format!("{}/oauth/callback?", proxy.url())),
        "{back}"
    );
    get(&back, &[("cookie", &cookie)]).await
}

/// The whole sign-in; returns the token answer.
async fn sign_in(proxy: &Proxy) -> Value {
    let ep = discover(proxy).await;
    let dev = device_start(&ep).await;
    let page = browser(proxy, &dev).await;
    assert_eq!(page.status, 200, "{}\n{}", text(&page), proxy.logs());
    let tokens = poll(&ep, &dev.device_code).await;
    assert_eq!(tokens.status, 200, "{}", text(&tokens));
    tokens.json()
}

fn bearer(tokens: &Value) -> String {
    tokens["access_token"].as_str().unwrap().to_string()
}

async fn messages_as(proxy: &Proxy, bearer: &str) -> Reply {
    let auth = format!("Bearer {bearer}");
    send(request(
        Method::POST,
        &format!("{}/v1/messages?beta=true", proxy.url()),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
            ("anthropic-version", "2023-06-01"),
            ("x-app", "cli"),
        ],
        messages_body("claude-sonnet-4-5", false),
    ))
    .await
}

async fn refresh(ep: &Endpoints, refresh_token: &str) -> Reply {
    form_post(
        &ep.token,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
        ],
    )
    .await
}

fn assert_signed_out(r: &Reply) {
    assert_eq!(r.status, 401, "{}", text(r));
    assert_eq!(r.headers["x-should-retry"], "false");
    let (kind, message) = r.anthropic_error();
    assert_eq!(kind, "authentication_error");
    assert!(message.contains("/login"), "{message}");
}

#[tokio::test]
async fn the_device_flow_as_claude_code_drives_it_then_refresh_and_revoke() {
    let g = start("", "").await;
    let ep = discover(&g.proxy).await;
    let dev = device_start(&ep).await;

    let pending = poll(&ep, &dev.device_code).await;
    assert_eq!(pending.status, 400);
    assert_eq!(oauth_error(&pending), "authorization_pending");
    let fast = poll(&ep, &dev.device_code).await;
    assert_eq!(
        oauth_error(&fast),
        "slow_down",
        "polled again at once, not after the interval"
    );

    let page = browser(&g.proxy, &dev).await;
    assert_eq!(page.status, 200, "{}", text(&page));
    assert!(
        text(&page).contains(ALICE_EMAIL),
        "the page names the signed-in email"
    );
    // The IdP saw a real code flow: PKCE S256, a nonce, our redirect URI, the client secret.
    let authz = g.idp.authorize_requests();
    assert_eq!(authz.len(), 1);
    assert_eq!(authz[0]["code_challenge_method"], "S256");
    assert!(authz[0]["nonce"].len() >= 32 && authz[0]["state"].len() >= 32);
    assert_eq!(
        authz[0]["redirect_uri"],
        format!("{}/oauth/callback", g.proxy.url())
    );
    let token_calls = g.idp.token_requests();
    assert!(
        token_calls[0]
            .get("code_verifier")
            .is_some_and(|v| v.len() >= 43)
    );

    let tokens = poll(&ep, &dev.device_code).await;
    assert_eq!(tokens.status, 200, "{}", text(&tokens));
    assert_eq!(tokens.headers["cache-control"], "no-store");
    let tokens = tokens.json();
    assert_eq!(tokens["token_type"], "Bearer");
    assert_eq!(tokens["email"], ALICE_EMAIL);
    assert!(tokens["expires_in"].as_u64().unwrap() > 0);
    let first = bearer(&tokens);
    assert!(first.starts_with("bgs_"));
    let refresh_token = tokens["refresh_token"].as_str().unwrap().to_string();

    let replay = poll(&ep, &dev.device_code).await;
    assert_eq!(
        oauth_error(&replay),
        "invalid_grant",
        "device codes are single use"
    );

    // The signed-in bearer calls on alice's own profile, like her API key would.
    let r = messages_as(&g.proxy, &first).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let got = g.fake.received();
    assert_eq!(got.last().unwrap().model, alice_sonnet());
    assert!(
        !got.last()
            .unwrap()
            .headers
            .get("authorization")
            .unwrap()
            .to_str()
            .unwrap()
            .contains("bgs_")
    );
    let rows = ledger_with(&g.proxy, 1).await;
    assert_eq!(rows[0].user.as_deref(), Some("alice"));

    // Refresh goes back to the IdP and rotates both tokens.
    let rotated = refresh(&ep, &refresh_token).await;
    assert_eq!(rotated.status, 200, "{}", text(&rotated));
    assert_eq!(g.idp.refresh_count(), 1);
    let rotated = rotated.json();
    let second = bearer(&rotated);
    assert_ne!(second, first);
    assert_signed_out(&messages_as(&g.proxy, &first).await);
    assert_eq!(messages_as(&g.proxy, &second).await.status, 200);
    let reused = refresh(&ep, &refresh_token).await;
    assert_eq!(reused.status, 401);
    assert_eq!(oauth_error(&reused), "invalid_grant");

    // Sign-out as Claude Code does it: the bearer, then the refresh token.
    let out = form_post(&ep.revoke, &[("token", &second)]).await;
    assert_eq!(out.status, 200);
    let out = form_post(
        &ep.revoke,
        &[
            ("token", rotated["refresh_token"].as_str().unwrap()),
            ("token_type_hint", "refresh_token"),
        ],
    )
    .await;
    assert_eq!(out.status, 200, "unknown tokens are fine too (RFC 7009)");
    assert_signed_out(&messages_as(&g.proxy, &second).await);
    let after = refresh(&ep, rotated["refresh_token"].as_str().unwrap()).await;
    assert_eq!(oauth_error(&after), "invalid_grant");

    let metrics = metrics_text(&g.proxy).await;
    assert!(
        metrics.contains("bedrock_gate_signins_total{outcome=\"approved\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("bedrock_gate_session_refreshes_total{outcome=\"rotated\"} 1"),
        "{metrics}"
    );

    // Nothing secret in the log.
    let logs = g.proxy.settled_logs().await;
    for secret in [
        first.as_str(),
        second.as_str(),
        &refresh_token,
        SECRET,
        &dev.device_code,
    ] {
        assert!(!logs.contains(secret), "a secret reached the log");
    }
}

#[tokio::test]
async fn an_api_key_and_a_signed_in_bearer_reach_the_same_user() {
    let g = start("", "").await;
    // Bob is mapped by IdP subject, not email.
    g.idp
        .sign_in_as(Identity::new("sub-bob", "robert@elsewhere.example", &[]));
    let tokens = sign_in(&g.proxy).await;
    assert_eq!(messages_as(&g.proxy, &bearer(&tokens)).await.status, 200);
    assert_eq!(
        messages(
            &g.proxy,
            BOB_KEY,
            &messages_body("claude-sonnet-4-5", false),
            &[]
        )
        .await
        .status,
        200
    );
    let got = g.fake.received();
    assert!(got.iter().all(|r| r.model == bob_sonnet()), "{got:#?}");
    let rows = ledger_with(&g.proxy, 2).await;
    assert!(rows.iter().all(|r| r.user.as_deref() == Some("bob")));
}

#[tokio::test]
async fn tampered_id_tokens_are_refused_and_the_device_gets_access_denied() {
    let g = start("", "").await;
    let ep = discover(&g.proxy).await;
    for tamper in [
        Tamper::BadSignature,
        Tamper::WrongAudience,
        Tamper::Expired,
        Tamper::WrongNonce,
        Tamper::WrongIssuer,
        Tamper::Unsigned,
    ] {
        g.idp.tamper_next(tamper);
        let dev = device_start(&ep).await;
        let page = browser(&g.proxy, &dev).await;
        assert_eq!(page.status, 403, "{tamper:?}: {}", text(&page));
        assert!(
            text(&page).contains("could not be verified"),
            "{tamper:?}: {}",
            text(&page)
        );
        let r = poll(&ep, &dev.device_code).await;
        assert_eq!(oauth_error(&r), "access_denied", "{tamper:?}");
    }
    // A sound token right after works.
    let dev = device_start(&ep).await;
    assert_eq!(browser(&g.proxy, &dev).await.status, 200);
    assert!(g.fake.received().is_empty(), "nothing reached Bedrock");
}

#[tokio::test]
async fn who_may_not_sign_in_is_told_why() {
    let g = start("allowed_groups = [\"dev\"]", "").await;
    let ep = discover(&g.proxy).await;

    g.idp
        .sign_in_as(Identity::new("sub-eve", "eve@corp.example", &["dev"]));
    let dev = device_start(&ep).await;
    let page = browser(&g.proxy, &dev).await;
    assert_eq!(page.status, 403);
    assert!(
        text(&page).contains("No bedrock-gate user is mapped to `eve@corp.example`"),
        "{}",
        text(&page)
    );
    let r = poll(&ep, &dev.device_code).await;
    assert_eq!(oauth_error(&r), "access_denied");
    assert!(
        r.json()["error_description"]
            .as_str()
            .unwrap()
            .contains("eve@corp.example")
    );

    // Alice by email, but not in an allowed group.
    g.idp
        .sign_in_as(Identity::new("sub-alice", ALICE_EMAIL, &["sales"]));
    let dev = device_start(&ep).await;
    let page = browser(&g.proxy, &dev).await;
    assert!(
        text(&page).contains("oidc.allowed_groups"),
        "{}",
        text(&page)
    );

    // The IdP says no.
    g.idp.deny_sign_ins();
    let dev = device_start(&ep).await;
    let page = browser(&g.proxy, &dev).await;
    assert_eq!(page.status, 403);
    assert_eq!(
        oauth_error(&poll(&ep, &dev.device_code).await),
        "access_denied"
    );
}

#[tokio::test]
async fn the_idp_refusing_a_refresh_ends_the_session() {
    let g = start("", "").await;
    let ep = discover(&g.proxy).await;
    let tokens = sign_in(&g.proxy).await;
    let b = bearer(&tokens);
    assert_eq!(messages_as(&g.proxy, &b).await.status, 200);
    // The admin disables alice at the IdP: her next refresh is the end.
    g.idp.refuse_refresh("sub-alice");
    let r = refresh(&ep, tokens["refresh_token"].as_str().unwrap()).await;
    assert_eq!(r.status, 401, "{}", text(&r));
    assert_eq!(oauth_error(&r), "invalid_grant");
    assert_signed_out(&messages_as(&g.proxy, &b).await);
}

#[tokio::test]
async fn two_clients_refreshing_at_once_do_not_end_the_session() {
    // Two terminals share one credential; both refresh at once. The IdP rotates its refresh
    // tokens, so presenting the same one twice would get the session ended by the IdP.
    let g = start("", "").await;
    let ep = discover(&g.proxy).await;
    let tokens = sign_in(&g.proxy).await;
    let rt = tokens["refresh_token"].as_str().unwrap().to_string();
    let (a, b) = tokio::join!(refresh(&ep, &rt), refresh(&ep, &rt));
    let mut statuses = [a.status.as_u16(), b.status.as_u16()];
    statuses.sort();
    assert_eq!(statuses, [200, 401], "{} / {}", text(&a), text(&b));
    assert_eq!(g.idp.refresh_count(), 1, "the IdP saw one refresh");
    let winner = if a.status == 200 { a.json() } else { b.json() };
    assert_eq!(messages_as(&g.proxy, &bearer(&winner)).await.status, 200);
    let next = refresh(&ep, winner["refresh_token"].as_str().unwrap()).await;
    assert_eq!(next.status, 200, "the session lives on: {}", text(&next));
}

#[tokio::test]
async fn sessions_survive_a_restart_and_the_cli_revokes_them_within_a_second() {
    // The secret from a file this time, as in production (a restart has no extra env).
    let secrets = tempfile::tempdir().unwrap();
    let file = secrets.path().join("oidc-secret");
    std::fs::write(&file, format!("{SECRET}\n")).unwrap();
    let g = start(&format!("client_secret_file = \"{}\"", file.display()), "").await;
    let tokens = sign_in(&g.proxy).await;
    let b = bearer(&tokens);
    let port: u16 = g.proxy.addr.rsplit(':').next().unwrap().parse().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let proxy = g.proxy.restart(&["--listen", &listen]).await;
    let r = messages_as(&proxy, &b).await;
    assert_eq!(r.status, 200, "{}\n{}", text(&r), proxy.logs());

    let config = proxy.config_path.to_str().unwrap().to_string();
    let list = run(proxy.dir.path(), &["sessions", "list", "-c", &config]).await;
    assert!(list.ok, "{}", list.stderr);
    assert!(
        list.stdout.contains("alice") && list.stdout.contains(ALICE_EMAIL),
        "{}",
        list.stdout
    );
    assert!(list.stdout.contains("1 session(s)"), "{}", list.stdout);
    assert!(!list.stdout.contains(&b), "never a token");

    let revoked = run(
        proxy.dir.path(),
        &["sessions", "revoke", "alice", "-c", &config],
    )
    .await;
    assert!(revoked.ok, "{}", revoked.stderr);
    assert!(
        revoked.stdout.contains("revoked 1 session"),
        "{}",
        revoked.stdout
    );
    let since = Instant::now();
    eventually("the running proxy refuses the revoked bearer", || async {
        (messages_as(&proxy, &b).await.status == 401).then_some(())
    })
    .await;
    assert!(since.elapsed() < Duration::from_millis(2500));
    assert_signed_out(&messages_as(&proxy, &b).await);
    let empty = run(
        proxy.dir.path(),
        &["sessions", "list", "-c", &config, "--format", "json"],
    )
    .await;
    assert_eq!(
        serde_json::from_str::<Value>(&empty.stdout).unwrap(),
        json!([])
    );
}

#[tokio::test]
async fn on_a_shared_store_a_sign_in_spans_replicas_and_a_revocation_anywhere_ends_it_within_a_second()
 {
    // Two replicas on one database behind one public URL (the load balancer's: here A's).
    let db = common::pg::Db::create().await;
    let fake = FakeBedrock::start().await;
    let idp = FakeIdp::start(CLIENT_ID, SECRET).await;
    idp.sign_in_as(alice());
    let (pa, pb) = (free_port(), free_port());
    // The secret from a file, so the CLI (no extra env) reads the same config.
    let secrets = tempfile::tempdir().unwrap();
    let file = secrets.path().join("oidc-secret");
    std::fs::write(&file, SECRET).unwrap();
    let oidc = format!("client_secret_file = \"{}\"", file.display());
    let text_of = |_: u16| config(pa, &fake.url(), &idp, &oidc, &db.store_table());
    let a = start_proxy(&text_of(pa), pa).await;
    let b = start_proxy(&text_of(pb), pb).await;

    // Claude Code reaches B, the browser A (the public URL): the flow in progress is shared.
    let ep_b = Endpoints {
        device: format!("{}/oauth/device_authorization", b.url()),
        token: format!("{}/oauth/token", b.url()),
        revoke: format!("{}/oauth/revoke", b.url()),
    };
    let dev = device_start(&ep_b).await;
    assert_eq!(
        oauth_error(&poll(&ep_b, &dev.device_code).await),
        "authorization_pending"
    );
    let page = browser(&a, &dev).await;
    assert_eq!(page.status, 200, "{}\n{}", text(&page), a.logs());
    let tokens = poll(&ep_b, &dev.device_code).await;
    assert_eq!(tokens.status, 200, "{}\n{}", text(&tokens), b.logs());
    let tokens = tokens.json();
    let again = poll(&ep_b, &dev.device_code).await;
    assert_eq!(
        oauth_error(&again),
        "invalid_grant",
        "a device code is single use"
    );
    // Signed in; the very next call lands on A, which has not polled the new session yet.
    let bearer_a = bearer(&tokens);
    let r = messages_as(&a, &bearer_a).await;
    assert_eq!(r.status, 200, "{}\n{}", text(&r), a.logs());
    let r = messages_as(&b, &bearer_a).await;
    assert_eq!(r.status, 200, "{}\n{}", text(&r), b.logs());
    // A refresh through B rotates the session for both.
    let rotated = refresh(&ep_b, tokens["refresh_token"].as_str().unwrap()).await;
    assert_eq!(rotated.status, 200, "{}", text(&rotated));
    let bearer_b = bearer(&rotated.json());
    eventually("A refuses the rotated-out bearer", || async {
        (messages_as(&a, &bearer_a).await.status == 401).then_some(())
    })
    .await;
    assert_eq!(messages_as(&a, &bearer_b).await.status, 200);

    // The CLI lists it from the store, whichever replica's config it reads.
    let config = b.config_path.to_str().unwrap().to_string();
    let list = run(b.dir.path(), &["sessions", "list", "-c", &config]).await;
    assert!(list.ok, "{}", list.stderr);
    assert!(list.stdout.contains("1 session(s)"), "{}", list.stdout);

    // Revoked on A (RFC 7009): B refuses it within a second.
    let out = form_post(
        &format!("{}/oauth/revoke", a.url()),
        &[("token", &bearer_b)],
    )
    .await;
    assert_eq!(out.status, 200);
    let since = Instant::now();
    eventually("B refuses the bearer revoked on A", || async {
        (messages_as(&b, &bearer_b).await.status == 401).then_some(())
    })
    .await;
    let took = since.elapsed();
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_signed_out(&messages_as(&b, &bearer_b).await);

    // And from the CLI: a new sign-in, revoked by `sessions revoke`, is refused by both.
    let again = bearer(&sign_in(&a).await);
    assert_eq!(messages_as(&b, &again).await.status, 200);
    let revoked = run(
        b.dir.path(),
        &["sessions", "revoke", "alice", "-c", &config],
    )
    .await;
    assert!(
        revoked.stdout.contains("revoked 1 session"),
        "{}",
        revoked.stdout
    );
    let since = Instant::now();
    for proxy in [&a, &b] {
        eventually("every replica refuses the revoked bearer", || async {
            (messages_as(proxy, &again).await.status == 401).then_some(())
        })
        .await;
        eprintln!("refused on {} after {:?}", proxy.url(), since.elapsed());
    }
    assert!(
        since.elapsed() < Duration::from_secs(1),
        "{:?}",
        since.elapsed()
    );
    // The sessions are not in either replica's SQLite file.
    for proxy in [&a, &b] {
        let ledger = proxy.dir.path().join("bedrock-gate.db");
        if ledger.exists() {
            let conn = rusqlite::Connection::open(&ledger).unwrap();
            let n: i64 = conn
                .query_row("SELECT count(*) FROM sessions", [], |r| r.get(0))
                .unwrap_or(0);
            assert_eq!(n, 0);
        }
    }
    let client = db.client().await;
    let n: i64 = client
        .query_one("SELECT count(*) FROM sessions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2, "both sign-ins are rows of the shared store");
    for proxy in [&a, &b] {
        let logs = proxy.settled_logs().await;
        assert!(!logs.contains("could not"), "{logs}");
    }
}

#[tokio::test]
async fn bad_input_gets_the_protocols_errors_and_never_a_panic() {
    let g = start("", "").await;
    let ep = discover(&g.proxy).await;
    let url = g.proxy.url();

    let not_form = send(request(
        Method::POST,
        &ep.token,
        &[("content-type", "application/json")],
        "{}",
    ))
    .await;
    assert_eq!(not_form.status, 400);
    assert_eq!(oauth_error(&not_form), "invalid_request");
    let huge = form_post(
        &ep.token,
        &[
            ("grant_type", "refresh_token"),
            ("pad", &"x".repeat(40_000)),
        ],
    )
    .await;
    assert_eq!(oauth_error(&huge), "invalid_request");
    let unknown = form_post(&ep.token, &[("grant_type", "password"), ("username", "a")]).await;
    assert_eq!(oauth_error(&unknown), "unsupported_grant_type");
    let missing = form_post(
        &ep.token,
        &[("grant_type", "urn:ietf:params:oauth:grant-type:device_code")],
    )
    .await;
    assert_eq!(oauth_error(&missing), "invalid_request");
    let made_up = poll(&ep, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").await;
    assert_eq!(oauth_error(&made_up), "invalid_grant");
    let bad_refresh = refresh(&ep, "bgr_nothing").await;
    assert_eq!(bad_refresh.status, 401);
    let no_token = form_post(&ep.revoke, &[]).await;
    assert_eq!(oauth_error(&no_token), "invalid_request");
    // Unknown parameters are ignored, as RFC 8628 asks.
    let extra = form_post(
        &ep.device,
        &[
            ("surface", "claude_code"),
            ("future", "x"),
            ("client_id", "whatever"),
        ],
    )
    .await;
    assert_eq!(extra.status, 200);

    // The verification page: a cross-site POST, a malformed code, an unknown code, a stale callback.
    let dev = device_start(&ep).await;
    let body = form(&[("user_code", &dev.user_code)]);
    let cross = send(request(
        Method::POST,
        &format!("{url}/device"),
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("origin", "https://evil.example"),
        ],
        body.clone(),
    ))
    .await;
    assert_eq!(cross.status, 403);
    let no_origin = send(request(
        Method::POST,
        &format!("{url}/device"),
        &[("content-type", "application/x-www-form-urlencoded")],
        body,
    ))
    .await;
    assert_eq!(no_origin.status, 403);
    for (code, says) in [
        ("<script>", "8 letters"),
        ("BCDF-GHJK", "not valid or has expired"),
    ] {
        let r = send(request(
            Method::POST,
            &format!("{url}/device"),
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("origin", &url),
            ],
            form(&[("user_code", code)]),
        ))
        .await;
        assert_eq!(r.status, 400);
        let html = text(&r);
        assert!(html.contains(says), "{html}");
        assert!(!html.contains("<script>"), "input is escaped");
    }
    let prefilled = get(&format!("{url}/device?user_code=%22%3E%3Cscript%3E"), &[]).await;
    assert_eq!(prefilled.status, 200);
    assert!(!text(&prefilled).contains("<script>"));
    let stale = get(&format!("{url}/oauth/callback?code=x&state=y"), &[]).await;
    assert_eq!(stale.status, 400);
    assert!(text(&stale).contains("not valid any more"));
    // A callback whose state is real but was started in another browser (no cookie).
    let origin = url.clone();
    let to_idp = send(request(
        Method::POST,
        &format!("{url}/device"),
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("origin", &origin),
        ],
        form(&[("user_code", &dev.user_code)]),
    ))
    .await;
    assert_eq!(to_idp.status, 303);
    let at_idp = get(&location(&to_idp), &[]).await;
    let cookieless = get(&location(&at_idp), &[]).await;
    assert_eq!(cookieless.status, 400);
    assert_eq!(
        oauth_error(&poll(&ep, &dev.device_code).await),
        "authorization_pending"
    );
    // The person can still finish with the same code, in their own browser.
    assert_eq!(browser(&g.proxy, &dev).await.status, 200);
    assert_eq!(poll(&ep, &dev.device_code).await.status, 200);

    // The session bearer paths: garbage and revoked-looking tokens get 401, never 500.
    for token in ["bgs_", "bgs_x", &format!("bgs_{}", "A".repeat(43))] {
        assert_signed_out(&messages_as(&g.proxy, token).await);
    }
    assert!(g.fake.received().is_empty());
    assert!(!g.proxy.settled_logs().await.contains("panicked"));
}

#[tokio::test]
async fn sign_ins_are_rate_limited_per_address() {
    let fake = FakeBedrock::start().await;
    let idp = FakeIdp::start(CLIENT_ID, SECRET).await;
    let port = free_port();
    let text = config(port, &fake.url(), &idp, "", "").replace(
        "sign_ins_per_ip_per_minute = 1000",
        "sign_ins_per_ip_per_minute = 3",
    );
    let proxy = start_proxy(&text, port).await;
    let ep = discover(&proxy).await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let r = form_post(&ep.device, &[("surface", "claude_code")]).await;
        statuses.push(r.status.as_u16());
        if r.status == 429 {
            assert_eq!(oauth_error(&r), "slow_down");
            assert!(r.headers.contains_key("retry-after"));
        }
    }
    // A minute boundary can fall in between; at most 3 per minute either way.
    assert!(
        statuses.iter().filter(|s| **s == 200).count() <= 6,
        "{statuses:?}"
    );
    assert!(statuses.contains(&429), "{statuses:?}");
}

#[tokio::test]
async fn a_slow_idp_costs_a_sign_in_never_the_proxy() {
    let g = start("", "").await;
    let ep = discover(&g.proxy).await;
    let dev = device_start(&ep).await;
    g.idp.set_delay(Duration::from_secs(4));
    let slow = async {
        let origin = g.proxy.url();
        send(request(
            Method::POST,
            &format!("{}/device", g.proxy.url()),
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("origin", &origin),
            ],
            form(&[("user_code", &dev.user_code)]),
        ))
        .await
    };
    let meanwhile = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        let r = messages(
            &g.proxy,
            ALICE_KEY,
            &messages_body("claude-sonnet-4-5", false),
            &[],
        )
        .await;
        (r.status, started.elapsed())
    };
    let started = Instant::now();
    let (page, (status, took)) = tokio::join!(slow, meanwhile);
    assert_eq!(page.status, 502, "{}", text(&page));
    assert!(text(&page).contains("cannot be reached"), "{}", text(&page));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "bounded by oidc.timeout_secs = 2"
    );
    assert_eq!(status, 200);
    assert!(
        took < Duration::from_secs(1),
        "other calls are served meanwhile: {took:?}"
    );
    // Back to normal: the same code can still be signed in.
    g.idp.set_delay(Duration::ZERO);
    let page = browser(&g.proxy, &dev).await;
    assert_eq!(page.status, 200, "{}", text(&page));
}

#[tokio::test]
async fn managed_settings_follow_the_checksum_etag_and_304_rules() {
    let extra = r#"
[managed_settings]
model = "claude-sonnet-4-5"
[managed_settings.env]
CLAUDE_CODE_ENABLE_TELEMETRY = "1"
OTEL_METRICS_EXPORTER = "otlp"
[group_settings.dev.env]
DEV_ONLY = "yes"
[users.alice.managed_settings.permissions]
deny = ["WebFetch"]
"#;
    let g = start("", extra).await;
    let tokens = sign_in(&g.proxy).await;
    let auth = format!("Bearer {}", bearer(&tokens));
    let url = format!("{}/managed/settings", g.proxy.url());
    let r = get(&url, &[("authorization", &auth)]).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let v = r.json();
    let settings = &v["settings"];
    assert_eq!(
        *settings,
        json!({
            "model": "claude-sonnet-4-5",
            "env": {"CLAUDE_CODE_ENABLE_TELEMETRY": "1", "OTEL_METRICS_EXPORTER": "otlp", "DEV_ONLY": "yes"},
            "permissions": {"deny": ["WebFetch"]},
        }),
        "everyone's, alice's group's (from the IdP), then her own"
    );
    // The client's own computation: keys sorted at every level, no whitespace.
    let canonical = r#"{"env":{"CLAUDE_CODE_ENABLE_TELEMETRY":"1","DEV_ONLY":"yes","OTEL_METRICS_EXPORTER":"otlp"},"model":"claude-sonnet-4-5","permissions":{"deny":["WebFetch"]}}"#;
    let sum = {
        use sha2::Digest;
        format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(canonical.as_bytes()))
        )
    };
    assert_eq!(v["checksum"], sum);
    assert_eq!(r.headers["etag"], format!("\"{sum}\""));
    assert_eq!(v["uuid"].as_str().unwrap().len(), 36);
    let quoted = format!("\"{sum}\"");
    let cached = get(
        &url,
        &[("authorization", &auth), ("if-none-match", &quoted)],
    )
    .await;
    assert_eq!(cached.status, 304);
    let star = get(&url, &[("authorization", &auth), ("if-none-match", "*")]).await;
    assert_eq!(star.status, 200, "`*` is answered as if it were absent");
    let stale = get(
        &url,
        &[("authorization", &auth), ("if-none-match", "\"sha256:00\"")],
    )
    .await;
    assert_eq!(stale.status, 200);

    // Bob (API key, no group, no own settings) gets everyone's.
    let b = get(&url, &[("authorization", &format!("Bearer {BOB_KEY}"))]).await;
    assert_eq!(b.json()["settings"]["env"].get("DEV_ONLY"), None);
    // No key: the Anthropic 401.
    let anon = get(&url, &[]).await;
    assert_eq!(anon.status, 401);
    assert_eq!(anon.anthropic_error().0, "authentication_error");
}

#[tokio::test]
async fn no_policy_is_404_and_telemetry_is_200_and_forwarded_without_the_bearer() {
    let collector = Collector::start().await;
    let extra = format!(
        "[telemetry]\notlp_endpoint = \"{}\"\nheaders = {{ x-collector-key = \"proxy-own\" }}",
        collector.url
    );
    let g = start("", &extra).await;
    let tokens = sign_in(&g.proxy).await;
    let auth = format!("Bearer {}", bearer(&tokens));
    let none = get(
        &format!("{}/managed/settings", g.proxy.url()),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(none.status, 404);

    for signal in ["metrics", "logs", "traces"] {
        let r = send(request(
            Method::POST,
            &format!("{}/v1/{signal}", g.proxy.url()),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            format!(r#"{{"resource{signal}":[]}}"#),
        ))
        .await;
        assert_eq!(r.status, 200, "{signal}: {}", text(&r));
    }
    let got = eventually("the collector got all three signals", || async {
        let got = collector.got();
        (got.len() == 3).then_some(got)
    })
    .await;
    let mut paths: Vec<&str> = got.iter().map(|(p, _, _)| p.as_str()).collect();
    paths.sort();
    assert_eq!(paths, ["/v1/logs", "/v1/metrics", "/v1/traces"]);
    for (_, headers, body) in &got {
        assert_eq!(headers["x-collector-key"], "proxy-own");
        assert!(
            headers.get("authorization").is_none(),
            "never the developer's bearer"
        );
        assert!(body.starts_with("{\"resource"));
    }
    // Without a key, telemetry is refused like any bearer endpoint.
    let anon = send(request(
        Method::POST,
        &format!("{}/v1/logs", g.proxy.url()),
        &[],
        "x",
    ))
    .await;
    assert_eq!(anon.status, 401);
}

#[tokio::test]
async fn usage_shows_the_budget_in_dollars_and_the_headers_warn_near_the_cap() {
    // Each call costs $0.40 (25 tokens at $16,000 per million) of a $1 budget.
    let extra = format!(
        "[prices.\"{SONNET}\"]\ninput_per_mtok = 16000\noutput_per_mtok = 16000\ncache_read_per_mtok = 16000\ncache_write_per_mtok = 16000\n\
         [users.alice.limits]\nmonthly_budget_usd = 1.0"
    );
    let g = start("", &extra).await;
    let tokens = sign_in(&g.proxy).await;
    let b = bearer(&tokens);
    let auth = format!("Bearer {b}");
    let usage_url = format!("{}/api/oauth/usage", g.proxy.url());
    let before = get(&usage_url, &[("authorization", &auth)]).await.json();
    assert_eq!(before["extra_usage"]["monthly_limit"], 100);
    assert_eq!(before["extra_usage"]["used_credits"], 0);

    for _ in 0..2 {
        assert_eq!(messages_as(&g.proxy, &b).await.status, 200);
    }
    let third = messages_as(&g.proxy, &b).await;
    assert_eq!(
        third.headers["anthropic-ratelimit-unified-status"],
        "allowed_warning"
    );
    assert_eq!(
        third.headers["anthropic-ratelimit-unified-overage-surpassed-threshold"],
        "0.75"
    );
    let reset = third.headers["anthropic-ratelimit-unified-overage-reset"]
        .to_str()
        .unwrap()
        .to_string();

    // On PostgreSQL /usage reads the store, which the rows reach from the spool a moment
    // after their answers end (on SQLite, before: this returns at once).
    g.proxy.shipped().await;
    let u = get(&usage_url, &[("authorization", &auth)]).await;
    assert_eq!(u.headers["cache-control"], "no-store");
    let u = u.json();
    assert_eq!(u["extra_usage"]["is_enabled"], true);
    assert_eq!(u["extra_usage"]["currency"], "USD");
    assert_eq!(u["extra_usage"]["used_credits"], 120, "{u}");
    let limit = &u["limits"][0];
    assert_eq!(limit["kind"], "spend");
    assert_eq!(limit["group"], "monthly");
    assert_eq!(limit["is_active"], true);
    assert_eq!(
        limit["percent"], 120,
        "$1.20 of $1: above 100 once over: {u}"
    );
    // The same instant as the headers' reset, to the second.
    let resets_at =
        chrono::DateTime::parse_from_rfc3339(limit["resets_at"].as_str().unwrap()).unwrap();
    assert_eq!(resets_at.timestamp().to_string(), reset);

    let capped = messages_as(&g.proxy, &b).await;
    assert_eq!(capped.status, 429);
    assert_eq!(capped.anthropic_error().0, "billing_error");
    assert_eq!(capped.headers["x-should-retry"], "false");
    assert_eq!(
        capped.headers["anthropic-ratelimit-unified-status"],
        "rejected"
    );
    assert!(
        !capped
            .headers
            .contains_key("anthropic-ratelimit-unified-representative-claim")
    );

    // Bob has no cap: no limits, and his spend this month, day and week (one call, $0.40).
    let call = messages(
        &g.proxy,
        BOB_KEY,
        &messages_body("claude-sonnet-4-5", false),
        &[],
    )
    .await;
    assert_eq!(call.status, 200, "{}", text(&call));
    // The day and week figures are read from the ledger's rollup: on SQLite the row is
    // committed before the answer ends, on PostgreSQL it is shipped from the spool just after.
    g.proxy.shipped().await;
    let bob = get(
        &usage_url,
        &[("authorization", &format!("Bearer {BOB_KEY}"))],
    )
    .await
    .json();
    assert_eq!(bob["limits"], json!([]));
    assert_eq!(bob["extra_usage"]["monthly_limit"], Value::Null);
    assert_eq!(bob["extra_usage"]["used_credits"], 40, "{bob}");
    assert_eq!(bob["extra_usage"]["daily"]["used_credits"], 40, "{bob}");
    assert_eq!(bob["extra_usage"]["weekly"]["used_credits"], 40, "{bob}");
    assert_eq!(bob["extra_usage"]["weekly"]["limit"], Value::Null);
}

#[tokio::test]
async fn the_real_claude_code_runs_on_a_signed_in_bearer() {
    // The env-var gateway mode of Claude Code 2.1.332: CLAUDE_CODE_USE_GATEWAY with the base URL
    // and a bearer from the device flow (what /login would have stored).
    let g = start("", "").await;
    let tokens = sign_in(&g.proxy).await;
    let mode = vec![
        ("CLAUDE_CODE_USE_GATEWAY", "1".to_string()),
        ("ANTHROPIC_BASE_URL", g.proxy.url()),
        ("ANTHROPIC_AUTH_TOKEN", bearer(&tokens)),
        // Its default in this mode is an Opus alias alice has no profile for.
        ("ANTHROPIC_MODEL", "claude-sonnet-4-5".to_string()),
    ];
    let (ok, stdout, stderr) = crate::claude_code::run_claude_in(&mode, &[]).await;
    assert!(
        ok && stdout.contains(fake::TEXT),
        "stdout:\n{stdout}\nstderr:\n{stderr}\nproxy log:\n{}",
        g.proxy.logs()
    );
    let got = g.fake.received();
    let turns: Vec<_> = got
        .iter()
        .filter(|r| r.raw_path.starts_with("/model/") && r.op != "count-tokens")
        .collect();
    assert!(!turns.is_empty(), "{got:#?}");
    assert!(
        turns.iter().all(|r| r.model == alice_sonnet()),
        "every turn on alice's own profile: {turns:#?}"
    );
    let rows = ledger_with(&g.proxy, 1).await;
    assert!(
        rows.iter().all(|r| r.user.as_deref() == Some("alice")),
        "{rows:#?}"
    );
}

/// A fake OTLP/HTTP collector: records path, headers and body of each export.
struct Collector {
    url: String,
    got: Arc<Mutex<Vec<(String, http::HeaderMap, String)>>>,
}

impl Collector {
    async fn start() -> Collector {
        let got: Arc<Mutex<Vec<(String, http::HeaderMap, String)>>> = Arc::default();
        let sink = got.clone();
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let sink = sink.clone();
            async move {
                use http_body_util::BodyExt;
                let (parts, body) = req.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                sink.lock().unwrap().push((
                    parts.uri.path().to_string(),
                    parts.headers,
                    String::from_utf8_lossy(&body).into_owned(),
                ));
                "{}"
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Collector { url, got }
    }

    fn got(&self) -> Vec<(String, http::HeaderMap, String)> {
        self.got.lock().unwrap().clone()
    }
}

/// A config whose control plane is the stateful fake, with `[oidc.auto_users]`.
fn auto_config(port: u16, runtime: &str, idp: &FakeIdp, control: &str, billing: &str) -> String {
    format!(
        r#"# Team gateway. Comments here must survive sign-ups.
public_url = "http://127.0.0.1:{port}"

[aws]
region = "us-east-1"
runtime_endpoint = "{runtime}"
control_endpoint = "{control}"   # the control plane
service_quotas_endpoint = "{billing}"

[oidc]
issuer = "{issuer}"
client_id = "{CLIENT_ID}"
sign_ins_per_ip_per_minute = 1000
# Everyone at corp gets Sonnet on their own profile, with a $50 budget.
[oidc.auto_users]
models = ["{SONNET}"]
tags = {{ team = "self-serve" }}
limits = {{ monthly_budget_usd = 50 }}

# The admin, added by hand.
[users.alice]
keys = ["{ka}"]
emails = ["{ALICE_EMAIL}"]
[users.alice.models]
"{SONNET}" = "{a_sonnet}"
"#,
        issuer = idp.issuer(),
        ka = hash(ALICE_KEY),
        a_sonnet = alice_sonnet(),
    )
}

#[tokio::test]
async fn a_first_sign_in_adds_the_user_and_creates_their_profiles() {
    let control = FakeControl::start().await;
    let billing = BillingFake::start().await;
    let fake = FakeBedrock::start().await;
    let idp = FakeIdp::start(CLIENT_ID, SECRET).await;
    let port = free_port();
    let config = auto_config(port, &fake.url(), &idp, &control.url(), &billing.url());
    let proxy = start_proxy(&config, port).await;

    const CAROL: &str = "carol@corp.example";
    idp.sign_in_as(Identity::new("sub-carol", CAROL, &[]));
    let tokens = sign_in(&proxy).await;
    assert_eq!(tokens["email"], CAROL);

    // The config: carol added with her email, budget and the new profile's ARN; comments kept.
    let after = std::fs::read_to_string(&proxy.config_path).unwrap();
    assert!(after.starts_with("# Team gateway. Comments here must survive sign-ups."));
    assert!(after.contains("# The admin, added by hand."), "{after}");
    assert!(after.contains("# the control plane"), "{after}");
    let made = control.applications();
    assert_eq!(made.len(), 1, "{made:#?}");
    let profile = &made[0];
    assert!(after.contains(&format!("[users.\"{CAROL}\"]")), "{after}");
    assert!(
        after.contains(&format!("emails = [\"{CAROL}\"]")),
        "{after}"
    );
    assert!(after.contains("monthly_budget_usd = 50"), "{after}");
    assert!(after.contains(&profile.arn), "{after}");
    let tags = control.tags(&profile.arn);
    assert_eq!(tags.get("BedrockUser").map(String::as_str), Some(CAROL));
    assert_eq!(tags.get("team").map(String::as_str), Some("self-serve"));
    let check = tokio::process::Command::from(command(proxy.dir.path()))
        .env("BEDROCK_GATE_OIDC_CLIENT_SECRET", SECRET)
        .args(["check", "-c", proxy.config_path.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // Her first call is on her new profile.
    let r = messages_as(&proxy, &bearer(&tokens)).await;
    assert_eq!(r.status, 200, "{}\n{}", text(&r), proxy.logs());
    assert_eq!(fake.received().last().unwrap().model, profile.arn);

    // Without the permission to create profiles, the next newcomer is refused cleanly and not
    // left half-added.
    control.inject(
        control::Fault::internal(control::Op::CreateInferenceProfile)
            .error(403, "AccessDeniedException"),
    );
    idp.sign_in_as(Identity::new("sub-dave", "dave@corp.example", &[]));
    let ep = discover(&proxy).await;
    let dev = device_start(&ep).await;
    let page = browser(&proxy, &dev).await;
    assert_eq!(page.status, 403, "{}", text(&page));
    assert!(
        text(&page).contains("could not set you up"),
        "{}",
        text(&page)
    );
    let denied = poll(&ep, &dev.device_code).await;
    assert_eq!(oauth_error(&denied), "access_denied");
    let last = std::fs::read_to_string(&proxy.config_path).unwrap();
    assert_eq!(last, after, "the config is as it was: no half-added dave");
}

/// Claude Code, unchanged, with a home of its own and no environment beyond the basics.
fn claude_in(home: &std::path::Path) -> tokio::process::Command {
    let bin = installed_client(
        "BEDROCK_GATE_CLAUDE",
        "claude-code/node_modules/.bin/claude",
        "Claude Code",
    );
    let mut cmd = tokio::process::Command::new(bin);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("DISABLE_AUTOUPDATER", "1")
        .env("DISABLE_TELEMETRY", "1")
        .env("DISABLE_ERROR_REPORTING", "1")
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .current_dir(home)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Claude Code's own `/login` to a gateway, in the JSON-lines mode its `auth login
/// --gateway-json` offers a program that shows the questions to a person: each question is
/// answered yes, and the browser step is the scripted browser. Returns every state it wrote.
async fn claude_login(home: &std::path::Path, proxy: &Proxy) -> Vec<Value> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut child = claude_in(home)
        .args(["auth", "login", "--gateway-json"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let line = tokio::select! {
            l = lines.next_line() => l.unwrap(),
            () = tokio::time::sleep_until(deadline) => panic!("claude auth login stalled after {seen:#?}"),
        };
        let Some(line) = line else { break };
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        match v["state"].as_str().unwrap_or_default() {
            question @ ("url_input" | "trust_prompt" | "confirm_account") => {
                let yes = json!({"state": question, "shown": v["shown"], "accept": true});
                stdin
                    .write_all(format!("{yes}\n").as_bytes())
                    .await
                    .unwrap();
            }
            "polling" => {
                let dev = Device {
                    device_code: String::new(),
                    user_code: v["userCode"].as_str().unwrap().to_string(),
                    complete: v["browserUrl"].as_str().unwrap().to_string(),
                };
                let page = browser(proxy, &dev).await;
                assert_eq!(page.status, 200, "{}", text(&page));
            }
            _ => {}
        }
        seen.push(v);
    }
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "{}\nstates: {seen:#?}\nproxy log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        proxy.logs()
    );
    seen
}

#[tokio::test]
async fn the_real_claude_code_logs_in_with_its_own_device_flow_and_then_runs() {
    // The gateway's managed settings pick the model: the only way Claude Code can know it is
    // by fetching /managed/settings with its new bearer.
    // A bearer of 60 s is inside Claude Code's 5-minute refresh margin: it refreshes at once.
    let g = start(
        "session_ttl_secs = 60",
        "[managed_settings]\nmodel = \"claude-sonnet-4-5\"",
    )
    .await;
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home.path().join(".claude")).unwrap();
    // What a developer's /login would be pre-filled with (a user-settings gateway URL).
    std::fs::write(
        home.path().join(".claude/settings.json"),
        json!({"forceLoginMethod": "gateway", "forceLoginGatewayUrl": g.proxy.url()}).to_string(),
    )
    .unwrap();

    let states = claude_login(home.path(), &g.proxy).await;
    let names: Vec<&str> = states.iter().filter_map(|v| v["state"].as_str()).collect();
    for want in ["url_input", "polling", "confirm_account", "done"] {
        assert!(names.contains(&want), "{names:?}");
    }
    let confirm = states
        .iter()
        .find(|v| v["state"] == "confirm_account")
        .unwrap();
    assert_eq!(
        confirm["shown"], ALICE_EMAIL,
        "the token answer's email is shown to confirm"
    );

    let creds: Value = serde_json::from_str(
        &std::fs::read_to_string(home.path().join(".claude/.credentials.json")).unwrap(),
    )
    .unwrap();
    let stored = &creds["enterpriseGateway"];
    assert_eq!(stored["url"], g.proxy.url());
    assert_eq!(stored["email"], ALICE_EMAIL);
    assert_eq!(
        stored["tokenEndpoint"],
        format!("{}/oauth/token", g.proxy.url())
    );
    assert_eq!(
        stored["revocationEndpoint"],
        format!("{}/oauth/revoke", g.proxy.url())
    );
    let jwt = stored["jwt"].as_str().unwrap().to_string();
    assert!(jwt.starts_with("bgs_"), "{stored}");
    assert!(
        stored["idpRefreshToken"]
            .as_str()
            .unwrap()
            .starts_with("bgr_")
    );

    // Signed in: `claude -p` with nothing but its home goes through the gateway.
    let run = claude_in(home.path())
        .args(["-p", "Say hello"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success() && stdout.contains(fake::TEXT),
        "stdout:\n{stdout}\nstderr:\n{}\nproxy log:\n{}",
        String::from_utf8_lossy(&run.stderr),
        g.proxy.logs()
    );
    let turns: Vec<_> = g
        .fake
        .received()
        .into_iter()
        .filter(|r| r.raw_path.starts_with("/model/") && r.op != "count-tokens")
        .collect();
    assert!(!turns.is_empty());
    assert!(
        turns.iter().all(|r| r.model == alice_sonnet()),
        "on alice's Sonnet profile, the model the managed settings chose: {turns:#?}"
    );
    let rows = ledger_with(&g.proxy, 1).await;
    assert!(
        rows.iter().all(|r| r.user.as_deref() == Some("alice")),
        "{rows:#?}"
    );
    let after: Value = serde_json::from_str(
        &std::fs::read_to_string(home.path().join(".claude/.credentials.json")).unwrap(),
    )
    .unwrap();
    let refreshed = after["enterpriseGateway"]["jwt"]
        .as_str()
        .unwrap()
        .to_string();
    // Claude Code refreshed through our token endpoint, which asked the IdP, and kept the new
    // bearer.
    assert!(g.idp.refresh_count() >= 1, "no refresh reached the IdP");
    assert_ne!(refreshed, jwt, "the stored bearer was rotated");
    assert_signed_out(&messages_as(&g.proxy, &jwt).await);
    let jwt = refreshed;

    // Sign-out revokes the bearer at the gateway.
    let out = claude_in(home.path())
        .args(["auth", "logout"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("the bearer is revoked after logout", || async {
        (messages_as(&g.proxy, &jwt).await.status == 401).then_some(())
    })
    .await;
}
