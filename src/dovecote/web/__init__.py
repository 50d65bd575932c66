"""The web layer: every ASGI endpoint, and the only package that knows Starlette routing.

    app.py         the Starlette application (routes + GuardMiddleware + lifespan)
    guard.py       GuardMiddleware: request id, RED metrics, limits, body deadline
    admission.py   the one way into a WebSocket (close 1012 draining, 1013 busy)
    responses.py   the one error body, Retry-After, bounded body reads
    didcomm.py     POST / and WebSocket /ws (the DIDComm transports)
    invitation.py  GET /, /oob, /invitation, /invitation/v1
    rooms.py       /v1/rooms JSON API and the table that routes and documents it
    rooms_ws.py    WebSocket /v1/rooms/ws
    openapi.py     /openapi.json and /docs from that table
    health.py      /health/live, /health/ready, /health, /metrics
    admin.py       /admin and the admin checks (allowlist, client cert, token, throttle)
    console.py     /console pages (templates and static files in dovecote/console/)

Endpoints are objects built by the composition root (server.py) with the parts they
need; none looks anything up on the application.
"""
