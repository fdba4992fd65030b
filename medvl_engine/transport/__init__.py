"""ZeroMQ transport of scored rollout groups (msgspec messages, credit flow control, sequence numbers)."""
