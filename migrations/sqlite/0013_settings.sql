-- Values every process on this database shares: `jwt_key`, the key registry JWTs are
-- signed with (formerly the data directory's auth.key, which is carried over).
CREATE TABLE settings (
    name   TEXT PRIMARY KEY,
    value  BLOB NOT NULL
);
