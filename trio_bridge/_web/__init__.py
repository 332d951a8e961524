"""The web view (``trio-bridge serve --web-port PORT``): pages of the sessions and their variables
that update as they change, served from the server's own process and store.

``app`` is the ASGI application (routes, security), ``feed`` a page's live feed (a watch, as Server-
Sent Events), ``views`` what the pages are sent, ``server`` hypercorn's Trio worker serving it;
``connections`` the open connections by browser; ``static/`` holds the page's script and style
sheet (no build step).
"""

from .app import WebSettings, WebView
from .connections import WebConnections
from .server import bind_web, serve_web

__all__ = ["WebConnections", "WebSettings", "WebView", "bind_web", "serve_web"]
