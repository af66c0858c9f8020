//! A Lambda Runtime API endpoint the tests invoke the function through.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A Lambda Runtime API endpoint: the part a runtime client uses (`invocation/next`,
/// `…/response`, `…/error`, `init/error`). It hands queued events to whichever handler
/// process asks next and returns their answers, as the Lambda service does.
pub struct RuntimeApi {
    pub address: String,
    pub state: std::sync::Arc<(std::sync::Mutex<RuntimeState>, std::sync::Condvar)>,
}

#[derive(Default)]
pub struct RuntimeState {
    pub queue: std::collections::VecDeque<(String, String)>,
    pub answers: HashMap<String, Result<String, String>>,
    pub next_id: u64,
}

impl RuntimeApi {
    pub fn start() -> RuntimeApi {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let state = std::sync::Arc::new((std::sync::Mutex::new(RuntimeState::default()), std::sync::Condvar::new()));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || Self::serve(stream, &state));
            }
        });
        RuntimeApi { address, state }
    }

    /// Answers the requests of one keep-alive connection.
    pub fn serve(stream: std::net::TcpStream, state: &(std::sync::Mutex<RuntimeState>, std::sync::Condvar)) {
        use std::io::{BufRead, Read, Write};
        let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
        let mut out = stream;
        loop {
            let mut request = String::new();
            if reader.read_line(&mut request).unwrap_or(0) == 0 {
                return;
            }
            let mut length = 0;
            loop {
                let mut header = String::new();
                reader.read_line(&mut header).unwrap();
                if header.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = header.split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        length = v.trim().parse().unwrap();
                    }
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let body = String::from_utf8(body).unwrap();
            let path = request.split_whitespace().nth(1).unwrap_or_default().to_owned();
            let (lock, ready) = state;
            if path.ends_with("/invocation/next") {
                let mut s = lock.lock().unwrap();
                while s.queue.is_empty() {
                    s = ready.wait(s).unwrap();
                }
                let (id, event) = s.queue.pop_front().unwrap();
                drop(s);
                let deadline = toolrank_live::now_ms() + 300_000;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nLambda-Runtime-Aws-Request-Id: {id}\r\nLambda-Runtime-Deadline-Ms: {deadline}\r\nLambda-Runtime-Invoked-Function-Arn: arn:aws:lambda:us-east-1:000000000000:function:toolrank\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    event.len()
                );
                if out.write_all(format!("{head}{event}").as_bytes()).is_err() {
                    return;
                }
                continue;
            }
            let parts: Vec<&str> = path.split('/').collect();
            if let [.., "invocation", id, kind] = parts.as_slice() {
                let answer = if *kind == "response" { Ok(body) } else { Err(body) };
                lock.lock().unwrap().answers.insert((*id).to_owned(), answer);
                ready.notify_all();
            }
            if out.write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n").is_err() {
                return;
            }
        }
    }

    /// Invokes the function with `event` and waits for its answer.
    pub fn invoke(&self, event: String) -> Result<String, String> {
        let (lock, ready) = &*self.state;
        let mut s = lock.lock().unwrap();
        s.next_id += 1;
        let id = format!("request-{}", s.next_id);
        s.queue.push_back((id.clone(), event));
        ready.notify_all();
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Some(answer) = s.answers.remove(&id) {
                return answer;
            }
            assert!(Instant::now() < deadline, "no answer to {id}");
            s = ready.wait_timeout(s, Duration::from_millis(200)).unwrap().0;
        }
    }
}
