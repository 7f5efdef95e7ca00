-- Tag immutability policies: an existing tag of a matching repository whose name matches
-- one of `tags` (comma-separated globs) can be neither moved nor deleted.
CREATE TABLE tag_policies (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    repositories  TEXT NOT NULL,              -- a repository, `namespace/*` or `*`
    tags          TEXT NOT NULL,              -- comma-separated tag globs
    created_at    INTEGER NOT NULL,
    created_by    TEXT
);
