-- The audit history: one row per change of a configuration resource, written in the change's
-- own transaction; before and after are the protobuf encodings of the resource.
CREATE TABLE IF NOT EXISTS audit_entries (
    id BIGSERIAL PRIMARY KEY,
    time BIGINT NOT NULL,
    actor TEXT NOT NULL,
    collection TEXT NOT NULL,
    resource_id BIGINT NOT NULL,
    action BIGINT NOT NULL,
    message_type TEXT NOT NULL,
    before_value BYTEA,
    after_value BYTEA
);
CREATE INDEX IF NOT EXISTS audit_entries_by_resource ON audit_entries (collection, resource_id, id);
