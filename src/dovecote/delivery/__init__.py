"""Delivery: live sessions, the outbox worker, retries, breakers and dead letters."""
