//! A real `redis-server` on a free loopback port, persistence off, killed on drop.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server` (the Debian package, installed by `.ci/run`).
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts one on a free port and waits until it answers PING.
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut server = RedisServer {
            child: None,
            port: super::free_port(),
            dir,
        };
        server.restart();
        server
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (SIGKILL: no goodbye to its clients).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty, and waits until it answers.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.connection().is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A synchronous connection, for the test's own checks.
    pub fn connection(&self) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(self.url())?;
        let mut connection = client.get_connection_with_timeout(Duration::from_secs(2))?;
        redis::cmd("PING").query::<String>(&mut connection)?;
        Ok(connection)
    }

    /// Every key in the database, by SCAN.
    pub fn keys(&self) -> Vec<String> {
        let mut connection = self.connection().expect("redis connection");
        let mut keys: Vec<String> = redis::cmd("SCAN")
            .cursor_arg(0)
            .arg("COUNT")
            .arg(1000)
            .clone()
            .iter(&mut connection)
            .expect("SCAN")
            .collect::<redis::RedisResult<_>>()
            .expect("SCAN");
        keys.sort();
        keys
    }

    /// The number of fields of the hash at `key` (0 when absent).
    pub fn hlen(&self, key: &str) -> u64 {
        let mut connection = self.connection().expect("redis connection");
        redis::cmd("HLEN")
            .arg(key)
            .query(&mut connection)
            .expect("HLEN")
    }

    /// The TTL of `key` in milliseconds (-1: none, -2: no such key).
    pub fn pttl(&self, key: &str) -> i64 {
        let mut connection = self.connection().expect("redis connection");
        redis::cmd("PTTL")
            .arg(key)
            .query(&mut connection)
            .expect("PTTL")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
