-- The initial schema (PostgreSQL). Booleans are 0/1 integers so that both stores decode them alike.
-- IF NOT EXISTS: stores created by the earlier built-in migration runner already hold these tables.
CREATE TABLE IF NOT EXISTS vaas_clock (
    id BIGINT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO vaas_clock (id, value) VALUES (1, 0) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS dcs (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL,
    symbol TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS clusters (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    labels TEXT NOT NULL DEFAULT '',
    partial_reload BIGINT NOT NULL DEFAULT 0,
    service_mesh_routing BIGINT NOT NULL DEFAULT 0,
    reload_timestamp BIGINT,
    error_timestamp BIGINT,
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS vcl_templates (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    content TEXT NOT NULL,
    syntax BIGINT NOT NULL,
    comment TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS varnish_servers (
    id BIGSERIAL PRIMARY KEY,
    address TEXT NOT NULL,
    hostname TEXT NOT NULL DEFAULT '',
    http_port BIGINT NOT NULL,
    admin_port BIGINT NOT NULL,
    status BIGINT NOT NULL,
    dc_id BIGINT NOT NULL REFERENCES dcs (id),
    template_id BIGINT NOT NULL REFERENCES vcl_templates (id),
    cluster_id BIGINT NOT NULL REFERENCES clusters (id),
    is_canary BIGINT NOT NULL DEFAULT 0,
    running_vcl_version TEXT NOT NULL DEFAULT '',
    agent_seen_time BIGINT,
    UNIQUE (address, admin_port)
);
CREATE TABLE IF NOT EXISTS directors (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    service TEXT NOT NULL DEFAULT '',
    mode BIGINT NOT NULL,
    router BIGINT NOT NULL,
    route_expression TEXT NOT NULL DEFAULT '',
    active_active BIGINT NOT NULL,
    enabled BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS director_clusters (
    director_id BIGINT NOT NULL REFERENCES directors (id) ON DELETE CASCADE,
    cluster_id BIGINT NOT NULL REFERENCES clusters (id) ON DELETE CASCADE,
    PRIMARY KEY (director_id, cluster_id)
);
CREATE INDEX IF NOT EXISTS director_clusters_by_cluster ON director_clusters (cluster_id);
CREATE TABLE IF NOT EXISTS backends (
    id BIGSERIAL PRIMARY KEY,
    director_id BIGINT NOT NULL REFERENCES directors (id),
    dc_id BIGINT NOT NULL REFERENCES dcs (id),
    address TEXT NOT NULL,
    port BIGINT NOT NULL,
    weight BIGINT NOT NULL,
    max_connections BIGINT NOT NULL,
    connect_timeout_micros BIGINT NOT NULL,
    first_byte_timeout_micros BIGINT NOT NULL,
    between_bytes_timeout_micros BIGINT NOT NULL,
    enabled BIGINT NOT NULL,
    tags TEXT NOT NULL DEFAULT '',
    UNIQUE (address, port, director_id)
);
CREATE INDEX IF NOT EXISTS backends_by_director ON backends (director_id);
CREATE TABLE IF NOT EXISTS tasks (
    id BIGSERIAL PRIMARY KEY,
    cluster_id BIGINT NOT NULL REFERENCES clusters (id) ON DELETE CASCADE,
    timestamp BIGINT NOT NULL,
    state BIGINT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    create_time BIGINT NOT NULL,
    start_time BIGINT,
    finish_time BIGINT
);
CREATE INDEX IF NOT EXISTS tasks_by_cluster_state ON tasks (cluster_id, state, timestamp);
CREATE TABLE IF NOT EXISTS outbox (
    id BIGSERIAL PRIMARY KEY,
    task_id BIGINT NOT NULL,
    cluster_id BIGINT NOT NULL,
    timestamp BIGINT NOT NULL
);
