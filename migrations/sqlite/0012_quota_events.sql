-- Quota warnings become events webhooks can deliver: the outbox gains the `quota` action,
-- the quota's limit (`size` holds the bytes used) and a message. SQLite cannot change a
-- CHECK, so the table is rebuilt with its ids kept (the migration runs with foreign
-- keys off and is checked against them before it commits).
CREATE TABLE events_new (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    uuid        TEXT NOT NULL UNIQUE,
    at          INTEGER NOT NULL,
    action      TEXT NOT NULL CHECK (action IN ('push', 'tag', 'untag', 'delete', 'quota')),
    repository  TEXT NOT NULL,             -- for `quota`: the quota's target (`team/*`)
    tag         TEXT,
    digest      TEXT NOT NULL,             -- for `quota`: empty
    media_type  TEXT,
    size        INTEGER,                   -- for `quota`: the bytes used
    actor       TEXT,
    quota       INTEGER,                   -- for `quota`: the limit, in bytes
    detail      TEXT                       -- for `quota`: the warning as people read it
);
INSERT INTO events_new (id, uuid, at, action, repository, tag, digest, media_type, size, actor)
    SELECT id, uuid, at, action, repository, tag, digest, media_type, size, actor FROM events;
-- Event ids are webhook cursors: they are never reused, so the sequence carries over.
DELETE FROM sqlite_sequence WHERE name = 'events_new';
INSERT INTO sqlite_sequence (name, seq) SELECT 'events_new', seq FROM sqlite_sequence WHERE name = 'events';
DROP TABLE events;
ALTER TABLE events_new RENAME TO events;
-- Pruning delivered and failed deliveries by age is a range scan.
CREATE INDEX deliveries_updated_at ON deliveries(updated_at);
CREATE INDEX events_at ON events(at);
