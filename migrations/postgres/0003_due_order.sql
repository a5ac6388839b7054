-- Due deliveries are claimed oldest first, by (next_attempt_at, id). An index in that order lets
-- a claim read just the rows it takes, instead of reading and sorting every due delivery, which
-- made each claim slower as the queue grew.
CREATE INDEX herald_deliveries_due_order ON herald_deliveries (next_attempt_at, id)
    WHERE state IN ('queued', 'retrying');
DROP INDEX herald_deliveries_due;
