//! The authorization matrix of issue 6: every op of PROTOCOL.md × {member, the member on
//! another device, non-member, removed member, another user's device id, expired token
//! mid-connection}, each cell with its expected result, over real loopback WebSockets. Every
//! cell runs on a chat of its own, and the chat's state is compared before and after: a refused
//! op must change nothing, an allowed one exactly what it should. Then devices (a device id is
//! not a credential, cursors are per device) and files (membership, ids, no path traversal).
//!
//! Devices in PROTOCOL.md: tokens name a user, not a device; the `device` of `hello` only keys
//! that device's delivered cursors and resume point. So the "wrong device" cases are another
//! user presenting someone's device id (it must grant nothing) and a member's second device
//! (same rights, its own cursor).

mod common;

use common::{Body, Client, RawFrame, RawWs, SECRET, TestServer, now_secs, token, token_signed};
use serde_json::{Value, json};

/// Who sends the op. `Expired` is a separate test (its connections end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subject {
    /// bob, a member, on his device `b1`.
    Member,
    /// bob on a second device `b2`.
    MemberOtherDevice,
    /// carol, never a member.
    NonMember,
    /// dave, added at creation, sent a message, then removed by the creator.
    Removed,
    /// carol presenting `phone`, the creator's device id.
    ForeignDevice,
}

const SUBJECTS: [Subject; 5] = [
    Subject::Member,
    Subject::MemberOtherDevice,
    Subject::NonMember,
    Subject::Removed,
    Subject::ForeignDevice,
];

impl Subject {
    fn login(self) -> (&'static str, &'static str) {
        match self {
            Subject::Member => ("bob", "b1"),
            Subject::MemberOtherDevice => ("bob", "b2"),
            Subject::NonMember => ("carol", "c1"),
            Subject::Removed => ("dave", "d1"),
            Subject::ForeignDevice => ("carol", "phone"),
        }
    }

    fn is_member(self) -> bool {
        matches!(self, Subject::Member | Subject::MemberOtherDevice)
    }
}

/// One cell's expectation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Allowed,
    Refused(&'static str),
}

use Expect::{Allowed, Refused};
const FORBIDDEN: Expect = Refused("forbidden");

/// Per subject, in [`SUBJECTS`] order.
const MEMBERS_ONLY: [Expect; 5] = [Allowed, Allowed, FORBIDDEN, FORBIDDEN, FORBIDDEN];
const EVERYONE: [Expect; 5] = [Allowed; 5];
const NOBODY: [Expect; 5] = [FORBIDDEN; 5];

/// A fresh chat for one cell: alice (the creator, device `phone`) with bob and dave; seq 2 is
/// bob's message, 3 dave's, 4 alice's, 5 the removal of dave.
struct Fixture {
    chat: String,
    bob_msg: u64,
    dave_msg: u64,
    alice_msg: u64,
}

const LAST_SEQ: u64 = 5;

impl Fixture {
    /// The message the subject would call its own: its own if it has one in the chat, else
    /// bob's.
    fn own_msg(&self, s: Subject) -> u64 {
        match s {
            Subject::Removed => self.dave_msg,
            _ => self.bob_msg,
        }
    }
}

/// One op of PROTOCOL.md's table as the subject would send it, with its expected results.
struct Row {
    name: &'static str,
    request: fn(&Fixture, Subject, &str) -> Value,
    expect: [Expect; 5],
    /// How much an allowed op moves the chat's `last_seq`.
    appends: u64,
}

fn rows() -> Vec<Row> {
    vec![
        Row {
            name: "create_chat",
            request: |_, _, _| json!({"op": "create_chat", "members": ["alice"], "title": "t"}),
            expect: EVERYONE,
            appends: 0,
        },
        Row {
            name: "create_chat direct",
            request: |_, _, _| json!({"op": "create_chat", "members": ["alice"], "direct": true}),
            expect: EVERYONE,
            appends: 0,
        },
        Row {
            name: "add_members",
            request: |f, _, _| json!({"op": "add_members", "chat": f.chat, "users": ["newcomer"]}),
            expect: MEMBERS_ONLY,
            appends: 1,
        },
        Row {
            name: "add_members (itself back)",
            request: |f, _, user| json!({"op": "add_members", "chat": f.chat, "users": [user]}),
            expect: MEMBERS_ONLY,
            appends: 0,
        },
        Row {
            name: "remove_members (itself)",
            request: |f, _, user| json!({"op": "remove_members", "chat": f.chat, "users": [user]}),
            expect: MEMBERS_ONLY,
            appends: 1,
        },
        Row {
            name: "remove_members (the creator)",
            request: |f, _, _| json!({"op": "remove_members", "chat": f.chat, "users": ["alice"]}),
            expect: NOBODY,
            appends: 0,
        },
        Row {
            name: "list_chats",
            request: |_, _, _| json!({"op": "list_chats"}),
            expect: EVERYONE,
            appends: 0,
        },
        Row {
            name: "send",
            request: |f, _, user| json!({"op": "send", "chat": f.chat, "cmid": format!("{user}-m"), "body": "hi"}),
            expect: MEMBERS_ONLY,
            appends: 1,
        },
        Row {
            name: "edit (own message)",
            request: |f, s, _| json!({"op": "edit", "chat": f.chat, "target": f.own_msg(s), "body": "e"}),
            expect: MEMBERS_ONLY,
            appends: 1,
        },
        Row {
            name: "edit (the creator's message)",
            request: |f, _, _| json!({"op": "edit", "chat": f.chat, "target": f.alice_msg, "body": "e"}),
            expect: NOBODY,
            appends: 0,
        },
        Row {
            name: "delete (own message)",
            request: |f, s, _| json!({"op": "delete", "chat": f.chat, "target": f.own_msg(s)}),
            expect: MEMBERS_ONLY,
            appends: 1,
        },
        Row {
            name: "delete (the creator's message)",
            request: |f, _, _| json!({"op": "delete", "chat": f.chat, "target": f.alice_msg}),
            expect: NOBODY,
            appends: 0,
        },
        Row {
            name: "history",
            request: |f, _, _| json!({"op": "history", "chat": f.chat}),
            expect: MEMBERS_ONLY,
            appends: 0,
        },
        Row {
            name: "history (after)",
            request: |f, _, _| json!({"op": "history", "chat": f.chat, "after": 0, "limit": 500}),
            expect: MEMBERS_ONLY,
            appends: 0,
        },
        Row {
            name: "delivered",
            request: |f, _, _| json!({"op": "delivered", "chat": f.chat, "seq": 4}),
            expect: MEMBERS_ONLY,
            appends: 0,
        },
        Row {
            name: "read",
            request: |f, _, _| json!({"op": "read", "chat": f.chat, "seq": 4}),
            expect: MEMBERS_ONLY,
            appends: 0,
        },
        Row {
            name: "receipts",
            request: |f, _, _| json!({"op": "receipts", "chat": f.chat}),
            expect: MEMBERS_ONLY,
            appends: 0,
        },
        // Presence is not restricted (PROTOCOL.md; SECURITY.md "Authorization").
        Row {
            name: "presence",
            request: |_, _, _| json!({"op": "presence", "users": ["alice", "bob"]}),
            expect: EVERYONE,
            appends: 0,
        },
        Row {
            name: "subscribe_presence",
            request: |_, _, _| json!({"op": "subscribe_presence", "users": ["alice"]}),
            expect: EVERYONE,
            appends: 0,
        },
        Row {
            name: "unsubscribe_presence",
            request: |_, _, _| json!({"op": "unsubscribe_presence", "users": ["alice"]}),
            expect: EVERYONE,
            appends: 0,
        },
        Row {
            name: "typing",
            request: |f, _, _| json!({"op": "typing", "chat": f.chat}),
            expect: MEMBERS_ONLY,
            appends: 0,
        },
        Row {
            name: "ping",
            request: |_, _, _| json!({"op": "ping"}),
            expect: EVERYONE,
            appends: 0,
        },
        Row {
            name: "hello (again)",
            request: |_, _, user| json!({"op": "hello", "token": token(user), "device": "x"}),
            expect: [Refused("bad_request"); 5],
            appends: 0,
        },
    ]
}

/// What the creator sees of a chat: `(last_seq, members, receipts)`.
async fn snapshot(alice: &mut Client, chat: &str) -> (u64, Vec<String>, Value) {
    let last_seq = alice.last_seq(chat).await;
    let list = alice.ok(json!({"op": "list_chats"})).await;
    let mut members: Vec<String> = list["chats"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["chat"] == chat)
        .map(|c| serde_json::from_value(c["members"].clone()).unwrap())
        .unwrap_or_default();
    members.sort();
    let receipts = alice.ok(json!({"op": "receipts", "chat": chat})).await["receipts"].clone();
    (last_seq, members, receipts)
}

async fn fixture(alice: &mut Client, bob: &mut Client, dave: &mut Client) -> Fixture {
    let chat = alice.create(&["bob", "dave"], "cell").await;
    let bob_msg = bob.send_msg(&chat, "b", "from bob").await["seq"]
        .as_u64()
        .unwrap();
    let dave_msg = dave.send_msg(&chat, "d", "from dave").await["seq"]
        .as_u64()
        .unwrap();
    let alice_msg = alice.send_msg(&chat, "a", "from alice").await["seq"]
        .as_u64()
        .unwrap();
    let removed = alice
        .ok(json!({"op": "remove_members", "chat": chat, "users": ["dave"]}))
        .await;
    assert_eq!(
        (bob_msg, dave_msg, alice_msg, removed["seq"].as_u64()),
        (2, 3, 4, Some(LAST_SEQ))
    );
    Fixture {
        chat,
        bob_msg,
        dave_msg,
        alice_msg,
    }
}

/// Checks an allowed reply beyond "it has a result": what it shows, for reads.
fn check_result(row: &Row, f: &Fixture, s: Subject, result: &Value) {
    match row.name {
        "list_chats" => {
            let listed = result["chats"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["chat"] == f.chat.as_str());
            assert_eq!(listed, s.is_member(), "{s:?} list_chats: {result}");
        }
        "history" | "history (after)" => {
            let events = result["events"].as_array().unwrap();
            assert_eq!(common::seqs(events), [1, 2, 3, 4, 5], "{result}");
        }
        "receipts" => {
            let users: Vec<&str> = result["receipts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["user"].as_str().unwrap())
                .collect();
            assert!(
                !users.contains(&"dave"),
                "a removed member in receipts: {result}"
            );
        }
        name if name.starts_with("create_chat") => {
            assert_ne!(result["chat"], f.chat.as_str());
        }
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_op_for_every_kind_of_caller() {
    let server = TestServer::start().await;
    let mut alice = server.connect_device("alice", "phone").await;
    alice.synced().await;
    let mut dave = server.connect_device("dave", "d1").await;
    dave.synced().await;
    let mut callers = Vec::new();
    for s in SUBJECTS {
        let (user, device) = s.login();
        let mut c = server.connect_device(user, device).await;
        c.synced().await;
        callers.push(c);
    }
    let rows = rows();
    let mut cells = 0;
    for row in &rows {
        for (i, s) in SUBJECTS.into_iter().enumerate() {
            let (user, _) = s.login();
            let (before, after) = {
                let (bob, rest) = callers.split_at_mut(1);
                let f = fixture(&mut alice, &mut bob[0], &mut dave).await;
                let before = snapshot(&mut alice, &f.chat).await;
                let caller = if s == Subject::Member {
                    &mut bob[0]
                } else {
                    &mut rest[i - 1]
                };
                let request = (row.request)(&f, s, user);
                let reply = caller.call(request.clone()).await;
                let cell = format!("{} × {s:?}: {request} -> {reply}", row.name);
                match row.expect[i] {
                    Allowed => {
                        assert!(reply.get("result").is_some(), "{cell}");
                        check_result(row, &f, s, &reply["result"]);
                    }
                    Refused(code) => assert_eq!(reply["error"]["code"], code, "{cell}"),
                }
                let after = snapshot(&mut alice, &f.chat).await;
                if row.expect[i] == Allowed {
                    assert_eq!(after.0, before.0 + row.appends, "{cell}: last_seq");
                    if row.name == "delivered" || row.name == "read" {
                        let bob = after
                            .2
                            .as_array()
                            .unwrap()
                            .iter()
                            .find(|r| r["user"] == "bob");
                        let field = if row.name == "read" {
                            "read"
                        } else {
                            "delivered"
                        };
                        assert_eq!(bob.unwrap()[field], 4, "{cell}: {}", after.2);
                    }
                } else {
                    assert_eq!(after, before, "{cell}: a refused op changed the chat");
                }
                (before, after)
            };
            assert!(after.0 >= before.0);
            cells += 1;
        }
    }
    assert_eq!(cells, rows.len() * SUBJECTS.len());
    println!("authorization matrix: {cells} cells");
    server.stop().await;
}

/// The sixth column: a member whose token expires while connected. The server closes the
/// connection with 1008 at expiry; a request written after that (while the server still
/// drains the socket before closing it) is not executed. All rows run at once: their tokens
/// expire together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_op_after_the_token_expired_mid_connection() {
    let server = TestServer::start().await;
    let mut alice = server.connect_device("alice", "phone").await;
    alice.synced().await;
    let mut bob = server.connect_device("bob", "b1").await;
    bob.synced().await;
    let mut dave = server.connect_device("dave", "d1").await;
    dave.synced().await;
    let rows = rows();
    let mut fixtures = Vec::new();
    let mut befores = Vec::new();
    for _ in &rows {
        let f = fixture(&mut alice, &mut bob, &mut dave).await;
        befores.push(snapshot(&mut alice, &f.chat).await);
        fixtures.push(f);
    }
    let chats_before = bob.ok(json!({"op": "list_chats"})).await["chats"]
        .as_array()
        .unwrap()
        .len();
    let exp = now_secs() + 3;
    let short = token_signed("bob", exp, SECRET);
    let mut tasks = tokio::task::JoinSet::new();
    for (row, f) in rows.iter().zip(&fixtures) {
        let request = (row.request)(f, Subject::Member, "bob");
        let name = row.name;
        let mut ws = RawWs::connect(server.addr).await;
        ws.hello_token(&short, "b1").await;
        let token = short.clone();
        tasks.spawn(async move {
            // Alive before expiry.
            ws.send_text(&json!({"op": "ping", "id": "alive"}).to_string())
                .await;
            let mut before_close = Vec::new();
            loop {
                match ws.frame().await {
                    Some(RawFrame::Close(code)) => {
                        assert_eq!(code, Some(1008), "{name}: {before_close:?}");
                        break;
                    }
                    Some(f) => before_close.push(f),
                    None => panic!("{name}: closed without a close frame: {before_close:?}"),
                }
            }
            assert!(
                before_close.iter().any(
                    |f| matches!(f, RawFrame::Text(v) if v["id"] == "alive" && v.get("result").is_some())
                ),
                "{name}: {before_close:?}"
            );
            assert!(
                before_close.iter().any(|f| matches!(
                    f,
                    RawFrame::Text(v) if v["error"]["code"] == "unauthorized" && v.get("id").is_none()
                )),
                "{name}: no unauthorized before the close: {before_close:?}"
            );
            // After the close frame: the op, a fresh hello with the same (expired) token.
            let mut late = request;
            late["id"] = json!("late");
            let _ = ws.try_send_text(&late.to_string()).await;
            let _ = ws
                .try_send_text(&json!({"op": "hello", "token": token, "id": "h"}).to_string())
                .await;
            let after = ws.until_eof().await;
            assert!(
                after.iter().all(|f| !matches!(f, RawFrame::Text(_))),
                "{name}: answered after the token expired: {after:?}"
            );
        });
    }
    let mut ran = 0;
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
        ran += 1;
    }
    assert_eq!(ran, rows.len());
    // Nothing any of them sent after expiry changed anything.
    for (f, before) in fixtures.iter().zip(befores) {
        assert_eq!(snapshot(&mut alice, &f.chat).await, before, "{}", f.chat);
    }
    let chats_after = bob.ok(json!({"op": "list_chats"})).await["chats"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(
        chats_after, chats_before,
        "an expired connection created a chat"
    );
    // And the token cannot open a new connection.
    let (frames, code) = common::refused(
        &server.url(),
        &json!({"op": "hello", "token": short, "device": "b1"}).to_string(),
    )
    .await;
    assert_eq!(code, Some(1008), "{frames:?}");
    println!("expired-token column: {ran} cells");
    server.stop().await;
}

/// The expired-token column for a client that never pauses: it writes pings faster than the
/// server answers them, from before its token expires until well after. No request may be
/// served after expiry (the `ping` reply carries the server's time), and the connection ends
/// with 1008. (Before the fix in `conn.rs`, such a client was answered for seconds after
/// expiry: the connection's select prefers inbound frames, and the timer never ran.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_pauses_cannot_outlive_its_token() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start().await;
    let exp = now_secs() + 2;
    let mut ws = RawWs::connect(server.addr).await;
    ws.hello_token(&token_signed("bob", exp, SECRET), "b1")
        .await;
    let (mut read, mut write) = ws.into_stream().into_split();
    // One masked text frame carrying a ping, repeated: 2,000 requests per write.
    let payload = br#"{"op":"ping","id":1}"#;
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    let batch = frame.repeat(2000);
    let flood_until = std::time::Duration::from_secs(exp + 4 - now_secs());
    let writer = tokio::spawn(async move {
        let start = std::time::Instant::now();
        while start.elapsed() < flood_until {
            if write.write_all(&batch).await.is_err() {
                return;
            }
        }
    });
    let (mut buf, mut chunk) = (Vec::new(), vec![0u8; 64 * 1024]);
    let (mut replies, mut late, mut close) = (0u64, Vec::new(), None);
    'reading: loop {
        let n = match tokio::time::timeout(common::WAIT, read.read(&mut chunk)).await {
            Err(_) => panic!(
                "the connection neither answered nor closed for {:?}",
                common::WAIT
            ),
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        while let Some((frame, used)) = RawWs::parse(&buf) {
            buf.drain(..used);
            match frame {
                RawFrame::Text(v) if v.get("result").is_some() => {
                    replies += 1;
                    let ts = v["result"]["ts"].as_u64().unwrap();
                    // Generous: the reply is stamped just after the request was read.
                    if ts >= exp * 1000 + 1000 {
                        late.push(ts);
                    }
                }
                RawFrame::Close(code) => {
                    close = Some(code);
                    break 'reading;
                }
                _ => {}
            }
        }
    }
    writer.abort();
    assert!(replies > 0, "nothing was answered before expiry");
    assert!(
        late.is_empty(),
        "{} of {replies} pings were answered a second or more after the token expired at {}",
        late.len(),
        exp * 1000
    );
    assert_eq!(close, Some(Some(1008)));
    server.stop().await;
}

/// A device id is a label inside a user, not a credential: another user presenting it gets
/// none of that device's state, and a member's devices keep separate cursors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_id_grants_nothing_and_cursors_are_per_device() {
    let server = TestServer::start().await;
    let url = server.url();
    let mut alice = server.connect_device("alice", "phone").await;
    alice.synced().await;
    let mut bob1 = server.connect_device("bob", "b1").await;
    bob1.synced().await;
    let chat = alice.create(&["bob"], "devices").await;
    for i in 0..3 {
        alice.send_msg(&chat, &format!("m{i}"), "text").await;
    }
    alice
        .ok(json!({"op": "delivered", "chat": chat, "seq": 2}))
        .await;
    bob1.until_event(&chat, 4).await;
    drop(bob1);

    // carol on alice's device id: no resume of alice's chat, not even when asked with
    // `since`; her cursor ops are refused and move nothing.
    let (mut carol, resumed) = Client::connect_resume(
        &url,
        &token("carol"),
        "phone",
        Some(json!({ chat.clone(): 0 })),
    )
    .await;
    assert!(resumed.is_empty(), "{resumed:?}");
    for op in ["delivered", "read"] {
        let reply = carol.call(json!({"op": op, "chat": chat, "seq": 4})).await;
        assert_eq!(reply["error"]["code"], "forbidden", "{reply}");
    }
    carol
        .no_push("event", std::time::Duration::from_millis(200))
        .await;

    // bob's second device moves its own cursor; the first device's resume still starts at
    // its own (the event that added bob), while bob's user-level value is the max.
    let mut bob2 = server.connect_device("bob", "b2").await;
    bob2.synced().await;
    bob2.ok(json!({"op": "delivered", "chat": chat, "seq": 4}))
        .await;
    let (_b1, resumed) = Client::connect_resume(&url, &token("bob"), "b1", None).await;
    assert_eq!(common::seqs(&resumed), [1, 2, 3, 4], "{resumed:?}");
    let receipts = alice.ok(json!({"op": "receipts", "chat": chat})).await;
    let of = |user: &str| {
        receipts["receipts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["user"] == user)
            .cloned()
            .unwrap()
    };
    assert_eq!(of("bob")["delivered"], 4, "{receipts}");
    assert_eq!(
        of("alice")["delivered"],
        2,
        "carol moved alice's cursor: {receipts}"
    );
    // alice's `phone` resumes from its own cursor, whatever carol did with the same id.
    drop(alice);
    let (_alice, resumed) = Client::connect_resume(&url, &token("alice"), "phone", None).await;
    assert_eq!(common::seqs(&resumed), [3, 4], "{resumed:?}");
    server.stop().await;
}

/// `GET /v1/files/{id}` as `user` (None: no token): (status, body).
async fn download(server: &TestServer, bearer: Option<&str>, id: &str) -> (u16, Vec<u8>) {
    let authorization = bearer.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = authorization
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    let (status, body, _) = common::http_with(
        server.addr,
        "GET",
        &format!("/v1/files/{id}"),
        &headers,
        Body::Sized(&[]),
    )
    .await
    .expect("download answered");
    (status, body)
}

async fn upload(server: &TestServer, user: &str, bytes: &[u8]) -> String {
    let (status, body, _) =
        common::http(server.addr, "POST", "/v1/files", Some(&token(user)), bytes)
            .await
            .unwrap();
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    v["file"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_need_membership_ids_are_not_guessable_and_never_paths() {
    let server = TestServer::start().await;
    let content = b"alice's private picture".to_vec();
    let id = upload(&server, "alice", &content).await;
    // Ids: `f` + 32 lowercase hex digits, per uploader (the same bytes from bob are another
    // file), stable for the same uploader and bytes.
    assert!(
        id.len() == 33
            && id.starts_with('f')
            && id[1..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "{id}"
    );
    assert_eq!(upload(&server, "alice", &content).await, id);
    let bobs = upload(&server, "bob", &content).await;
    assert_ne!(
        bobs, id,
        "the same bytes from another uploader must get another id"
    );
    let other = upload(&server, "alice", b"another picture").await;
    let differing = id
        .bytes()
        .zip(other.bytes())
        .filter(|(a, b)| a != b)
        .count();
    assert!(
        differing > 16,
        "ids of different files look alike: {id} {other}"
    );

    // Before any message references it, only the uploader may read it.
    assert_eq!(
        download(&server, Some(&token("alice")), &id).await,
        (200, content.clone())
    );
    assert_eq!(download(&server, Some(&token("bob")), &id).await.0, 404);

    let mut alice = server.connect_device("alice", "phone").await;
    alice.synced().await;
    let chat = alice.create(&["bob", "dave"], "pictures").await;
    alice
        .ok(json!({"op": "send", "chat": chat, "cmid": "pic", "file": id}))
        .await;
    alice
        .ok(json!({"op": "remove_members", "chat": chat, "users": ["dave"]}))
        .await;

    // Who may download: the uploader and members of a chat referencing it; anyone else gets
    // 404 (as for a file that does not exist); no, expired or forged tokens 401.
    let expired = token_signed("bob", now_secs() - 5, SECRET);
    let forged = token_signed("bob", now_secs() + 3600, "another-secret-0123456789");
    let cases: [(&str, Option<String>, u16); 7] = [
        ("uploader", Some(token("alice")), 200),
        ("member", Some(token("bob")), 200),
        ("non-member", Some(token("carol")), 404),
        ("removed member", Some(token("dave")), 404),
        ("no token", None, 401),
        ("expired token", Some(expired), 401),
        ("forged token", Some(forged), 401),
    ];
    for (who, bearer, status) in &cases {
        let (got, body) = download(&server, bearer.as_deref(), &id).await;
        assert_eq!(got, *status, "{who}");
        assert_eq!(body == content, *status == 200, "{who}");
    }
    // A file of one's own is not made readable to others by sending someone else's id.
    let mut carol = server.connect("carol").await;
    carol.synced().await;
    let carols = carol.create(&["erin"], "c").await;
    let reply = carol
        .call(json!({"op": "send", "chat": carols, "cmid": "steal", "file": id}))
        .await;
    assert_eq!(reply["error"]["code"], "bad_request", "{reply}");
    assert_eq!(download(&server, Some(&token("erin")), &id).await.0, 404);

    // Ids are names, never paths: near misses, encodings, traversal and absolute paths are
    // 404 (or refused by the router) even for the uploader, and never serve a file.
    let data_dir = server.dir.path().display().to_string().replace('/', "%2F");
    let mut near = id.clone().into_bytes();
    near[32] = if near[32] == b'0' { b'1' } else { b'0' };
    let near = String::from_utf8(near).unwrap();
    let hostile = [
        near.as_str(),
        &id.to_uppercase(),
        &format!("{id}%00"),
        &format!("{id}%2F"),
        &format!("{id}/"),
        "..",
        "..%2F..%2Fetc%2Fpasswd",
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "%252e%252e%252fetc%252fpasswd",
        "..%5C..%5Cwindows",
        "....%2F%2Fetc%2Fpasswd",
        "%2Fetc%2Fpasswd",
        &format!("{data_dir}%2Ffiles"),
        &format!("..%2F{id}"),
        &format!("%2E%2E%2F{id}"),
    ];
    for path in hostile {
        let (status, body) = download(&server, Some(&token("alice")), path).await;
        assert!(matches!(status, 400 | 404), "{path}: {status}");
        assert_ne!(body, content, "{path}");
        assert!(!String::from_utf8_lossy(&body).contains("root:"), "{path}");
    }
    // The server is fine afterwards.
    assert_eq!(
        download(&server, Some(&token("bob")), &id).await,
        (200, content)
    );
    server.stop().await;
}
