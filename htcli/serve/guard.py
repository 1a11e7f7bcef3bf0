"""Who may talk to `ht serve`: trusted Host names, and no cross-origin POSTs.

A server on 127.0.0.1 is still reachable from every web page its user visits: a page can POST
a plain HTML form to it (forms need no CORS preflight), and with DNS rebinding a page can even
read the answers. `Guard` refuses both before any route runs:

- the Host header must name this server: loopback names (`LOOPBACK_HOSTS`) and those given with
  `ht serve --allowed-host` (starlette's `TrustedHostMiddleware` decides), else 400;
- a POST (any method but GET, HEAD, OPTIONS) that a browser marks as coming from another origin
  is refused with 403: its `Origin` must be this server's own (`Origin: null` is refused), and
  without `Origin`, `Sec-Fetch-Site` must be `same-origin` or `none`. Clients that are not
  browsers (curl, httpx) send neither header and pass.

Refusals are the server's JSON errors, `{"error": ..., "field": "Host" | "Origin" | "Sec-Fetch-Site"}`.

The page itself goes out with `page_policy`'s headers: a Content-Security-Policy that runs only
its own inline script and style (by their SHA-256), talks only to this server and cannot be
framed, with `nosniff` and no Referer sent elsewhere.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
SAME_SITE = ("same-origin", "none")  # Sec-Fetch-Site values of the server's own page, or a typed URL


class Guard:
    """ASGI middleware: trusted Host names, and POSTs only from the server's own origin."""

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str] = ()) -> None:
        self.app = app
        self.allowed_hosts = tuple(dict.fromkeys([*LOOPBACK_HOSTS, *(h.lower() for h in allowed_hosts)]))
        self._hosts = TrustedHostMiddleware(self._trusted, allowed_hosts=self.allowed_hosts, www_redirect=False)

    @staticmethod
    async def _trusted(scope: Scope, receive: Receive, send: Send) -> None:
        scope["ht.trusted_host"] = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = await self._refusal(scope, receive)
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await JSONResponse({"error": refusal[1], "field": refusal[2]}, status_code=refusal[0])(scope, receive, send)

    async def _refusal(self, scope: Scope, receive: Receive) -> tuple[int, str, str] | None:
        """(status, message, header) of a request to refuse; None to let it through."""

        async def discard(message: dict) -> None:  # TrustedHostMiddleware's own plain-text refusal
            pass

        await self._hosts(scope, receive, discard)
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if not scope.pop("ht.trusted_host", False):
            return 400, (f"the Host header {host[:100]!r} does not name this server; it answers to "
                         f"{', '.join(self.allowed_hosts)} (ht serve --allowed-host adds names)"), "Host"
        if scope["method"] in SAFE_METHODS:
            return None
        origin = headers.get("origin")
        if origin is not None:
            if origin == "null" or urlsplit(origin).netloc.lower() != host.lower():
                return 403, f"cross-origin requests are refused: Origin {origin[:100]!r} is not this server", "Origin"
            return None
        site = headers.get("sec-fetch-site")
        if site is not None and site.lower() not in SAME_SITE:
            return 403, f"cross-origin requests are refused (Sec-Fetch-Site: {site[:40]})", "Sec-Fetch-Site"
        return None


def _hashes(page: str, tag: str) -> str:
    """CSP source expressions of the page's inline `tag` elements: 'sha256-...' of each one's text."""
    texts = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(t.encode()).digest()).decode()}'" for t in texts)


def page_policy(page: str) -> dict[str, str]:
    """The security headers of the web page `page`: its inline script and style allowed by hash, nothing else inline."""
    policy = (f"default-src 'none'; script-src {_hashes(page, 'script')}; style-src {_hashes(page, 'style')}; "
              "img-src 'self' data: blob:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
              "frame-ancestors 'none'")
    return {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
            "Referrer-Policy": "no-referrer"}
