-- Credentials of API callers and agents. Only the SHA-256 hash of a secret is kept.
CREATE TABLE access_tokens (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL,
    role BIGINT NOT NULL,
    varnish_server_id BIGINT NOT NULL DEFAULT 0,
    secret_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT,
    created_by TEXT NOT NULL
);
CREATE UNIQUE INDEX access_tokens_by_name ON access_tokens (lower(name));
