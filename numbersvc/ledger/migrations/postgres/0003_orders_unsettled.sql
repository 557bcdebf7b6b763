-- Every replica's heartbeat counts the orders waiting to be settled (`outcome_unknown`), for
-- the metric numbersvc_orders_outcome_unknown: a partial index keeps that count to the few
-- rows it names, however many orders the ledger holds.
CREATE INDEX orders_unsettled ON orders (request_id) WHERE state = 'outcome_unknown';
