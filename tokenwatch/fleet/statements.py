"""The shared budgets' statements. Each is one atomic statement: the limit check and the write
happen on the budget's row under its lock (PostgreSQL re-checks the WHERE on the row's newest
version when two supervisors race), so there is no read-then-write window."""

from __future__ import annotations

from typing import Final

RESERVE: Final = """
WITH held AS (
    INSERT INTO shared_budgets AS b (budget, key, period_start, reserved)
    SELECT %(budget)s, %(key)s, %(period)s, %(amount)s
    WHERE %(amount)s <= %(limit)s
    ON CONFLICT (budget, key, period_start) DO UPDATE
        SET reserved = b.reserved + EXCLUDED.reserved, updated_at = now()
        WHERE b.spent + b.reserved + EXCLUDED.reserved <= %(limit)s
    RETURNING b.spent, b.reserved
), lease AS (
    INSERT INTO shared_reservations (id, budget, key, period_start, host, amount, expires_at)
    SELECT %(id)s, %(budget)s, %(key)s, %(period)s, %(host)s, %(amount)s,
           now() + make_interval(secs => %(lease)s)
    FROM held
    RETURNING id
)
SELECT spent, reserved, (SELECT count(*) FROM lease) FROM held
"""
"""Hold `amount` if spent + reserved + amount stays within the limit; no row: refused."""

SETTLE: Final = """
WITH released AS (
    DELETE FROM shared_reservations WHERE id = %(id)s AND budget = %(budget)s
    RETURNING key, period_start, amount
), counted AS (
    INSERT INTO shared_settlements (call_id, budget, key, period_start, host, amount)
    VALUES (%(call_id)s, %(budget)s, %(key)s, %(period)s, %(host)s, %(amount)s)
    ON CONFLICT DO NOTHING
    RETURNING amount
)
INSERT INTO shared_budgets AS b (budget, key, period_start, spent, reserved)
VALUES (
    %(budget)s, %(key)s, %(period)s,
    coalesce((SELECT sum(amount) FROM counted), 0),
    -coalesce((SELECT sum(amount) FROM released
               WHERE key = %(key)s AND period_start = %(period)s), 0)
)
ON CONFLICT (budget, key, period_start) DO UPDATE
    SET spent = b.spent + EXCLUDED.spent,
        reserved = greatest(0, b.reserved + EXCLUDED.reserved),
        updated_at = now()
RETURNING spent, reserved
"""
"""Replace the hold (if it is still there) by the call's real use, counted once per call id:
a settlement sent again after a lost answer or an outage changes nothing. A hold made in an
earlier period than the call's end is left to expire (no one reserves against a past period)."""

RELEASE: Final = """
WITH released AS (
    DELETE FROM shared_reservations WHERE id = %(id)s AND budget = %(budget)s
    RETURNING key, period_start, amount
)
UPDATE shared_budgets AS b
    SET reserved = greatest(0, b.reserved - released.amount), updated_at = now()
FROM released
WHERE b.budget = %(budget)s AND b.key = released.key AND b.period_start = released.period_start
RETURNING b.spent, b.reserved
"""
"""Give back the hold of a call that never went (or was refused by another shared budget)."""

RENEW: Final = """
UPDATE shared_reservations SET expires_at = now() + make_interval(secs => %(lease)s)
WHERE id = ANY(%(ids)s)
"""
"""Push back the expiry of this supervisor's calls in flight."""

SWEEP: Final = """
WITH gone AS (
    DELETE FROM shared_reservations WHERE (id, budget) IN (
        SELECT id, budget FROM shared_reservations
        WHERE expires_at < now()
        ORDER BY id, budget
        LIMIT 1000
        FOR UPDATE SKIP LOCKED
    )
    RETURNING budget, key, period_start, amount
), total AS (
    SELECT budget, key, period_start, sum(amount) AS amount FROM gone GROUP BY 1, 2, 3
)
UPDATE shared_budgets AS b
    SET reserved = greatest(0, b.reserved - total.amount), updated_at = now()
FROM total
WHERE b.budget = total.budget AND b.key = total.key AND b.period_start = total.period_start
RETURNING b.budget
"""
"""Stop counting the holds whose lease ran out (a supervisor killed, a machine switched off)."""

FIGURES: Final = """
SELECT spent, reserved FROM shared_budgets
WHERE budget = %(budget)s AND key = %(key)s AND period_start = %(period)s
"""
"""Where one shared budget stands (to word a refusal and show it)."""
