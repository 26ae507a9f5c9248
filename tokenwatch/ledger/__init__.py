"""The ledger: usage, agents, alerts and actions in SQLite, and what is read back from it."""
