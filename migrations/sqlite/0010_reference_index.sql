-- "Does a manifest of this repository reference this digest?" is asked by garbage
-- collection for every link, by retention for every manifest, and by deletes: without
-- this index SQLite scanned all of the repository's references for each question.
CREATE INDEX manifest_references_repository_child ON manifest_references(repository, child);
