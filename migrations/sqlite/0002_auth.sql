-- Accounts, access tokens, permissions, visibility and the audit log.

CREATE TABLE users (
    name                 TEXT PRIMARY KEY,
    password_hash        TEXT NOT NULL,          -- Argon2id, PHC string
    admin                INTEGER NOT NULL DEFAULT 0,
    created_at           INTEGER NOT NULL,
    -- Bumped on password change or removal: JWTs carry it, so old ones stop working.
    generation           INTEGER NOT NULL DEFAULT 1
);

-- Access tokens for CI and servers, and the refresh tokens `docker login` keeps.
-- The token string is `wharf_<id>_<secret>`; only a SHA-256 of the secret is stored.
CREATE TABLE access_tokens (
    id            TEXT PRIMARY KEY,
    user_name     TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('access', 'refresh')),
    secret_hash   TEXT NOT NULL,
    scopes        TEXT NOT NULL,                 -- JSON array of "repository:<pattern>:<actions>"
    created_at    INTEGER NOT NULL,
    last_used_at  INTEGER,
    expires_at    INTEGER,
    revoked_at    INTEGER
);
CREATE INDEX access_tokens_user ON access_tokens(user_name);

-- What a user may do beyond their own namespace: pattern is a repository or `ns/*`.
CREATE TABLE grants (
    user_name   TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    pattern     TEXT NOT NULL,
    level       TEXT NOT NULL CHECK (level IN ('pull', 'push', 'delete', 'admin')),
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (user_name, pattern)
);

-- Repositories are private unless a pattern here makes them public; the most specific
-- pattern wins.
CREATE TABLE visibility (
    pattern     TEXT PRIMARY KEY,
    public      INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);

CREATE TABLE audit_log (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    actor       TEXT,
    action      TEXT NOT NULL,
    repository  TEXT,
    detail      TEXT,
    client      TEXT
);
CREATE INDEX audit_log_at ON audit_log(at);
