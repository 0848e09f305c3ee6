//! The admin dashboard on `admin_listen`: access, the API against `usage`, and the pages in a
//! real headless Chromium driven over WebDriver (Debian's chromium and chromium-driver, which
//! `.ci/run` installs), with screenshots kept under the target directory.

use crate::common::*;
use serde_json::{Value, json};

const ADMIN_TOKEN: &str = "bgadmin_test_0123456789abcdefghijklmnopqrstuvwxyz";

fn dashboard_config(fake: &FakeBedrock, extra: &str) -> String {
    two_user_config(
        fake,
        &format!("[admin]\ntoken_sha256 = \"{}\"\n{extra}", hash(ADMIN_TOKEN)),
    )
}

async fn get(url: &str, token: Option<&str>) -> Reply {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    send(request(http::Method::GET, url, &headers, "")).await
}

#[tokio::test]
async fn only_the_admin_token_opens_the_dashboard_and_only_on_the_admin_listener() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&dashboard_config(&fake, "")).await;
    let admin = proxy.admin_url();
    for path in [
        "/",
        "/users",
        "/users/alice",
        "/profiles",
        "/api/overview",
        "/api/users",
        "/api/users.csv",
        "/api/profiles",
    ] {
        let url = format!("{admin}{path}");
        let none = get(&url, None).await;
        assert_eq!(none.status, 401, "{path} without a token");
        assert!(none.headers.contains_key("www-authenticate"), "{path}");
        let user = get(&url, Some(ALICE_KEY)).await;
        assert_eq!(user.status, 403, "{path} with a user's API key");
        let text = String::from_utf8_lossy(&user.body).to_string();
        assert!(text.contains("API key"), "{path}: {text}");
        assert_eq!(get(&url, Some("not-the-token")).await.status, 403, "{path}");
        let ok = get(&url, Some(ADMIN_TOKEN)).await;
        assert_eq!(ok.status, 200, "{path}: {:?}", ok.body);
        assert_eq!(ok.headers["cache-control"], "no-store", "{path}");
        assert_eq!(ok.headers["x-frame-options"], "DENY", "{path}");
        assert!(ok.headers.contains_key("content-security-policy"), "{path}");
        // The main listener has no dashboard, whatever the credential.
        let main = get(&format!("{}{path}", proxy.url()), Some(ADMIN_TOKEN)).await;
        assert_ne!(main.status, 200, "{path} on the main listener");
        assert!(
            !String::from_utf8_lossy(&main.body).contains("bedrock-gate</strong>"),
            "{path} on the main listener"
        );
    }
    // The sign-in form: a wrong token is refused, the right one sets an HttpOnly cookie that
    // opens the pages.
    let form = |token: &str| {
        let mut r = request(
            http::Method::POST,
            &format!("{admin}/login"),
            &[("content-type", "application/x-www-form-urlencoded")],
            format!("token={token}"),
        );
        r.headers_mut().remove("authorization");
        r
    };
    assert_eq!(send(form("wrong")).await.status, 403);
    let signed_in = send(form(ADMIN_TOKEN)).await;
    assert_eq!(signed_in.status, 303);
    let cookie = signed_in.headers["set-cookie"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap();
    let page = send(request(
        http::Method::GET,
        &format!("{admin}/users"),
        &[("cookie", pair)],
        "",
    ))
    .await;
    assert_eq!(page.status, 200);
    // And the health and metrics of the admin listener stay open.
    assert_eq!(get(&format!("{admin}/metrics"), None).await.status, 200);
    assert_eq!(get(&format!("{admin}/healthz"), None).await.status, 200);
}

/// Alice three Converse calls on Sonnet and one on Haiku, bob one; returns `usage`'s JSON.
async fn some_traffic(proxy: &Proxy) -> Value {
    for _ in 0..3 {
        assert_eq!(converse(proxy, SONNET, ALICE_KEY).await.status, 200);
    }
    assert_eq!(converse(proxy, HAIKU, ALICE_KEY).await.status, 200);
    assert_eq!(converse(proxy, SONNET, BOB_KEY).await.status, 200);
    // One refusal: a model bob does not map.
    assert_ne!(converse(proxy, HAIKU, BOB_KEY).await.status, 200);
    proxy.shipped().await;
    proxy.usage_by_user().await
}

#[tokio::test]
async fn the_api_answers_what_usage_reports_for_the_same_month() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&dashboard_config(&fake, "")).await;
    let report = some_traffic(&proxy).await;
    let admin = proxy.admin_url();
    let users = get(&format!("{admin}/api/users"), Some(ADMIN_TOKEN))
        .await
        .json();
    assert_eq!(users["period"]["since"], report["since"], "{users}");
    assert_eq!(users["period"]["last"], report["until"], "{users}");
    for row in report["rows"].as_array().unwrap() {
        let key = row["key"].as_str().unwrap();
        if key == "(unidentified)" {
            assert_eq!(users["unidentified"]["requests"], row["requests"]);
            continue;
        }
        let line = users["users"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["user"] == key)
            .unwrap_or_else(|| panic!("{key} missing from {users}"));
        for field in [
            "requests",
            "input_tokens",
            "output_tokens",
            "cache_read_tokens",
            "cache_write_tokens",
            "cost_usd",
        ] {
            assert_eq!(line[field], row[field], "{key}.{field}: {line} vs {row}");
        }
        assert_eq!(line["errors"], row["error_requests"], "{key}");
        assert!(line["last_seen_ms"].as_i64().unwrap() > 0, "{line}");
    }
    let alice = users["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["user"] == "alice")
        .unwrap();
    assert_eq!(alice["requests"], 4);

    let overview = get(&format!("{admin}/api/overview"), Some(ADMIN_TOKEN))
        .await
        .json();
    assert_eq!(overview["month"]["requests"], report["total"]["requests"]);
    assert_eq!(overview["month"]["cost_usd"], report["total"]["cost_usd"]);
    assert_eq!(
        overview["month"]["errors"],
        report["total"]["error_requests"]
    );
    assert_eq!(overview["minutes"].as_array().unwrap().len(), 60);
    let in_hour: i64 = overview["minutes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["requests"].as_i64().unwrap())
        .sum();
    assert_eq!(json!(in_hour), report["total"]["requests"], "{overview}");
    let series: Vec<&str> = overview["daily"]["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["user"].as_str().unwrap())
        .collect();
    assert_eq!(series, ["alice", "bob"], "biggest spender first");
    assert_eq!(overview["daily"]["days"].as_array().unwrap().len(), 30);
    let models: Vec<&str> = overview["top_models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["key"].as_str().unwrap())
        .collect();
    assert!(
        models.contains(&SONNET) && models.contains(&HAIKU),
        "{models:?}"
    );

    // A user's page: per model, and the latest requests with status and latency, never a body.
    let detail = get(&format!("{admin}/api/users/alice"), Some(ADMIN_TOKEN))
        .await
        .json();
    assert_eq!(detail["line"]["requests"], 4);
    assert_eq!(detail["models"].as_array().unwrap().len(), 2, "{detail}");
    let recent = detail["recent"].as_array().unwrap();
    assert_eq!(recent.len(), 4);
    assert!(
        recent
            .iter()
            .all(|r| r["status"] == 200 && r["latency_ms"].is_i64())
    );
    assert!(
        !detail.to_string().contains("\"hi\""),
        "no prompt in {detail}"
    );
    assert_eq!(
        get(&format!("{admin}/api/users/nobody"), Some(ADMIN_TOKEN))
            .await
            .status,
        404
    );

    // The profiles the config maps, with the tag each carries.
    let profiles = get(&format!("{admin}/api/profiles"), Some(ADMIN_TOKEN))
        .await
        .json();
    let mut seen: Vec<(String, String, String)> = profiles["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let region = p["region"].as_str().unwrap();
            assert!(
                p["arn"].as_str().unwrap().contains(&format!(":{region}:")),
                "the ARN's region: {p}"
            );
            assert_eq!(p["tag_value"], p["user"], "{p}");
            (
                p["user"].as_str().unwrap().to_string(),
                p["model"].as_str().unwrap().to_string(),
                p["arn"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    seen.sort();
    let mut want = vec![
        ("alice".to_string(), HAIKU.to_string(), alice_haiku()),
        ("alice".to_string(), SONNET.to_string(), alice_sonnet()),
        ("bob".to_string(), SONNET.to_string(), bob_sonnet()),
    ];
    want.sort();
    assert_eq!(seen, want);

    // The CSV export: a header and a line per user, the same numbers.
    let csv = get(&format!("{admin}/api/users.csv"), Some(ADMIN_TOKEN)).await;
    assert!(
        csv.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let text = String::from_utf8_lossy(&csv.body).to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("user,requests,input_tokens"), "{text}");
    assert!(lines.iter().any(|l| l.starts_with("alice,4,")), "{text}");
    assert!(lines.iter().any(|l| l.starts_with("bob,2,")), "{text}");
}

/// A WebDriver session on Debian's chromedriver and headless Chromium.
struct Browser {
    driver: std::process::Child,
    base: String,
    session: String,
    profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let bin = std::env::var("BEDROCK_GATE_CHROMEDRIVER")
            .unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        let chromium =
            std::env::var("BEDROCK_GATE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let port = free_port();
        let driver = std::process::Command::new(&bin)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin} ({e}): .ci/run installs chromium-driver")
            });
        let base = format!("http://127.0.0.1:{port}");
        eventually("chromedriver answers", || async {
            let r = client()
                .request(request(
                    http::Method::GET,
                    &format!("{base}/status"),
                    &[],
                    "",
                ))
                .await
                .ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                         "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync",
                         "--disable-dev-shm-usage", "--window-size=1280,1400",
                         format!("--user-data-dir={}", profile.path().display())],
            }
        }}});
        let started = post_json(&format!("{base}/session"), &caps).await;
        let session = started["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {started}"))
            .to_string();
        Browser {
            driver,
            base,
            session,
            profile,
        }
    }

    /// The browser's profile directory, which its command line names.
    fn profile_dir(&self) -> String {
        self.profile.path().display().to_string()
    }

    fn url(&self, path: &str) -> String {
        format!("{}/session/{}{path}", self.base, self.session)
    }

    async fn go(&self, to: &str) {
        post_json(&self.url("/url"), &json!({"url": to})).await;
    }

    /// Runs `script` (a function body) in the page and gives back its `return` value.
    async fn eval(&self, script: &str) -> Value {
        let r = post_json(
            &self.url("/execute/sync"),
            &json!({"script": script, "args": []}),
        )
        .await;
        r["value"].clone()
    }

    /// Saves a PNG of the window as `<target>/dashboard-screenshots/<name>.png`.
    async fn screenshot(&self, name: &str) -> std::path::PathBuf {
        use base64::Engine as _;
        let r = send(request(
            http::Method::GET,
            &self.url("/screenshot"),
            &[],
            "",
        ))
        .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r.json()["value"].as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .unwrap()
            .join("dashboard-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The session first: ending it is what makes chromedriver close Chromium. Killed with a
        // session open, chromedriver leaves the browser running, orphaned, after the tests.
        let _ = end_session(&self.base, &self.session);
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// WebDriver's `DELETE /session/{id}`, on a blocking socket: a `Drop` cannot await. Returns
/// once chromedriver has answered (it answers when the browser is closed).
fn end_session(base: &str, session: &str) -> std::io::Result<()> {
    use std::io::{Read as _, Write as _};
    let addr = base.trim_start_matches("http://");
    let mut socket = std::net::TcpStream::connect(addr)?;
    socket.set_read_timeout(Some(std::time::Duration::from_secs(20)))?;
    write!(
        socket,
        "DELETE /session/{session} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    socket.read_to_end(&mut Vec::new())?;
    Ok(())
}

async fn post_json(url: &str, body: &Value) -> Value {
    let r = send(request(
        http::Method::POST,
        url,
        &[("content-type", "application/json")],
        body.to_string(),
    ))
    .await;
    assert!(r.status.is_success(), "{url}: {} {:?}", r.status, r.body);
    r.json()
}

#[tokio::test]
async fn the_pages_in_a_real_browser_show_the_users_their_budgets_and_one_series_each() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&dashboard_config(&fake, "")).await;
    some_traffic(&proxy).await;
    let admin = proxy.admin_url();
    // Give alice a budget she has used 80 % of: her bar is amber.
    let users = get(&format!("{admin}/api/users"), Some(ADMIN_TOKEN))
        .await
        .json();
    let spent = users["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["user"] == "alice")
        .unwrap()["cost_usd"]
        .as_f64()
        .unwrap();
    let budget = spent / 0.8;
    proxy.edit_config(|c| {
        c.replace(
            "[users.alice.models]",
            &format!("[users.alice.limits]\nmonthly_budget_usd = {budget}\n[users.alice.models]"),
        )
    });
    eventually("the budget is live", || async {
        let u = get(&format!("{admin}/api/users"), Some(ADMIN_TOKEN))
            .await
            .json();
        (u["users"][0]["budget_level"] == "amber").then_some(())
    })
    .await;

    let browser = Browser::start().await;
    // Not signed in: the browser is refused and finds the sign-in form.
    browser.go(&format!("{admin}/")).await;
    let refused = browser
        .eval("return document.querySelector('#why') && document.querySelector('#why').textContent")
        .await;
    assert!(
        refused.as_str().unwrap_or("").contains("admin token"),
        "{refused}"
    );
    browser.go(&format!("{admin}/login")).await;
    browser
        .eval(&format!(
            "document.querySelector('input[name=token]').value = '{ADMIN_TOKEN}';
             document.querySelector('form[action=\"/login\"]').submit(); return true;"
        ))
        .await;
    eventually("the overview after signing in", || async {
        let t = browser.eval("return document.title").await;
        (t.as_str() == Some("Overview · bedrock-gate")).then_some(())
    })
    .await;
    let overview = browser
        .eval(
            "return {
               series: [...document.querySelectorAll('#daily g.series')].map(g => g.dataset.user),
               rects: document.querySelectorAll('#daily g.series rect').length,
               minutes: document.querySelectorAll('#minutes rect.minute').length,
               requests: document.querySelector('[data-field=month-requests]').textContent,
               models: [...document.querySelectorAll('#top-models tr td:first-child')].map(t => t.textContent),
             }",
        )
        .await;
    assert_eq!(overview["series"], json!(["alice", "bob"]), "{overview}");
    assert!(overview["rects"].as_u64().unwrap() >= 2, "{overview}");
    assert_eq!(overview["minutes"], 60, "{overview}");
    assert_eq!(overview["requests"], "6", "{overview}");
    let shot = browser.screenshot("overview").await;
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000, "{shot:?}");

    // Live: a new call shows without a reload.
    browser.eval("window.__same_page = true; return true").await;
    assert_eq!(converse(&proxy, SONNET, BOB_KEY).await.status, 200);
    proxy.shipped().await;
    eventually("the overview updates itself", || async {
        let v = browser
            .eval(
                "return [window.__same_page === true,
                         document.querySelector('[data-field=month-requests]').textContent]",
            )
            .await;
        (v == json!([true, "7"])).then_some(())
    })
    .await;

    browser.go(&format!("{admin}/users")).await;
    let table = browser
        .eval(
            "return [...document.querySelectorAll('#users tr[data-user]')].map(r => ({
               user: r.dataset.user,
               usd: Number(r.querySelector('.cost').dataset.usd),
               bar: r.querySelector('.bar') ? r.querySelector('.bar').className : null,
               requests: r.querySelector('.requests').textContent,
             }))",
        )
        .await;
    let rows = table.as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["user"].as_str().unwrap()).collect();
    assert_eq!(names, ["alice", "bob"], "{table}");
    assert_eq!(rows[0]["bar"], "bar amber", "alice at 80 %: {table}");
    assert_eq!(rows[0]["requests"], "4");
    assert!(
        (rows[0]["usd"].as_f64().unwrap() - spent).abs() < 1e-12,
        "{table}"
    );
    assert_eq!(rows[1]["bar"], Value::Null, "bob has no budget: {table}");
    assert_eq!(rows[1]["requests"], "3");
    browser.screenshot("users").await;

    browser.go(&format!("{admin}/users/alice")).await;
    let detail = browser
        .eval(
            "return {
               models: document.querySelectorAll('#models tr td:first-child').length,
               recent: document.querySelectorAll('#recent tr').length - 1,
             }",
        )
        .await;
    assert_eq!(detail["models"], 2, "{detail}");
    assert_eq!(detail["recent"], 4, "{detail}");
    browser.screenshot("user-alice").await;

    // Nothing of the browser outlives the test.
    let profile = browser.profile_dir();
    drop(browser);
    eventually("Chromium has exited", || async {
        (!running_with(&profile)).then_some(())
    })
    .await;
}

/// Whether a process on this machine has `arg` in its command line.
fn running_with(arg: &str) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|p| {
        std::fs::read(p.path().join("cmdline"))
            .is_ok_and(|c| c.windows(arg.len()).any(|w| w == arg.as_bytes()))
    })
}

const CLIENT_ID: &str = "bedrock-gate-admin-test";
const SECRET: &str = "admin-test-client-secret";

/// Follows an admin's sign-in through the fake IdP from `/login/sso` to the callback's
/// answer; returns it and the session cookie (`name=value`) it set, if any.
async fn sso_sign_in(admin: &str) -> (Reply, Option<String>) {
    let to_idp = get(&format!("{admin}/login/sso"), None).await;
    assert_eq!(to_idp.status, 303, "{:?}", to_idp.body);
    let bind = to_idp.headers["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let at_idp = get(to_idp.headers["location"].to_str().unwrap(), None).await;
    assert_eq!(at_idp.status, 302, "{:?}", at_idp.body);
    let back = at_idp.headers["location"].to_str().unwrap().to_string();
    assert!(
        back.starts_with(&format!("{admin}/oauth/callback?")),
        "{back}"
    );
    let answer = send(request(
        http::Method::GET,
        &back,
        &[("cookie", bind.as_str())],
        "",
    ))
    .await;
    let session = answer
        .headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("bedrock_gate_admin_session=") && !c.contains("Max-Age=0"))
        .map(|c| c.split(';').next().unwrap().to_string());
    (answer, session)
}

#[tokio::test]
async fn admins_sign_in_through_the_idp_by_group_or_email_and_nobody_else_does() {
    use crate::common::idp::{FakeIdp, Identity};
    let fake = FakeBedrock::start().await;
    let idp = FakeIdp::start(CLIENT_ID, SECRET).await;
    let port = free_port();
    let config = two_user_config(
        &fake,
        &format!(
            "[oidc]\nissuer = \"{}\"\nclient_id = \"{CLIENT_ID}\"\ngroups_claim = \"groups\"\n\
             sign_ins_per_ip_per_minute = 1000\ntimeout_secs = 2\n\
             [admin]\ngroups = [\"platform\"]\nemails = [\"Erin@Corp.Example\"]\n",
            idp.issuer()
        ),
    );
    let config = format!("public_url = \"http://127.0.0.1:{port}\"\n{config}");
    let listen = format!("127.0.0.1:{port}");
    let proxy = Proxy::start_with_env(
        &config,
        &["--listen", &listen],
        &[("BEDROCK_GATE_OIDC_CLIENT_SECRET", SECRET)],
    )
    .await;
    let admin = proxy.admin_url();
    let login = get(&format!("{admin}/login"), None).await;
    assert!(
        String::from_utf8_lossy(&login.body).contains("href=\"/login/sso\""),
        "the form offers the IdP"
    );

    // A member of `platform`.
    idp.sign_in_as(Identity::new(
        "sub-carol",
        "carol@corp.example",
        &["dev", "platform"],
    ));
    let (answer, session) = sso_sign_in(&admin).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert!(String::from_utf8_lossy(&answer.body).contains("carol@corp.example"));
    let session = session.expect("a session cookie");
    let cookie = [("cookie", session.as_str())];
    let page = send(request(
        http::Method::GET,
        &format!("{admin}/users"),
        &cookie,
        "",
    ))
    .await;
    assert_eq!(page.status, 200);
    // The IdP's redirect came back to the admin listener, not the main one.
    let asked = idp.authorize_requests();
    assert_eq!(
        asked.last().unwrap()["redirect_uri"],
        format!("{admin}/oauth/callback")
    );

    // By email, whatever the case the IdP spells it in.
    idp.sign_in_as(Identity::new("sub-erin", "erin@corp.example", &["finance"]));
    let (answer, session) = sso_sign_in(&admin).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert!(session.is_some());

    // Signed in at the IdP, but neither in the group nor on the list: 403, and no session.
    idp.sign_in_as(Identity::new("sub-dave", "dave@corp.example", &["dev"]));
    let (answer, session) = sso_sign_in(&admin).await;
    assert_eq!(answer.status, 403, "{:?}", answer.body);
    assert!(String::from_utf8_lossy(&answer.body).contains("not an admin"));
    assert!(session.is_none());

    // A callback without the browser's binding cookie, or replayed: refused.
    let to_idp = get(&format!("{admin}/login/sso"), None).await;
    let at_idp = get(to_idp.headers["location"].to_str().unwrap(), None).await;
    let back = at_idp.headers["location"].to_str().unwrap().to_string();
    assert_eq!(get(&back, None).await.status, 400, "no binding cookie");

    // Signing out ends the session at once.
    let out = send(request(
        http::Method::POST,
        &format!("{admin}/logout"),
        &cookie,
        "",
    ))
    .await;
    assert_eq!(out.status, 303);
    let after = send(request(
        http::Method::GET,
        &format!("{admin}/users"),
        &cookie,
        "",
    ))
    .await;
    assert_eq!(after.status, 401);

    // Reached at another address (a port-forward, a proxy): [admin] public_url is where the
    // IdP sends the browser back.
    drop(proxy);
    let config = config.replace(
        "[admin]\n",
        "[admin]\npublic_url = \"https://gate-admin.corp.example/\"\n",
    );
    let proxy = Proxy::start_with_env(
        &config,
        &["--listen", &listen],
        &[("BEDROCK_GATE_OIDC_CLIENT_SECRET", SECRET)],
    )
    .await;
    let to_idp = get(&format!("{}/login/sso", proxy.admin_url()), None).await;
    let location = to_idp.headers["location"].to_str().unwrap();
    assert!(
        location.contains("redirect_uri=https%3A%2F%2Fgate-admin.corp.example%2Foauth%2Fcallback"),
        "{location}"
    );
}
