-- Domain mappings (a domain, the hosts it stands for per cluster) and redirects of a mapped
-- domain, with their assertions (one encoded RedirectAssertion a line).
CREATE TABLE IF NOT EXISTS domain_mappings (
    id BIGSERIAL PRIMARY KEY,
    domain TEXT NOT NULL,
    mappings TEXT NOT NULL,
    mapping_type BIGINT NOT NULL,
    description TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX IF NOT EXISTS domain_mappings_by_domain ON domain_mappings (LOWER(domain));
CREATE TABLE IF NOT EXISTS domain_mapping_clusters (
    domain_mapping_id BIGINT NOT NULL REFERENCES domain_mappings (id) ON DELETE CASCADE,
    cluster_id BIGINT NOT NULL REFERENCES clusters (id) ON DELETE CASCADE,
    PRIMARY KEY (domain_mapping_id, cluster_id)
);
CREATE INDEX IF NOT EXISTS domain_mapping_clusters_by_cluster ON domain_mapping_clusters (cluster_id);
CREATE TABLE IF NOT EXISTS redirects (
    id BIGSERIAL PRIMARY KEY,
    source_domain_id BIGINT NOT NULL REFERENCES domain_mappings (id),
    condition TEXT NOT NULL,
    rewrite_groups BIGINT NOT NULL,
    destination TEXT NOT NULL,
    status BIGINT NOT NULL,
    priority BIGINT NOT NULL,
    preserve_query BIGINT NOT NULL,
    required_header_name TEXT NOT NULL DEFAULT '',
    required_header_value TEXT NOT NULL DEFAULT '',
    assertions TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX IF NOT EXISTS redirects_by_domain_priority ON redirects (source_domain_id, priority);
