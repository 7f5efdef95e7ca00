-- Online garbage collection (ARCHITECTURE.md, "Garbage collection").

-- When a repository's link to a blob was last made or used (a push, a mount, a HEAD or
-- GET): garbage collection removes a link that no manifest of its repository references
-- only once this is older than gc_delay.
ALTER TABLE repository_blobs ADD COLUMN touched_at INTEGER NOT NULL DEFAULT 0;
UPDATE repository_blobs SET touched_at = created_at;

-- Set (unix milliseconds) when garbage collection has decided to delete the blob's bytes
-- and is deleting them; the row goes once they are gone. An upload cannot claim a digest
-- in this state (it waits), and the collector cannot mark a digest an upload has claimed
-- (`uploads.digest`) or a repository links.
ALTER TABLE blobs ADD COLUMN deleting_at INTEGER;
CREATE INDEX blobs_deleting ON blobs(deleting_at) WHERE deleting_at IS NOT NULL;
CREATE INDEX uploads_digest ON uploads(digest) WHERE digest IS NOT NULL;

-- Every pass of the collector, dry runs included.
CREATE TABLE gc_runs (
    id            INTEGER PRIMARY KEY,
    started_at    INTEGER NOT NULL,
    finished_at   INTEGER NOT NULL,
    dry_run       INTEGER NOT NULL,
    by_whom       TEXT NOT NULL,
    links         INTEGER NOT NULL,
    blobs         INTEGER NOT NULL,
    bytes         INTEGER NOT NULL,
    manifests     INTEGER NOT NULL,
    uploads       INTEGER NOT NULL,
    repositories  INTEGER NOT NULL,
    error         TEXT
);
