-- Usage and quotas (ARCHITECTURE.md, "Usage and quotas").

-- Which blobs each namespace holds (a namespace is a name's first component: `team` for
-- `team/api`), with how many of its repositories link each: a blob counts once per
-- namespace however many of its repositories hold it.
CREATE TABLE namespace_blobs (
    namespace  TEXT NOT NULL,
    digest     TEXT NOT NULL,
    links      INTEGER NOT NULL,
    PRIMARY KEY (namespace, digest)
);
INSERT INTO namespace_blobs (namespace, digest, links)
    SELECT CASE WHEN instr(repository, '/') > 0 THEN substr(repository, 1, instr(repository, '/') - 1) ELSE repository END,
           digest, count(*)
      FROM repository_blobs GROUP BY 1, 2;

-- Bytes and blobs per namespace (`ns:team`) and per repository (`repo:team/api`), kept
-- in the transaction of every link made or removed; `wharf usage --verify` recomputes them.
CREATE TABLE usage (
    scope  TEXT PRIMARY KEY,
    bytes  INTEGER NOT NULL,
    blobs  INTEGER NOT NULL
);
INSERT INTO usage (scope, bytes, blobs)
    SELECT 'ns:' || n.namespace, sum(b.size), count(*) FROM namespace_blobs n JOIN blobs b ON b.digest = n.digest GROUP BY n.namespace;
INSERT INTO usage (scope, bytes, blobs)
    SELECT 'repo:' || l.repository, sum(b.size), count(*) FROM repository_blobs l JOIN blobs b ON b.digest = l.digest GROUP BY l.repository;

-- Quotas: `team/*` (a namespace) or a repository, in bytes. `warned` is set when usage
-- passed 85 % (and cleared when it falls below), so the warning is given once.
CREATE TABLE quotas (
    target      TEXT PRIMARY KEY,
    bytes       INTEGER NOT NULL,
    warned      INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL,
    created_by  TEXT
);
