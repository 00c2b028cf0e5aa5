-- What each server verifiably runs: the store timestamp of the newest configuration it runs,
-- why its last reload failed, and whether its agent is attached to the leading scheduler.
ALTER TABLE varnish_servers ADD COLUMN synced_version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE varnish_servers ADD COLUMN sync_error TEXT NOT NULL DEFAULT '';
ALTER TABLE varnish_servers ADD COLUMN agent_attached BIGINT NOT NULL DEFAULT 0;
