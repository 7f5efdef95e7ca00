-- What `wharf import` brought from each source (`tag:<name>` and `manifest:<digest>`
-- items of a repository), so a later run tells a change in the source from a change
-- made here since: it moves a tag only if it still points where the import put it, and
-- brings back nothing deleted here.
CREATE TABLE imports (
    source      TEXT NOT NULL,
    repository  TEXT NOT NULL,
    item        TEXT NOT NULL,
    digest      TEXT NOT NULL,
    at          INTEGER NOT NULL,
    PRIMARY KEY (source, repository, item)
);
