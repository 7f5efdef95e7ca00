//! Failed-login rate limiting for passwords.
//!
//! Failures are counted in fixed windows per (client, user), per client and per user.
//! An attempt *reserves* its place in every window before the password is hashed, in one
//! step under the lock, so a burst of simultaneous guesses is counted as it arrives: the
//! sixth of six parallel guesses is refused before any is checked. A success gives its
//! reservation back.
//!
//! The per-user window would let an attacker anywhere lock the user out everywhere, and
//! the per-client one would let an attacker behind the same address (a shared NAT) do
//! it, so neither applies to a client the user signed in from before ("trusted" for
//! [`TRUST_FOR`]): an attack from other addresses slows down the attack, not the user at
//! their usual address, whose own failures are still limited per (client, user). IPv6
//! clients are counted by their /64, which one host usually holds whole.
//!
//! Access tokens are not limited here: their 238 random bits cannot be guessed, and
//! checking one costs a hash and a point read.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
pub const PER_CLIENT_USER: u32 = 5;
pub const PER_CLIENT: u32 = 20;
pub const PER_USER: u32 = 50;
/// How long a successful sign-in from a client exempts it from the per-user window.
pub const TRUST_FOR: Duration = Duration::from_secs(30 * 24 * 3600);
/// Past this many tracked windows, expired ones are swept.
const SWEEP_AT: usize = 10_000;
/// The most trusted (client, user) pairs kept; the oldest go first.
const TRUST_MAX: usize = 100_000;

/// A client address as the limiter counts it: IPv4 whole, IPv6 by its /64.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct ClientKey(u128);

impl From<IpAddr> for ClientKey {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => ClientKey(u128::from(u32::from(v4))),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey(u128::from(u32::from(v4))),
                None => ClientKey((u128::from(v6) >> 64 << 64) | (1 << 32)),
            },
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
enum Key {
    ClientUser(ClientKey, String),
    Client(ClientKey),
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
struct State {
    windows: HashMap<Key, (Instant, u32)>,
    trusted: HashMap<(ClientKey, String), Instant>,
}

#[derive(Default)]
pub struct Limiter {
    state: Mutex<State>,
}

/// A place reserved in each window an attempt counts against. Report the outcome with
/// [`Reservation::succeeded`] or [`Reservation::failed`]; dropped without either (the
/// check itself failed), the place is given back.
pub struct Reservation<'a> {
    limiter: &'a Limiter,
    client: Option<ClientKey>,
    user: String,
    keys: Vec<(Key, Instant)>,
}

impl Limiter {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reserves an attempt for `user` from `client`, or says how many seconds to wait.
    pub fn reserve(&self, client: Option<IpAddr>, user: &str) -> Result<Reservation<'_>, u64> {
        let now = Instant::now();
        let client = client.map(ClientKey::from);
        let mut st = self.lock();
        if st.windows.len() > SWEEP_AT {
            st.windows
                .retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        let trusted = client.is_some_and(|c| {
            st.trusted
                .get(&(c, user.to_owned()))
                .is_some_and(|t| now.duration_since(*t) < TRUST_FOR)
        });
        // A trusted pair counts only its own failures: neither other users' failures
        // from the same address (a shared NAT) nor the user's from elsewhere hold it up.
        let mut keys = Vec::with_capacity(3);
        if let Some(c) = client {
            keys.push(Key::ClientUser(c, user.to_owned()));
            if !trusted {
                keys.push(Key::Client(c));
            }
        }
        if !trusted {
            keys.push(Key::User(user.to_owned()));
        }
        let mut wait = None::<u64>;
        for k in &keys {
            if let Some((start, n)) = st.windows.get(k) {
                if let Some(left) = WINDOW.checked_sub(now.duration_since(*start)) {
                    if *n >= k.limit() {
                        let secs = left.as_secs().max(1);
                        wait = Some(wait.map_or(secs, |w| w.max(secs)));
                    }
                }
            }
        }
        if let Some(w) = wait {
            return Err(w);
        }
        let mut reserved = Vec::with_capacity(keys.len());
        for k in keys {
            let e = st.windows.entry(k.clone()).or_insert((now, 0));
            if now.duration_since(e.0) >= WINDOW {
                *e = (now, 0);
            }
            e.1 += 1;
            reserved.push((k, e.0));
        }
        Ok(Reservation {
            limiter: self,
            client,
            user: user.to_owned(),
            keys: reserved,
        })
    }

    /// Gives back places reserved in windows that are still the same windows.
    fn release(&self, keys: &[(Key, Instant)]) {
        let mut st = self.lock();
        for (k, start) in keys {
            if let Some(e) = st.windows.get_mut(k) {
                if e.0 == *start {
                    e.1 = e.1.saturating_sub(1);
                }
            }
        }
    }
}

impl Reservation<'_> {
    /// The right password: the reservation is given back, the client's failures for this
    /// user are forgotten, and the client is trusted for the user.
    pub fn succeeded(mut self) {
        let keys = std::mem::take(&mut self.keys);
        self.limiter.release(&keys);
        let Some(c) = self.client else { return };
        let now = Instant::now();
        let mut st = self.limiter.lock();
        st.windows.remove(&Key::ClientUser(c, self.user.clone()));
        if st.trusted.len() >= TRUST_MAX {
            st.trusted.retain(|_, t| now.duration_since(*t) < TRUST_FOR);
            if st.trusted.len() >= TRUST_MAX {
                // Still full of live entries: drop the oldest tenth.
                let mut ages: Vec<Instant> = st.trusted.values().copied().collect();
                ages.sort_unstable();
                let cut = ages[TRUST_MAX / 10];
                st.trusted.retain(|_, t| *t > cut);
            }
        }
        st.trusted.insert((c, std::mem::take(&mut self.user)), now);
    }

    /// A wrong password: the reservation stays counted.
    pub fn failed(mut self) {
        self.keys.clear();
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.keys.is_empty() {
            self.limiter.release(&self.keys);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn blocks_one_client_not_the_user_elsewhere() {
        let l = Limiter::default();
        for _ in 0..PER_CLIENT_USER {
            l.reserve(ip("10.0.0.1"), "alice").unwrap().failed();
        }
        assert!(
            l.reserve(ip("10.0.0.1"), "alice")
                .err()
                .is_some_and(|s| (1..=60).contains(&s))
        );
        assert!(l.reserve(ip("10.0.0.2"), "alice").is_ok());
        assert!(l.reserve(ip("10.0.0.1"), "bob").is_ok());
    }

    #[test]
    fn simultaneous_attempts_are_counted_before_any_is_checked() {
        let l = Limiter::default();
        // Reservations held at once, as parallel requests hold them while hashing.
        let held: Vec<_> = (0..PER_CLIENT_USER)
            .map(|_| l.reserve(ip("10.0.0.1"), "alice").unwrap())
            .collect();
        assert!(l.reserve(ip("10.0.0.1"), "alice").is_err());
        drop(held); // none reported: given back
        assert!(l.reserve(ip("10.0.0.1"), "alice").is_ok());
    }

    #[test]
    fn a_success_gives_its_place_back() {
        let l = Limiter::default();
        for _ in 0..PER_CLIENT_USER * 3 {
            l.reserve(ip("10.0.0.1"), "alice").unwrap().succeeded();
        }
        assert!(l.reserve(ip("10.0.0.1"), "alice").is_ok());
    }

    #[test]
    fn an_attack_from_elsewhere_does_not_lock_out_a_trusted_client() {
        let l = Limiter::default();
        l.reserve(ip("10.0.0.9"), "alice").unwrap().succeeded();
        // 10 attacking addresses, 5 failures each: the per-user window fills up.
        for a in 0..10 {
            for _ in 0..PER_USER / 10 {
                if let Ok(r) = l.reserve(ip(&format!("10.1.0.{a}")), "alice") {
                    r.failed();
                }
            }
        }
        assert!(
            l.reserve(ip("10.2.0.1"), "alice").is_err(),
            "an unknown client waits"
        );
        assert!(
            l.reserve(ip("10.0.0.9"), "alice").is_ok(),
            "the usual one does not"
        );
    }

    #[test]
    fn ipv6_clients_count_by_their_64() {
        let l = Limiter::default();
        for i in 0..PER_CLIENT_USER {
            l.reserve(ip(&format!("2001:db8::{i:x}")), "alice")
                .unwrap()
                .failed();
        }
        assert!(l.reserve(ip("2001:db8::ffff"), "alice").is_err());
        assert!(l.reserve(ip("2001:db8:0:1::1"), "alice").is_ok());
    }
}
