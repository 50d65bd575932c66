"""Dovecote: a store-and-forward message relay (DIDComm v2 mediator and rooms)."""

__version__ = "0.1.0"
