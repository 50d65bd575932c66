"""Below ASGI: uvicorn's HTTP protocol with connection limits and header deadlines
(connections.py), in-process TLS (tls.py). The endpoints are the web layer's (web/)."""
