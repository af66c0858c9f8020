//! Processes the tests start: run to their end with a limit, or kept running and read as they go.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const SEED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/seed-sample.jsonl");

pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run the tests through scripts/test, which starts infra/local/up"))
}

pub fn toolrank(args: &[&str]) -> Output {
    run(Command::new(env!("CARGO_BIN_EXE_toolrank")).args(args))
}

/// Runs `cmd` to its end (at most `COMMAND_LIMIT`) and requires success.
pub fn run(cmd: &mut Command) -> Output {
    let what = format!("{cmd:?}");
    let out = Running::spawn(cmd.stdout(Stdio::piped()).stderr(Stdio::piped())).wait(COMMAND_LIMIT);
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// The longest any one command of these tests may run: one that hangs fails its test with
/// what it said, instead of stalling the suite.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(420);

/// A spawned command whose piped output is read while it runs (a full pipe would stall
/// it) and whose end is waited for with a limit. Killed if dropped while running, so a
/// failed test leaves no process behind.
pub struct Running {
    pub child: std::process::Child,
    pub what: String,
    pub stdout: Option<std::thread::JoinHandle<Vec<u8>>>,
    pub stderr: Option<std::thread::JoinHandle<Vec<u8>>>,
    /// What it wrote to stderr so far.
    pub said: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Running {
    pub fn spawn(cmd: &mut Command) -> Running {
        let what = format!("{cmd:?}");
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{what}: {e}"));
        let said = std::sync::Arc::default();
        let (stdout, stderr) = (read_all(child.stdout.take(), Default::default()), read_all(child.stderr.take(), std::sync::Arc::clone(&said)));
        Running { child, what, stdout, stderr, said }
    }

    /// What it wrote to stderr so far (while it runs).
    pub fn said(&self) -> String {
        String::from_utf8_lossy(&self.said.lock().unwrap()).into_owned()
    }

    pub fn signal(&self, which: &str) {
        Command::new("kill").args([which, &self.child.id().to_string()]).status().unwrap();
    }

    /// Whether the command exits within `limit`.
    pub fn exits_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.child.try_wait().unwrap().is_some() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its exit and output; past `limit`, kills it and fails the test with its stderr.
    pub fn wait(mut self, limit: Duration) -> Output {
        let exited = self.exits_within(limit);
        if !exited {
            let _ = self.child.kill();
        }
        let status = self.child.wait().unwrap();
        let stdout = self.stdout.take().map(|t| t.join().unwrap()).unwrap_or_default();
        let stderr = self.stderr.take().map(|t| t.join().unwrap()).unwrap_or_default();
        assert!(exited, "{} did not exit within {} s; its stderr:\n{}", self.what, limit.as_secs(), String::from_utf8_lossy(&stderr));
        Output { status, stdout, stderr }
    }

    /// Kills it with SIGKILL (a crash).
    pub fn kill(self) {
        drop(self);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads `pipe` to its end on a thread of its own, into `into` as it comes.
pub fn read_all(
    pipe: Option<impl std::io::Read + Send + 'static>,
    into: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) -> Option<std::thread::JoinHandle<Vec<u8>>> {
    pipe.map(|mut pipe| {
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                into.lock().unwrap().extend_from_slice(&buf[..n]);
            }
            std::mem::take(&mut *into.lock().unwrap())
        })
    })
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), Instant::now().elapsed().as_nanos() ^ rand_suffix())
}

pub fn rand_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() % 1_000_000_007
}

/// The Prometheus metrics a command serves at `addr`.
pub fn scrape(addr: &str) -> String {
    get(addr, "/metrics")
}

/// `GET path` on `addr`: the whole response, which must be a 200.
pub fn get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    write!(conn, "GET {path} HTTP/1.1\r\nHost: toolrank\r\n\r\n").unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    response
}

/// A port nobody listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing answers on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The number after `prefix` in a summary line.
pub fn count_after(text: &str, prefix: &str) -> u64 {
    let at = text.find(prefix).unwrap_or_else(|| panic!("{prefix:?} in {text}")) + prefix.len();
    text[at..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}

/// Tests that load DynamoDB Local heavily and tests that count its rounds take turns: a
/// round paced by DynamoDB's answers is slower while 200,000 items go in beside it.
pub fn dynamodb_pace() -> std::sync::MutexGuard<'static, ()> {
    static PACE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    PACE.lock().unwrap_or_else(|e| e.into_inner())
}
