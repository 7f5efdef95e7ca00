-- The replica writing an upload now, until when (renewed while it writes): with several
-- replicas on one database, a chunk of an upload that another replica is writing is
-- refused, and no replica expires an upload that one is writing.
ALTER TABLE uploads ADD COLUMN writer TEXT;
ALTER TABLE uploads ADD COLUMN writer_until INTEGER NOT NULL DEFAULT 0;
