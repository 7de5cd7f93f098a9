//! The workload, as pure functions: who is who, which chats exist, what a message body holds and
//! when each connection sends.
//!
//! # Mapping
//!
//! - Connection `i` (0-based, over all worker processes) is device `i % D` of user `i / D`, where
//!   `D` is `--devices-per-user`. There are `U = ceil(N / D)` users.
//! - Chat `c` (0-based) has the `G` users `(c*G + j) mod U` for `j` in `0..G`; the first of them
//!   (`c*G mod U`) creates it. With `M*G <= U` every user is in at most one chat; with more chats
//!   the assignment wraps and users are in several.
//! - Worker `k` of `P` owns the contiguous connection range `[k*N/P, (k+1)*N/P)`.
//! - A connection sends to the chats of its user in turn; at `--rate R` each connection sends
//!   every `N/R` seconds, the connections' first sends spread evenly over one period.

use std::ops::Range;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Sockets one worker process may hold: the per-process open-files limit here is 20,000 (hard),
/// and the process needs some descriptors of its own.
pub const SOCKETS_PER_PROCESS_MAX: usize = 16_000;
/// Prefix of every message body; the send timestamp (µs since the Unix epoch) follows.
const BODY_PREFIX: &str = "ts=";
/// Ends the timestamp in a body; padding follows.
const BODY_TIMESTAMP_END: char = ';';
/// Digits of the largest `u64`.
const U64_DIGITS_MAX: usize = 20;
/// Smallest body that holds any timestamp: prefix, 20 digits, terminator.
pub const BODY_BYTES_MIN: usize = BODY_PREFIX.len() + U64_DIGITS_MAX + 1;
/// The byte bodies are padded with (ASCII, so the body needs no JSON escaping).
const BODY_PADDING: char = 'x';

/// Who is who: the users, devices and chats the flags describe. See the module docs.
#[derive(Debug, Clone)]
pub struct Layout {
    connections: usize,
    devices_per_user: usize,
    users: usize,
    chats: usize,
    group: usize,
}

impl Layout {
    /// Checks that the numbers describe a workload (every chat has `group` distinct users).
    pub fn new(
        connections: usize,
        devices_per_user: usize,
        chats: usize,
        group: usize,
    ) -> Result<Self, String> {
        if devices_per_user == 0 {
            return Err("--devices-per-user must be at least 1".into());
        }
        let users = connections.div_ceil(devices_per_user);
        if chats > 0 && group > users {
            return Err(format!(
                "a chat of {group} members needs at least {group} users; \
                 {connections} connections with {devices_per_user} devices per user make {users}"
            ));
        }
        Ok(Self {
            connections,
            devices_per_user,
            users,
            chats,
            group,
        })
    }

    /// Number of connections in all.
    pub fn connections(&self) -> usize {
        self.connections
    }

    /// Number of users.
    pub fn users(&self) -> usize {
        self.users
    }

    /// Number of chats.
    pub fn chats(&self) -> usize {
        self.chats
    }

    /// The user (index) that connection `connection` belongs to.
    pub fn user_of_connection(&self, connection: usize) -> usize {
        connection / self.devices_per_user
    }

    /// The device number of connection `connection` within its user.
    pub fn device_of_connection(&self, connection: usize) -> usize {
        connection % self.devices_per_user
    }

    /// The member users (indexes) of chat `chat`, its creator first.
    pub fn members(&self, chat: usize) -> impl Iterator<Item = usize> + '_ {
        let first = chat * self.group;
        (0..self.group).map(move |j| (first + j) % self.users)
    }

    /// The user (index) that creates chat `chat`.
    pub fn creator(&self, chat: usize) -> usize {
        (chat * self.group) % self.users
    }

    /// For every user, the chats it is a member of, ascending.
    pub fn chats_by_user(&self) -> Vec<Vec<usize>> {
        let mut by_user = vec![Vec::new(); self.users];
        for chat in 0..self.chats {
            for user in self.members(chat) {
                by_user[user].push(chat);
            }
        }
        by_user
    }

    /// The connections worker `worker` of `workers` owns.
    pub fn connection_range(&self, worker: usize, workers: usize) -> Range<usize> {
        assert!(
            workers > 0 && worker < workers,
            "worker {worker} of {workers}"
        );
        let start = worker * self.connections / workers;
        let end = (worker + 1) * self.connections / workers;
        start..end
    }
}

/// The user id of user `user`.
pub fn user_name(prefix: &str, user: usize) -> String {
    format!("{prefix}{user}")
}

/// The device id of device `device` in run `run_id`. Devices are new in every run, so the server
/// starts them at each chat's current end instead of replaying earlier runs' messages.
pub fn device_name(run_id: &str, device: usize) -> String {
    format!("{run_id}-d{device}")
}

/// The title of chat `chat` in run `run_id`.
pub fn chat_title(run_id: &str, chat: usize) -> String {
    format!("load-{run_id}-{chat}")
}

/// A client message id unique to (run, connection, message number): at most 64 characters for a
/// run id of at most 16.
pub fn cmid(run_id: &str, connection: usize, number: u64) -> String {
    format!("{run_id}-{connection}-{number}")
}

/// A message body of exactly `body_bytes` ASCII bytes (at least [`BODY_BYTES_MIN`]) holding
/// `timestamp_us`.
pub fn encode_body(timestamp_us: u64, body_bytes: usize) -> String {
    assert!(body_bytes >= BODY_BYTES_MIN, "body of {body_bytes} bytes");
    let mut body = String::with_capacity(body_bytes);
    body.push_str(BODY_PREFIX);
    body.push_str(&timestamp_us.to_string());
    body.push(BODY_TIMESTAMP_END);
    while body.len() < body_bytes {
        body.push(BODY_PADDING);
    }
    body
}

/// The timestamp (µs) in a body made by [`encode_body`]; `None` for any other text.
pub fn decode_body(body: &str) -> Option<u64> {
    let rest = body.strip_prefix(BODY_PREFIX)?;
    let end = rest.find(BODY_TIMESTAMP_END)?;
    let digits = &rest[..end];
    if digits.is_empty() || digits.len() > U64_DIGITS_MAX {
        return None;
    }
    digits.parse().ok()
}

/// Microseconds since the Unix epoch. All processes run on one machine, so this clock is
/// comparable between sender and recipient.
pub fn now_us() -> u64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    u64::try_from(since_epoch.as_micros()).unwrap_or(u64::MAX)
}

/// Time between two sends of one connection at `rate_total` messages/s over `connections`
/// sending connections; `None` means as fast as possible.
pub fn send_period(rate_total: f64, connections: usize) -> Option<Duration> {
    if rate_total <= 0.0 || connections == 0 {
        return None;
    }
    Some(Duration::from_secs_f64(connections as f64 / rate_total))
}

/// Delay before connection `connection`'s first send, so that the connections' sends are spread
/// evenly over one period instead of arriving together.
pub fn first_send_offset(period: Duration, connection: usize, connections: usize) -> Duration {
    if connections == 0 {
        return Duration::ZERO;
    }
    period.mul_f64((connection % connections) as f64 / connections as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_round_trips_its_timestamp() {
        for ts in [0, 1, 1_712_345_678_901_234, u64::MAX] {
            for bytes in [BODY_BYTES_MIN, 200, 1000] {
                let body = encode_body(ts, bytes);
                assert_eq!(body.len(), bytes);
                assert!(body.is_ascii());
                assert_eq!(decode_body(&body), Some(ts));
            }
        }
    }

    #[test]
    fn foreign_bodies_have_no_timestamp() {
        for body in [
            "",
            "hello",
            "ts=",
            "ts=;",
            "ts=12",
            "ts=abc;",
            "xts=1;",
            "ts=99999999999999999999;",
        ] {
            assert_eq!(decode_body(body), None, "{body:?}");
        }
    }

    #[test]
    fn connections_map_to_users_and_devices() {
        let layout = Layout::new(10, 2, 1, 2).unwrap();
        assert_eq!(layout.users(), 5);
        assert_eq!(layout.user_of_connection(0), 0);
        assert_eq!(layout.user_of_connection(1), 0);
        assert_eq!(layout.device_of_connection(1), 1);
        assert_eq!(layout.user_of_connection(9), 4);
        // An odd count leaves the last user with fewer devices.
        assert_eq!(Layout::new(9, 2, 1, 2).unwrap().users(), 5);
    }

    #[test]
    fn chats_take_consecutive_users_and_wrap() {
        let layout = Layout::new(10, 1, 4, 4).unwrap();
        assert_eq!(layout.members(0).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        assert_eq!(layout.members(2).collect::<Vec<_>>(), vec![8, 9, 0, 1]);
        assert_eq!(layout.creator(2), 8);
        let by_user = layout.chats_by_user();
        assert_eq!(by_user[0], vec![0, 2]);
        assert_eq!(by_user[4], vec![1, 3]);
        assert_eq!(by_user[9], vec![2]);
        let memberships: usize = by_user.iter().map(Vec::len).sum();
        assert_eq!(memberships, 4 * 4);
    }

    #[test]
    fn one_chat_per_user_when_groups_fit() {
        let layout = Layout::new(1000, 1, 125, 8).unwrap();
        assert!(layout.chats_by_user().iter().all(|chats| chats.len() == 1));
    }

    #[test]
    fn group_larger_than_users_is_rejected() {
        assert!(Layout::new(4, 1, 1, 8).is_err());
        assert!(Layout::new(4, 1, 0, 8).is_ok());
        assert!(Layout::new(4, 0, 1, 2).is_err());
    }

    #[test]
    fn worker_ranges_cover_every_connection_once() {
        let layout = Layout::new(1001, 1, 1, 1).unwrap();
        let mut next = 0;
        for worker in 0..7 {
            let range = layout.connection_range(worker, 7);
            assert_eq!(range.start, next);
            next = range.end;
        }
        assert_eq!(next, 1001);
    }

    #[test]
    fn pacing_spreads_sends_over_a_period() {
        assert_eq!(send_period(0.0, 10), None);
        let period = send_period(10_000.0, 1000).unwrap();
        assert_eq!(period, Duration::from_millis(100));
        assert_eq!(first_send_offset(period, 0, 1000), Duration::ZERO);
        assert_eq!(
            first_send_offset(period, 500, 1000),
            Duration::from_millis(50)
        );
    }

    #[test]
    fn cmid_fits_the_protocol_limit() {
        let id = cmid("0123456789abcdef", 999_999, u64::MAX);
        assert!(id.len() <= 64, "{id}");
    }
}
