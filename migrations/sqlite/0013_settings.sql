-- Values every process on this database shares: `jwt_key`, the key registry JWTs are
-- signed with (formerly the data directory's auth.key, which is carried over).
CREATE TABLE settings (
    name   TEXT PRIMARY KEY,
    value  BLOB NOT NULL
);

-- Failed logins per limiter window (`cu:<client>:<user>`, `c:<client>`, `u:<user>`) in
-- fixed one-minute windows, so processes sharing the database limit together.
CREATE TABLE login_failures (
    key           TEXT NOT NULL,
    window_start  INTEGER NOT NULL,
    failures      INTEGER NOT NULL,
    PRIMARY KEY (key, window_start)
);
CREATE INDEX login_failures_window ON login_failures(window_start);
