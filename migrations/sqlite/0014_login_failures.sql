-- Deleting an event checks that no delivery names it: without an index on the column,
-- each delete scanned every delivery (pruning a month of events held the writer for
-- minutes). And the failed-login windows shared by processes on one database.
CREATE INDEX deliveries_event ON deliveries(event);

-- Failed logins per limiter window (`cu:<client>:<user>`, `c:<client>`, `u:<user>`) in
-- fixed one-minute windows, so processes sharing the database limit together.
CREATE TABLE login_failures (
    key           TEXT NOT NULL,
    window_start  INTEGER NOT NULL,
    failures      INTEGER NOT NULL,
    PRIMARY KEY (key, window_start)
);
CREATE INDEX login_failures_window ON login_failures(window_start);
