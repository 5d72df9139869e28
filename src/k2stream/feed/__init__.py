"""Resilience that knows no exchange: backoff, breakers, budgets, connections, sequencing."""
