"""A team's supervisors on one PostgreSQL database: shared budgets (and the team ledger)."""
