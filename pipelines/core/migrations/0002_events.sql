-- Events: an append-only log; every insert notifies listeners on channel 'cdl_events'.
CREATE TABLE events (
    id          bigserial PRIMARY KEY,
    type        text NOT NULL CHECK (type ~ '^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$'),
    subject     text,                          -- what it is about, often a lineage node id
    payload     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX events_type ON events (type, id);

CREATE FUNCTION events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('cdl_events', NEW.id::text);
    RETURN NEW;
END $$;

CREATE TRIGGER events_notify AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_notify();

-- A subscriber hears the events after the one that was newest when it was first registered.
CREATE TABLE event_subscribers (
    name          text PRIMARY KEY,
    start_after   bigint NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now()
);

-- One row per event and subscriber once delivery has ended, delivered or failed for good.
CREATE TABLE event_deliveries (
    subscriber   text NOT NULL REFERENCES event_subscribers (name) ON DELETE CASCADE,
    event_id     bigint NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    status       text NOT NULL CHECK (status IN ('delivered', 'failed')),
    attempts     integer NOT NULL CHECK (attempts > 0),
    error        text,
    finished_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscriber, event_id)
);
