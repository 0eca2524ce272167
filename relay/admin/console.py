"""The status console: static files served by the internal port at `/admin/`.

The page itself carries no secret and needs no token: it asks for the admin token and sends it
with each API request (it keeps it in the tab's sessionStorage, never in a cookie, so no other
site can make the browser use it). Everything it shows comes from the admin API and /metrics
of the node that served it, which reaches the other nodes of a cluster for it
(`/admin/v1/nodes/{node}/...`). No build step: plain HTML, CSS and JavaScript in the package.
"""

from __future__ import annotations

import functools
from importlib import resources

from aiohttp import web

PREFIX = "/admin/"
_FILES = {
    "index.html": "text/html",
    "console.js": "text/javascript",
    "console.css": "text/css",
}
# The page may load only its own files and talk only to the node that served it; nothing
# inline, no frames.
_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; "
                                "connect-src 'self'; img-src 'self' data:; "
                                "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def is_console(path: str) -> bool:
    """A path of the console's static files (served without the token)."""
    return path == PREFIX or path.removeprefix(PREFIX) in _FILES


@functools.cache  # (three small files: read once, not per request)
def _file(name: str) -> bytes:
    return (resources.files("relay.admin") / "static" / name).read_bytes()


async def _serve(request: web.Request) -> web.Response:
    name = request.path.removeprefix(PREFIX) or "index.html"
    if name not in _FILES:
        raise web.HTTPNotFound()
    return web.Response(body=_file(name), content_type=_FILES[name], headers=_HEADERS)


def add_routes(app: web.Application) -> None:
    app.router.add_get(PREFIX, _serve)
    for name in _FILES:
        app.router.add_get(PREFIX + name, _serve)
