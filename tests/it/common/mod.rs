//! Test helpers: start the real `bedrock-gate` binary on port 0 with a temp config, a fake
//! Bedrock on 127.0.0.1:0, and a plain HTTP client for raw requests.
#![allow(dead_code)]

pub mod billing;
pub mod control;
pub mod fake;
pub mod idp;
pub mod pg;
pub mod sigv4;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub use fake::FakeBedrock;

pub const SONNET: &str = "anthropic.claude-sonnet-4-5-20250929-v1:0";
pub const HAIKU: &str = "anthropic.claude-haiku-4-5-20251001-v1:0";
pub const OPUS: &str = "anthropic.claude-opus-4-1-20250805-v1:0";

pub const ALICE_KEY: &str = "bgk_test_alice_0123456789abcdefghijklmnopqrstu";
pub const BOB_KEY: &str = "bgk_test_bob_0123456789abcdefghijklmnopqrstuvw";

pub fn arn(region: &str, id: &str) -> String {
    format!("arn:aws:bedrock:{region}:123456789012:application-inference-profile/{id}")
}

pub fn alice_sonnet() -> String {
    arn("us-east-1", "alicesonnet1")
}
pub fn alice_haiku() -> String {
    arn("us-west-2", "alicehaiku1")
}
pub fn bob_sonnet() -> String {
    arn("us-east-1", "bobsonnet1")
}

pub fn hash(key: &str) -> String {
    use sha2::Digest;
    format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(key.as_bytes()))
    )
}

/// The standard two-user config pointing at the fake.
pub fn two_user_config(fake: &FakeBedrock, extra: &str) -> String {
    format!(
        r#"
[aws]
region = "us-east-1"
runtime_endpoint = "{url}"
control_endpoint = "{url}"
{extra}
[users.alice]
keys = ["{ka}"]
[users.alice.models]
"{SONNET}" = "{a_sonnet}"
"{HAIKU}" = "{a_haiku}"
[users.bob]
keys = ["{kb}"]
[users.bob.models]
"{SONNET}" = "{b_sonnet}"
"#,
        url = fake.url(),
        ka = hash(ALICE_KEY),
        kb = hash(BOB_KEY),
        a_sonnet = alice_sonnet(),
        a_haiku = alice_haiku(),
        b_sonnet = bob_sonnet(),
    )
}

/// A port on 127.0.0.1 that was free a moment ago (nothing listens on it now).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Alice alone, mapping Sonnet, with Bedrock Runtime at `runtime_endpoint`; `extra` is
/// appended (more tables).
pub fn alice_config(runtime_endpoint: &str, extra: &str) -> String {
    format!(
        "[aws]\nruntime_endpoint = \"{runtime_endpoint}\"\n[users.alice]\nkeys = [\"{}\"]\n[users.alice.models]\n\"{SONNET}\" = \"{}\"\n{extra}",
        hash(ALICE_KEY),
        alice_sonnet()
    )
}

/// Alice alone, with a runtime endpoint where nothing listens, so every connect fails.
pub fn unreachable_upstream_config() -> String {
    alice_config(&format!("http://127.0.0.1:{}", free_port()), "")
}

/// The real binary, running on a free port with a temp config and dummy AWS credentials.
pub struct Proxy {
    /// `http` or `https`.
    pub scheme: String,
    /// host:port of the main listener.
    pub addr: String,
    /// The admin (metrics) listener.
    pub admin_addr: String,
    child: Child,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    logs: Arc<Mutex<String>>,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_bedrock-gate")
}

/// A command for the binary with a hermetic AWS environment: dummy static credentials, no
/// shared config files, and no instance-metadata lookups.
pub fn command(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(binary());
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("AWS_ACCESS_KEY_ID", sigv4::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", sigv4::SECRET_KEY)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", dir.join("no-aws-config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            dir.join("no-aws-credentials"),
        )
        .env("RUST_LOG", "info");
    cmd
}

/// What one run of an admin command printed and how it ended.
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit ok={}\n--- stdout\n{}--- stderr\n{}",
            self.ok, self.stdout, self.stderr
        )
    }
}

impl Proxy {
    /// `bedrock-gate usage --by user --format json` on this proxy's config: the month so far.
    pub async fn usage_by_user(&self) -> serde_json::Value {
        let config = self.config_path.to_str().expect("utf-8 path").to_string();
        let usage = run(
            self.dir.path(),
            &["usage", "--by", "user", "--format", "json", "-c", &config],
        )
        .await;
        assert!(usage.ok, "{usage}");
        serde_json::from_str(usage.stdout.trim()).expect("usage prints JSON")
    }
}

/// Runs the binary with `args` in `dir` (see [`command`]) to its end.
pub async fn run(dir: &std::path::Path, args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::from(command(dir));
    let out = cmd.args(args).output().await.expect("run the binary");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Which ledger the proxies of this test run keep: `BEDROCK_GATE_TEST_STORE=postgres` puts
/// every proxy whose config names no store on a fresh PostgreSQL database of its own (the
/// ledger-facing tests run once on each store; see `.ci/run`).
pub const TEST_STORE_ENV: &str = "BEDROCK_GATE_TEST_STORE";

/// Marks a config whose test is about the SQLite file itself: it stays there under
/// `BEDROCK_GATE_TEST_STORE=postgres`.
pub fn sqlite_only(config: &str) -> String {
    format!("{config}\n{SQLITE_ONLY}\n")
}

const SQLITE_ONLY: &str = "# test: the SQLite ledger";

async fn with_test_store(config: &str) -> String {
    match std::env::var(TEST_STORE_ENV).as_deref() {
        Ok("postgres") if store_url_in(config).is_none() && !config.contains(SQLITE_ONLY) => {
            let db = pg::Db::create().await;
            format!("{config}\n{}", db.store_table())
        }
        Ok("postgres" | "sqlite") | Err(_) => config.to_string(),
        Ok(other) => panic!("{TEST_STORE_ENV}={other}: say postgres or sqlite"),
    }
}

/// The `[store] url` a config names, if its ledger is in PostgreSQL.
pub fn store_url_in(config: &str) -> Option<String> {
    let value: toml::Table = config.parse().ok()?;
    Some(value.get("store")?.get("url")?.as_str()?.to_string())
}

impl Proxy {
    /// The PostgreSQL database the proxy's ledger is in, if not the SQLite file.
    pub fn store_url(&self) -> Option<String> {
        store_url_in(&std::fs::read_to_string(&self.config_path).ok()?)
    }

    pub async fn start(config: &str) -> Proxy {
        Self::start_with_args(config, &[]).await
    }

    /// The spool of this proxy's ledger, the file its answers commit to: `[store] spool_path`
    /// for PostgreSQL, `<ledger>-spool` beside the SQLite file.
    fn spool_path(&self) -> std::path::PathBuf {
        let config: Option<toml::Table> = std::fs::read_to_string(&self.config_path)
            .ok()
            .and_then(|c| c.parse().ok());
        let store = config.as_ref().and_then(|c| c.get("store"));
        if store.is_some_and(|s| s.get("url").is_some()) {
            let name = store
                .and_then(|s| s.get("spool_path"))
                .and_then(|p| p.as_str())
                .unwrap_or("bedrock-gate.spool");
            return self.dir.path().join(name);
        }
        bedrock_gate::meter::ledger::spool_path_of(&self.ledger_path())
    }

    /// Whether everything this proxy's answers committed is in the database (its spool is
    /// empty).
    pub fn is_shipped(&self) -> bool {
        std::fs::metadata(self.spool_path()).map_or(true, |m| m.len() == 0)
    }

    /// Waits until [`Proxy::is_shipped`]: an answer ends once its row is in the spool, and the
    /// row reaches the database a moment later.
    pub async fn shipped(&self) {
        eventually("the proxy's spool is shipped to the store", || async {
            self.is_shipped().then_some(())
        })
        .await;
    }

    pub async fn start_with_args(config: &str, args: &[&str]) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = with_test_store(config).await;
        std::fs::write(dir.path().join("bedrock-gate.toml"), config).expect("write config");
        Self::launch(dir, args, &[]).await
    }

    /// Like [`Proxy::start_with_args`], with extra environment (e.g. `RUST_LOG` to observe a
    /// step that has no other outward sign).
    pub async fn start_with_env(config: &str, args: &[&str], env: &[(&str, &str)]) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = with_test_store(config).await;
        std::fs::write(dir.path().join("bedrock-gate.toml"), config).expect("write config");
        Self::launch(dir, args, env).await
    }

    /// Stops this proxy with SIGTERM and starts a new one on the same directory (config and
    /// ledger), as an operator's restart would.
    pub async fn restart(mut self, args: &[&str]) -> Proxy {
        let status = self.terminate();
        assert!(
            status.success(),
            "exit status {status:?}; log:\n{}",
            self.logs()
        );
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
        Self::launch(dir, args, &[]).await
    }

    /// Kills this proxy with SIGKILL, as a crash would (nothing is flushed or closed), and
    /// starts a new one on the same directory (config and ledger).
    pub async fn kill9(self, args: &[&str]) -> Proxy {
        let dir = self.crash();
        Self::launch(dir, args, &[]).await
    }

    /// Kills this proxy with SIGKILL and hands back its directory, for a test that changes
    /// the world before [`Proxy::relaunch`].
    pub fn crash(mut self) -> tempfile::TempDir {
        // `Child::kill` is SIGKILL on Unix.
        self.child.kill().expect("SIGKILL");
        let status = self.child.wait().expect("wait");
        assert!(!status.success(), "killed, not exited: {status:?}");
        std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"))
    }

    /// Starts a proxy on the directory (config and ledger) of one that [`Proxy::crash`]ed.
    pub async fn relaunch(dir: tempfile::TempDir, args: &[&str]) -> Proxy {
        Self::launch(dir, args, &[]).await
    }

    async fn launch(dir: tempfile::TempDir, args: &[&str], env: &[(&str, &str)]) -> Proxy {
        let config_path = dir.path().join("bedrock-gate.toml");
        let mut cmd = command(dir.path());
        cmd.envs(env.iter().copied());
        let mut child = cmd
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--admin-listen")
            .arg("127.0.0.1:0")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn bedrock-gate");
        let logs = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().expect("lock");
                l.push_str(&line);
                l.push('\n');
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let addrs = tokio::task::spawn_blocking(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let mut main = None;
            while reader.read_line(&mut line).ok()? > 0 {
                let l = line.trim();
                if let Some(a) = l.strip_prefix("bedrock-gate listening on ") {
                    main = Some(a.to_string());
                } else if let Some(a) = l.strip_prefix("bedrock-gate admin listening on http://") {
                    let admin = a.to_string();
                    // Keep draining stdout so the child never blocks on a full pipe.
                    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
                    return Some((main?, admin));
                }
                line.clear();
            }
            None
        })
        .await
        .expect("join");
        let Some((addr, admin_addr)) = addrs else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "bedrock-gate did not start; stderr:\n{}",
                logs.lock().expect("lock")
            );
        };
        let (scheme, addr) = addr.split_once("://").expect("scheme://addr");
        Proxy {
            scheme: scheme.to_string(),
            addr: addr.to_string(),
            admin_addr,
            child,
            dir,
            config_path,
            logs,
        }
    }

    /// The listener's base URL, `https://` when the config turned TLS on.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    /// The ledger database (the default path, next to the config).
    pub fn ledger_path(&self) -> PathBuf {
        self.dir.path().join("bedrock-gate.db")
    }

    /// Sends SIGTERM and waits for a clean exit; the ledger is flushed by then.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(ok.success());
        self.wait_exit(Duration::from_secs(60))
            .expect("bedrock-gate did not exit after SIGTERM")
    }

    /// Everything the proxy wrote to stderr so far.
    pub fn logs(&self) -> String {
        self.logs.lock().expect("lock").clone()
    }

    /// Everything the proxy logged up to now, once it is all written out: waits out the log
    /// writer's interval (`logging::FLUSH_EVERY`) first. For checks that a line is *absent*,
    /// which could not fail on lines still in the proxy's buffer.
    pub async fn settled_logs(&self) -> String {
        tokio::time::sleep(bedrock_gate::logging::FLUSH_EVERY + Duration::from_millis(500)).await;
        self.logs()
    }

    /// The main listener's `/healthz`.
    pub async fn health(&self) -> serde_json::Value {
        send(request(
            Method::GET,
            &format!("{}/healthz", self.url()),
            &[],
            "",
        ))
        .await
        .json()
    }

    /// GETs `path` on the admin listener (the dashboard) with `Authorization: Bearer token`.
    pub async fn admin_get(&self, path: &str, token: &str) -> Reply {
        send(request(
            Method::GET,
            &format!("{}{path}", self.admin_url()),
            &[("authorization", &format!("Bearer {token}"))],
            "",
        ))
        .await
    }

    /// Waits until the log contains `needle` (log lines are written when a response body ends).
    pub async fn wait_for_log(&self, needle: &str) -> String {
        for _ in 0..200 {
            let l = self.logs();
            if l.contains(needle) {
                return l;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("log never contained {needle:?}:\n{}", self.logs());
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it yields `Some`, for up to ten seconds. Reload and background work
/// are asynchronous by design; tests wait for the effect instead of sleeping a guessed time.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..400 {
        if let Some(v) = check().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("never happened: {what}");
}

impl Proxy {
    /// Rewrites the config file in place (the running proxy reloads it).
    pub fn edit_config(&self, edit: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(&self.config_path).expect("read config");
        std::fs::write(&self.config_path, edit(text)).expect("write config");
    }
}

/// A POST with a bearer key, for tests that read the response body themselves.
pub fn keyed(proxy: &Proxy, path: &str, key: &str, body: &str) -> Request<Full<Bytes>> {
    request(
        Method::POST,
        &format!("{}{path}", proxy.url()),
        &[("authorization", &format!("Bearer {key}"))],
        body.to_string(),
    )
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// A complete response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn error_type(&self) -> String {
        self.headers
            .get("x-amzn-errortype")
            .map(|v| v.to_str().expect("text").to_string())
            .unwrap_or_default()
    }

    pub fn message(&self) -> String {
        self.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

pub fn request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(body.into())).expect("request")
}

pub async fn send(req: Request<Full<Bytes>>) -> Reply {
    let resp = client().request(req).await.expect("send");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// POST to the proxy with a bearer key.
pub async fn post(proxy: &Proxy, path: &str, key: &str, body: &str) -> Reply {
    let auth = format!("Bearer {key}");
    send(request(
        Method::POST,
        &format!("{}{path}", proxy.url()),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body.to_string(),
    ))
    .await
}

/// The admin listener's `/metrics` text.
pub async fn metrics_text(proxy: &Proxy) -> String {
    let r = send(request(
        Method::GET,
        &format!("{}/metrics", proxy.admin_url()),
        &[],
        "",
    ))
    .await;
    assert_eq!(r.status, 200, "GET /metrics");
    String::from_utf8_lossy(&r.body).into_owned()
}

/// A Converse call to `model` with a bearer key.
pub async fn converse(proxy: &Proxy, model: &str, key: &str) -> Reply {
    post(
        proxy,
        &format!("/model/{model}/converse"),
        key,
        CONVERSE_BODY,
    )
    .await
}

/// Starts alice's invoke-with-response-stream on Sonnet and reads its first event: the call is
/// in flight, its rest held back by the fake's [`FakeBedrock::gate_streams`] gate (take the
/// gate before).
pub async fn alice_stream_in_flight(proxy: &Proxy) -> hyper::body::Incoming {
    use http_body_util::BodyExt as _;
    let req = keyed(
        proxy,
        &format!("/model/{SONNET}/invoke-with-response-stream"),
        ALICE_KEY,
        INVOKE_BODY,
    );
    let mut body = client().request(req).await.unwrap().into_body();
    body.frame().await.unwrap().unwrap();
    body
}

pub const INVOKE_BODY: &str = r#"{"anthropic_version":"bedrock-2023-05-31","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}"#;
pub const CONVERSE_BODY: &str = r#"{"messages":[{"role":"user","content":[{"text":"hi"}]}]}"#;

/// One ledger row, as the tests of both fronts read it.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerRow {
    pub user: Option<String>,
    pub front: Option<String>,
    pub operation: String,
    pub model: Option<String>,
    pub profile: Option<String>,
    pub status: i64,
    /// input, output, cache read, cache write
    pub tokens: (i64, i64, i64, i64),
    pub complete: bool,
    pub outcome: String,
    pub project: Option<String>,
    pub session: Option<String>,
}

/// Runs `sql` (SQLite's dialect) on the proxy's ledger and maps each row. The SQLite file is
/// opened as a separate view; a ledger in PostgreSQL has its `requests` copied into an
/// in-memory SQLite table of the same columns first, so one query checks either store.
pub fn ledger_query<T>(
    proxy: &Proxy,
    sql: &str,
    mut row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Vec<T> {
    // The rows of answers that ended may still be on their way from the spool.
    for _ in 0..400 {
        if proxy.is_shipped() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let conn = match proxy.store_url() {
        Some(url) => pg_requests_in_memory(&url),
        None => rusqlite::Connection::open(proxy.ledger_path()).expect("open the ledger"),
    };
    let Ok(mut stmt) = conn.prepare(sql) else {
        // No table yet: the proxy has not written its first row.
        if conn.prepare("SELECT 1 FROM requests").is_err() {
            return Vec::new();
        }
        panic!("ledger query: {sql}");
    };
    stmt.query_map([], &mut row)
        .expect("ledger query")
        .collect::<Result<_, _>>()
        .expect("ledger rows")
}

/// The store's `requests` table, copied into an in-memory SQLite table with the same column
/// names, in `id` order. Runs on a thread of its own (the tests' runtime may not block).
fn pg_requests_in_memory(url: &str) -> rusqlite::Connection {
    use tokio_postgres::types::Type;
    let url = url.to_string();
    let rows = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let client = pg::connect(&url).await;
            client
                .query("SELECT * FROM requests ORDER BY id", &[])
                .await
                .unwrap_or_default()
        })
    })
    .join()
    .expect("read the store");
    let conn = rusqlite::Connection::open_in_memory().expect("memory");
    let Some(first) = rows.first() else {
        return conn;
    };
    let names: Vec<String> = first
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    conn.execute_batch(&format!(
        "CREATE TABLE requests ({})",
        names
            .iter()
            .map(|n| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(", ")
    ))
    .expect("create");
    let insert = format!(
        "INSERT INTO requests VALUES ({})",
        (1..=names.len())
            .map(|i| format!("?{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut stmt = conn.prepare(&insert).expect("insert");
    for r in &rows {
        let values: Vec<rusqlite::types::Value> = r
            .columns()
            .iter()
            .enumerate()
            .map(|(i, c)| {
                use rusqlite::types::Value as V;
                let t = c.type_();
                let v = if *t == Type::INT8 {
                    r.get::<_, Option<i64>>(i).map(V::Integer)
                } else if *t == Type::INT4 {
                    r.get::<_, Option<i32>>(i).map(|v| V::Integer(v.into()))
                } else if *t == Type::BOOL {
                    r.get::<_, Option<bool>>(i).map(|v| V::Integer(v.into()))
                } else if *t == Type::FLOAT8 {
                    r.get::<_, Option<f64>>(i).map(V::Real)
                } else {
                    r.get::<_, Option<String>>(i).map(V::Text)
                };
                v.unwrap_or(V::Null)
            })
            .collect();
        stmt.execute(rusqlite::params_from_iter(values))
            .expect("copy a row");
    }
    drop(stmt);
    conn
}

/// The ledger's rows so far, in order.
pub fn ledger(proxy: &Proxy) -> Vec<LedgerRow> {
    ledger_query(
        proxy,
        "SELECT user, front, operation, model, profile_arn, status, input_tokens, output_tokens,
                cache_read_tokens, cache_write_tokens, complete, outcome, project, session
         FROM requests ORDER BY rowid",
        |r| {
            Ok(LedgerRow {
                user: r.get(0)?,
                front: r.get(1)?,
                operation: r.get(2)?,
                model: r.get(3)?,
                profile: r.get(4)?,
                status: r.get(5)?,
                tokens: (r.get(6)?, r.get(7)?, r.get(8)?, r.get(9)?),
                complete: r.get(10)?,
                outcome: r.get(11)?,
                project: r.get(12)?,
                session: r.get(13)?,
            })
        },
    )
}

/// Waits until the ledger holds `n` rows (they are committed in the background) and returns them.
pub async fn ledger_with(proxy: &Proxy, n: usize) -> Vec<LedgerRow> {
    eventually(&format!("{n} ledger rows"), || async {
        let rows = ledger(proxy);
        (rows.len() >= n).then_some(rows)
    })
    .await
}

/// A Messages API call with `x-api-key`, as the Anthropic SDKs send it.
pub async fn messages(proxy: &Proxy, key: &str, body: &str, extra: &[(&str, &str)]) -> Reply {
    let mut headers = vec![
        ("x-api-key", key),
        ("content-type", "application/json"),
        ("anthropic-version", "2023-06-01"),
    ];
    headers.extend_from_slice(extra);
    send(request(
        Method::POST,
        &format!("{}/v1/messages", proxy.url()),
        &headers,
        body.to_string(),
    ))
    .await
}

/// A minimal Messages body for `model`.
pub fn messages_body(model: &str, stream: bool) -> String {
    format!(
        r#"{{"model":"{model}","max_tokens":64,"stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#
    )
}

impl Reply {
    /// The Anthropic error envelope's `error.type`.
    pub fn anthropic_error(&self) -> (String, String) {
        let v = self.json();
        assert_eq!(v["type"], "error", "not an Anthropic error: {v}");
        (
            v["error"]["type"].as_str().unwrap_or_default().to_string(),
            v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    }
}

/// A client `.ci/run` installs under `~/.cache/bedrock-gate` (`cached`), or the one `env`
/// names. A missing one fails the test and says how to get it (`what`): a skipped test proves
/// nothing.
pub fn installed_client(env: &str, cached: &str, what: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let p = PathBuf::from(home).join(".cache/bedrock-gate").join(cached);
    assert!(
        p.exists(),
        "{what} is not installed at {}. Run `.ci/run` once (it installs the pinned version) or set {env}.",
        p.display()
    );
    p
}

/// Runs `call(i)` for `i` in `0..n`, `width` at a time, each on its own task; returns what
/// each saw.
pub async fn concurrently<T, F, Fut>(n: usize, width: usize, call: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    use futures_util::StreamExt as _;
    futures_util::stream::iter(0..n)
        .map(|i| tokio::spawn(call(i)))
        .buffer_unordered(width)
        .map(|r| r.expect("client task"))
        .collect()
        .await
}

/// How often each kind was seen; fails unless every one of `kinds` was.
pub fn tally_all<T: Ord + Copy + std::fmt::Debug>(
    seen: &[T],
    kinds: &[T],
) -> std::collections::BTreeMap<T, usize> {
    let mut tally = std::collections::BTreeMap::new();
    for s in seen {
        *tally.entry(*s).or_insert(0usize) += 1;
    }
    for kind in kinds {
        assert!(tally.contains_key(kind), "{kind:?} never seen: {tally:?}");
    }
    tally
}
