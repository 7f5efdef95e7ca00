-- The rights generation: moved by every change to users, passwords, grants, visibility
-- and token revocation, in the same transaction, so a server holding rights in memory
-- reloads them at the next request. Users take their generation from it too, so a user
-- removed and created again under the same name never matches the old one's JWTs.
CREATE TABLE auth_state (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    generation  INTEGER NOT NULL
);
INSERT INTO auth_state (id, generation)
    SELECT 1, COALESCE(MAX(generation), 0) + 1 FROM users;

-- The digest an upload's bytes were verified to have, recorded before they are renamed
-- into place: finishing an upload whose file is gone (a failure between the rename and
-- the commit) is allowed only for that digest.
ALTER TABLE uploads ADD COLUMN digest TEXT;
-- Uploads of a monolithic `POST ?digest=`: no client can resume one, so a restart
-- removes those left by a crash.
ALTER TABLE uploads ADD COLUMN monolithic INTEGER NOT NULL DEFAULT 0;

-- The credential behind an audited action: `password`, a token's id.
ALTER TABLE audit_log ADD COLUMN credential TEXT;

-- Addresses users signed in from, with the password they used (its generation): the
-- failed-login limiter exempts them from the per-user window, across restarts.
CREATE TABLE login_trust (
    user_name   TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    client      TEXT NOT NULL,
    generation  INTEGER NOT NULL,
    at          INTEGER NOT NULL,
    PRIMARY KEY (user_name, client)
);

-- Open uploads per repository are bounded.
CREATE INDEX uploads_repository ON uploads(repository);
