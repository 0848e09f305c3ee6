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
