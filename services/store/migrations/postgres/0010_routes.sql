-- Routes: conditions (one encoded RouteCondition a line), priority, director, action, positive
-- URLs, and the clusters they apply to (route_clusters) unless they follow their director's.
CREATE TABLE IF NOT EXISTS routes (
    id BIGSERIAL PRIMARY KEY,
    conditions TEXT NOT NULL,
    priority BIGINT NOT NULL,
    clusters_in_sync BIGINT NOT NULL,
    director_id BIGINT NOT NULL REFERENCES directors (id),
    action BIGINT NOT NULL,
    positive_urls TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS routes_by_director ON routes (director_id);
CREATE TABLE IF NOT EXISTS route_clusters (
    route_id BIGINT NOT NULL REFERENCES routes (id) ON DELETE CASCADE,
    cluster_id BIGINT NOT NULL REFERENCES clusters (id) ON DELETE CASCADE,
    PRIMARY KEY (route_id, cluster_id)
);
CREATE INDEX IF NOT EXISTS route_clusters_by_cluster ON route_clusters (cluster_id);
