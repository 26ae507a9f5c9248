"""The engine side of tokenwatch: plain data, storage, pricing, budgets, processes; no UI."""
