-- deliveries_plan_status (plan_id, status), from 001, is read by no query any more: the status
-- counts come from delivery_counts (010), each status a query filters on has a partial index of
-- its own (pending, deferred, errors, sent), and a plan's rows by time are read through
-- deliveries_plan_due. Every send still wrote two entries into it, the claim's row and then its
-- result's new version (bench/fanout.py on PostgreSQL 15: 14.7 index entries written a send
-- before, 12.6 after; WAL 2,690 bytes a send before, 2,536 after).
DROP INDEX deliveries_plan_status;
