-- The account-wide budget of upstream (Plivo) requests, shared by every replica (issue 10):
-- one GCRA row per account (`numbersvc/ledger/pgbudget.py` holds the one statement that
-- spends it). `tat_ns` is the theoretical arrival time of the next request, in Unix
-- nanoseconds of the database's clock.
--
-- UNLOGGED: the row is rewritten on every upstream request, and losing it (a crash, a
-- failover to a standby) only hands the account a fresh full burst, as a restart of one
-- replica does today. So it is kept out of the WAL: a write costs no flush, and the row lock
-- is released as soon as the statement ends.
CREATE UNLOGGED TABLE budget (
    name    text PRIMARY KEY,
    tat_ns  bigint NOT NULL
);
