//! Parsing what the user types into a [`Command`]. Pure: a line in, a command or a usage
//! message out.

use crate::request::HISTORY_LIMIT_MAX;

/// Events shown by `/open` and by `/history` without a count, and fetched by `/older`.
pub const PAGE_EVENTS_DEFAULT: u32 = 20;

/// The `/help` text.
pub const HELP: &str = "\
commands:
  /chats                     list your chats with unread counts
  /create <title> <user>...  create a group chat (quote a title with spaces: \"Team A\")
  /direct <user>             open the direct chat with a user
  /open <chat>               make <chat> current and show its last 20 events
  <text>                     send a message to the current chat (start with // to send a /)
  /history [n]               show the last n events of the current chat (default 20)
  /older                     show the page before the oldest event shown
  /edit <seq> <text>         replace the text of your message <seq>
  /delete <seq>              delete message <seq>
  /read                      mark the current chat read up to its last event
  /receipts                  who has received and read what in the current chat
  /add <user>...             add members to the current chat
  /remove <user>...          remove members from the current chat (yourself to leave)
  /presence <user>...        who is online
  /watch <user>...           be told whenever these users come or go
  /typing                    tell the current chat you are typing
  /help                      this text
  /quit                      leave (after the replies still awaited, at most a few seconds)";

/// One thing the user asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// An empty line: nothing to do.
    Nothing,
    /// `/help`.
    Help,
    /// `/chats`.
    Chats,
    /// `/create <title> <user>...`.
    Create {
        /// The chat's title.
        title: String,
        /// The other members.
        users: Vec<String>,
    },
    /// `/direct <user>`.
    Direct {
        /// The other user.
        user: String,
    },
    /// `/open <chat>`: the chat as typed; the session resolves it against known chats.
    Open {
        /// The chat id as typed.
        chat: String,
    },
    /// A plain line: a message for the current chat.
    Say {
        /// The text.
        body: String,
    },
    /// `/history [n]`.
    History {
        /// How many events.
        limit: u32,
    },
    /// `/older`.
    Older,
    /// `/edit <seq> <text>`.
    Edit {
        /// Seq of the message.
        target: u64,
        /// The new text.
        body: String,
    },
    /// `/delete <seq>`.
    Delete {
        /// Seq of the message.
        target: u64,
    },
    /// `/read`.
    Read,
    /// `/receipts`.
    Receipts,
    /// `/add <user>...`.
    Add {
        /// Users to add.
        users: Vec<String>,
    },
    /// `/remove <user>...`.
    Remove {
        /// Users to remove.
        users: Vec<String>,
    },
    /// `/presence <user>...`.
    Presence {
        /// Users to ask about.
        users: Vec<String>,
    },
    /// `/watch <user>...`.
    Watch {
        /// Users to follow.
        users: Vec<String>,
    },
    /// `/typing`.
    Typing,
    /// `/quit`.
    Quit,
}

/// Splits `text` into words at whitespace; a word may be wrapped in double quotes to hold
/// spaces (`"Team A"`). An unclosed quote runs to the end of the line.
fn words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let Some(&first) = chars.peek() else {
            return words;
        };
        let mut word = String::new();
        if first == '"' {
            chars.next();
            for c in chars.by_ref() {
                if c == '"' {
                    break;
                }
                word.push(c);
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                word.push(c);
            }
        }
        words.push(word);
    }
}

/// A seq typed by the user.
fn seq(word: &str, usage: &str) -> Result<u64, String> {
    match word.parse::<u64>() {
        Ok(seq) if seq > 0 => Ok(seq),
        _ => Err(format!("not a seq: {word:?}; usage: {usage}")),
    }
}

/// At least one user name, else the usage text.
fn users(rest: &str, usage: &str) -> Result<Vec<String>, String> {
    let users = words(rest);
    if users.is_empty() {
        return Err(format!("usage: {usage}"));
    }
    Ok(users)
}

/// Parses one input line (without its line ending).
///
/// A line not starting with `/` is a message; `//text` sends `/text`. Errors are the text to
/// show the user (usage of the command, or a hint for an unknown one).
pub fn parse(line: &str) -> Result<Command, String> {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty() {
        return Ok(Command::Nothing);
    }
    if let Some(literal) = line.strip_prefix("//") {
        return Ok(Command::Say {
            body: format!("/{literal}"),
        });
    }
    let Some(command) = line.strip_prefix('/') else {
        return Ok(Command::Say {
            body: line.to_owned(),
        });
    };
    let (name, rest) = command
        .split_once(char::is_whitespace)
        .map_or((command, ""), |(name, rest)| (name, rest.trim()));
    let no_arguments = |command: Command| {
        if rest.is_empty() {
            Ok(command)
        } else {
            Err(format!("/{name} takes no arguments"))
        }
    };
    match name {
        "help" | "h" | "?" => Ok(Command::Help),
        "quit" | "q" | "exit" => no_arguments(Command::Quit),
        "chats" => no_arguments(Command::Chats),
        "older" => no_arguments(Command::Older),
        "read" => no_arguments(Command::Read),
        "receipts" => no_arguments(Command::Receipts),
        "typing" => no_arguments(Command::Typing),
        "create" => {
            let mut words = words(rest);
            if words.len() < 2 {
                return Err("usage: /create <title> <user>...".to_owned());
            }
            let title = words.remove(0);
            Ok(Command::Create {
                title,
                users: words,
            })
        }
        "direct" => match words(rest).as_slice() {
            [user] => Ok(Command::Direct { user: user.clone() }),
            _ => Err("usage: /direct <user>".to_owned()),
        },
        "open" => match words(rest).as_slice() {
            [chat] => Ok(Command::Open { chat: chat.clone() }),
            _ => Err("usage: /open <chat> (see /chats)".to_owned()),
        },
        "history" => match words(rest).as_slice() {
            [] => Ok(Command::History {
                limit: PAGE_EVENTS_DEFAULT,
            }),
            [n] => match n.parse::<u32>() {
                Ok(limit) if (1..=HISTORY_LIMIT_MAX).contains(&limit) => {
                    Ok(Command::History { limit })
                }
                _ => Err(format!(
                    "usage: /history [n], n from 1 to {HISTORY_LIMIT_MAX}"
                )),
            },
            _ => Err("usage: /history [n]".to_owned()),
        },
        "edit" => {
            const USAGE: &str = "/edit <seq> <text>";
            let Some((target, body)) = rest.split_once(char::is_whitespace) else {
                return Err(format!("usage: {USAGE}"));
            };
            let body = body.trim();
            if body.is_empty() {
                return Err(format!("usage: {USAGE}"));
            }
            Ok(Command::Edit {
                target: seq(target, USAGE)?,
                body: body.to_owned(),
            })
        }
        "delete" => {
            const USAGE: &str = "/delete <seq>";
            match words(rest).as_slice() {
                [target] => Ok(Command::Delete {
                    target: seq(target, USAGE)?,
                }),
                _ => Err(format!("usage: {USAGE}")),
            }
        }
        "add" => Ok(Command::Add {
            users: users(rest, "/add <user>...")?,
        }),
        "remove" => Ok(Command::Remove {
            users: users(rest, "/remove <user>...")?,
        }),
        "presence" => Ok(Command::Presence {
            users: users(rest, "/presence <user>...")?,
        }),
        "watch" => Ok(Command::Watch {
            users: users(rest, "/watch <user>...")?,
        }),
        _ => Err(format!(
            "unknown command /{name}: /help lists them (start with // to send a line beginning with /)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn plain_lines_are_messages() {
        assert_eq!(
            parse("hello there \r\n"),
            Ok(Command::Say {
                body: "hello there ".into()
            })
        );
        assert_eq!(
            parse("//me waves"),
            Ok(Command::Say {
                body: "/me waves".into()
            })
        );
        assert_eq!(parse("   "), Ok(Command::Nothing));
        assert_eq!(parse(""), Ok(Command::Nothing));
    }

    #[test]
    fn commands_without_arguments() {
        assert_eq!(parse("/help"), Ok(Command::Help));
        assert_eq!(parse("/chats"), Ok(Command::Chats));
        assert_eq!(parse("/older"), Ok(Command::Older));
        assert_eq!(parse("/read"), Ok(Command::Read));
        assert_eq!(parse("/receipts"), Ok(Command::Receipts));
        assert_eq!(parse("/typing"), Ok(Command::Typing));
        assert_eq!(parse("/quit"), Ok(Command::Quit));
        assert!(matches!(parse("/chats now"), Err(e) if e.contains("no arguments")));
    }

    #[test]
    fn create_takes_a_possibly_quoted_title_and_users() {
        assert_eq!(
            parse("/create Team bob carol"),
            Ok(Command::Create {
                title: "Team".into(),
                users: strings(&["bob", "carol"])
            })
        );
        assert_eq!(
            parse("/create \"Team A\"   bob"),
            Ok(Command::Create {
                title: "Team A".into(),
                users: strings(&["bob"])
            })
        );
        assert!(matches!(parse("/create Team"), Err(e) if e.starts_with("usage")));
    }

    #[test]
    fn chat_and_user_commands() {
        assert_eq!(
            parse("/direct bob"),
            Ok(Command::Direct { user: "bob".into() })
        );
        assert!(matches!(parse("/direct"), Err(e) if e.contains("usage")));
        assert!(matches!(parse("/direct bob carol"), Err(e) if e.contains("usage")));
        assert_eq!(
            parse("/open d:alice:bob"),
            Ok(Command::Open {
                chat: "d:alice:bob".into()
            })
        );
        assert!(matches!(parse("/open"), Err(e) if e.contains("usage")));
        assert_eq!(
            parse("/add dan  eve"),
            Ok(Command::Add {
                users: strings(&["dan", "eve"])
            })
        );
        assert_eq!(
            parse("/remove dan"),
            Ok(Command::Remove {
                users: strings(&["dan"])
            })
        );
        assert_eq!(
            parse("/presence bob"),
            Ok(Command::Presence {
                users: strings(&["bob"])
            })
        );
        assert_eq!(
            parse("/watch bob eve"),
            Ok(Command::Watch {
                users: strings(&["bob", "eve"])
            })
        );
        assert!(matches!(parse("/watch"), Err(e) if e == "usage: /watch <user>..."));
    }

    #[test]
    fn history_counts_are_bounded() {
        assert_eq!(
            parse("/history"),
            Ok(Command::History {
                limit: PAGE_EVENTS_DEFAULT
            })
        );
        assert_eq!(parse("/history 5"), Ok(Command::History { limit: 5 }));
        assert!(matches!(parse("/history 0"), Err(e) if e.contains("usage")));
        assert!(matches!(parse("/history 501"), Err(e) if e.contains("usage")));
        assert!(matches!(parse("/history x"), Err(e) if e.contains("usage")));
    }

    #[test]
    fn edit_keeps_the_rest_of_the_line_and_delete_needs_a_seq() {
        assert_eq!(
            parse("/edit 12 new  text here"),
            Ok(Command::Edit {
                target: 12,
                body: "new  text here".into()
            })
        );
        assert!(matches!(parse("/edit 12"), Err(e) if e.starts_with("usage")));
        assert!(matches!(parse("/edit x text"), Err(e) if e.starts_with("not a seq")));
        assert!(matches!(parse("/edit 0 text"), Err(e) if e.starts_with("not a seq")));
        assert_eq!(parse("/delete 3"), Ok(Command::Delete { target: 3 }));
        assert!(matches!(parse("/delete"), Err(e) if e.contains("usage")));
        assert!(matches!(parse("/delete -1"), Err(e) if e.contains("usage")));
    }

    #[test]
    fn unknown_commands_point_to_help() {
        assert!(matches!(parse("/frobnicate"), Err(e) if e.contains("/help")));
    }

    #[test]
    fn words_handles_quotes_and_spacing() {
        assert_eq!(words("  a  \"b c\" d"), strings(&["a", "b c", "d"]));
        assert_eq!(words("\"unclosed quote"), strings(&["unclosed quote"]));
        assert_eq!(words("\"\""), strings(&[""]));
        assert!(words("   ").is_empty());
    }
}
