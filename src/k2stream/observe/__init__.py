"""Metrics, probes and status: how k2stream is seen from outside."""
