-- The order ledger, the twin of the SQLite file's schema (numbersvc/ledger/sqlite.py).
-- Times are bigint Unix nanoseconds, as in SQLite: a page token's key (create_time_ns,
-- request_id) means the same on both stores, and `numbersvc db import` copies them exactly
-- (timestamptz keeps microseconds only). They come from the database's clock, so replicas
-- never disagree about a lease, a send deadline or the UTC day.

CREATE TABLE orders (
    request_id       text PRIMARY KEY,
    fingerprint      text NOT NULL,
    caller           text NOT NULL,
    peer             text NOT NULL,
    owner            text NOT NULL,
    state            text NOT NULL CHECK (state IN ('sending', 'fulfilled', 'pending',
                         'unrecognized', 'failed', 'released', 'outcome_unknown')),
    status           integer NOT NULL,
    quantity         integer NOT NULL,
    create_time_ns   bigint NOT NULL,
    update_time_ns   bigint NOT NULL,
    -- The latest claim of the id (a released or failed order may be claimed again); the
    -- daily cap counts by it.
    attempt_time_ns  bigint NOT NULL,
    -- No POST of this row can still be running after it: attempt + rent timeout + slack.
    send_deadline_ns bigint NOT NULL,
    order_proto      bytea NOT NULL,
    error_outcome    text NOT NULL DEFAULT '',
    upstream         text NOT NULL DEFAULT ''
);
CREATE INDEX orders_by_time ON orders (create_time_ns, request_id);
CREATE INDEX orders_by_caller_attempt ON orders (caller, attempt_time_ns);
CREATE INDEX orders_sending ON orders (send_deadline_ns) WHERE state = 'sending';

-- The audit trail: one row per change of an order, never updated.
CREATE TABLE events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id  text NOT NULL,
    time_ns     bigint NOT NULL,
    state       text NOT NULL,
    detail      text NOT NULL
);
CREATE INDEX events_by_request ON events (request_id, id);

-- One lease per server process: a `sending` order whose owner has no live lease (and whose
-- send deadline has passed) is turned into `outcome_unknown` by any live replica.
CREATE TABLE instances (
    instance    text PRIMARY KEY,
    expires_ns  bigint NOT NULL,
    started_ns  bigint NOT NULL,
    host        text NOT NULL,
    pid         integer NOT NULL
);
