//! Authorization (PROTOCOL.md "Ops"): every chat op refused to non-members and to removed
//! members, `not_found` for unknown chats and events, the removal rules, idempotent
//! membership changes, and direct chats.

mod common;

use common::{Client, TestServer};
use serde_json::{Value, json};

/// Every chat-scoped op, as `user` would send it, targeting message `target`.
fn chat_ops(chat: &str, user: &str, target: u64) -> Vec<Value> {
    vec![
        json!({"op": "history", "chat": chat}),
        json!({"op": "history", "chat": chat, "after": 0, "limit": 10}),
        json!({"op": "send", "chat": chat, "cmid": format!("{user}-x"), "body": "x"}),
        json!({"op": "edit", "chat": chat, "target": target, "body": "x"}),
        json!({"op": "delete", "chat": chat, "target": target}),
        json!({"op": "add_members", "chat": chat, "users": [user]}),
        json!({"op": "add_members", "chat": chat, "users": ["newcomer"]}),
        json!({"op": "remove_members", "chat": chat, "users": [user]}),
        json!({"op": "remove_members", "chat": chat, "users": ["alice"]}),
        json!({"op": "receipts", "chat": chat}),
        json!({"op": "typing", "chat": chat}),
        json!({"op": "delivered", "chat": chat, "seq": 1}),
        json!({"op": "read", "chat": chat, "seq": 1}),
    ]
}

async fn all_refused(c: &mut Client, ops: Vec<Value>, code: &str) {
    for op in ops {
        let reply = c.call(op.clone()).await;
        assert_eq!(reply["error"]["code"], code, "{op}: {reply}");
    }
}

fn member_names(list: &Value) -> Vec<String> {
    let mut names: Vec<String> = serde_json::from_value(list.clone()).unwrap();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_members_are_forbidden_and_unknown_chats_are_not_found_for_every_op() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let mut bob = server.connect("bob").await;
    bob.synced().await;
    let mut carol = server.connect("carol").await;
    carol.synced().await;
    let chat = alice.create(&["bob"], "private").await;
    alice.send_msg(&chat, "m1", "secret").await;

    all_refused(&mut carol, chat_ops(&chat, "carol", 2), "forbidden").await;
    let list = carol.ok(json!({"op": "list_chats"})).await;
    assert_eq!(list["chats"], json!([]));
    // Nothing changed, and bob saw no typing from carol: the next thing bob sees after
    // seq 2 is alice's seq 3.
    assert_eq!(alice.last_seq(&chat).await, 2);
    alice.send_msg(&chat, "m2", "after").await;
    let frames = bob.until_event(&chat, 3).await;
    assert!(
        frames.iter().all(|f| f["ev"] != "typing"),
        "a non-member's typing reached a member: {frames:?}"
    );
    let members = alice.ok(json!({"op": "list_chats"})).await["chats"][0]["members"].clone();
    assert_eq!(member_names(&members), ["alice", "bob"]);
    // A non-member learns nothing from files or history either way: unknown chats are
    // not_found, existing ones forbidden.
    for unknown in ["g999999", "d:alice:zed", "nonsense"] {
        all_refused(&mut carol, chat_ops(unknown, "carol", 1), "not_found").await;
        all_refused(&mut alice, chat_ops(unknown, "alice", 1), "not_found").await;
    }
    // Unknown events of a known chat.
    for op in [
        json!({"op": "edit", "chat": chat, "target": 99, "body": "x"}),
        json!({"op": "delete", "chat": chat, "target": 99}),
        json!({"op": "edit", "chat": chat, "target": 0, "body": "x"}),
        json!({"op": "delete", "chat": chat, "target": 0}),
    ] {
        let reply = alice.call(op.clone()).await;
        assert_eq!(reply["error"]["code"], "not_found", "{op}: {reply}");
    }
    assert_eq!(alice.last_seq(&chat).await, 3);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_members_are_forbidden_afterwards_and_get_no_more_pushes() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let mut bob = server.connect("bob").await;
    bob.synced().await;
    let mut carol = server.connect("carol").await;
    carol.synced().await;
    let chat = alice.create(&["bob", "carol"], "team").await;
    let bobs = bob.send_msg(&chat, "b1", "mine").await;
    assert_eq!(bobs["seq"], 2);
    bob.ok(json!({"op": "read", "chat": chat, "seq": 2})).await;

    let r = alice
        .ok(json!({"op": "remove_members", "chat": chat, "users": ["bob"]}))
        .await;
    assert_eq!(r["seq"], 3);
    let removal = carol.until_event(&chat, 3).await.pop().unwrap();
    assert_eq!(removal["event"]["kind"], "members");
    assert_eq!(removal["event"]["removed"], json!(["bob"]));
    assert_eq!(removal["event"]["added"], json!([]));

    // Every op, including on bob's own message, is forbidden now.
    all_refused(&mut bob, chat_ops(&chat, "bob", 2), "forbidden").await;
    let list = bob.ok(json!({"op": "list_chats"})).await;
    assert!(
        list["chats"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["chat"] != chat.as_str()),
        "{list}"
    );
    assert_eq!(alice.last_seq(&chat).await, 3, "nothing bob did was stored");
    let h = alice.ok(json!({"op": "history", "chat": chat})).await;
    assert_eq!(h["events"][1]["body"], "mine", "bob's message is untouched");
    let r = alice.ok(json!({"op": "receipts", "chat": chat})).await;
    assert!(
        r["receipts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["user"] != "bob"),
        "receipts are per member: {r}"
    );

    // bob gets no pushes of the chat while removed: seq 4 is not among what he sees before
    // the event that adds him back (seq 5), since one connection's pushes of one chat
    // arrive in seq order.
    alice.send_msg(&chat, "a1", "without bob").await;
    alice.ok(json!({"op": "typing", "chat": chat})).await;
    carol.until_event(&chat, 4).await;
    // Reconnecting does not bring it either.
    let (_again, resumed) =
        Client::connect_resume(&server.url(), &common::token("bob"), "default", None).await;
    assert!(
        resumed.iter().all(|e| e["seq"].as_u64() < Some(4)),
        "a removed member resumed a later event: {resumed:?}"
    );
    let r = alice
        .ok(json!({"op": "add_members", "chat": chat, "users": ["bob"]}))
        .await;
    assert_eq!(r["seq"], 5);
    let frames = bob.until_event(&chat, 5).await;
    for f in &frames {
        assert!(
            !(f["ev"] == "event" && f["event"]["seq"] == 4),
            "a removed member got a message push: {frames:?}"
        );
        assert_ne!(f["ev"], "typing", "a removed member got typing: {frames:?}");
    }
    // Back in: members may read the whole history, whenever they joined.
    let h = bob.ok(json!({"op": "history", "chat": chat})).await;
    assert_eq!(
        common::seqs(h["events"].as_array().unwrap()),
        [1, 2, 3, 4, 5]
    );
    // A device resuming after the re-add starts at the event that added the user back (its
    // cursor, 2, is older), not at what it missed while removed.
    alice.send_msg(&chat, "a2", "with bob").await;
    let (_again, resumed) =
        Client::connect_resume(&server.url(), &common::token("bob"), "default", None).await;
    let resumed: Vec<Value> = resumed
        .into_iter()
        .filter(|e| e["chat"] == chat.as_str())
        .collect();
    assert_eq!(common::seqs(&resumed), [5, 6], "{resumed:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_creator_may_remove_anyone_and_members_only_themselves() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let mut bob = server.connect("bob").await;
    bob.synced().await;
    let mut dave = server.connect("dave").await;
    dave.synced().await;
    let chat = alice.create(&["bob", "carol", "dave"], "t").await;

    // A member may not remove another member, alone or together with itself.
    for users in [json!(["carol"]), json!(["bob", "carol"]), json!(["alice"])] {
        let reply = bob
            .call(json!({"op": "remove_members", "chat": chat, "users": users}))
            .await;
        assert_eq!(reply["error"]["code"], "forbidden", "{users}: {reply}");
    }
    assert_eq!(alice.last_seq(&chat).await, 1);
    // Messages: only the sender edits; the sender or the creator deletes.
    let sent = bob.send_msg(&chat, "b1", "from bob").await;
    let target = sent["seq"].as_u64().unwrap();
    for op in [
        json!({"op": "edit", "chat": chat, "target": target, "body": "x"}),
        json!({"op": "delete", "chat": chat, "target": target}),
    ] {
        let reply = dave.call(op.clone()).await;
        assert_eq!(reply["error"]["code"], "forbidden", "{op}: {reply}");
        let reply = alice.call(op.clone()).await;
        if op["op"] == "edit" {
            assert_eq!(reply["error"]["code"], "forbidden", "{op}: {reply}");
        } else {
            assert_eq!(reply["result"]["seq"], target + 1, "{op}: {reply}");
        }
    }
    assert_eq!(alice.last_seq(&chat).await, 3);

    // A member removes itself.
    let r = bob
        .ok(json!({"op": "remove_members", "chat": chat, "users": ["bob"]}))
        .await;
    assert_eq!(r["seq"], 4);
    assert_eq!(
        bob.err(json!({"op": "history", "chat": chat})).await,
        "forbidden"
    );
    // The creator removes anyone.
    let r = alice
        .ok(json!({"op": "remove_members", "chat": chat, "users": ["carol"]}))
        .await;
    assert_eq!(r["seq"], 5);
    // Nobody changes: no event, the chat's last_seq.
    let r = alice
        .ok(json!({"op": "remove_members", "chat": chat, "users": ["zed", "carol"]}))
        .await;
    assert_eq!(r["seq"], 5);
    let r = alice
        .ok(json!({"op": "add_members", "chat": chat, "users": ["dave", "alice"]}))
        .await;
    assert_eq!(r["seq"], 5);
    let r = dave
        .ok(json!({"op": "add_members", "chat": chat, "users": []}))
        .await;
    assert_eq!(r["seq"], 5);
    assert_eq!(alice.last_seq(&chat).await, 5);
    // Adding a mix appends one event naming only the new users.
    let r = dave
        .ok(json!({"op": "add_members", "chat": chat, "users": ["alice", "erin", "dave"]}))
        .await;
    assert_eq!(r["seq"], 6);
    let ev = dave.until_event(&chat, 6).await.pop().unwrap();
    assert_eq!(ev["event"]["added"], json!(["erin"]));
    assert_eq!(ev["event"]["sender"], "dave");
    // A member added late reads the whole history.
    let mut erin = server.connect("erin").await;
    erin.synced().await;
    let h = erin.ok(json!({"op": "history", "chat": chat})).await;
    assert_eq!(
        common::seqs(h["events"].as_array().unwrap()),
        [1, 2, 3, 4, 5, 6]
    );
    let members = alice.ok(json!({"op": "list_chats"})).await["chats"][0]["members"].clone();
    assert_eq!(member_names(&members), ["alice", "dave", "erin"]);
    // The creator may remove itself too; then it is refused like anyone else.
    let r = alice
        .ok(json!({"op": "remove_members", "chat": chat, "users": ["alice"]}))
        .await;
    assert_eq!(r["seq"], 7);
    assert_eq!(
        alice
            .err(json!({"op": "send", "chat": chat, "cmid": "a", "body": "x"}))
            .await,
        "forbidden"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_chat_has_one_id_per_pair() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let mut bob = server.connect("bob").await;
    bob.synced().await;
    let direct = |members: Value| json!({"op": "create_chat", "members": members, "direct": true});
    let first = alice.ok(direct(json!(["bob"]))).await["chat"].clone();
    let again = alice.ok(direct(json!(["bob"]))).await["chat"].clone();
    let with_self = alice.ok(direct(json!(["bob", "alice"]))).await["chat"].clone();
    let from_bob = bob.ok(direct(json!(["alice"]))).await["chat"].clone();
    assert_eq!(again, first);
    assert_eq!(with_self, first);
    assert_eq!(from_bob, first, "the pair, in either order, has one chat");
    let chat = first.as_str().unwrap().to_owned();
    // Created once: one members event, and one chat in each list.
    assert_eq!(alice.last_seq(&chat).await, 1);
    for c in [&mut alice, &mut bob] {
        let list = c.ok(json!({"op": "list_chats"})).await;
        let chats = list["chats"].as_array().unwrap();
        assert_eq!(chats.len(), 1, "{list}");
        assert_eq!(member_names(&chats[0]["members"]), ["alice", "bob"]);
    }
    // Another pair is another chat; a group with the same members is not the direct chat.
    let other = alice.ok(direct(json!(["carol"]))).await["chat"].clone();
    assert_ne!(other, first);
    let group = alice.create(&["bob"], "g").await;
    assert_ne!(json!(group), first);
    // It works like any chat.
    let sent = bob.send_msg(&chat, "hi", "hello").await;
    assert_eq!(sent["seq"], 2);
    let ev = alice.until_event(&chat, 2).await.pop().unwrap();
    assert_eq!(ev["event"]["body"], "hello");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_may_have_the_creator_as_its_only_member() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let chat = alice.create(&[], "notes").await;
    let ev = alice.until_event(&chat, 1).await.pop().unwrap();
    assert_eq!(ev["event"]["added"], json!(["alice"]));
    assert_eq!(alice.send_msg(&chat, "n1", "note").await["seq"], 2);
    server.stop().await;
}
