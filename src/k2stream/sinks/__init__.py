"""Where trades end up: SQLite, JSON lines, Kafka."""
