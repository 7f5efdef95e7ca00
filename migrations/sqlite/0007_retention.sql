-- Retention (ARCHITECTURE.md, "Retention").

-- Since when a manifest has had no tag (NULL while tagged); set for those stored now.
ALTER TABLE manifests ADD COLUMN untagged_at INTEGER;
UPDATE manifests SET untagged_at = created_at
 WHERE NOT EXISTS (SELECT 1 FROM tags t WHERE t.repository = manifests.repository AND t.digest = manifests.digest);
-- Set when retention decided to delete the manifest; garbage collection deletes it once
-- this is older than gc_delay (if it is still untagged and unreferenced). Cleared when
-- it is tagged again.
ALTER TABLE manifests ADD COLUMN condemned_at INTEGER;
CREATE INDEX manifests_condemned ON manifests(condemned_at) WHERE condemned_at IS NOT NULL;
-- When the manifest was last pulled (GET), written in batches.
ALTER TABLE manifests ADD COLUMN pulled_at INTEGER;

CREATE TABLE retention_rules (
    id            INTEGER PRIMARY KEY,
    repositories  TEXT NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('keep', 'keep-last', 'delete-older', 'delete-untagged', 'keep-pulled')),
    tags          TEXT NOT NULL DEFAULT '',
    count         INTEGER NOT NULL DEFAULT 0,
    age_ms        INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL,
    created_by    TEXT
);

-- Tags deleted by hand or by retention, for `wharf tag restore` while their manifest
-- is kept.
CREATE TABLE deleted_tags (
    id          INTEGER PRIMARY KEY,
    repository  TEXT NOT NULL,
    name        TEXT NOT NULL,
    digest      TEXT NOT NULL,
    deleted_at  INTEGER NOT NULL,
    by_whom     TEXT,
    reason      TEXT NOT NULL
);
CREATE INDEX deleted_tags_repository ON deleted_tags(repository, name);
