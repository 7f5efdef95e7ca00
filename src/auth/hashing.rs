//! Password hashing on threads of its own, at the lowest CPU priority.
//!
//! Argon2id is built to cost tens of milliseconds of a core per check, so a flood of
//! guesses (which the failed-login limiter cannot stop when they come from many
//! addresses for many users) keeps whatever cores check passwords busy. The checks run
//! on [`threads`] dedicated threads set to nice 19: they take the CPU that nothing else
//! wants, and a pull or push with a token never waits for them. A check is handed over
//! with its reservation and runs to its end even if the caller goes away.

use std::sync::OnceLock;
use std::sync::mpsc::{Sender, channel};

type Job = Box<dyn FnOnce() + Send>;

/// Checks run at once: half the cores, at least one (each needs a 7 MiB working area).
pub fn threads() -> usize {
    (super::parallelism() / 2).max(1)
}

fn pool() -> &'static std::sync::Mutex<Sender<Job>> {
    static POOL: OnceLock<std::sync::Mutex<Sender<Job>>> = OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = channel::<Job>();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        for i in 0..threads() {
            let rx = std::sync::Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("wharf-password-{i}"))
                .spawn(move || {
                    // This thread only: on Linux a thread id names one thread.
                    let me = rustix::thread::gettid();
                    if let Err(e) = rustix::process::setpriority_process(Some(me), 19) {
                        tracing::debug!(error = %e, "could not lower the password threads' priority");
                    }
                    loop {
                        let job = rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner).recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                })
                .expect("a thread for password checks");
        }
        std::sync::Mutex::new(tx)
    })
}

/// Runs `f` on a password thread; its result, unless the caller has gone.
pub async fn run<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    pool()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .send(job)
        .ok()?;
    rx.await.ok()
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn runs_on_a_low_priority_thread() {
        let (name, nice) = super::run(|| {
            let name = std::thread::current().name().map(str::to_owned);
            let nice = rustix::process::getpriority_process(Some(rustix::thread::gettid()));
            (name, nice.ok())
        })
        .await
        .unwrap();
        assert!(name.unwrap().starts_with("wharf-password-"));
        assert_eq!(nice, Some(19));
    }
}
