//! A tiny HTTP server standing in for the push webhook: it records each post and answers as
//! told.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::WAIT;

/// How the test's webhook answers.
#[derive(Debug, Clone, Copy)]
pub enum Answer {
    Status(u16),
    /// Reads the request and never answers.
    Hang,
}

/// One request the webhook received.
#[derive(Debug)]
pub struct Post {
    pub method: String,
    pub path: String,
    pub content_type: String,
    pub body: Value,
}

/// The running webhook and the posts it received.
pub struct Hook {
    addr: SocketAddr,
    posts: mpsc::UnboundedReceiver<Post>,
}

impl Hook {
    pub async fn start(answer: Answer) -> Hook {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, posts) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve_hook(stream, answer, tx.clone()));
            }
        });
        Hook { addr, posts }
    }

    pub fn url(&self) -> String {
        format!("http://{}/push", self.addr)
    }

    pub async fn next(&mut self) -> Post {
        tokio::time::timeout(WAIT, self.posts.recv())
            .await
            .expect("a webhook post in time")
            .expect("hook running")
    }

    /// The next post for `user`; posts for other users are returned in `others`.
    pub async fn next_for(&mut self, user: &str, others: &mut Vec<Value>) -> Value {
        loop {
            let post = self.next().await;
            if post.body["user"] == user {
                return post.body;
            }
            others.push(post.body);
        }
    }

    /// Every post that arrives within `wait`.
    pub async fn drain(&mut self, wait: Duration) -> Vec<Value> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some(post)) = tokio::time::timeout_at(deadline, self.posts.recv()).await {
            out.push(post.body);
        }
        out
    }
}

/// Reads HTTP/1.1 requests (keep-alive) and reports each.
async fn serve_hook(mut stream: TcpStream, answer: Answer, tx: mpsc::UnboundedSender<Post>) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let header = |name: &str| {
            head.lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_owned())
        };
        let length: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + 4 + length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = buf[head_end + 4..head_end + 4 + length].to_vec();
        buf.drain(..head_end + 4 + length);
        let mut first = head.lines().next().unwrap_or("").split(' ');
        let post = Post {
            method: first.next().unwrap_or("").to_owned(),
            path: first.next().unwrap_or("").to_owned(),
            content_type: header("content-type").unwrap_or_default(),
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        };
        let _ = tx.send(post);
        match answer {
            Answer::Status(code) => {
                let response = format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n");
                if stream.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
            }
            Answer::Hang => {
                // Hold the connection open without answering.
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return;
            }
        }
    }
}
