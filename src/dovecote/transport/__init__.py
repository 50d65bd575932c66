"""Transports: HTTP and WebSocket routes, request limits. Knows nothing of storage."""
