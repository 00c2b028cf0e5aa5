-- Where each server stands in each of the newest reloads of its cluster (phase and durations), and
-- which reload last included a task, so that GetTask and WatchTask can show per-server progress.
CREATE TABLE IF NOT EXISTS reload_progress (
    cluster_id INTEGER NOT NULL REFERENCES clusters (id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    server_id INTEGER NOT NULL,
    address TEXT NOT NULL,
    phase INTEGER NOT NULL,
    render_micros INTEGER,
    compile_micros INTEGER,
    activate_micros INTEGER,
    unchanged INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    update_time INTEGER NOT NULL,
    PRIMARY KEY (cluster_id, version, server_id)
);
ALTER TABLE tasks ADD COLUMN reload_version INTEGER;
