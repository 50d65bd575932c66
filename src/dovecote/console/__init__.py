"""The operator web console's parts below the web layer: sessions and CSRF (session.py),
number formatting (format.py), templates/ and static/. Its pages are web/console.py."""
