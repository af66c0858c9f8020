//! A proxy in front of DynamoDB (or any TCP server) that can answer every request with a
//! throttle or a server error, or hold what clients send for a while.

use std::time::Duration;

/// A TCP proxy in front of DynamoDB Local that, while failing, answers every new
/// connection with a DynamoDB error (500 InternalServerError or 400 throttling, in
/// turn) and cuts the connections already open.
pub struct FaultyProxy {
    pub url: String,
    pub failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// While set, what clients send waits in the proxy (a network that stalls).
    pub holding: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// While set, the next `TransactWriteItems` request that names this table starts
    /// holding (a sink write, told from a checkpoint's write to the state table).
    pub armed: std::sync::Arc<std::sync::Mutex<Option<Vec<u8>>>>,
    /// Milliseconds each `Query` request waits before it goes on (0: none).
    pub query_delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// `Query` requests delayed so far.
    pub delayed_queries: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Requests answered with an injected error.
    pub refused: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub cut: tokio::sync::watch::Sender<u64>,
    pub _rt: tokio::runtime::Runtime,
}

impl FaultyProxy {
    pub fn start(upstream: &str) -> FaultyProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let failing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let holding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hold = holding.clone();
        let armed = std::sync::Arc::new(std::sync::Mutex::new(None::<Vec<u8>>));
        let arm = armed.clone();
        let query_delay_ms = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let delayed_queries = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (delay, delayed) = (query_delay_ms.clone(), delayed_queries.clone());
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let refused = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (flag, cuts, count) = (failing.clone(), cut.clone(), refused.clone());
        rt.spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { continue };
                if flag.load(std::sync::atomic::Ordering::SeqCst) {
                    let refused = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    let (status, kind) = if refused % 2 == 0 {
                        ("500 Internal Server Error", "InternalServerError")
                    } else {
                        ("400 Bad Request", "ProvisionedThroughputExceededException")
                    };
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 1 << 16];
                        let _ = tokio::time::timeout(Duration::from_millis(500), inbound.read(&mut buf)).await;
                        let body = format!(r#"{{"__type":"com.amazonaws.dynamodb.v20120810#{kind}","message":"injected by the test"}}"#);
                        let head = format!(
                            "HTTP/1.1 {status}\r\nContent-Type: application/x-amz-json-1.0\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = inbound.write_all(format!("{head}{body}").as_bytes()).await;
                        let _ = inbound.shutdown().await;
                    });
                    continue;
                }
                let (upstream, mut cut, hold, arm) = (upstream.clone(), cuts.subscribe(), hold.clone(), arm.clone());
                let (delay, delayed) = (delay.clone(), delayed.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    let ((mut from_client, mut to_client), (mut from_server, mut to_server)) = (inbound.into_split(), outbound.into_split());
                    // Each chunk a client sends waits while the proxy holds; replies pass.
                    let up = async move {
                        let mut buf = vec![0u8; 1 << 16];
                        // Whether the request being sent is a transaction (its body may
                        // come in chunks after its head).
                        let mut transaction = false;
                        while let Ok(n @ 1..) = from_client.read(&mut buf).await {
                            let chunk = &buf[..n];
                            transaction = chunk.windows(18).any(|w| w == b"TransactWriteItems") || (transaction && !chunk.starts_with(b"POST "));
                            if transaction {
                                let mut armed = arm.lock().unwrap();
                                if armed.as_ref().is_some_and(|table| chunk.windows(table.len()).any(|w| w == table.as_slice())) {
                                    *armed = None;
                                    hold.store(true, std::sync::atomic::Ordering::SeqCst);
                                }
                            }
                            let wait = delay.load(std::sync::atomic::Ordering::SeqCst);
                            if wait > 0 && buf[..n].windows(14).any(|w| w == b"20120810.Query") {
                                delayed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(wait)).await;
                            }
                            while hold.load(std::sync::atomic::Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            if to_server.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = to_server.shutdown().await;
                    };
                    let down = tokio::io::copy(&mut from_server, &mut to_client);
                    // Either side closing ends the connection: a client must not send its
                    // next request into a connection the server has closed.
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        FaultyProxy { url, failing, holding, armed, query_delay_ms, delayed_queries, refused, cut, _rt: rt }
    }

    pub fn fail(&self, on: bool) {
        self.failing.store(on, std::sync::atomic::Ordering::SeqCst);
        if on {
            self.cut.send_modify(|n| *n += 1);
        }
    }

    /// Holds what clients send from now on; `false` lets it through.
    pub fn hold(&self, on: bool) {
        self.holding.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Holds from the next transaction that writes `table` on (a sink write, not a
    /// checkpoint's): that write and all after it wait.
    pub fn hold_from_next_write_to(&self, table: &str) {
        *self.armed.lock().unwrap() = Some(format!("\"{table}\"").into_bytes());
    }

    /// Makes each `Query` request from now on wait `delay` before it goes on.
    pub fn delay_queries(&self, delay: Duration) {
        self.query_delay_ms.store(delay.as_millis() as u64, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn is_holding(&self) -> bool {
        self.holding.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Fails for `window`, then passes requests through again.
    pub fn fail_for(&self, window: Duration) {
        self.fail(true);
        std::thread::sleep(window);
        self.fail(false);
    }
}
