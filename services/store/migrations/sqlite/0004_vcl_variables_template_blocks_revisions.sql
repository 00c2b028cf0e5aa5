-- VCL variables per cluster, template blocks per template and tag, and every saved revision of
-- every template.
CREATE TABLE IF NOT EXISTS vcl_variables (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    cluster_id INTEGER NOT NULL REFERENCES clusters (id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    UNIQUE (cluster_id, key)
);
CREATE TABLE IF NOT EXISTS vcl_template_blocks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    template_id INTEGER NOT NULL REFERENCES vcl_templates (id) ON DELETE CASCADE,
    tag TEXT NOT NULL,
    content TEXT NOT NULL,
    UNIQUE (template_id, tag)
);
CREATE TABLE IF NOT EXISTS vcl_template_revisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    template_id INTEGER NOT NULL REFERENCES vcl_templates (id) ON DELETE CASCADE,
    revision INTEGER NOT NULL,
    content TEXT NOT NULL,
    comment TEXT NOT NULL DEFAULT '',
    time INTEGER NOT NULL,
    actor TEXT NOT NULL,
    UNIQUE (template_id, revision)
);
