-- The compiler command each server's varnishd compiles VCL with, as its agent reports it.
ALTER TABLE varnish_servers ADD COLUMN cc_command TEXT NOT NULL DEFAULT '';
