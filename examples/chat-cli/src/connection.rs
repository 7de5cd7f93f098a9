//! The I/O driver: standard input, the WebSocket, timers. It feeds what happens to the
//! [`Session`] and carries out the [`Effect`]s it returns; it decides nothing about the
//! protocol itself.

use std::time::Duration;

use futures_util::SinkExt;
use futures_util::stream::{SplitSink, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use crate::backoff::reconnect_delay_ms;
use crate::session::{Effect, Session};

/// Lines read ahead from standard input before the reader waits for the session.
const INPUT_LINES_QUEUED_MAX: usize = 64;

/// Silence from the server after which the client sends a WebSocket ping, in milliseconds.
/// The server pings every 30 s by default, so in a healthy connection this rarely fires.
const SILENCE_PING_MS: u64 = 45_000;

/// Silence from the server after which the connection is taken as dead and reopened, in
/// milliseconds (a ping went out and nothing came back).
const SILENCE_DEAD_MS: u64 = 75_000;

/// How long opening a connection (TCP and the WebSocket handshake) may take, in milliseconds.
const CONNECT_TIMEOUT_MS: u64 = 10_000;

/// How long `/quit` or the end of input waits for outstanding replies, in milliseconds.
const QUIT_GRACE_MS: u64 = 5_000;

const _: () = assert!(SILENCE_PING_MS < SILENCE_DEAD_MS);

/// WebSocket close code for failed authentication (PROTOCOL.md).
const CLOSE_AUTH_FAILED: u16 = 1008;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Sink = SplitSink<Socket, Message>;

/// How the client ended.
#[derive(Debug)]
pub enum Exit {
    /// The user quit.
    Quit,
    /// The client cannot go on (bad URL, token refused).
    Fail(String),
}

/// What to do after carrying out a batch of effects.
enum Flow {
    Continue,
    Exit(Exit),
}

/// Runs the client until the user quits or the server refuses the token. Reconnects with
/// exponential backoff whenever the connection drops; the session resends what is safe.
pub async fn run(url: String, session: Session) -> Exit {
    let (lines_tx, lines) = mpsc::channel(INPUT_LINES_QUEUED_MAX);
    tokio::spawn(read_lines(lines_tx));
    let mut driver = Driver {
        session,
        lines,
        input_open: true,
        quit_deadline: None,
    };
    driver.run(&url).await
}

/// Reads standard input line by line into `lines` until it ends (or cannot be read).
async fn read_lines(lines: mpsc::Sender<String>) {
    let mut input = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = input.next_line().await {
        if lines.send(line).await.is_err() {
            return;
        }
    }
}

/// The driver's state besides the session: the input channel and the quit deadline.
struct Driver {
    session: Session,
    lines: mpsc::Receiver<String>,
    input_open: bool,
    /// Set on the first quit request: the latest moment to leave with replies outstanding.
    quit_deadline: Option<Instant>,
}

impl Driver {
    async fn run(&mut self, url: &str) -> Exit {
        let mut attempt: u32 = 0;
        loop {
            self.session.on_connecting();
            let outcome = match self.connect(url).await {
                Ok(Some(socket)) => self.converse(socket).await,
                Ok(None) => return Exit::Quit,
                Err(ConnectError::Fatal(message)) => return Exit::Fail(message),
                Err(ConnectError::Retry(reason)) => Conversation::Dropped {
                    reason,
                    was_ready: false,
                },
            };
            let (reason, was_ready) = match outcome {
                Conversation::Exit(exit) => return exit,
                Conversation::Dropped { reason, was_ready } => (reason, was_ready),
            };
            let effects = self.session.on_disconnected(&reason);
            if let Flow::Exit(exit) = self.apply(effects, None).await {
                return exit;
            }
            if was_ready {
                attempt = 0;
            }
            let delay_ms = reconnect_delay_ms(attempt);
            attempt = attempt.saturating_add(1);
            println!("reconnecting in {}", crate::format::duration(delay_ms));
            if let Some(exit) = self.wait(Duration::from_millis(delay_ms)).await {
                return exit;
            }
        }
    }

    /// Opens the WebSocket while still taking input. `Ok(None)`: the user quit meanwhile.
    async fn connect(&mut self, url: &str) -> Result<Option<Socket>, ConnectError> {
        let connecting = connect_async(url);
        tokio::pin!(connecting);
        let give_up = Instant::now() + Duration::from_millis(CONNECT_TIMEOUT_MS);
        loop {
            tokio::select! {
                () = sleep_until(give_up) => {
                    return Err(ConnectError::Retry(format!(
                        "no handshake within {CONNECT_TIMEOUT_MS} ms"
                    )));
                }
                result = &mut connecting => {
                    return match result {
                        Ok((socket, _response)) => Ok(Some(socket)),
                        Err(e) => Err(ConnectError::from(e)),
                    };
                }
                line = next_line(&mut self.lines, self.input_open) => {
                    let effects = self.on_input(line);
                    if let Flow::Exit(exit) = self.apply(effects, None).await {
                        return match exit {
                            Exit::Quit => Ok(None),
                            Exit::Fail(message) => Err(ConnectError::Fatal(message)),
                        };
                    }
                }
                () = until(self.quit_deadline) => return Ok(None),
            }
        }
    }

    /// Talks on an open connection until it drops or the client exits.
    async fn converse(&mut self, socket: Socket) -> Conversation {
        let (sink, mut stream) = socket.split();
        let mut sink = Some(sink);
        let hello = self.session.on_connected();
        if let Flow::Exit(exit) = self.apply(hello, sink.as_mut()).await {
            return Conversation::Exit(exit);
        }
        let mut last_inbound = Instant::now();
        let mut pinged = false;
        loop {
            if sink.is_none() {
                return self.dropped("sending failed");
            }
            let silence_ms = if pinged {
                SILENCE_DEAD_MS
            } else {
                SILENCE_PING_MS
            };
            let silence_deadline = last_inbound + Duration::from_millis(silence_ms);
            let effects = tokio::select! {
                message = stream.next() => {
                    last_inbound = Instant::now();
                    pinged = false;
                    match message {
                        None => return self.dropped("the server closed the connection"),
                        Some(Err(e)) => return self.dropped(&format!("connection error: {e}")),
                        Some(Ok(Message::Text(text))) => self.session.on_text(text.as_str()),
                        Some(Ok(Message::Close(frame))) => {
                            let code = frame.as_ref().map(|f| u16::from(f.code));
                            let reason = frame
                                .as_ref()
                                .map(|f| crate::format::clean(f.reason.as_str()))
                                .unwrap_or_default();
                            if code == Some(CLOSE_AUTH_FAILED) && !self.session.ready() {
                                return Conversation::Exit(Exit::Fail(format!(
                                    "authentication failed: {reason}"
                                )));
                            }
                            let code = code.map_or_else(|| "none".to_owned(), |c| c.to_string());
                            return self.dropped(&format!(
                                "the server closed the connection (code {code}) {reason}"
                            ));
                        }
                        Some(Ok(Message::Binary(_))) => {
                            vec![Effect::Print("ignoring a binary frame".to_owned())]
                        }
                        // Pings are answered by tungstenite; pongs only prove liveness.
                        Some(Ok(_)) => Vec::new(),
                    }
                }
                line = next_line(&mut self.lines, self.input_open) => self.on_input(line),
                () = sleep_until(silence_deadline) => {
                    if pinged {
                        return self.dropped(&format!("no word from the server for {SILENCE_DEAD_MS} ms"));
                    }
                    pinged = true;
                    if let Some(s) = sink.as_mut()
                        && s.send(Message::Ping(Default::default())).await.is_err()
                    {
                        sink = None;
                    }
                    Vec::new()
                }
                () = until(self.quit_deadline) => {
                    self.report_abandoned();
                    close(sink).await;
                    return Conversation::Exit(Exit::Quit);
                }
            };
            match self.apply(effects, sink.as_mut()).await {
                Flow::Continue => {}
                Flow::Exit(exit) => {
                    close(sink).await;
                    return Conversation::Exit(exit);
                }
            }
        }
    }

    /// A connection that dropped, remembering whether it got as far as `welcome` (which resets
    /// the backoff).
    fn dropped(&self, reason: &str) -> Conversation {
        Conversation::Dropped {
            reason: reason.to_owned(),
            was_ready: self.session.ready(),
        }
    }

    /// Waits `delay` before reconnecting, still taking input. `Some`: exit instead.
    async fn wait(&mut self, delay: Duration) -> Option<Exit> {
        let wake = Instant::now() + delay;
        loop {
            tokio::select! {
                () = sleep_until(wake) => return None,
                line = next_line(&mut self.lines, self.input_open) => {
                    let effects = self.on_input(line);
                    if let Flow::Exit(exit) = self.apply(effects, None).await {
                        return Some(exit);
                    }
                }
                () = until(self.quit_deadline) => {
                    self.report_abandoned();
                    return Some(Exit::Quit);
                }
            }
        }
    }

    /// A line typed, or `None` at the end of input.
    fn on_input(&mut self, line: Option<String>) -> Vec<Effect> {
        let effects = match line {
            Some(line) => self.session.on_line(&line),
            None => {
                self.input_open = false;
                self.session.on_input_closed()
            }
        };
        if self.session.quitting() && self.quit_deadline.is_none() {
            self.quit_deadline = Some(Instant::now() + Duration::from_millis(QUIT_GRACE_MS));
        }
        effects
    }

    /// Prints and sends what the session asked for. A failed send drops the sink (the read
    /// side then sees the connection end).
    async fn apply(&mut self, effects: Vec<Effect>, mut sink: Option<&mut Sink>) -> Flow {
        for effect in effects {
            match effect {
                Effect::Print(text) => println!("{text}"),
                Effect::Frame(frame) => {
                    // The session only asks to send on an open connection; without one there
                    // is nothing to do, and the request stays pending in the session.
                    if let Some(s) = sink.as_deref_mut()
                        && let Err(e) = s.send(Message::text(frame.to_string())).await
                    {
                        println!("send failed: {e}");
                        sink = None;
                    }
                }
                Effect::Fail(message) => return Flow::Exit(Exit::Fail(message)),
            }
        }
        if self.session.finished() {
            return Flow::Exit(Exit::Quit);
        }
        Flow::Continue
    }

    /// Says which replies were given up on when the quit grace period ran out.
    fn report_abandoned(&self) {
        let pending = self.session.pending_count();
        if pending > 0 {
            println!(
                "leaving without the {}",
                crate::format::count(pending, "reply", "replies")
            );
        }
    }
}

/// How a conversation on one connection ended.
enum Conversation {
    /// The client exits.
    Exit(Exit),
    /// The connection is gone; reconnect.
    Dropped { reason: String, was_ready: bool },
}

/// Why a connection could not be opened.
enum ConnectError {
    /// Trying again cannot help (a malformed URL).
    Fatal(String),
    /// Try again after a delay.
    Retry(String),
}

impl From<tungstenite::Error> for ConnectError {
    fn from(error: tungstenite::Error) -> ConnectError {
        match error {
            tungstenite::Error::Url(e) => ConnectError::Fatal(format!("bad URL: {e}")),
            tungstenite::Error::HttpFormat(e) => ConnectError::Fatal(format!("bad URL: {e}")),
            tungstenite::Error::Http(response) => {
                ConnectError::Retry(format!("the server answered HTTP {}", response.status()))
            }
            other => ConnectError::Retry(other.to_string()),
        }
    }
}

/// The next input line; never resolves once input has ended.
async fn next_line(lines: &mut mpsc::Receiver<String>, open: bool) -> Option<String> {
    if open {
        lines.recv().await
    } else {
        std::future::pending().await
    }
}

/// Resolves at `deadline`, or never without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Closes the connection politely, if it is still there.
async fn close(sink: Option<Sink>) {
    if let Some(mut sink) = sink {
        let _ = sink.close().await;
    }
}
