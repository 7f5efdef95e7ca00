//! The agent's own embedded database: every deploy and rollback, and the webhook event
//! ids already seen (replay protection).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS deploys (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    stack        TEXT NOT NULL,
    kind         TEXT NOT NULL CHECK (kind IN ('deploy', 'rollback')),
    trigger      TEXT NOT NULL,
    actor        TEXT,
    state        TEXT NOT NULL CHECK (state IN ('running', 'success', 'failed', 'interrupted')),
    before       TEXT,               -- JSON: service -> image@digest, the last healthy
    after        TEXT NOT NULL,      -- JSON: service -> image@digest, what this applies
    error        TEXT,
    logs         TEXT,               -- the tail of the failing container's log
    rollback_of  INTEGER,
    started_at   INTEGER NOT NULL,
    finished_at  INTEGER
);
CREATE INDEX IF NOT EXISTS deploys_stack ON deploys(stack, id);
CREATE TABLE IF NOT EXISTS seen_events (
    id  TEXT PRIMARY KEY,
    at  INTEGER NOT NULL
);
-- Digests a stack was rolled away from (unhealthy, or `rollback` by a person): following
-- never deploys them again; a deploy with force does, once.
CREATE TABLE IF NOT EXISTS quarantine (
    stack    TEXT NOT NULL,
    service  TEXT NOT NULL,
    image    TEXT NOT NULL,      -- repo@sha256:...
    since    INTEGER NOT NULL,
    reason   TEXT NOT NULL,
    deploy   INTEGER,            -- the deploy that showed it bad
    PRIMARY KEY (stack, service, image)
);
-- A deploy asked for over HTTP (the hook, the CLI): queued behind a running deploy, then
-- running, then done with the answer it got; `GET /api/deploys/<id>` reads it.
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,    -- random: one caller cannot count through the others'
    stack       TEXT NOT NULL,
    trigger     TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'interrupted')),
    status      INTEGER,             -- the HTTP status of the answer
    answer      TEXT,                -- JSON: the outcome, or an error
    created_at  INTEGER NOT NULL,
    finished_at INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished_at);
-- A stack held on an explicit version: following is suspended until `resume`.
CREATE TABLE IF NOT EXISTS holds (
    stack    TEXT PRIMARY KEY,
    deploy   INTEGER,
    actor    TEXT,
    since    INTEGER NOT NULL,
    reason   TEXT NOT NULL
);
";

/// A digest following will not deploy again.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Quarantined {
    pub service: String,
    pub image: String,
    pub since: i64,
    pub reason: String,
    pub deploy: Option<i64>,
}

/// A stack held where an explicit deploy put it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Hold {
    pub deploy: Option<i64>,
    pub actor: Option<String>,
    pub since: i64,
    pub reason: String,
}

pub type Pins = BTreeMap<String, String>;

/// A deploy asked for over HTTP, and what came of it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Job {
    pub id: String,
    pub stack: String,
    pub trigger: String,
    pub state: String,
    pub status: Option<u16>,
    pub answer: Option<serde_json::Value>,
    pub created_at: i64,
    pub finished_at: Option<i64>,
}

/// How long a finished job stays readable.
const JOB_DAYS: i64 = 7;
/// Finished jobs kept at most, the newest.
const MAX_JOBS: i64 = 1000;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Deploy {
    pub id: i64,
    pub stack: String,
    pub kind: String,
    pub trigger: String,
    pub actor: Option<String>,
    pub state: String,
    pub before: Option<Pins>,
    pub after: Pins,
    pub error: Option<String>,
    pub logs: Option<String>,
    pub rollback_of: Option<i64>,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    /// The version a person knows each service's image by (`v1.4.2`, `main-abc1234`):
    /// a release tag pointing at its digest, or the image's version label.
    pub versions: BTreeMap<String, String>,
    /// The fingerprint of the stack's compose and env files this deploy applied.
    pub config: Option<String>,
}

/// A deploy or rollback about to start.
pub struct NewDeploy<'a> {
    pub stack: &'a str,
    pub kind: &'a str,
    pub trigger: &'a str,
    pub actor: Option<&'a str>,
    pub before: Option<&'a Pins>,
    pub after: &'a Pins,
    pub rollback_of: Option<i64>,
    pub versions: &'a BTreeMap<String, String>,
    pub config: Option<&'a str>,
}

pub struct History {
    conn: Mutex<Connection>,
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Deploy> {
    let json = |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok());
    Ok(Deploy {
        id: r.get(0)?,
        stack: r.get(1)?,
        kind: r.get(2)?,
        trigger: r.get(3)?,
        actor: r.get(4)?,
        state: r.get(5)?,
        before: json(r.get(6)?),
        after: json(r.get(7)?).unwrap_or_default(),
        error: r.get(8)?,
        logs: r.get(9)?,
        rollback_of: r.get(10)?,
        started_at: r.get(11)?,
        finished_at: r.get(12)?,
        versions: json(r.get(13)?).unwrap_or_default(),
        config: r.get(14)?,
    })
}

const COLUMNS: &str = "id, stack, kind, trigger, actor, state, before, after, error, logs, rollback_of, started_at, finished_at, versions, config";

impl History {
    pub fn open(path: &Path) -> anyhow::Result<History> {
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")?;
        conn.execute_batch(SCHEMA)?;
        // Added after the first release: a database from before gets the columns.
        for column in ["versions", "config"] {
            let has = conn
                .prepare("SELECT 1 FROM pragma_table_info('deploys') WHERE name = ?1")?
                .exists([column])?;
            if !has {
                conn.execute_batch(&format!("ALTER TABLE deploys ADD COLUMN {column} TEXT"))?;
            }
        }
        // A job the last run of the agent did not finish never will.
        conn.execute(
            "UPDATE jobs SET state = 'interrupted', finished_at = ?1 WHERE state IN ('queued', 'running')",
            params![crate::store::meta::now_ms()],
        )?;
        Ok(History {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> anyhow::Result<T> {
        let c = self.conn.lock().expect("history lock");
        Ok(f(&c)?)
    }

    pub fn begin(&self, d: NewDeploy<'_>) -> anyhow::Result<i64> {
        let NewDeploy {
            stack,
            kind,
            trigger,
            actor,
            before,
            after,
            rollback_of,
            versions,
            config,
        } = d;
        let before = before.map(|b| serde_json::to_string(b).expect("pins serialize"));
        let after = serde_json::to_string(after).expect("pins serialize");
        let versions = serde_json::to_string(versions).expect("versions serialize");
        self.with(|c| {
            c.execute(
                "INSERT INTO deploys (stack, kind, trigger, actor, state, before, after, rollback_of, started_at, versions, config)
                 VALUES (?1, ?2, ?3, ?4, 'running', ?5, ?6, ?7, ?8, ?9, ?10)",
                params![stack, kind, trigger, actor, before, after, rollback_of, crate::store::meta::now_ms(), versions, config],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    pub fn finish(
        &self,
        id: i64,
        state: &str,
        error: Option<&str>,
        logs: Option<&str>,
    ) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE deploys SET state = ?2, error = ?3, logs = ?4, finished_at = ?5 WHERE id = ?1",
                params![id, state, error, logs, crate::store::meta::now_ms()],
            )
            .map(|_| ())
        })
    }

    /// What the stack last ran healthy.
    pub fn last_healthy(&self, stack: &str) -> anyhow::Result<Option<Deploy>> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {COLUMNS} FROM deploys WHERE stack = ?1 AND state = 'success' ORDER BY id DESC LIMIT 1"),
                params![stack],
                row,
            )
            .optional()
        })
    }

    pub fn get(&self, id: i64) -> anyhow::Result<Option<Deploy>> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {COLUMNS} FROM deploys WHERE id = ?1"),
                params![id],
                row,
            )
            .optional()
        })
    }

    pub fn list(&self, stack: &str, limit: u32) -> anyhow::Result<Vec<Deploy>> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {COLUMNS} FROM deploys WHERE stack = ?1 ORDER BY id DESC LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![stack, limit], row)?;
            rows.collect()
        })
    }

    /// The version recorded for `image` (`repo@sha256:...`) by the latest deploy of it.
    pub fn version_of(&self, image: &str) -> anyhow::Result<Option<String>> {
        // `_` in a repository name matches itself as well as any character; the exact
        // comparison below decides.
        let like = format!("%{image}%");
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT after, versions FROM deploys WHERE after LIKE ?1 AND versions IS NOT NULL ORDER BY id DESC LIMIT 20",
            )?;
            let rows = stmt.query_map(params![like], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?;
            for row in rows {
                let (after, versions) = row?;
                let after: Pins = serde_json::from_str(&after).unwrap_or_default();
                let versions: BTreeMap<String, String> =
                    serde_json::from_str(&versions).unwrap_or_default();
                for (svc, pin) in &after {
                    if pin == image {
                        if let Some(v) = versions.get(svc) {
                            return Ok(Some(v.clone()));
                        }
                    }
                }
            }
            Ok(None)
        })
    }

    /// Deploys a crash or restart left running.
    pub fn running(&self) -> anyhow::Result<Vec<Deploy>> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {COLUMNS} FROM deploys WHERE state = 'running' ORDER BY id"
            ))?;
            let rows = stmt.query_map([], row)?;
            rows.collect()
        })
    }

    pub fn quarantine(
        &self,
        stack: &str,
        service: &str,
        image: &str,
        reason: &str,
        deploy: Option<i64>,
    ) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO quarantine (stack, service, image, since, reason, deploy) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (stack, service, image) DO UPDATE SET since = excluded.since, reason = excluded.reason, deploy = excluded.deploy",
                params![stack, service, image, crate::store::meta::now_ms(), reason, deploy],
            )
            .map(|_| ())
        })
    }

    /// Takes `image` of `service` out of quarantine (it ran healthy, deployed on purpose).
    pub fn release(&self, stack: &str, service: &str, image: &str) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "DELETE FROM quarantine WHERE stack = ?1 AND service = ?2 AND image = ?3",
                params![stack, service, image],
            )
            .map(|_| ())
        })
    }

    pub fn quarantined(&self, stack: &str) -> anyhow::Result<Vec<Quarantined>> {
        self.with(|c| {
            let mut s = c.prepare(
                "SELECT service, image, since, reason, deploy FROM quarantine WHERE stack = ?1 ORDER BY since, service",
            )?;
            let rows = s.query_map(params![stack], |r| {
                Ok(Quarantined {
                    service: r.get(0)?,
                    image: r.get(1)?,
                    since: r.get(2)?,
                    reason: r.get(3)?,
                    deploy: r.get(4)?,
                })
            })?;
            rows.collect()
        })
    }

    pub fn hold(
        &self,
        stack: &str,
        deploy: Option<i64>,
        actor: Option<&str>,
        reason: &str,
    ) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO holds (stack, deploy, actor, since, reason) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (stack) DO UPDATE SET deploy = excluded.deploy, actor = excluded.actor, since = excluded.since, reason = excluded.reason",
                params![stack, deploy, actor, crate::store::meta::now_ms(), reason],
            )
            .map(|_| ())
        })
    }

    pub fn held(&self, stack: &str) -> anyhow::Result<Option<Hold>> {
        self.with(|c| {
            c.query_row(
                "SELECT deploy, actor, since, reason FROM holds WHERE stack = ?1",
                params![stack],
                |r| {
                    Ok(Hold {
                        deploy: r.get(0)?,
                        actor: r.get(1)?,
                        since: r.get(2)?,
                        reason: r.get(3)?,
                    })
                },
            )
            .optional()
        })
    }

    /// Ends a hold; false if there was none.
    pub fn unhold(&self, stack: &str) -> anyhow::Result<bool> {
        self.with(|c| Ok(c.execute("DELETE FROM holds WHERE stack = ?1", params![stack])? > 0))
    }

    /// Records an event id; false if it was seen before (a replay).
    pub fn first_sight(&self, id: &str) -> anyhow::Result<bool> {
        self.with(|c| {
            let now = crate::store::meta::now_ms();
            // Ids older than a day cannot come back: their timestamps are refused.
            c.execute(
                "DELETE FROM seen_events WHERE at < ?1",
                params![now - 86_400_000],
            )?;
            Ok(c.execute(
                "INSERT INTO seen_events (id, at) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                params![id, now],
            )? > 0)
        })
    }

    /// A new queued job; jobs finished more than a week ago are forgotten.
    pub fn job_create(&self, stack: &str, trigger: &str) -> anyhow::Result<String> {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("system randomness: {e}"))?;
        let id = hex::encode(b);
        self.with(|c| {
            let now = crate::store::meta::now_ms();
            c.execute(
                "DELETE FROM jobs WHERE finished_at < ?1",
                params![now - JOB_DAYS * 86_400_000],
            )?;
            c.execute(
                "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE finished_at IS NOT NULL
                 ORDER BY finished_at DESC LIMIT -1 OFFSET ?1)",
                params![MAX_JOBS],
            )?;
            c.execute(
                "INSERT INTO jobs (id, stack, trigger, state, created_at) VALUES (?1, ?2, ?3, 'queued', ?4)",
                params![id, stack, trigger, now],
            )?;
            Ok(id)
        })
    }

    pub fn job_running(&self, id: &str) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE jobs SET state = 'running' WHERE id = ?1",
                params![id],
            )
            .map(|_| ())
        })
    }

    pub fn job_done(
        &self,
        id: &str,
        status: u16,
        answer: &serde_json::Value,
    ) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE jobs SET state = 'done', status = ?2, answer = ?3, finished_at = ?4 WHERE id = ?1",
                params![id, status, answer.to_string(), crate::store::meta::now_ms()],
            )
            .map(|_| ())
        })
    }

    pub fn job(&self, id: &str) -> anyhow::Result<Option<Job>> {
        self.with(|c| {
            c.query_row(
                "SELECT id, stack, trigger, state, status, answer, created_at, finished_at FROM jobs WHERE id = ?1",
                params![id],
                |r| {
                    let answer: Option<String> = r.get(5)?;
                    Ok(Job {
                        id: r.get(0)?,
                        stack: r.get(1)?,
                        trigger: r.get(2)?,
                        state: r.get(3)?,
                        status: r.get(4)?,
                        answer: answer.and_then(|a| serde_json::from_str(&a).ok()),
                        created_at: r.get(6)?,
                        finished_at: r.get(7)?,
                    })
                },
            )
            .optional()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_from_before_versions_opens_and_keeps_its_deploys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE deploys (
                    id INTEGER PRIMARY KEY AUTOINCREMENT, stack TEXT NOT NULL, kind TEXT NOT NULL,
                    trigger TEXT NOT NULL, actor TEXT, state TEXT NOT NULL, before TEXT,
                    after TEXT NOT NULL, error TEXT, logs TEXT, rollback_of INTEGER,
                    started_at INTEGER NOT NULL, finished_at INTEGER);
                 INSERT INTO deploys (stack, kind, trigger, state, after, started_at)
                 VALUES ('web', 'deploy', 'poll', 'success', '{\"web\":\"r/a@sha256:00\"}', 1);",
            )
            .unwrap();
        }
        let h = History::open(&path).unwrap();
        let old = h.list("web", 10).unwrap();
        assert_eq!(old.len(), 1);
        assert!(old[0].versions.is_empty());
        let pins: Pins = [("web".to_owned(), "r/a_b@sha256:11".to_owned())].into();
        let versions = [("web".to_owned(), "v1.2.3".to_owned())].into();
        h.begin(NewDeploy {
            stack: "web",
            kind: "deploy",
            trigger: "cli",
            actor: None,
            before: None,
            after: &pins,
            rollback_of: None,
            versions: &versions,
            config: Some("sha256:00"),
        })
        .unwrap();
        assert_eq!(
            h.version_of("r/a_b@sha256:11").unwrap().as_deref(),
            Some("v1.2.3")
        );
        // `_` is a wildcard to LIKE: a name differing there is not the same image.
        assert_eq!(h.version_of("r/aXb@sha256:11").unwrap(), None);
        assert_eq!(h.version_of("r/a@sha256:00").unwrap(), None);
        drop(h);
        // Opened again (the column exists now): nothing changes.
        let h = History::open(&path).unwrap();
        assert_eq!(h.list("web", 10).unwrap().len(), 2);
    }
}
