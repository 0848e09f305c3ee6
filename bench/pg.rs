//! The PostgreSQL side of the store phases: a database of its own per phase in the cluster
//! `BEDROCK_GATE_PG_URL` names (`source .ci/postgres` starts a throwaway one), dropped at the
//! end, and the CPU time of that cluster's processes, so a phase can charge the database's
//! work to the store instead of calling it noise.

use tokio_postgres::{Client, NoTls};

/// The cluster's URL (a superuser), if one is configured.
pub fn cluster_url() -> Option<String> {
    std::env::var("BEDROCK_GATE_PG_URL")
        .ok()
        .filter(|u| !u.is_empty())
}

/// What a phase prints when there is no cluster.
pub const HOW_TO_ENABLE: &str = "BEDROCK_GATE_PG_URL is not set; `source .ci/postgres` starts a \
     throwaway PostgreSQL and sets it (or point it at a superuser URL of your own)";

/// A fresh database in the cluster, dropped when this goes out of scope.
pub struct Db {
    pub name: String,
    /// `postgres://…/NAME?sslmode=disable`, for `[store] url`.
    pub url: String,
    cluster: String,
}

/// Runs `f` on a runtime of its own (the bench's main thread is not in one).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to PostgreSQL: {e}"));
    tokio::spawn(conn);
    client
}

impl Db {
    pub fn create(cluster: &str, prefix: &str) -> Db {
        let mut b = [0u8; 4];
        getrandom::fill(&mut b).expect("random");
        let name = format!("{prefix}_{}", hex::encode(b));
        // `BENCH_PG_SYNCHRONOUS_COMMIT=off`: commits don't wait for the WAL's fsync, as
        // SQLite's `synchronous = "normal"` doesn't (a crash of the database server, not of
        // the proxy, can lose the last fraction of a second). Default: the server's (`on`).
        let sync = std::env::var("BENCH_PG_SYNCHRONOUS_COMMIT")
            .ok()
            .filter(|v| !v.is_empty());
        block_on(async {
            let c = connect(cluster).await;
            c.batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .expect("create the bench database");
            if let Some(v) = &sync {
                c.batch_execute(&format!(
                    "ALTER DATABASE {name} SET synchronous_commit = '{}'",
                    v.replace('\'', "")
                ))
                .await
                .expect("set synchronous_commit");
            }
        });
        let server = cluster.rsplit_once('/').map_or(cluster, |(s, _)| s);
        Db {
            url: format!("{server}/{name}?sslmode=disable"),
            name,
            cluster: cluster.to_string(),
        }
    }

    /// One query's first row, on a connection of its own.
    pub fn query_one<T>(&self, sql: &str, get: impl FnOnce(&tokio_postgres::Row) -> T) -> T {
        block_on(async {
            let row = connect(&self.url)
                .await
                .query_one(sql, &[])
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            get(&row)
        })
    }

    /// (rows, complete rows) in `requests`.
    pub fn rows(&self) -> (i64, i64) {
        self.query_one(
            "SELECT count(*), count(*) FILTER (WHERE complete) FROM requests",
            |r| (r.get(0), r.get(1)),
        )
    }

    /// Transactions committed in this database so far (the cumulative statistics, which a
    /// backend reports when it goes idle, so read it a second after the load ends).
    pub fn commits(&self) -> i64 {
        self.query_one(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
            |r| r.get(0),
        )
    }

    /// The postmaster's pid: the parent of a backend (this query's).
    pub fn postmaster_pid(&self) -> Option<u32> {
        let backend: i32 = self.query_one("SELECT pg_backend_pid()", |r| r.get(0));
        parent_of(&backend.to_string())
    }

    pub fn size_bytes(&self) -> u64 {
        let n: i64 = self.query_one("SELECT pg_database_size(current_database())", |r| r.get(0));
        u64::try_from(n).unwrap_or(0)
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let (cluster, name) = (self.cluster.clone(), self.name.clone());
        // A database of millions of rows is gigabytes: never leave one behind.
        block_on(async move {
            let c = connect(&cluster).await;
            if let Err(e) = c
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await
            {
                eprintln!("overhead: could not drop database {name}: {e}");
            }
        });
    }
}

/// The parent pid of `pid`, from /proc.
fn parent_of(pid: &str) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime of the postmaster and every process it started (backends, the WAL writer,
/// the checkpointer…), in clock ticks. A backend that exited during a window takes its CPU
/// with it; the proxy's connections stay open, so that is little.
pub fn cluster_ticks(postmaster: u32) -> u64 {
    let mut ticks = crate::sys::process_ticks(&postmaster.to_string()).unwrap_or(0);
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return ticks;
    };
    for p in procs.filter_map(Result::ok) {
        let name = p.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if parent_of(pid) == Some(postmaster) {
            ticks += crate::sys::process_ticks(pid).unwrap_or(0);
        }
    }
    ticks
}
