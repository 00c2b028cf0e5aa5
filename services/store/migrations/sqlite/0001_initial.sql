-- The initial schema (SQLite). Booleans are 0/1 integers so that both stores decode them alike.
-- IF NOT EXISTS: stores created by the earlier built-in migration runner already hold these tables.
CREATE TABLE IF NOT EXISTS vaas_clock (
    id INTEGER PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO vaas_clock (id, value) VALUES (1, 0) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS dcs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    symbol TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS clusters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    labels TEXT NOT NULL DEFAULT '',
    partial_reload INTEGER NOT NULL DEFAULT 0,
    service_mesh_routing INTEGER NOT NULL DEFAULT 0,
    reload_timestamp INTEGER,
    error_timestamp INTEGER,
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS vcl_templates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    content TEXT NOT NULL,
    syntax INTEGER NOT NULL,
    comment TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS varnish_servers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    address TEXT NOT NULL,
    hostname TEXT NOT NULL DEFAULT '',
    http_port INTEGER NOT NULL,
    admin_port INTEGER NOT NULL,
    status INTEGER NOT NULL,
    dc_id INTEGER NOT NULL REFERENCES dcs (id),
    template_id INTEGER NOT NULL REFERENCES vcl_templates (id),
    cluster_id INTEGER NOT NULL REFERENCES clusters (id),
    is_canary INTEGER NOT NULL DEFAULT 0,
    running_vcl_version TEXT NOT NULL DEFAULT '',
    agent_seen_time INTEGER,
    UNIQUE (address, admin_port)
);
CREATE TABLE IF NOT EXISTS directors (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    service TEXT NOT NULL DEFAULT '',
    mode INTEGER NOT NULL,
    router INTEGER NOT NULL,
    route_expression TEXT NOT NULL DEFAULT '',
    active_active INTEGER NOT NULL,
    enabled INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS director_clusters (
    director_id INTEGER NOT NULL REFERENCES directors (id) ON DELETE CASCADE,
    cluster_id INTEGER NOT NULL REFERENCES clusters (id) ON DELETE CASCADE,
    PRIMARY KEY (director_id, cluster_id)
);
CREATE INDEX IF NOT EXISTS director_clusters_by_cluster ON director_clusters (cluster_id);
CREATE TABLE IF NOT EXISTS backends (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    director_id INTEGER NOT NULL REFERENCES directors (id),
    dc_id INTEGER NOT NULL REFERENCES dcs (id),
    address TEXT NOT NULL,
    port INTEGER NOT NULL,
    weight INTEGER NOT NULL,
    max_connections INTEGER NOT NULL,
    connect_timeout_micros INTEGER NOT NULL,
    first_byte_timeout_micros INTEGER NOT NULL,
    between_bytes_timeout_micros INTEGER NOT NULL,
    enabled INTEGER NOT NULL,
    tags TEXT NOT NULL DEFAULT '',
    UNIQUE (address, port, director_id)
);
CREATE INDEX IF NOT EXISTS backends_by_director ON backends (director_id);
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    cluster_id INTEGER NOT NULL REFERENCES clusters (id) ON DELETE CASCADE,
    timestamp INTEGER NOT NULL,
    state INTEGER NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    create_time INTEGER NOT NULL,
    start_time INTEGER,
    finish_time INTEGER
);
CREATE INDEX IF NOT EXISTS tasks_by_cluster_state ON tasks (cluster_id, state, timestamp);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id INTEGER NOT NULL,
    cluster_id INTEGER NOT NULL,
    timestamp INTEGER NOT NULL
);
