"""The operator web console (/console): server-rendered pages over the admin functions."""

from dovecote.console.views import routes

__all__ = ["routes"]
