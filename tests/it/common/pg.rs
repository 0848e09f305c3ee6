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
