-- Where each server stands in each of the newest reloads of its cluster (phase and durations), and
-- which reload last included a task, so that GetTask and WatchTask can show per-server progress.
CREATE TABLE IF NOT EXISTS reload_progress (
    cluster_id BIGINT NOT NULL REFERENCES clusters (id) ON DELETE CASCADE,
    version BIGINT NOT NULL,
    server_id BIGINT NOT NULL,
    address TEXT NOT NULL,
    phase BIGINT NOT NULL,
    render_micros BIGINT,
    compile_micros BIGINT,
    activate_micros BIGINT,
    unchanged BIGINT NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    update_time BIGINT NOT NULL,
    PRIMARY KEY (cluster_id, version, server_id)
);
ALTER TABLE tasks ADD COLUMN reload_version BIGINT;
