"""Keep secrets out of what the pipeline logs, and out of where it sends them.

URLs reach MLflow params and artifacts, Prefect artifacts, reports and the terminal; a URL's
user-info (`user:password@`) and query string (`?token=...`) are where credentials hide, so
`redact_url` drops both. Judge API keys come from the environment, from variables whose names say
they are API keys (`API_KEY_ENV`), and go only over https or to this machine.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

API_KEY_ENV = re.compile(r"^[A-Z][A-Z0-9_]*_API_KEY$")
"""Names a judge's API key may be read from: OPENAI_API_KEY, VLLM_API_KEY, ... (never, say,
AWS_SECRET_ACCESS_KEY: the key is sent to the judge's server as a bearer token)."""

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def redact_url(url: str) -> str:
    """url without user-info, query string and fragment; anything that is not a URL unchanged."""
    if not isinstance(url, str) or not _URL.match(url):
        return url
    parts = urlsplit(url)
    if "@" not in parts.netloc and not parts.query and not parts.fragment:
        return url  # nothing to hide: exactly as written
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def redact(obj: Any) -> Any:
    """A JSON-like object (a dumped config, a report) with every URL in it redacted."""
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    return redact_url(obj) if isinstance(obj, str) else obj


_SECRET_PARAM = re.compile(
    r"key|token|secret|passw|pwd|signature|credential|^x-amz-|(^|[-_.])(sig|sas|auth|code)($|[-_.])",
    re.IGNORECASE,
)
"""Query parameters that carry credentials (api_key, apiKey, accessToken, X-Amz-Signature, sig,
...); others (api-version, region) are plain settings. A false alarm costs one line asking to move
the URL into the environment; a miss would store a secret with every run."""


def carries_credentials(url: str) -> bool:
    """A URL with user-info, or with a query parameter that names a credential."""
    if not isinstance(url, str) or not _URL.match(url):
        return False
    parts = urlsplit(url)
    names = [p.split("=", 1)[0] for p in parts.query.split("&") if p]
    return "@" in parts.netloc or any(_SECRET_PARAM.search(n) for n in names)


def credential_url_key(obj: Any, prefix: str = "") -> str | None:
    """The dotted key of the first URL carrying credentials in a JSON-like object, else None."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(obj))
    else:
        return prefix.rstrip(".") if carries_credentials(obj) else None
    for k, v in items:
        found = credential_url_key(v, f"{prefix}{k}.")
        if found:
            return found
    return None


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint(url: str) -> str:
    """An endpoint an API key may be sent to: https, or http on this machine; no credentials in
    the URL itself. Returns url; raises ValueError with the reason."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{redact_url(url)!r} is not an http(s) URL")
    if parts.username or parts.password:
        raise ValueError("credentials do not belong in the URL: set api_key_env instead")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ValueError(
            f"plain http to {parts.hostname} would send the API key unencrypted: use https "
            "(http is allowed for 127.0.0.1, ::1 and localhost)"
        )
    return url
