-- Probes and time profiles, the rest of the director's fields and backends inheriting time profiles.
CREATE TABLE IF NOT EXISTS probes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    url TEXT NOT NULL,
    expected_response INTEGER NOT NULL,
    interval_micros INTEGER NOT NULL,
    timeout_micros INTEGER NOT NULL,
    window_size INTEGER NOT NULL,
    threshold INTEGER NOT NULL,
    start_as_healthy INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS time_profiles (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    max_connections INTEGER NOT NULL,
    connect_timeout_micros INTEGER NOT NULL,
    first_byte_timeout_micros INTEGER NOT NULL,
    between_bytes_timeout_micros INTEGER NOT NULL,
    service_mesh_timeout_micros INTEGER NOT NULL
);
ALTER TABLE directors ADD COLUMN probe_id INTEGER REFERENCES probes (id);
ALTER TABLE directors ADD COLUMN time_profile_id INTEGER REFERENCES time_profiles (id);
ALTER TABLE directors ADD COLUMN protocol INTEGER NOT NULL DEFAULT 1;
ALTER TABLE directors ADD COLUMN hashing_policy INTEGER NOT NULL DEFAULT 1;
ALTER TABLE directors ADD COLUMN remove_path INTEGER NOT NULL DEFAULT 0;
ALTER TABLE directors ADD COLUMN is_virtual INTEGER NOT NULL DEFAULT 0;
ALTER TABLE directors ADD COLUMN service_mesh_label TEXT NOT NULL DEFAULT '';
ALTER TABLE directors ADD COLUMN service_tag TEXT NOT NULL DEFAULT '';
ALTER TABLE directors ADD COLUMN reachable_via_service_mesh INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS directors_by_probe ON directors (probe_id);
CREATE INDEX IF NOT EXISTS directors_by_time_profile ON directors (time_profile_id);
ALTER TABLE backends ADD COLUMN inherit_time_profile INTEGER NOT NULL DEFAULT 0;
