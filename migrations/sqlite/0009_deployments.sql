-- What deploy agents report running (ARCHITECTURE.md, "Retention"): per agent and stack,
-- each service's running digest and its last rollback targets. Retention never deletes
-- a digest listed here. A report replaces the rows of its agent and stack that the same
-- user reported, never another's: reporting needs only pull, so a reader can add
-- protection but not take away what another agent reported.
CREATE TABLE deployments (
    agent        TEXT NOT NULL,
    stack        TEXT NOT NULL,
    service      TEXT NOT NULL,
    repository   TEXT NOT NULL,
    digest       TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('running', 'previous')),
    deployed_at  INTEGER NOT NULL,
    reported_at  INTEGER NOT NULL,
    reported_by  TEXT NOT NULL,
    PRIMARY KEY (reported_by, agent, stack, service, digest)
);
CREATE INDEX deployments_repository ON deployments(repository, digest);
