//! Failed-login rate limiting. Failures are counted per (client address, user), per
//! client address and per user, each in a fixed window. The per-user limit is loose and
//! short, so an attacker elsewhere cannot lock the real user out for long.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
const PER_CLIENT_USER: u32 = 5;
const PER_CLIENT: u32 = 20;
const PER_USER: u32 = 50;
/// Past this many tracked keys, expired windows are swept.
const SWEEP_AT: usize = 10_000;

#[derive(Clone, Hash, PartialEq, Eq)]
enum Key {
    ClientUser(IpAddr, String),
    Client(IpAddr),
    User(String),
}

impl Key {
    fn limit(&self) -> u32 {
        match self {
            Key::ClientUser(..) => PER_CLIENT_USER,
            Key::Client(_) => PER_CLIENT,
            Key::User(_) => PER_USER,
        }
    }
}

#[derive(Default)]
pub struct Limiter {
    windows: Mutex<HashMap<Key, (Instant, u32)>>,
}

fn keys(client: Option<IpAddr>, user: &str) -> Vec<Key> {
    let mut k = vec![Key::User(user.to_owned())];
    if let Some(ip) = client {
        k.push(Key::ClientUser(ip, user.to_owned()));
        k.push(Key::Client(ip));
    }
    k
}

impl Limiter {
    /// Seconds to wait if attempts for `user` from `client` are blocked now.
    pub fn blocked(&self, client: Option<IpAddr>, user: &str) -> Option<u64> {
        let now = Instant::now();
        let map = self.windows.lock().expect("limiter lock");
        keys(client, user)
            .iter()
            .filter_map(|k| {
                let (start, n) = map.get(k)?;
                let left = WINDOW.checked_sub(now.duration_since(*start))?;
                (*n >= k.limit()).then(|| left.as_secs().max(1))
            })
            .max()
    }

    pub fn failed(&self, client: Option<IpAddr>, user: &str) {
        let now = Instant::now();
        let mut map = self.windows.lock().expect("limiter lock");
        if map.len() > SWEEP_AT {
            map.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        for k in keys(client, user) {
            let e = map.entry(k).or_insert((now, 0));
            if now.duration_since(e.0) >= WINDOW {
                *e = (now, 0);
            }
            e.1 += 1;
        }
    }

    /// A success clears the (client, user) count, not the wider ones.
    pub fn succeeded(&self, client: Option<IpAddr>, user: &str) {
        if let Some(ip) = client {
            self.windows
                .lock()
                .expect("limiter lock")
                .remove(&Key::ClientUser(ip, user.to_owned()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_one_client_not_the_user_elsewhere() {
        let l = Limiter::default();
        let attacker: IpAddr = "10.0.0.1".parse().unwrap();
        let user: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..PER_CLIENT_USER {
            assert_eq!(l.blocked(Some(attacker), "alice"), None);
            l.failed(Some(attacker), "alice");
        }
        assert!(
            l.blocked(Some(attacker), "alice")
                .is_some_and(|s| (1..=60).contains(&s))
        );
        assert_eq!(l.blocked(Some(user), "alice"), None);
        assert_eq!(l.blocked(Some(attacker), "bob"), None);
    }
}
