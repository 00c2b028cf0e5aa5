-- Probes and time profiles, the rest of the director's fields and backends inheriting time profiles.
CREATE TABLE IF NOT EXISTS probes (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    url TEXT NOT NULL,
    expected_response BIGINT NOT NULL,
    interval_micros BIGINT NOT NULL,
    timeout_micros BIGINT NOT NULL,
    window_size BIGINT NOT NULL,
    threshold BIGINT NOT NULL,
    start_as_healthy BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS time_profiles (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    max_connections BIGINT NOT NULL,
    connect_timeout_micros BIGINT NOT NULL,
    first_byte_timeout_micros BIGINT NOT NULL,
    between_bytes_timeout_micros BIGINT NOT NULL,
    service_mesh_timeout_micros BIGINT NOT NULL
);
ALTER TABLE directors ADD COLUMN probe_id BIGINT REFERENCES probes (id);
ALTER TABLE directors ADD COLUMN time_profile_id BIGINT REFERENCES time_profiles (id);
ALTER TABLE directors ADD COLUMN protocol BIGINT NOT NULL DEFAULT 1;
ALTER TABLE directors ADD COLUMN hashing_policy BIGINT NOT NULL DEFAULT 1;
ALTER TABLE directors ADD COLUMN remove_path BIGINT NOT NULL DEFAULT 0;
ALTER TABLE directors ADD COLUMN is_virtual BIGINT NOT NULL DEFAULT 0;
ALTER TABLE directors ADD COLUMN service_mesh_label TEXT NOT NULL DEFAULT '';
ALTER TABLE directors ADD COLUMN service_tag TEXT NOT NULL DEFAULT '';
ALTER TABLE directors ADD COLUMN reachable_via_service_mesh BIGINT NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS directors_by_probe ON directors (probe_id);
CREATE INDEX IF NOT EXISTS directors_by_time_profile ON directors (time_profile_id);
ALTER TABLE backends ADD COLUMN inherit_time_profile BIGINT NOT NULL DEFAULT 0;
