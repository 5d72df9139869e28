"""A Binance-compatible exchange that runs in-process, for tests, demos and drills."""
