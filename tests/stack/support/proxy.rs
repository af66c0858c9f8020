//! A proxy in front of DynamoDB that can answer every request with a throttle or a server error.

use std::time::Duration;

/// A TCP proxy in front of DynamoDB Local that, while failing, answers every new
/// connection with a DynamoDB error (500 InternalServerError or 400 throttling, in
/// turn) and cuts the connections already open.
pub struct FaultyProxy {
    pub url: String,
    pub failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
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
                let (upstream, mut cut) = (upstream.clone(), cuts.subscribe());
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        FaultyProxy { url, failing, refused, cut, _rt: rt }
    }

    pub fn fail(&self, on: bool) {
        self.failing.store(on, std::sync::atomic::Ordering::SeqCst);
        if on {
            self.cut.send_modify(|n| *n += 1);
        }
    }

    /// Fails for `window`, then passes requests through again.
    pub fn fail_for(&self, window: Duration) {
        self.fail(true);
        std::thread::sleep(window);
        self.fail(false);
    }
}
