-- herald's configuration in PostgreSQL (DATABASE_URL): run once, e.g.
--   psql "postgres://user@host/db" -f /usr/share/doc/herald/database.sql
-- Safe to run again.

-- wspubsub's API keys, laid out as wspubsub's own `apikeys` table. herald
-- reads domain, apikey and active; a domain may have several keys (to
-- rotate one), so wspubsub's unique index on domain is left out.
CREATE SEQUENCE IF NOT EXISTS apikeys_id_seq;
CREATE TABLE IF NOT EXISTS apikeys (
    id integer NOT NULL DEFAULT nextval('apikeys_id_seq'::regclass) PRIMARY KEY,
    domain varchar(64) NOT NULL,
    username varchar(254) NOT NULL,
    apikey varchar(255) NOT NULL UNIQUE,
    insert_ts timestamp NOT NULL DEFAULT now(),
    active boolean NOT NULL DEFAULT false
);

-- Pusher apps (when neither APPS nor APPS_FILE is set): one row per app,
-- the same settings as an app of APPS. webhooks is a JSON array of
-- {"url": ..., "events": [...]} objects, as in APPS.
CREATE TABLE IF NOT EXISTS herald_apps (
    id varchar(64) PRIMARY KEY,
    key varchar(64) NOT NULL UNIQUE,
    secret text NOT NULL,
    enabled boolean NOT NULL DEFAULT true,
    enable_client_messages boolean NOT NULL DEFAULT false,
    max_connections integer,              -- NULL: no limit
    max_client_events_per_second integer NOT NULL DEFAULT 10,
    max_event_payload_in_kb integer NOT NULL DEFAULT 10,
    webhooks jsonb NOT NULL DEFAULT '[]'
);

-- Every change tells herald at once (channel herald_config); without
-- this trigger changes are read every DATABASE_REFRESH seconds.
CREATE OR REPLACE FUNCTION herald_config_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('herald_config', TG_TABLE_NAME);
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS herald_config_changed ON apikeys;
CREATE TRIGGER herald_config_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON apikeys
    FOR EACH STATEMENT EXECUTE FUNCTION herald_config_changed();
DROP TRIGGER IF EXISTS herald_config_changed ON herald_apps;
CREATE TRIGGER herald_config_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON herald_apps
    FOR EACH STATEMENT EXECUTE FUNCTION herald_config_changed();
