-- The event outbox: one row per registry change, written in the transaction that makes
-- the change, so no event is lost to a crash. Webhook delivery reads it after `cursor`.
CREATE TABLE events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    uuid        TEXT NOT NULL UNIQUE,      -- the id receivers de-duplicate on
    at          INTEGER NOT NULL,          -- unix milliseconds
    action      TEXT NOT NULL CHECK (action IN ('push', 'tag', 'untag', 'delete')),
    repository  TEXT NOT NULL,
    tag         TEXT,
    digest      TEXT NOT NULL,
    media_type  TEXT,
    size        INTEGER,
    actor       TEXT
);

-- Webhook endpoints: from `wharf webhook add` (source 'cli') or wharf.toml ('config').
CREATE TABLE webhooks (
    id            TEXT PRIMARY KEY,
    url           TEXT NOT NULL,
    secret        TEXT NOT NULL,           -- the HMAC key; the server must be able to sign
    repositories  TEXT NOT NULL,           -- a repository pattern: name, `ns/*` or `*`
    tags          TEXT NOT NULL,           -- comma-separated tag globs (`*` for all)
    actions       TEXT NOT NULL,           -- comma-separated actions
    format        TEXT NOT NULL CHECK (format IN ('wharf', 'cncf', 'dockerhub')),
    source        TEXT NOT NULL CHECK (source IN ('cli', 'config')),
    created_at    INTEGER NOT NULL,
    cursor        INTEGER NOT NULL         -- the last event id considered for this hook
);

-- One row per (webhook, event) to deliver: its state, attempts and last answer.
CREATE TABLE deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook         TEXT NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
    event           INTEGER NOT NULL REFERENCES events(id),
    status          TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    response_code   INTEGER,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    UNIQUE (webhook, event)
);
CREATE INDEX deliveries_due ON deliveries(status, next_attempt_at);
