-- wharf's metadata on PostgreSQL: the same tables as the SQLite schema (migrations/sqlite,
-- all applied), with PostgreSQL's types. Times are unix milliseconds (BIGINT), as there.

CREATE TABLE repositories (
    name        TEXT PRIMARY KEY,
    created_at  BIGINT NOT NULL
);

CREATE TABLE blobs (
    digest       TEXT PRIMARY KEY,
    size         BIGINT NOT NULL,
    created_at   BIGINT NOT NULL,
    deleting_at  BIGINT
);
CREATE INDEX blobs_deleting ON blobs(deleting_at) WHERE deleting_at IS NOT NULL;

CREATE TABLE repository_blobs (
    repository  TEXT NOT NULL REFERENCES repositories(name),
    digest      TEXT NOT NULL REFERENCES blobs(digest),
    created_at  BIGINT NOT NULL,
    touched_at  BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (repository, digest)
);
CREATE INDEX repository_blobs_digest ON repository_blobs(digest);

CREATE TABLE manifests (
    repository     TEXT NOT NULL REFERENCES repositories(name),
    digest         TEXT NOT NULL,
    media_type     TEXT NOT NULL,
    artifact_type  TEXT,
    subject        TEXT,
    annotations    TEXT,
    size           BIGINT NOT NULL,
    content        BYTEA NOT NULL,
    created_at     BIGINT NOT NULL,
    untagged_at    BIGINT,
    condemned_at   BIGINT,
    pulled_at      BIGINT,
    PRIMARY KEY (repository, digest)
);
CREATE INDEX manifests_subject ON manifests(repository, subject) WHERE subject IS NOT NULL;
CREATE INDEX manifests_condemned ON manifests(condemned_at) WHERE condemned_at IS NOT NULL;

CREATE TABLE manifest_references (
    repository  TEXT NOT NULL,
    manifest    TEXT NOT NULL,
    child       TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('blob', 'manifest')),
    PRIMARY KEY (repository, manifest, child),
    FOREIGN KEY (repository, manifest) REFERENCES manifests(repository, digest) ON DELETE CASCADE
);
CREATE INDEX manifest_references_child ON manifest_references(child);
CREATE INDEX manifest_references_repository_child ON manifest_references(repository, child);

CREATE TABLE tags (
    repository  TEXT NOT NULL,
    name        TEXT NOT NULL,
    digest      TEXT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (repository, name),
    FOREIGN KEY (repository, digest) REFERENCES manifests(repository, digest) ON DELETE CASCADE
);
CREATE INDEX tags_digest ON tags(repository, digest);

CREATE TABLE uploads (
    id          TEXT PRIMARY KEY,
    repository  TEXT NOT NULL,
    size        BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    digest      TEXT,
    monolithic  BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX uploads_repository ON uploads(repository);
CREATE INDEX uploads_digest ON uploads(digest) WHERE digest IS NOT NULL;

-- Accounts, access tokens, permissions, visibility and the audit log.

CREATE TABLE users (
    name           TEXT PRIMARY KEY,
    password_hash  TEXT NOT NULL,          -- Argon2id, PHC string
    admin          BOOLEAN NOT NULL DEFAULT FALSE,
    created_at     BIGINT NOT NULL,
    -- Moved on password change: JWTs carry it, so old ones stop working. Taken from
    -- auth_state, so a user created again under an old name never reuses one.
    generation     BIGINT NOT NULL DEFAULT 1
);

-- The token string is `wharf_<id>_<secret>`; only a SHA-256 of the secret is stored.
CREATE TABLE access_tokens (
    id            TEXT PRIMARY KEY,
    user_name     TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('access', 'refresh')),
    secret_hash   TEXT NOT NULL,
    scopes        TEXT NOT NULL,           -- JSON array of "repository:<pattern>:<actions>"
    created_at    BIGINT NOT NULL,
    last_used_at  BIGINT,
    expires_at    BIGINT,
    revoked_at    BIGINT
);
CREATE INDEX access_tokens_user ON access_tokens(user_name);

CREATE TABLE grants (
    user_name   TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    pattern     TEXT NOT NULL,
    level       TEXT NOT NULL CHECK (level IN ('pull', 'push', 'delete', 'admin')),
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (user_name, pattern)
);

CREATE TABLE visibility (
    pattern     TEXT PRIMARY KEY,
    public      BOOLEAN NOT NULL,
    updated_at  BIGINT NOT NULL
);

CREATE TABLE audit_log (
    id          BIGSERIAL PRIMARY KEY,
    at          BIGINT NOT NULL,
    actor       TEXT,
    action      TEXT NOT NULL,
    repository  TEXT,
    detail      TEXT,
    client      TEXT,
    credential  TEXT
);
CREATE INDEX audit_log_at ON audit_log(at);

-- The rights generation: one row, moved in every transaction that changes rights.
CREATE TABLE auth_state (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    generation  BIGINT NOT NULL
);
INSERT INTO auth_state (id, generation) VALUES (1, 1);

-- Values every replica shares: `jwt_key`, the key registry JWTs are signed with.
CREATE TABLE settings (
    name   TEXT PRIMARY KEY,
    value  BYTEA NOT NULL
);

-- Failed logins per limiter window (`cu:<client>:<user>`, `c:<client>`, `u:<user>`) in
-- fixed one-minute windows, so replicas limit together.
CREATE TABLE login_failures (
    key       TEXT NOT NULL,
    window_start  BIGINT NOT NULL,
    failures  BIGINT NOT NULL,
    PRIMARY KEY (key, window_start)
);
CREATE INDEX login_failures_window ON login_failures(window_start);

CREATE TABLE login_trust (
    user_name   TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    client      TEXT NOT NULL,
    generation  BIGINT NOT NULL,
    at          BIGINT NOT NULL,
    PRIMARY KEY (user_name, client)
);

CREATE TABLE tag_policies (
    id            BIGSERIAL PRIMARY KEY,
    repositories  TEXT NOT NULL,           -- a repository, `namespace/*` or `*`
    tags          TEXT NOT NULL,           -- comma-separated tag globs
    created_at    BIGINT NOT NULL,
    created_by    TEXT
);

-- Webhooks: the event outbox, endpoints and their deliveries.
--
-- Ids are handed out when an event is inserted, but transactions commit in any order, so
-- a reader walking by id alone could pass an id whose transaction commits later. Each
-- event also records its transaction's id (`xid`, 64-bit, never reused); readers walk in
-- (xid, id) order and only below the oldest transaction still running, which no later
-- event can precede (see postgres/events.rs).

CREATE TABLE events (
    id          BIGSERIAL PRIMARY KEY,
    xid         BIGINT NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    uuid        TEXT NOT NULL UNIQUE,
    at          BIGINT NOT NULL,
    action      TEXT NOT NULL CHECK (action IN ('push', 'tag', 'untag', 'delete', 'quota')),
    repository  TEXT NOT NULL,             -- for `quota`: the quota's target (`team/*`)
    tag         TEXT,
    digest      TEXT NOT NULL,             -- for `quota`: empty
    media_type  TEXT,
    size        BIGINT,                    -- for `quota`: the bytes used
    actor       TEXT,
    quota       BIGINT,                    -- for `quota`: the limit, in bytes
    detail      TEXT                       -- for `quota`: the warning as people read it
);
CREATE INDEX events_at ON events(at);
CREATE INDEX events_order ON events(xid, id);

CREATE TABLE webhooks (
    id            TEXT PRIMARY KEY,
    url           TEXT NOT NULL,
    secret        TEXT NOT NULL,           -- the HMAC key; the server must be able to sign
    repositories  TEXT NOT NULL,           -- a repository pattern: name, `ns/*` or `*`
    tags          TEXT NOT NULL,           -- comma-separated tag globs (`*` for all)
    actions       TEXT NOT NULL,           -- comma-separated actions
    format        TEXT NOT NULL CHECK (format IN ('wharf', 'cncf', 'dockerhub')),
    source        TEXT NOT NULL CHECK (source IN ('cli', 'config')),
    created_at    BIGINT NOT NULL,
    -- The last event considered for this hook, in (xid, id) order.
    cursor_xid    BIGINT NOT NULL,
    cursor        BIGINT NOT NULL,
    -- The replica sending this hook's deliveries now (one at a time, so they go in
    -- order), until when.
    sender        TEXT,
    sender_until  BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE deliveries (
    id               BIGSERIAL PRIMARY KEY,
    webhook          TEXT NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
    event            BIGINT NOT NULL REFERENCES events(id),
    status           TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT NOT NULL,
    last_error       TEXT,
    response_code    BIGINT,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    UNIQUE (webhook, event)
);
CREATE INDEX deliveries_due ON deliveries(status, next_attempt_at);
CREATE INDEX deliveries_updated_at ON deliveries(updated_at);
-- Deleting an event checks no delivery names it: without this, a scan of all of them.
CREATE INDEX deliveries_event ON deliveries(event);

-- Garbage collection, retention, usage and quotas, deploy reports.

CREATE TABLE gc_runs (
    id            BIGSERIAL PRIMARY KEY,
    started_at    BIGINT NOT NULL,
    finished_at   BIGINT NOT NULL,
    dry_run       BOOLEAN NOT NULL,
    by_whom       TEXT NOT NULL,
    links         BIGINT NOT NULL,
    blobs         BIGINT NOT NULL,
    bytes         BIGINT NOT NULL,
    manifests     BIGINT NOT NULL,
    uploads       BIGINT NOT NULL,
    repositories  BIGINT NOT NULL,
    error         TEXT
);

CREATE TABLE gc_lease (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    owner  TEXT NOT NULL,
    until  BIGINT NOT NULL
);

CREATE TABLE retention_rules (
    id            BIGSERIAL PRIMARY KEY,
    repositories  TEXT NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('keep', 'keep-last', 'delete-older', 'delete-untagged', 'keep-pulled')),
    tags          TEXT NOT NULL DEFAULT '',
    count         BIGINT NOT NULL DEFAULT 0,
    age_ms        BIGINT NOT NULL DEFAULT 0,
    created_at    BIGINT NOT NULL,
    created_by    TEXT
);

CREATE TABLE deleted_tags (
    id          BIGSERIAL PRIMARY KEY,
    repository  TEXT NOT NULL,
    name        TEXT NOT NULL,
    digest      TEXT NOT NULL,
    deleted_at  BIGINT NOT NULL,
    by_whom     TEXT,
    reason      TEXT NOT NULL
);
CREATE INDEX deleted_tags_repository ON deleted_tags(repository, name);
CREATE INDEX deleted_tags_deleted_at ON deleted_tags(deleted_at);

CREATE TABLE namespace_blobs (
    namespace  TEXT NOT NULL,
    digest     TEXT NOT NULL,
    links      BIGINT NOT NULL,
    PRIMARY KEY (namespace, digest)
);

CREATE TABLE usage (
    scope  TEXT PRIMARY KEY,
    bytes  BIGINT NOT NULL,
    blobs  BIGINT NOT NULL
);

CREATE TABLE quotas (
    target      TEXT PRIMARY KEY,
    bytes       BIGINT NOT NULL,
    warned      BOOLEAN NOT NULL DEFAULT FALSE,
    created_at  BIGINT NOT NULL,
    created_by  TEXT
);

-- What `wharf import` brought from each source (see migrations/sqlite/0015_imports.sql).
CREATE TABLE imports (
    source      TEXT NOT NULL,
    repository  TEXT NOT NULL,
    item        TEXT NOT NULL,
    digest      TEXT NOT NULL,
    at          BIGINT NOT NULL,
    PRIMARY KEY (source, repository, item)
);

CREATE TABLE deployments (
    agent        TEXT NOT NULL,
    stack        TEXT NOT NULL,
    service      TEXT NOT NULL,
    repository   TEXT NOT NULL,
    digest       TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('running', 'previous')),
    deployed_at  BIGINT NOT NULL,
    reported_at  BIGINT NOT NULL,
    reported_by  TEXT NOT NULL,
    PRIMARY KEY (reported_by, agent, stack, service, digest)
);
CREATE INDEX deployments_repository ON deployments(repository, digest);
