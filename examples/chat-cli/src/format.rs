//! Turning server frames into the lines a person reads.
//!
//! Every function here is pure (`serde_json::Value` in, `String` out) and total: a field that is
//! missing or of the wrong type is shown as `?` rather than making the client panic, because the
//! server is outside this program's control. Text that came from the server is passed through
//! [`clean`] so that a body holding terminal escape sequences cannot repaint the user's screen.

use serde_json::Value;

/// Longest piece of raw JSON shown when a frame is not understood, in characters.
pub const RAW_JSON_CHARS_MAX: usize = 400;

/// Milliseconds in a day, for [`time_of_day`].
const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// Makes server-supplied text safe to print on one terminal line: control characters
/// (newlines, escapes, ...) are shown escaped (`\n`, `\u{1b}`) instead of being interpreted.
pub fn clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Shows a scalar the way a person would write it: strings without quotes (cleaned), numbers
/// and booleans as themselves, `?` for a missing value or `null`, and anything else as compact
/// JSON.
pub fn scalar(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "?".to_owned(),
        Some(Value::String(s)) => clean(s),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(other) => raw(other),
    }
}

/// Compact JSON of `value`, cleaned and cut to [`RAW_JSON_CHARS_MAX`] characters.
pub fn raw(value: &Value) -> String {
    let text = clean(&value.to_string());
    if text.chars().count() <= RAW_JSON_CHARS_MAX {
        return text;
    }
    let mut cut: String = text.chars().take(RAW_JSON_CHARS_MAX).collect();
    cut.push('…');
    cut
}

/// `n` with the noun in the right number: `1 reply`, `2 replies`.
pub fn count(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

/// A delay for people: `250 ms`, `1 s`, `2.5 s`.
pub fn duration(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

/// `HH:MM:SS` (UTC) of a timestamp in milliseconds since the Unix epoch.
pub fn time_of_day(ts_ms: u64) -> String {
    let seconds = (ts_ms % DAY_MS) / 1000;
    format!(
        "{:02}:{:02}:{:02}",
        seconds / 3600,
        (seconds / 60) % 60,
        seconds % 60
    )
}

/// A list of users (`["bob","carol"]`) as `bob, carol`; `-` when empty or not a list.
fn user_list(value: Option<&Value>) -> String {
    let users: Vec<String> = value
        .and_then(Value::as_array)
        .map(|list| list.iter().map(|u| scalar(Some(u))).collect())
        .unwrap_or_default();
    if users.is_empty() {
        "-".to_owned()
    } else {
        users.join(", ")
    }
}

/// Whether `value` is a non-empty array.
fn non_empty_list(value: Option<&Value>) -> bool {
    value
        .and_then(Value::as_array)
        .is_some_and(|l| !l.is_empty())
}

/// One chat event (as pushed or as found in history) on one line:
/// `[g1 #5 12:34:56] alice: hello`.
///
/// History events carry `edited`/`deleted` flags, shown as `(edited)` and `(deleted)`.
pub fn event(event: &Value) -> String {
    let prefix = format!(
        "[{} #{} {}]",
        scalar(event.get("chat")),
        scalar(event.get("seq")),
        event
            .get("ts")
            .and_then(Value::as_u64)
            .map_or_else(|| "--:--:--".to_owned(), time_of_day)
    );
    let sender = scalar(event.get("sender"));
    let kind = event.get("kind").and_then(Value::as_str).unwrap_or("?");
    let text = match kind {
        "message" => {
            let deleted = event.get("deleted").and_then(Value::as_bool) == Some(true);
            let mut text = format!("{sender}:");
            if deleted {
                text.push_str(" (deleted)");
            } else {
                if let Some(body) = event.get("body").and_then(Value::as_str) {
                    text.push(' ');
                    text.push_str(&clean(body));
                }
                if let Some(file) = event.get("file").filter(|f| !f.is_null()) {
                    text.push_str(&format!(" [file {}]", scalar(Some(file))));
                }
                if event.get("edited").and_then(Value::as_bool) == Some(true) {
                    text.push_str(" (edited)");
                }
            }
            text
        }
        "edit" => format!(
            "{sender} edited #{}: {}",
            scalar(event.get("target")),
            scalar(event.get("body"))
        ),
        "delete" => format!("{sender} deleted #{}", scalar(event.get("target"))),
        "members" => members_text(&sender, event),
        other => format!("{sender}: {} event {}", clean(other), raw(event)),
    };
    format!("{prefix} {text}")
}

/// The text of a `members` event: creation (it carries the title), additions, removals.
fn members_text(sender: &str, event: &Value) -> String {
    let added = event.get("added");
    let removed = event.get("removed");
    if let Some(title) = event.get("title").filter(|t| !t.is_null()) {
        return format!(
            "{sender} created \"{}\" with {}",
            scalar(Some(title)),
            user_list(added)
        );
    }
    let first = event.get("seq").and_then(Value::as_u64) == Some(1);
    if first && non_empty_list(added) && !non_empty_list(removed) {
        // A chat's first event adds everyone; direct chats have no title.
        return format!("{sender} created the chat with {}", user_list(added));
    }
    let mut parts = Vec::new();
    if non_empty_list(added) {
        parts.push(format!("added {}", user_list(added)));
    }
    if non_empty_list(removed) {
        let only_sender = removed
            .and_then(Value::as_array)
            .is_some_and(|l| l.len() == 1 && l[0].as_str() == Some(sender));
        if only_sender {
            parts.push("left".to_owned());
        } else {
            parts.push(format!("removed {}", user_list(removed)));
        }
    }
    if parts.is_empty() {
        return format!("{sender} changed nothing in the members");
    }
    format!("{sender} {}", parts.join(" and "))
}

/// The `welcome` push: `connected as alice (device cli)`.
pub fn welcome(frame: &Value) -> String {
    format!(
        "connected as {} (device {})",
        scalar(frame.get("user")),
        scalar(frame.get("device"))
    )
}

/// The `synced` push, with how many events the resume brought.
pub fn synced(resumed_events: u64) -> String {
    match resumed_events {
        0 => "-- synced: nothing new --".to_owned(),
        1 => "-- synced: 1 event above was new --".to_owned(),
        n => format!("-- synced: {n} events above were new --"),
    }
}

/// A `receipt` push: `[g1] bob: delivered #5, read #4`.
pub fn receipt(frame: &Value) -> String {
    format!(
        "[{}] {}: delivered #{}, read #{}",
        scalar(frame.get("chat")),
        scalar(frame.get("user")),
        scalar(frame.get("delivered")),
        scalar(frame.get("read"))
    )
}

/// A presence state (`online`, `last_seen`) as `online` or `offline, last seen 12:00:01`.
fn presence_state(value: &Value) -> String {
    if value.get("online").and_then(Value::as_bool) == Some(true) {
        return "online".to_owned();
    }
    match value.get("last_seen").and_then(Value::as_u64) {
        Some(ts_ms) => format!("offline, last seen {}", time_of_day(ts_ms)),
        None => "offline, never seen".to_owned(),
    }
}

/// A `presence` push: `* bob is online`.
pub fn presence_change(frame: &Value) -> String {
    format!(
        "* {} is {}",
        scalar(frame.get("user")),
        presence_state(frame)
    )
}

/// A `typing` push: `[g1] bob is typing…`.
pub fn typing(frame: &Value) -> String {
    format!(
        "[{}] {} is typing…",
        scalar(frame.get("chat")),
        scalar(frame.get("user"))
    )
}

/// The error object of a reply or push: `error forbidden: not a member`, with the retry
/// delay of `rate_limited`. `op` names the request it answers, when known.
pub fn error(op: Option<&str>, error: &Value) -> String {
    let code = scalar(error.get("code"));
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .map(clean)
        .unwrap_or_default();
    let mut text = match op {
        Some(op) => format!("error ({op}) {code}"),
        None => format!("error {code}"),
    };
    if !message.is_empty() {
        text.push_str(": ");
        text.push_str(&message);
    }
    if let Some(retry_ms) = error.get("retry_after_ms").and_then(Value::as_u64) {
        text.push_str(&format!(" (retry after {retry_ms} ms)"));
    }
    text
}

/// The result of `list_chats` as a table, one chat a line, unread = `last_seq - read`.
pub fn chats(result: &Value) -> String {
    let Some(chats) = result.get("chats").and_then(Value::as_array) else {
        return format!("unexpected list_chats result: {}", raw(result));
    };
    if chats.is_empty() {
        return "no chats yet: /create <title> <user>... or /direct <user>".to_owned();
    }
    let mut lines = vec![format!(
        "{:<20} {:>8} {:>6}  {:<20} members",
        "chat", "last_seq", "unread", "title"
    )];
    for chat in chats {
        let last_seq = chat.get("last_seq").and_then(Value::as_u64);
        let read = chat.get("read").and_then(Value::as_u64).unwrap_or(0);
        let unread =
            last_seq.map_or_else(|| "?".to_owned(), |l| l.saturating_sub(read).to_string());
        let title = match chat.get("title") {
            None | Some(Value::Null) => "-".to_owned(),
            title => scalar(title),
        };
        lines.push(format!(
            "{:<20} {:>8} {:>6}  {:<20} {}",
            scalar(chat.get("chat")),
            scalar(chat.get("last_seq")),
            unread,
            title,
            user_list(chat.get("members"))
        ));
    }
    lines.join("\n")
}

/// The result of `receipts` as one line per member: `bob: delivered #5, read #4`.
pub fn receipts(chat: &str, result: &Value) -> String {
    let Some(receipts) = result.get("receipts").and_then(Value::as_array) else {
        return format!("unexpected receipts result: {}", raw(result));
    };
    let mut lines = vec![format!("receipts in {chat}:")];
    for receipt in receipts {
        lines.push(format!(
            "  {}: delivered #{}, read #{}",
            scalar(receipt.get("user")),
            scalar(receipt.get("delivered")),
            scalar(receipt.get("read"))
        ));
    }
    lines.join("\n")
}

/// The result of `presence` as one line per user: `bob: online`.
pub fn presence_list(result: &Value) -> String {
    let Some(list) = result.get("presence").and_then(Value::as_array) else {
        return format!("unexpected presence result: {}", raw(result));
    };
    if list.is_empty() {
        return "no users asked".to_owned();
    }
    list.iter()
        .map(|p| format!("{}: {}", scalar(p.get("user")), presence_state(p)))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn message_event_is_one_line_with_chat_seq_time_sender_and_body() {
        let e = json!({"chat":"g1","seq":5,"kind":"message","sender":"alice",
            "ts": 45_296_000u64, "cmid":"x","body":"hello","file":null});
        assert_eq!(event(&e), "[g1 #5 12:34:56] alice: hello");
    }

    #[test]
    fn history_flags_and_files_are_shown() {
        let edited = json!({"chat":"g1","seq":2,"kind":"message","sender":"bob","ts":0,
            "body":"new","file":"f9","edited":true,"deleted":false});
        assert_eq!(
            event(&edited),
            "[g1 #2 00:00:00] bob: new [file f9] (edited)"
        );
        let deleted = json!({"chat":"g1","seq":3,"kind":"message","sender":"bob","ts":0,
            "body":null,"edited":true,"deleted":true});
        assert_eq!(event(&deleted), "[g1 #3 00:00:00] bob: (deleted)");
    }

    #[test]
    fn edit_delete_and_member_events() {
        let edit =
            json!({"chat":"g1","seq":4,"kind":"edit","sender":"a","ts":0,"target":2,"body":"b"});
        assert_eq!(event(&edit), "[g1 #4 00:00:00] a edited #2: b");
        let delete = json!({"chat":"g1","seq":5,"kind":"delete","sender":"a","ts":0,"target":2});
        assert_eq!(event(&delete), "[g1 #5 00:00:00] a deleted #2");
        let created = json!({"chat":"g1","seq":1,"kind":"members","sender":"a","ts":0,
            "added":["a","b"],"removed":[],"title":"Team"});
        assert_eq!(
            event(&created),
            "[g1 #1 00:00:00] a created \"Team\" with a, b"
        );
        let untitled = json!({"chat":"d:a:b","seq":1,"kind":"members","sender":"a","ts":0,
            "added":["a","b"],"removed":[],"title":null});
        assert_eq!(
            event(&untitled),
            "[d:a:b #1 00:00:00] a created the chat with a, b"
        );
        let removed = json!({"chat":"g1","seq":6,"kind":"members","sender":"a","ts":0,
            "added":["c"],"removed":["b"]});
        assert_eq!(event(&removed), "[g1 #6 00:00:00] a added c and removed b");
        let left = json!({"chat":"g1","seq":7,"kind":"members","sender":"c","ts":0,
            "added":[],"removed":["c"]});
        assert_eq!(event(&left), "[g1 #7 00:00:00] c left");
    }

    #[test]
    fn malformed_events_do_not_panic_and_show_question_marks() {
        assert_eq!(event(&json!({})), "[? #? --:--:--] ?: ? event {}");
        assert_eq!(event(&json!(null)), "[? #? --:--:--] ?: ? event null");
        assert_eq!(
            event(&json!({"kind":"message","seq":"x","body":7})),
            "[? #x --:--:--] ?:"
        );
        assert_eq!(
            event(&json!({"kind":"members","added":"nope"})),
            "[? #? --:--:--] ? changed nothing in the members"
        );
    }

    #[test]
    fn control_characters_from_the_server_are_escaped() {
        let e = json!({"chat":"g1","seq":1,"kind":"message","sender":"a","ts":0,
            "body":"line1\nline2 \u{1b}[2J"});
        assert_eq!(event(&e), "[g1 #1 00:00:00] a: line1\\nline2 \\u{1b}[2J");
    }

    #[test]
    fn raw_json_is_cut() {
        let long = json!("x".repeat(RAW_JSON_CHARS_MAX * 2));
        let shown = raw(&long);
        assert_eq!(shown.chars().count(), RAW_JSON_CHARS_MAX + 1);
        assert!(shown.ends_with('…'));
    }

    #[test]
    fn counts_and_durations() {
        assert_eq!(count(1, "reply", "replies"), "1 reply");
        assert_eq!(count(0, "reply", "replies"), "0 replies");
        assert_eq!(duration(250), "250 ms");
        assert_eq!(duration(2000), "2 s");
        assert_eq!(duration(2500), "2.5 s");
    }

    #[test]
    fn time_of_day_wraps_at_midnight() {
        assert_eq!(time_of_day(0), "00:00:00");
        assert_eq!(time_of_day(DAY_MS - 1), "23:59:59");
        assert_eq!(time_of_day(DAY_MS + 61_000), "00:01:01");
    }

    #[test]
    fn pushes() {
        assert_eq!(
            welcome(&json!({"ev":"welcome","user":"alice","device":"cli"})),
            "connected as alice (device cli)"
        );
        assert_eq!(
            receipt(&json!({"ev":"receipt","chat":"g1","user":"bob","delivered":5,"read":4})),
            "[g1] bob: delivered #5, read #4"
        );
        assert_eq!(
            typing(&json!({"ev":"typing","chat":"g1","user":"bob"})),
            "[g1] bob is typing…"
        );
        assert_eq!(
            presence_change(&json!({"ev":"presence","user":"bob","online":true,"last_seen":1})),
            "* bob is online"
        );
        assert_eq!(
            presence_change(&json!({"user":"bob","online":false,"last_seen":3_600_000})),
            "* bob is offline, last seen 01:00:00"
        );
        assert_eq!(
            presence_change(&json!({"user":"bob","online":false,"last_seen":null})),
            "* bob is offline, never seen"
        );
        assert_eq!(synced(0), "-- synced: nothing new --");
        assert_eq!(synced(3), "-- synced: 3 events above were new --");
    }

    #[test]
    fn errors_show_code_message_and_retry_delay() {
        assert_eq!(
            error(
                Some("send"),
                &json!({"code":"rate_limited","message":"slow down","retry_after_ms":250})
            ),
            "error (send) rate_limited: slow down (retry after 250 ms)"
        );
        assert_eq!(error(None, &json!({"code":"too_large"})), "error too_large");
        assert_eq!(error(None, &json!("weird")), "error ?");
    }

    #[test]
    fn chat_table_counts_unread_from_read_cursor() {
        let result = json!({"chats":[
            {"chat":"g1","title":"Team","members":["alice","bob"],"last_seq":10,"delivered":9,"read":7},
            {"chat":"d:alice:bob","title":null,"members":["alice","bob"],"last_seq":3,"delivered":0,"read":5}
        ]});
        let table = chats(&result);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("chat"));
        let g1: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(g1, ["g1", "10", "3", "Team", "alice,", "bob"]);
        // A read cursor past last_seq (a server bug) must not underflow.
        let direct: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(direct[..4], ["d:alice:bob", "3", "0", "-"]);
    }

    #[test]
    fn chat_table_handles_empty_and_malformed_results() {
        assert!(chats(&json!({"chats":[]})).starts_with("no chats yet"));
        assert!(chats(&json!({})).starts_with("unexpected list_chats result"));
        let odd = chats(&json!({"chats":[{"chat":1}]}));
        assert!(odd.lines().nth(1).unwrap().contains('?'));
    }

    #[test]
    fn receipts_and_presence_lists() {
        let r = receipts(
            "g1",
            &json!({"receipts":[{"user":"bob","delivered":5,"read":4}]}),
        );
        assert_eq!(r, "receipts in g1:\n  bob: delivered #5, read #4");
        assert!(receipts("g1", &json!([])).starts_with("unexpected"));
        let p = presence_list(&json!({"presence":[
            {"user":"bob","online":true,"last_seen":5},
            {"user":"eve","online":false,"last_seen":null}
        ]}));
        assert_eq!(p, "bob: online\neve: offline, never seen");
    }
}
