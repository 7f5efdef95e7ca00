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
//! it, so neither applies to a client the user signed in from before with the same
//! password ("trusted" for [`TRUST_FOR`], at most [`TRUST_PER_USER`] addresses a user,
//! kept in the database so a restart does not forget them): an attack from other
//! addresses slows down the attack, not the user at their usual address, whose own
//! failures are still limited per (client, user) and are not forgotten by a success.
//! IPv6 clients are counted by their /64, which one host usually holds whole.
//!
//! A reservation is owned (`'static`), so the password check can carry it to its end:
//! a client that hangs up while its guess is being hashed does not get its place back.
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
/// Trusted addresses kept per user; the one used longest ago goes first.
pub const TRUST_PER_USER: usize = 16;
/// How often expired windows are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A client address as the limiter counts it: IPv4 whole, IPv6 by its /64.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct ClientKey(u128);

impl ClientKey {
    /// How the database keeps it.
    pub fn to_text(self) -> String {
        format!("{:032x}", self.0)
    }

    pub fn from_text(s: &str) -> Option<ClientKey> {
        u128::from_str_radix(s, 16).ok().map(ClientKey)
    }
}

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

/// The windows failures are shared in between processes on one database (replicas):
/// fixed, so that every process counts in the same one.
pub const SHARED_WINDOW_MS: i64 = 60_000;

/// The start of the shared window holding `now_ms`.
pub fn shared_window(now_ms: i64) -> i64 {
    now_ms - now_ms.rem_euclid(SHARED_WINDOW_MS)
}

/// Failures other processes (and this one) recorded in the database in the current
/// shared window, by [`shared_keys`] text: an attempt counts against
/// the larger of these and this process's own count, so replicas behind a load balancer
/// together allow what one would.
#[derive(Debug, Default, Clone)]
pub struct Shared {
    pub failures: HashMap<String, u32>,
    /// Seconds until the shared window ends.
    pub left_secs: u64,
}

/// The database keys of every window an attempt by `user` from `client` may count
/// against (the trusted case counts against fewer of them).
pub fn shared_keys(client: Option<IpAddr>, user: &str) -> Vec<String> {
    let client = client.map(ClientKey::from);
    let mut keys = Vec::with_capacity(3);
    if let Some(c) = client {
        keys.push(Key::ClientUser(c, user.to_owned()).text());
        keys.push(Key::Client(c).text());
    }
    keys.push(Key::User(user.to_owned()).text());
    keys
}

impl Key {
    /// How the database keeps it.
    fn text(&self) -> String {
        match self {
            Key::ClientUser(c, u) => format!("cu:{}:{u}", c.to_text()),
            Key::Client(c) => format!("c:{}", c.to_text()),
            Key::User(u) => format!("u:{u}"),
        }
    }

    fn limit(&self) -> u32 {
        match self {
            Key::ClientUser(..) => PER_CLIENT_USER,
            Key::Client(_) => PER_CLIENT,
            Key::User(_) => PER_USER,
        }
    }
}

/// A trusted address of a user: where, with which password (the user's generation),
/// and when it last signed in.
#[derive(Clone, Copy, Debug)]
struct Trust {
    client: ClientKey,
    generation: i64,
    at: Instant,
}

struct State {
    /// Failures per window.
    windows: HashMap<Key, (Instant, u32)>,
    /// Attempts in flight, not yet decided.
    pending: HashMap<Key, u32>,
    /// Per user (only users that signed in, so bounded by the users there are).
    trusted: HashMap<String, Vec<Trust>>,
    swept: Instant,
}

impl Default for State {
    fn default() -> Self {
        State {
            windows: HashMap::new(),
            pending: HashMap::new(),
            trusted: HashMap::new(),
            swept: Instant::now(),
        }
    }
}

#[derive(Default)]
pub struct Limiter {
    state: Mutex<State>,
    /// Woken whenever an attempt is decided.
    decided: tokio::sync::Notify,
}

enum Decision {
    Go(Vec<Key>, bool),
    Wait,
    Limited(u64),
}

/// A place reserved in each window an attempt counts against. Report the outcome with
/// [`Reservation::succeeded`] or [`Reservation::failed`], or give it up unchecked with
/// [`Reservation::abandon`]; dropped without any of these (the client hung up while it
/// waited for its check), it counts as a failure, so hanging up never gives a guess
/// back.
pub struct Reservation {
    limiter: std::sync::Arc<Limiter>,
    client: Option<ClientKey>,
    user: String,
    keys: Vec<Key>,
    /// The client signed in as the user before, with the same password.
    pub trusted: bool,
}

impl Reservation {
    /// The database keys of the windows this attempt counts against: where to record
    /// it if it fails.
    pub fn shared_keys(&self) -> Vec<String> {
        self.keys.iter().map(Key::text).collect()
    }
}

impl Limiter {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reserves an attempt for `user` (whose password is at `generation`, if the user
    /// exists) from `client`, or says how many seconds to wait.
    pub async fn reserve(
        self: &std::sync::Arc<Self>,
        client: Option<IpAddr>,
        user: &str,
        generation: Option<i64>,
    ) -> Result<Reservation, u64> {
        self.reserve_shared(client, user, generation, &Shared::default())
            .await
    }

    /// [`Limiter::reserve`], also counting the failures `shared` says the database
    /// holds for this window.
    pub async fn reserve_shared(
        self: &std::sync::Arc<Self>,
        client: Option<IpAddr>,
        user: &str,
        generation: Option<i64>,
        shared: &Shared,
    ) -> Result<Reservation, u64> {
        let client = client.map(ClientKey::from);
        loop {
            // Registered before the check, so a decision in between is not missed.
            let decided = self.decided.notified();
            tokio::pin!(decided);
            decided.as_mut().enable();
            match self.decide(client, user, generation, shared) {
                Decision::Go(keys, trusted) => {
                    return Ok(Reservation {
                        limiter: std::sync::Arc::clone(self),
                        client,
                        user: user.to_owned(),
                        keys,
                        trusted,
                    });
                }
                Decision::Limited(wait) => return Err(wait),
                Decision::Wait => decided.await,
            }
        }
    }

    fn decide(
        &self,
        client: Option<ClientKey>,
        user: &str,
        generation: Option<i64>,
        shared: &Shared,
    ) -> Decision {
        let now = Instant::now();
        let mut st = self.lock();
        if now.duration_since(st.swept) >= SWEEP_EVERY {
            st.windows
                .retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
            st.swept = now;
        }
        let trusted = match (client, generation) {
            (Some(c), Some(g)) => st.trusted.get(user).is_some_and(|ts| {
                ts.iter().any(|t| {
                    t.client == c && t.generation == g && now.duration_since(t.at) < TRUST_FOR
                })
            }),
            _ => false,
        };
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
            let elsewhere = shared.failures.get(&k.text()).copied().unwrap_or(0);
            if elsewhere >= k.limit() {
                let secs = shared.left_secs.max(1);
                wait = Some(wait.map_or(secs, |w| w.max(secs)));
            }
            let local = match st.windows.get(k) {
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
            // This process's failures are in the database's count too (once written).
            let failures = local.max(elsewhere);
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
        Decision::Go(keys, trusted)
    }

    /// Drops windows that have ended, and trust that has lapsed (also done as attempts
    /// come; this is for quiet times after a burst).
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut st = self.lock();
        st.windows
            .retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        st.trusted.retain(|_, ts| {
            ts.retain(|t| now.duration_since(t.at) < TRUST_FOR);
            !ts.is_empty()
        });
        st.windows.shrink_to_fit();
        st.pending.shrink_to_fit();
        st.trusted.shrink_to_fit();
        st.swept = now;
    }

    /// Trusts `client` for `user` at `generation` (a sign-in that happened at `at`, as
    /// the database remembers it). Returns true if this is news worth keeping (a new
    /// address, or one last kept a day ago or more).
    pub fn trust(&self, client: ClientKey, user: &str, generation: i64, at: Instant) -> bool {
        let mut st = self.lock();
        let ts = st.trusted.entry(user.to_owned()).or_default();
        ts.retain(|t| t.generation == generation);
        if let Some(t) = ts.iter_mut().find(|t| t.client == client) {
            let stale = at.duration_since(t.at) >= Duration::from_secs(86_400);
            t.at = t.at.max(at);
            return stale;
        }
        if ts.len() >= TRUST_PER_USER {
            let oldest = (0..ts.len()).min_by_key(|&i| ts[i].at).expect("not empty");
            ts.swap_remove(oldest);
        }
        ts.push(Trust {
            client,
            generation,
            at,
        });
        true
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

impl Reservation {
    /// The right password for `generation`: the attempt is no failure, and the client is
    /// trusted for the user. Returns the client to remember in the database, if there
    /// is news to keep (see [`Limiter::trust`]).
    pub fn succeeded(mut self, generation: i64) -> Option<ClientKey> {
        let keys = std::mem::take(&mut self.keys);
        let news = self.client.filter(|c| {
            self.limiter
                .trust(*c, &self.user, generation, Instant::now())
        });
        self.limiter.decide_pending(&keys, false);
        news
    }

    /// A wrong password: counted as a failure in every window.
    pub fn failed(mut self) {
        let keys = std::mem::take(&mut self.keys);
        self.limiter.decide_pending(&keys, true);
    }

    /// Not checked at all (the server was too busy to): no failure.
    pub fn abandon(mut self) {
        let keys = std::mem::take(&mut self.keys);
        self.limiter.decide_pending(&keys, false);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.keys.is_empty() {
            let keys = std::mem::take(&mut self.keys);
            self.limiter.decide_pending(&keys, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    async fn fail(l: &Arc<Limiter>, client: &str, user: &str) -> Result<(), u64> {
        l.reserve(ip(client), user, Some(1))
            .await
            .map(Reservation::failed)
    }

    use std::sync::Arc;

    #[tokio::test]
    async fn blocks_one_client_not_the_user_elsewhere() {
        let l = Arc::new(Limiter::default());
        for _ in 0..PER_CLIENT_USER {
            fail(&l, "10.0.0.1", "alice").await.unwrap();
        }
        assert!(
            l.reserve(ip("10.0.0.1"), "alice", Some(1))
                .await
                .err()
                .is_some_and(|s| (1..=60).contains(&s))
        );
        assert!(l.reserve(ip("10.0.0.2"), "alice", Some(1)).await.is_ok());
        assert!(l.reserve(ip("10.0.0.1"), "bob", Some(1)).await.is_ok());
    }

    #[tokio::test]
    async fn attempts_in_flight_count_before_any_is_decided() {
        let l = Arc::new(Limiter::default());
        // Reservations held at once, as parallel requests hold them while hashing.
        let mut held = Vec::new();
        for _ in 0..PER_CLIENT_USER {
            held.push(l.reserve(ip("10.0.0.1"), "alice", Some(1)).await.unwrap());
        }
        // (Given up unchecked, they would not count.)
        let sixth = l.reserve(ip("10.0.0.1"), "alice", Some(1));
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
        let l = Arc::new(Limiter::default());
        let mut tasks = Vec::new();
        for _ in 0..PER_CLIENT_USER * 4 {
            let l = Arc::clone(&l);
            tasks.push(tokio::spawn(async move {
                let r = l
                    .reserve(ip("10.0.0.1"), "alice", Some(1))
                    .await
                    .map_err(|_| ())?;
                tokio::time::sleep(Duration::from_millis(5)).await;
                r.succeeded(1);
                Ok::<_, ()>(())
            }));
        }
        for t in tasks {
            assert!(t.await.unwrap().is_ok());
        }
    }

    #[tokio::test]
    async fn an_attack_from_elsewhere_does_not_lock_out_a_trusted_client() {
        let l = Arc::new(Limiter::default());
        l.reserve(ip("10.0.0.9"), "alice", Some(1))
            .await
            .unwrap()
            .succeeded(1);
        // 10 attacking addresses, 5 failures each: the per-user window fills up.
        for a in 0..10 {
            for _ in 0..PER_USER / 10 {
                let _ = fail(&l, &format!("10.1.0.{a}"), "alice").await;
            }
        }
        assert!(
            l.reserve(ip("10.2.0.1"), "alice", Some(1)).await.is_err(),
            "an unknown client waits"
        );
        assert!(
            l.reserve(ip("10.0.0.9"), "alice", Some(1)).await.is_ok(),
            "the usual one does not"
        );
    }

    #[tokio::test]
    async fn trust_is_per_password_and_bounded_per_user() {
        let l = Arc::new(Limiter::default());
        let c = ClientKey::from("10.0.0.9".parse::<IpAddr>().unwrap());
        assert!(l.trust(c, "alice", 1, Instant::now()));
        assert!(
            !l.trust(c, "alice", 1, Instant::now()),
            "nothing new to keep"
        );
        assert!(
            l.reserve(ip("10.0.0.9"), "alice", Some(1))
                .await
                .unwrap()
                .trusted
        );
        // A new password (generation) ends the trust.
        assert!(
            !l.reserve(ip("10.0.0.9"), "alice", Some(2))
                .await
                .unwrap()
                .trusted
        );
        for i in 0..TRUST_PER_USER + 5 {
            let c = ClientKey::from(format!("10.9.0.{i}").parse::<IpAddr>().unwrap());
            l.trust(c, "mallory", 1, Instant::now());
        }
        assert_eq!(l.lock().trusted["mallory"].len(), TRUST_PER_USER);
        // Failures from a trusted address are not forgotten by a success there.
        fail(&l, "10.0.0.9", "bob").await.unwrap();
        l.reserve(ip("10.0.0.9"), "bob", Some(1))
            .await
            .unwrap()
            .succeeded(1);
        for _ in 0..PER_CLIENT_USER - 1 {
            fail(&l, "10.0.0.9", "bob").await.unwrap();
        }
        assert!(l.reserve(ip("10.0.0.9"), "bob", Some(1)).await.is_err());
    }

    #[tokio::test]
    async fn failures_other_processes_recorded_count_here() {
        let l = Arc::new(Limiter::default());
        let keys = shared_keys(ip("10.0.0.1"), "alice");
        let mut shared = Shared {
            failures: HashMap::from([(keys[0].clone(), PER_CLIENT_USER - 1)]),
            left_secs: 42,
        };
        // One place left in the (client, user) window: this process takes it.
        let r = l
            .reserve_shared(ip("10.0.0.1"), "alice", Some(1), &shared)
            .await
            .unwrap();
        assert_eq!(r.shared_keys(), keys, "where a failure is to be recorded");
        r.failed();
        shared.failures.insert(keys[0].clone(), PER_CLIENT_USER);
        assert_eq!(
            l.reserve_shared(ip("10.0.0.1"), "alice", Some(1), &shared)
                .await
                .err(),
            Some(42),
            "refused until the shared window ends"
        );
        // Another user from there is not held up by that window.
        assert!(
            l.reserve_shared(ip("10.0.0.1"), "bob", Some(1), &shared)
                .await
                .is_ok()
        );
        assert_eq!(shared_window(125_000), 120_000);
    }

    #[tokio::test]
    async fn ipv6_clients_count_by_their_64() {
        let l = Arc::new(Limiter::default());
        for i in 0..PER_CLIENT_USER {
            fail(&l, &format!("2001:db8::{i:x}"), "alice")
                .await
                .unwrap();
        }
        assert!(
            l.reserve(ip("2001:db8::ffff"), "alice", Some(1))
                .await
                .is_err()
        );
        assert!(
            l.reserve(ip("2001:db8:0:1::1"), "alice", Some(1))
                .await
                .is_ok()
        );
    }
}
