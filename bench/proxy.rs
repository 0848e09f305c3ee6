//! The proxy under test: the real `bedrock-gate` binary (built by cargo with the bench profile)
//! as a child process, with a config in a temp dir pointing at the fake, dummy AWS credentials,
//! its default log level, and stderr in a file next to the config.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The key the benchmark's user calls with.
pub const KEY: &str = "bgk_bench_0123456789abcdefghijklmnopqrstuvwxyzABCDE";
/// The dashboard's admin token, with [`Setup::admin`].
pub const ADMIN_TOKEN: &str = "bgadmin_bench_0123456789abcdefghijklmnopqrstuvwxyz";

/// A running `bedrock-gate serve`.
pub struct Proxy {
    pub addr: SocketAddr,
    /// The admin listener (the dashboard), with [`Setup::admin`].
    pub admin: Option<SocketAddr>,
    child: Child,
    dir: tempfile::TempDir,
    ledger: PathBuf,
}

impl Proxy {
    /// Writes the config (one user, each model mapped to its profile ARN) and starts the proxy on
    /// a free port; returns once it printed its address.
    pub fn start(upstream: SocketAddr, models: &[(&str, &str)]) -> Proxy {
        Proxy::start_on(upstream, models, None)
    }

    /// As [`Proxy::start`], on the ledger at `ledger` (a fresh one in the temp dir if `None`).
    pub fn start_on(
        upstream: SocketAddr,
        models: &[(&str, &str)],
        ledger: Option<&std::path::Path>,
    ) -> Proxy {
        Proxy::start_with(
            upstream,
            models,
            &Setup {
                ledger: ledger.map(std::path::Path::to_path_buf),
                ..Setup::default()
            },
        )
    }

    /// As [`Proxy::start`], set up as `setup` says.
    pub fn start_with(upstream: SocketAddr, models: &[(&str, &str)], setup: &Setup) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("bedrock-gate.toml");
        let ledger = setup.ledger.clone().unwrap_or_else(|| {
            if setup.ledger_in_subdir {
                let sub = dir.path().join("ledger");
                std::fs::create_dir(&sub).expect("ledger dir");
                sub.join("ledger.db")
            } else {
                dir.path().join("ledger.db")
            }
        });
        let mut config = config_with(upstream, models, &ledger, setup.store_url.as_deref());
        if setup.admin {
            use sha2::Digest as _;
            config = config.replace("admin_listen = \"\"", "admin_listen = \"127.0.0.1:0\"");
            config.push_str(&format!(
                "\n[admin]\ntoken_sha256 = \"sha256:{}\"\n",
                hex::encode(sha2::Sha256::digest(ADMIN_TOKEN.as_bytes()))
            ));
        }
        std::fs::write(&config_path, config).expect("write config");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("stderr file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_bedrock-gate"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            // Hermetic: no ~/.aws config or credentials from the machine.
            .env("HOME", dir.path())
            .env("AWS_ACCESS_KEY_ID", "AKIDBENCHEXAMPLE")
            .env(
                "AWS_SECRET_ACCESS_KEY",
                "bench/secret/key/not/a/real/one/EXAMPLE",
            )
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn bedrock-gate");
        let stdout = child.stdout.take().expect("stdout");
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let (mut addr, mut admin) = (None, None);
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            let l = line.trim();
            if let Some(a) = l.strip_prefix("bedrock-gate listening on http://") {
                addr = a.parse().ok();
            } else if let Some(a) = l.strip_prefix("bedrock-gate admin listening on http://") {
                admin = a.parse().ok();
            }
            if addr.is_some() && (admin.is_some() || !setup.admin) {
                break;
            }
            line.clear();
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        let Some(addr) = addr else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "bedrock-gate did not start; stderr:\n{}",
                std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default()
            );
        };
        Proxy {
            addr,
            admin,
            child,
            dir,
            ledger,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn ledger_path(&self) -> PathBuf {
        self.ledger.clone()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// SIGTERM, then waits up to a minute for the exit (the ledger is committed by then).
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .is_ok_and(|s| s.success());
        if !sent {
            return None;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How a proxy is set up beyond its models.
#[derive(Debug, Default, Clone)]
pub struct Setup {
    /// The SQLite ledger (`ledger.path`); `None`: a fresh one in the temp dir.
    pub ledger: Option<PathBuf>,
    /// The fresh ledger goes into a directory of its own, not the config's (as in the Docker
    /// image), so its writes don't wake the config watcher.
    pub ledger_in_subdir: bool,
    /// `[store] url`: the ledger lives in PostgreSQL (`ledger.path` then only holds sign-in
    /// sessions).
    pub store_url: Option<String>,
    /// The admin listener on a free port, with an admin token ([`ADMIN_TOKEN`]).
    pub admin: bool,
}

pub fn config(upstream: SocketAddr, models: &[(&str, &str)], ledger: &std::path::Path) -> String {
    config_with(upstream, models, ledger, None)
}

/// The config, with a `[store]` table when `store_url` is set.
pub fn config_with(
    upstream: SocketAddr,
    models: &[(&str, &str)],
    ledger: &std::path::Path,
    store_url: Option<&str>,
) -> String {
    use sha2::Digest as _;
    let hash = hex::encode(sha2::Sha256::digest(KEY.as_bytes()));
    let mut s = format!(
        r#"listen = "127.0.0.1:0"
admin_listen = ""

[aws]
region = "us-east-1"
runtime_endpoint = "http://{upstream}"
control_endpoint = "http://{upstream}"

[ledger]
path = "{ledger}"
{synchronous}

{store}
[users.bench]
keys = ["sha256:{hash}"]

[users.bench.models]
"#,
        ledger = ledger.display(),
        // To measure what each sync level costs: `normal` (the default) or `full`.
        synchronous = std::env::var("BENCH_LEDGER_SYNCHRONOUS")
            .map(|v| format!("synchronous = \"{v}\""))
            .unwrap_or_default(),
        // A stable replica name, as a deployment gives each replica.
        store = store_url
            .map(|url| format!("[store]\nurl = \"{url}\"\nreplica = \"bench\"\n"))
            .unwrap_or_default(),
    );
    for (model, arn) in models {
        s.push_str(&format!("\"{model}\" = \"{arn}\"\n"));
    }
    s
}
