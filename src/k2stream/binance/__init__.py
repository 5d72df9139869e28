"""What k2stream knows about Binance: stream names, payloads, REST."""
