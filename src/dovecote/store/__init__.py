"""Storage: one interface (`base.Store`), two engines, chosen by URL."""

from __future__ import annotations

from dovecote.store.base import Store

ENGINES = {
    "sqlite": "dovecote.store.sqlite:SQLiteStore",
    "postgresql": "dovecote.store.postgres:PostgresStore",
    "postgres": "dovecote.store.postgres:PostgresStore",
}


def open_store(url: str, **options: object) -> Store:
    """Build (not yet open) the store engine named by the URL's scheme."""
    import importlib

    scheme = url.split(":", 1)[0]
    try:
        target = ENGINES[scheme]
    except KeyError:
        # Only the scheme: the rest of a DSN may carry a password.
        known = ", ".join(sorted(ENGINES))
        raise ValueError(f"unknown store scheme {scheme[:40]!r} (known: {known})") from None
    module_name, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    store: Store = cls(url, **options)
    return store


__all__ = ["ENGINES", "Store", "open_store"]
