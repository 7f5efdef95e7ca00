-- The replica writing an upload now, until when (see migrations/sqlite/0016).
ALTER TABLE uploads ADD COLUMN writer TEXT;
ALTER TABLE uploads ADD COLUMN writer_until BIGINT NOT NULL DEFAULT 0;
