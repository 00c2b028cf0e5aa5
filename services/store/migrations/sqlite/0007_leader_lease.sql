-- The lease of the vaas-scheduler replica that drives reloads: at most one row (id 1), created by
-- the first replica that takes it. `term` grows by one every time the lease is taken, so it never
-- repeats and fences off commands of an older leader; `expires_at` is the database's clock in
-- microseconds. An empty holder means the lease was released.
CREATE TABLE leader_lease (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    holder TEXT NOT NULL,
    term BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
