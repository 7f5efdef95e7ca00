-- One garbage collection pass at a time, across processes (the server's and `wharf gc`):
-- a pass holds this lease and renews it after each batch; one that died loses it when
-- `until` passes, and the next pass finishes what it marked.
CREATE TABLE gc_lease (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    owner  TEXT NOT NULL,
    until  INTEGER NOT NULL
);
-- Pruning deleted tags by age is a range scan.
CREATE INDEX deleted_tags_deleted_at ON deleted_tags(deleted_at);
