-- What the agent reports makes a server's varnishd unsafe (newline-separated findings).
ALTER TABLE varnish_servers ADD COLUMN unsafe_settings TEXT NOT NULL DEFAULT '';
