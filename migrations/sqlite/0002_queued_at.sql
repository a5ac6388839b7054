-- When a delivery entered the queue: when it was planned, or when an operator requeued it with
-- `herald retry --dead`. retry.max_age counts from here; NULL means created_at.
ALTER TABLE herald_deliveries ADD COLUMN queued_at TEXT;
