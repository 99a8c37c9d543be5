"""The explainer page's files (`service/static/`): `GET /` and `GET /static/NAME`. No Ray, no torch.

The page builds every URL relative to the document's base, which is the application's root:
`root_path` (Ray Serve passes the application's `route_prefix` as the ASGI root_path) plus '/', set
in a `<base href>` here, so the same files work at `/` and under any prefix.
"""

from __future__ import annotations

import html
from functools import cache
from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"
BASE_MARKER = "<!--BASE-->"
AUTH_MARKER = "<!--AUTH-->"

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".jpg": "image/jpeg",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".json": "application/json",
}


@cache
def _read(path: Path) -> bytes:
    return path.read_bytes()


def static_file(name: str) -> tuple[bytes, str] | None:
    """(content, media type) of `service/static/NAME`, or None: unknown names, other extensions and
    anything outside the folder (`..`, absolute paths, links out of it) are not served."""
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        return None
    path = (STATIC_DIR / name).resolve()
    if STATIC_DIR not in path.parents or not path.is_file() or path.suffix not in MEDIA_TYPES:
        return None
    return _read(path), MEDIA_TYPES[path.suffix]


def index_html(root_path: str, auth: bool = False) -> str:
    """The page, with `<base href="ROOT_PATH/">` so that its relative URLs resolve under the prefix,
    and whether `/v1/*` needs a bearer token (so that the page asks for it before its first call,
    rather than after a 401)."""
    text = _read(STATIC_DIR / "index.html").decode()
    base = html.escape(root_path.rstrip("/") + "/", quote=True)
    text = text.replace(BASE_MARKER, f'<base href="{base}">', 1)
    return text.replace(AUTH_MARKER, f'<meta name="convserve-auth" content="{"bearer" if auth else "none"}">', 1)
