//! Failures in the audit log without letting them fill it: refused logins, refused
//! tokens, denials and rate limits are recorded, but repeats are aggregated.
//!
//! Rows are not written one by one: they wait here, and the server writes what is
//! waiting once a second in one transaction, so a flood of refusals costs the database
//! one commit a second, not one per refusal, and pushes do not queue behind them.
//!
//! In each minute the first failure of a kind (action, user, client) is recorded at once;
//! its repeats in that minute are counted and written as one summary row when the minute
//! ends. At most [`ROWS_PER_MINUTE`] kinds naming a user, and as many naming none, get
//! rows of their own in a minute (two budgets, so a flood of failures that name no user
//! cannot push the failures against real users out of the log); failures past that are
//! counted together in one row. So an attack adds at most about `4 * ROWS_PER_MINUTE + 1`
//! rows a minute, however many requests it sends, and memory holds at most
//! `2 * ROWS_PER_MINUTE` kinds.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::store::meta::auth::AuditEntry;

pub const ROWS_PER_MINUTE: u32 = 100;
const WINDOW: Duration = Duration::from_secs(60);

type Kind = (String, Option<String>, Option<String>);

struct State {
    start: Instant,
    /// Kinds with a row this minute, and their repeats since.
    repeats: HashMap<Kind, u32>,
    /// Of those, the kinds that name a user.
    named: u32,
    /// Failures of kinds past the cap.
    suppressed: u32,
    /// Rows waiting to be written.
    waiting: Vec<AuditEntry>,
}

pub struct Failures {
    state: Mutex<State>,
}

impl Default for Failures {
    fn default() -> Self {
        Failures {
            state: Mutex::new(State {
                start: Instant::now(),
                repeats: HashMap::new(),
                named: 0,
                suppressed: 0,
                waiting: Vec::new(),
            }),
        }
    }
}

fn entry(kind: &Kind, detail: String, at: i64) -> AuditEntry {
    AuditEntry {
        at,
        actor: kind.1.clone(),
        action: kind.0.clone(),
        repository: None,
        detail: Some(detail),
        client: kind.2.clone(),
        credential: None,
    }
}

impl State {
    /// The summary rows of the minute that ended, and a new minute.
    fn roll(&mut self, now: Instant, at: i64) -> Vec<AuditEntry> {
        let mut out: Vec<AuditEntry> = std::mem::take(&mut self.repeats)
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| entry(&k, format!("{n} more in the minute after the first"), at))
            .collect();
        if self.suppressed > 0 {
            out.push(AuditEntry {
                at,
                action: "audit.aggregated".into(),
                detail: Some(format!(
                    "{} more failures in a minute, past {ROWS_PER_MINUTE} kinds, not recorded one by one",
                    self.suppressed
                )),
                ..AuditEntry::default()
            });
            self.suppressed = 0;
        }
        self.start = now;
        self.named = 0;
        out
    }
}

impl Failures {
    /// Records one failure: a row to write, unless it only counts as a repeat.
    pub fn record(
        &self,
        action: &str,
        user: Option<&str>,
        client: Option<IpAddr>,
        detail: &str,
        at: i64,
    ) {
        let now = Instant::now();
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out = if now.duration_since(st.start) >= WINDOW {
            st.roll(now, at)
        } else {
            Vec::new()
        };
        let kind: Kind = (
            action.to_owned(),
            user.map(str::to_owned),
            client.map(|c| c.to_string()),
        );
        let named = kind.1.is_some();
        let used = if named {
            st.named
        } else {
            st.repeats.len() as u32 - st.named
        };
        if let Some(n) = st.repeats.get_mut(&kind) {
            *n += 1;
        } else if used < ROWS_PER_MINUTE {
            out.push(entry(&kind, detail.to_owned(), at));
            st.repeats.insert(kind, 0);
            st.named += u32::from(named);
        } else {
            st.suppressed += 1;
        }
        st.waiting.append(&mut out);
    }

    /// The rows waiting to be written, with the summaries of a minute that has ended.
    pub fn drain(&self, at: i64) -> Vec<AuditEntry> {
        let now = Instant::now();
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if now.duration_since(st.start) >= WINDOW {
            let mut summaries = st.roll(now, at);
            st.waiting.append(&mut summaries);
        }
        std::mem::take(&mut st.waiting)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_and_floods_are_bounded() {
        let f = Failures::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        f.record("login.failed", Some("a"), Some(ip), "pw", 1);
        assert_eq!(f.drain(1).len(), 1);
        for _ in 0..1000 {
            f.record("login.failed", Some("a"), Some(ip), "pw", 1);
        }
        assert!(f.drain(1).is_empty(), "repeats are counted, not written");
        for i in 0..10_000 {
            f.record("login.failed", Some(&format!("u{i}")), Some(ip), "pw", 1);
        }
        let mut rows = 1 + f.drain(1).len();
        assert_eq!(rows as u32, ROWS_PER_MINUTE);
        // Failures naming no user have a budget of their own.
        for i in 0..10_000 {
            let client: IpAddr = format!("10.1.{}.{}", i / 250, i % 250).parse().unwrap();
            f.record("login.failed", None, Some(client), "x", 1);
        }
        rows += f.drain(1).len();
        assert_eq!(rows as u32, 2 * ROWS_PER_MINUTE);
        let st = f.state.lock().unwrap();
        assert_eq!(st.repeats.len() as u32, 2 * ROWS_PER_MINUTE);
        assert_eq!(st.suppressed, 2 * 10_000 - (2 * ROWS_PER_MINUTE - 1));
    }

    #[test]
    fn a_minute_ends_with_its_summaries() {
        let f = Failures::default();
        for _ in 0..3 {
            f.record("token.refused", None, None, "bad signature", 1);
        }
        assert_eq!(f.drain(1).len(), 1);
        {
            let mut st = f.state.lock().unwrap();
            st.start -= WINDOW;
        }
        let rows = f.drain(2);
        assert_eq!(rows.len(), 1);
        assert_eq!(
            rows[0].detail.as_deref(),
            Some("2 more in the minute after the first")
        );
        assert!(f.drain(3).is_empty());
    }
}
