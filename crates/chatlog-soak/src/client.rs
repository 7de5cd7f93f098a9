//! A minimal WebSocket client of the protocol in PROTOCOL.md: `hello`, then one request at a
//! time, skipping pushes while it waits for the reply with its id.

use std::collections::BTreeMap;

use anyhow::{Context, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// One authenticated connection.
#[derive(Debug)]
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

/// The server's answer to a request: its `result`, or its `error` object.
pub type Reply = Result<Value, Value>;

impl Client {
    /// Connects, says `hello` with `since` (so no backlog is replayed beyond it) and waits for
    /// `synced`.
    pub async fn connect(
        url: &str,
        token: &str,
        device: &str,
        since: &BTreeMap<String, u64>,
    ) -> anyhow::Result<Client> {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .with_context(|| format!("connect {url}"))?;
        let mut client = Client { ws, next_id: 1 };
        let hello = json!({"op": "hello", "token": token, "device": device, "since": since});
        client.ws.send(Message::text(hello.to_string())).await?;
        loop {
            let frame = client.next_frame().await?;
            if frame.get("error").is_some() {
                bail!("hello refused: {frame}");
            }
            if frame["ev"] == "synced" {
                return Ok(client);
            }
        }
    }

    async fn next_frame(&mut self) -> anyhow::Result<Value> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    return serde_json::from_str(text.as_str())
                        .with_context(|| format!("server sent invalid JSON: {text}"));
                }
                Some(Ok(Message::Close(frame))) => bail!("closed by the server: {frame:?}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(anyhow!(e)),
                None => bail!("connection ended"),
            }
        }
    }

    /// Sends `request` (an `id` is added) and returns the reply; `Err` if the connection
    /// failed before the reply arrived.
    pub async fn call(&mut self, mut request: Value) -> anyhow::Result<Reply> {
        let id = self.next_id;
        self.next_id += 1;
        request["id"] = json!(id);
        self.ws.send(Message::text(request.to_string())).await?;
        loop {
            let frame = self.next_frame().await?;
            if frame.get("id") != Some(&json!(id)) {
                continue; // a push
            }
            return Ok(match frame.get("result") {
                Some(result) => Ok(result.clone()),
                None => Err(frame.get("error").cloned().unwrap_or(frame)),
            });
        }
    }

    /// [`Client::call`] for requests that must succeed.
    pub async fn ok(&mut self, request: Value) -> anyhow::Result<Value> {
        let shown = request.to_string();
        self.call(request)
            .await?
            .map_err(|e| anyhow!("{shown} failed: {e}"))
    }
}
