//! Failed-login rate limiting for passwords.
//!
//! Failures are counted in fixed windows per (client, user), per client and per user.
//! An attempt *reserves* its place in every window before the password is hashed, in one
//! step under the lock: attempts in flight count against the limit like failures, so a
//! burst of simultaneous guesses is counted as it arrives and no more of them are
//! checked than the limit allows. An attempt that would go past the limit only because
//! of others still in flight waits (holding no thread) until they are decided: if they
//! were right (a client sending its correct password on many connections at once) it
//! goes on, if they were failures it is refused.
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
    /// Failures per window.
    windows: HashMap<Key, (Instant, u32)>,
    /// Attempts in flight, not yet decided.
    pending: HashMap<Key, u32>,
    trusted: HashMap<(ClientKey, String), Instant>,
}

#[derive(Default)]
pub struct Limiter {
    state: Mutex<State>,
    /// Woken whenever an attempt is decided.
    decided: tokio::sync::Notify,
}

enum Decision {
    Go(Vec<Key>),
    Wait,
    Limited(u64),
}

/// A place reserved in each window an attempt counts against. Report the outcome with
/// [`Reservation::succeeded`] or [`Reservation::failed`]; dropped without either (the
/// check itself failed), the place is given back.
pub struct Reservation<'a> {
    limiter: &'a Limiter,
    client: Option<ClientKey>,
    user: String,
    keys: Vec<Key>,
}

impl Limiter {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reserves an attempt for `user` from `client`, or says how many seconds to wait.
    pub async fn reserve(
        &self,
        client: Option<IpAddr>,
        user: &str,
    ) -> Result<Reservation<'_>, u64> {
        let client = client.map(ClientKey::from);
        loop {
            // Registered before the check, so a decision in between is not missed.
            let decided = self.decided.notified();
            tokio::pin!(decided);
            decided.as_mut().enable();
            match self.decide(client, user) {
                Decision::Go(keys) => {
                    return Ok(Reservation {
                        limiter: self,
                        client,
                        user: user.to_owned(),
                        keys,
                    });
                }
                Decision::Limited(wait) => return Err(wait),
                Decision::Wait => decided.await,
            }
        }
    }

    fn decide(&self, client: Option<ClientKey>, user: &str) -> Decision {
        let now = Instant::now();
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
        let mut busy = false;
        for k in &keys {
            let failures = match st.windows.get(k) {
                Some((start, n)) => match WINDOW.checked_sub(now.duration_since(*start)) {
                    Some(left) => {
                        if *n >= k.limit() {
                            let secs = left.as_secs().max(1);
                            wait = Some(wait.map_or(secs, |w| w.max(secs)));
                        }
                        *n
                    }
                    None => 0,
                },
                None => 0,
            };
            busy |= failures + st.pending.get(k).copied().unwrap_or(0) >= k.limit();
        }
        if let Some(w) = wait {
            return Decision::Limited(w);
        }
        if busy {
            return Decision::Wait;
        }
        for k in &keys {
            *st.pending.entry(k.clone()).or_insert(0) += 1;
        }
        Decision::Go(keys)
    }

    /// Decides attempts in flight: each no longer pending, and counted as a failure if
    /// `failed`.
    fn decide_pending(&self, keys: &[Key], failed: bool) {
        let now = Instant::now();
        {
            let mut st = self.lock();
            for k in keys {
                if let Some(n) = st.pending.get_mut(k) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        st.pending.remove(k);
                    }
                }
                if failed {
                    let e = st.windows.entry(k.clone()).or_insert((now, 0));
                    if now.duration_since(e.0) >= WINDOW {
                        *e = (now, 0);
                    }
                    e.1 += 1;
                }
            }
        }
        self.decided.notify_waiters();
    }
}

impl Reservation<'_> {
    /// The right password: the attempt is no failure, the client's failures for this
    /// user are forgotten, and the client is trusted for the user.
    pub fn succeeded(mut self) {
        let keys = std::mem::take(&mut self.keys);
        let Some(c) = self.client else {
            self.limiter.decide_pending(&keys, false);
            return;
        };
        let now = Instant::now();
        {
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
        self.limiter.decide_pending(&keys, false);
    }

    /// A wrong password: counted as a failure in every window.
    pub fn failed(mut self) {
        let keys = std::mem::take(&mut self.keys);
        self.limiter.decide_pending(&keys, true);
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        // Neither outcome reported (the check itself failed): no failure.
        if !self.keys.is_empty() {
            let keys = std::mem::take(&mut self.keys);
            self.limiter.decide_pending(&keys, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    async fn fail(l: &Limiter, client: &str, user: &str) -> Result<(), u64> {
        l.reserve(ip(client), user).await.map(Reservation::failed)
    }

    #[tokio::test]
    async fn blocks_one_client_not_the_user_elsewhere() {
        let l = Limiter::default();
        for _ in 0..PER_CLIENT_USER {
            fail(&l, "10.0.0.1", "alice").await.unwrap();
        }
        assert!(
            l.reserve(ip("10.0.0.1"), "alice")
                .await
                .err()
                .is_some_and(|s| (1..=60).contains(&s))
        );
        assert!(l.reserve(ip("10.0.0.2"), "alice").await.is_ok());
        assert!(l.reserve(ip("10.0.0.1"), "bob").await.is_ok());
    }

    #[tokio::test]
    async fn attempts_in_flight_count_before_any_is_decided() {
        let l = Limiter::default();
        // Reservations held at once, as parallel requests hold them while hashing.
        let mut held = Vec::new();
        for _ in 0..PER_CLIENT_USER {
            held.push(l.reserve(ip("10.0.0.1"), "alice").await.unwrap());
        }
        let sixth = l.reserve(ip("10.0.0.1"), "alice");
        tokio::pin!(sixth);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), sixth.as_mut())
                .await
                .is_err(),
            "the sixth waits while five are in flight"
        );
        // All five fail: the sixth is refused without being checked.
        for r in held.drain(..) {
            r.failed();
        }
        assert!(sixth.await.is_err());
    }

    #[tokio::test]
    async fn right_passwords_in_parallel_all_go_through() {
        let l = std::sync::Arc::new(Limiter::default());
        let mut tasks = Vec::new();
        for _ in 0..PER_CLIENT_USER * 4 {
            let l = std::sync::Arc::clone(&l);
            tasks.push(tokio::spawn(async move {
                let r = l.reserve(ip("10.0.0.1"), "alice").await.map_err(|_| ())?;
                tokio::time::sleep(Duration::from_millis(5)).await;
                r.succeeded();
                Ok::<_, ()>(())
            }));
        }
        for t in tasks {
            assert!(t.await.unwrap().is_ok());
        }
    }

    #[tokio::test]
    async fn an_attack_from_elsewhere_does_not_lock_out_a_trusted_client() {
        let l = Limiter::default();
        l.reserve(ip("10.0.0.9"), "alice")
            .await
            .unwrap()
            .succeeded();
        // 10 attacking addresses, 5 failures each: the per-user window fills up.
        for a in 0..10 {
            for _ in 0..PER_USER / 10 {
                let _ = fail(&l, &format!("10.1.0.{a}"), "alice").await;
            }
        }
        assert!(
            l.reserve(ip("10.2.0.1"), "alice").await.is_err(),
            "an unknown client waits"
        );
        assert!(
            l.reserve(ip("10.0.0.9"), "alice").await.is_ok(),
            "the usual one does not"
        );
    }

    #[tokio::test]
    async fn ipv6_clients_count_by_their_64() {
        let l = Limiter::default();
        for i in 0..PER_CLIENT_USER {
            fail(&l, &format!("2001:db8::{i:x}"), "alice")
                .await
                .unwrap();
        }
        assert!(l.reserve(ip("2001:db8::ffff"), "alice").await.is_err());
        assert!(l.reserve(ip("2001:db8:0:1::1"), "alice").await.is_ok());
    }
}
