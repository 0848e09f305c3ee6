//! A database of its own for each test, in the PostgreSQL cluster `.ci/run` starts
//! (`BEDROCK_GATE_PG_URL`, from `.ci/postgres`). Without one the test fails and says how to get
//! it: a skipped test proves nothing.

use tokio_postgres::{Client, NoTls};

/// The cluster's URL (its superuser), or a failure that says how to start one.
pub fn cluster_url() -> String {
    std::env::var("BEDROCK_GATE_PG_URL").unwrap_or_else(|_| {
        panic!(
            "BEDROCK_GATE_PG_URL is not set: these tests need PostgreSQL. Run them through .ci/run, \
             or `source .ci/postgres` first (it starts a throwaway cluster and sets it)"
        )
    })
}

/// A fresh, empty database in the test cluster.
pub struct Db {
    pub name: String,
    /// `postgres://…/NAME?sslmode=disable`, for `[store] url`.
    pub url: String,
}

impl Db {
    pub async fn create() -> Db {
        let mut b = [0u8; 6];
        getrandom::fill(&mut b).expect("random");
        let name = format!("bg_test_{}", hex::encode(b));
        let admin = connect(&cluster_url()).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create the test database");
        let base = cluster_url();
        let server = base.rsplit_once('/').map_or(base.as_str(), |(s, _)| s);
        Db {
            url: format!("{server}/{name}?sslmode=disable"),
            name,
        }
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// The `[store]` table that points a config at this database.
    pub fn store_table(&self) -> String {
        format!("[store]\nurl = \"{}\"\n", self.url)
    }
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to the test cluster: {e}"));
    tokio::spawn(conn);
    client
}

/// A TCP relay in front of the database that a test can cut (every connection dropped, new
/// ones refused) and restore: the database going away as a network sees it.
pub struct Relay {
    pub port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Relay {
    pub async fn start(target: std::net::SocketAddr) -> Relay {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let (up2, cut2) = (up.clone(), cut.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let mut cut_rx = cut2.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Relay { port, up, cut }
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Db {
    /// The database's host:port.
    pub fn addr(&self) -> std::net::SocketAddr {
        let rest = self.url.split_once('@').map_or("", |(_, r)| r);
        let hostport = rest.split('/').next().unwrap_or("");
        hostport
            .parse()
            .expect("the test cluster listens on an IP:port")
    }

    /// This database through `relay`, for `[store] url`.
    pub fn store_table_via(&self, relay: &Relay) -> String {
        let url = self.url.replacen(
            &self.addr().to_string(),
            &format!("127.0.0.1:{}", relay.port),
            1,
        );
        format!("[store]\nurl = \"{url}\"\n")
    }
}

/// A PostgreSQL cluster of a test's own, which it may stop and start (the shared cluster keeps
/// serving the other tests). Made with `BEDROCK_GATE_PG_BIN` and `BEDROCK_GATE_PG_AS` from
/// `.ci/postgres`; stopped and removed on drop.
pub struct Cluster {
    dir: std::path::PathBuf,
    pub port: u16,
}

fn env_or_fail(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: `source .ci/postgres` first (.ci/run does)"))
}

impl Cluster {
    fn as_owner(args: &[&str]) -> std::process::Output {
        let prefix = env_or_fail("BEDROCK_GATE_PG_AS");
        let mut words = prefix.split_whitespace();
        let program = words.next().expect("a command");
        std::process::Command::new(program)
            .args(words)
            .args(args)
            .output()
            .expect("run a PostgreSQL command")
    }

    fn bin(name: &str) -> String {
        format!("{}/{name}", env_or_fail("BEDROCK_GATE_PG_BIN"))
    }

    fn owner() -> String {
        env_or_fail("BEDROCK_GATE_PG_AS")
            .split_whitespace()
            .nth(1)
            .expect("pg_ctl_as USER")
            .to_string()
    }

    pub async fn start() -> Cluster {
        let mut b = [0u8; 6];
        getrandom::fill(&mut b).expect("random");
        let dir = std::env::temp_dir().join(format!("bedrock-gate-pg-own-{}", hex::encode(b)));
        std::fs::create_dir_all(&dir).expect("cluster dir");
        if is_root() {
            let chown = std::process::Command::new("chown")
                .arg(Self::owner())
                .arg(&dir)
                .output()
                .expect("chown");
            assert!(chown.status.success(), "chown: {chown:?}");
        }
        let data = dir.join("data");
        let out = Self::as_owner(&[
            &Self::bin("initdb"),
            "-D",
            data.to_str().unwrap(),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        ]);
        assert!(out.status.success(), "initdb: {out:?}");
        let port = crate::common::free_port();
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\nfsync = off\n",
            dir.display()
        );
        let path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path).expect("postgresql.conf");
        text.push_str(&conf);
        // The owner's file: written through a shell run as the owner.
        let mut child = {
            let prefix = env_or_fail("BEDROCK_GATE_PG_AS");
            let mut words = prefix.split_whitespace();
            std::process::Command::new(words.next().unwrap())
                .args(words)
                .args(["sh", "-c", &format!("cat > '{}'", path.display())])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .expect("write postgresql.conf")
        };
        {
            use std::io::Write as _;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
        }
        assert!(child.wait().unwrap().success());
        let cluster = Cluster { dir, port };
        cluster.start_again();
        cluster
    }

    fn pg_ctl(&self, args: &[&str]) -> std::process::Output {
        let data = self.dir.join("data");
        let log = self.dir.join("log");
        let mut all = vec![
            Self::bin("pg_ctl"),
            "-D".into(),
            data.to_str().unwrap().to_string(),
            "-l".into(),
            log.to_str().unwrap().to_string(),
            "-w".into(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        Self::as_owner(&all.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Starts the (stopped) cluster and waits until it takes connections.
    pub fn start_again(&self) {
        let out = self.pg_ctl(&["start"]);
        assert!(out.status.success(), "pg_ctl start: {out:?}");
    }

    /// Stops the cluster as an operator would (`pg_ctl stop -m fast`: connections are cut).
    pub fn stop(&self) {
        let out = self.pg_ctl(&["-m", "fast", "stop"]);
        assert!(out.status.success(), "pg_ctl stop: {out:?}");
    }

    /// A fresh database in this cluster.
    pub async fn database(&self) -> Db {
        let admin = connect(&format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            self.port
        ))
        .await;
        admin
            .batch_execute("CREATE DATABASE bg_own")
            .await
            .expect("create the database");
        Db {
            name: "bg_own".into(),
            url: format!(
                "postgres://postgres@127.0.0.1:{}/bg_own?sslmode=disable",
                self.port
            ),
        }
    }
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["-m", "immediate", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
