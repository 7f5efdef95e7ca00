-- The registry's keys compare and sort byte by byte, as in SQLite: listings page by
-- `name > last`, and a caller's visible repositories are read as ranges of names
-- (oci::keyset), which only byte order makes right. A database created with a
-- language's collation (en_US.UTF-8, the default on many systems) would sort `a-b`
-- after `a/b` or ignore case, so these columns use the "C" collation whatever the
-- database's is.
ALTER TABLE repository_blobs DROP CONSTRAINT repository_blobs_repository_fkey;
ALTER TABLE repository_blobs DROP CONSTRAINT repository_blobs_digest_fkey;
ALTER TABLE manifests DROP CONSTRAINT manifests_repository_fkey;
ALTER TABLE manifest_references DROP CONSTRAINT manifest_references_repository_manifest_fkey;
ALTER TABLE tags DROP CONSTRAINT tags_repository_digest_fkey;

ALTER TABLE repositories ALTER COLUMN name TYPE TEXT COLLATE "C";
ALTER TABLE blobs ALTER COLUMN digest TYPE TEXT COLLATE "C";
ALTER TABLE repository_blobs ALTER COLUMN repository TYPE TEXT COLLATE "C",
                             ALTER COLUMN digest TYPE TEXT COLLATE "C";
ALTER TABLE manifests ALTER COLUMN repository TYPE TEXT COLLATE "C",
                      ALTER COLUMN digest TYPE TEXT COLLATE "C",
                      ALTER COLUMN subject TYPE TEXT COLLATE "C";
ALTER TABLE manifest_references ALTER COLUMN repository TYPE TEXT COLLATE "C",
                                ALTER COLUMN manifest TYPE TEXT COLLATE "C",
                                ALTER COLUMN child TYPE TEXT COLLATE "C";
ALTER TABLE tags ALTER COLUMN repository TYPE TEXT COLLATE "C",
                 ALTER COLUMN name TYPE TEXT COLLATE "C",
                 ALTER COLUMN digest TYPE TEXT COLLATE "C";
ALTER TABLE uploads ALTER COLUMN repository TYPE TEXT COLLATE "C";
ALTER TABLE deleted_tags ALTER COLUMN repository TYPE TEXT COLLATE "C",
                         ALTER COLUMN name TYPE TEXT COLLATE "C";
ALTER TABLE deployments ALTER COLUMN agent TYPE TEXT COLLATE "C",
                        ALTER COLUMN stack TYPE TEXT COLLATE "C",
                        ALTER COLUMN service TYPE TEXT COLLATE "C";

ALTER TABLE repository_blobs ADD FOREIGN KEY (repository) REFERENCES repositories(name);
ALTER TABLE repository_blobs ADD FOREIGN KEY (digest) REFERENCES blobs(digest);
ALTER TABLE manifests ADD FOREIGN KEY (repository) REFERENCES repositories(name);
ALTER TABLE manifest_references ADD FOREIGN KEY (repository, manifest)
    REFERENCES manifests(repository, digest) ON DELETE CASCADE;
ALTER TABLE tags ADD FOREIGN KEY (repository, digest)
    REFERENCES manifests(repository, digest) ON DELETE CASCADE;

-- Moved (nextval) by every transaction that changes the registry's metadata, except the
-- garbage collector's: the collector's pacing reads it to see whether anything else
-- wrote since it last looked, on any replica. A sequence is outside transactions, so it
-- orders nothing and conflicts with nothing.
CREATE SEQUENCE foreground_writes;
