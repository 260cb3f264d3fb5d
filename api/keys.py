"""The service's API keys, each with a name: the name of the key a request used is stored with its decisions.

`create_app(api_key=...)` takes one key (a str, named ``"default"``) or a mapping ``{name: key}``; the CLI's
``--api-key`` and ``INFLUENCE_API_KEY`` take one key or ``name:key,name2:key2`` (`parse_keys`). `key_name`
finds which key a request's ``X-API-Key`` is, comparing against every key in constant time.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["DEFAULT_NAME", "check_keys", "key_name", "parse_keys"]

DEFAULT_NAME = "default"
MAX_NAME = 64
_NAMED = re.compile(r"[A-Za-z0-9_.@-]{1,64}:[^,:\s]+(,[A-Za-z0-9_.@-]{1,64}:[^,:\s]+)*")


def check_keys(api_key: Any) -> dict[str, str] | None:
    """One key (a str, named ``"default"``), a mapping ``{name: key}`` or None -> ``{name: key}`` or None.

    Raises:
        ValueError: an empty key or mapping, a name that is not a non-empty str of at most 64 characters,
            a key that is not a non-empty str, or one key under two names (the message names ``api_key``).
    """
    if api_key is None:
        return None
    if isinstance(api_key, str):
        if not api_key:
            raise ValueError("api_key: must be a non-empty str or a mapping name -> key, got ''")
        return {DEFAULT_NAME: api_key}
    if not isinstance(api_key, Mapping) or not api_key:
        raise ValueError(f"api_key: must be a non-empty str or a non-empty mapping name -> key, got {api_key!r}")
    keys: dict[str, str] = {}
    for name, key in api_key.items():
        if not isinstance(name, str) or not name or len(name) > MAX_NAME:
            raise ValueError(f"api_key: a key's name must be a str of 1..{MAX_NAME} characters, got {name!r}")
        if not isinstance(key, str) or not key:
            raise ValueError(f"api_key: the key of {name!r} must be a non-empty str")
        if key in keys.values():
            raise ValueError(f"api_key: the key of {name!r} is also another name's key")
        keys[name] = key
    return keys


def parse_keys(text: str | None) -> dict[str, str] | None:
    """The CLI / environment form: ``name:key,name2:key2`` -> a mapping; anything else is one key."""
    if not text:
        return None
    if _NAMED.fullmatch(text):
        pairs = [part.split(":", 1) for part in text.split(",")]
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            raise ValueError(f"api_key: a name given twice in {names!r}")
        return check_keys(dict(pairs))
    return check_keys(text)


def key_name(keys: Mapping[str, str], given: str | None) -> str | None:
    """The name of the key ``given`` is, or None (no header, or no key matches); every key is compared."""
    found = None
    raw = (given or "").encode()
    for name, key in keys.items():
        if hmac.compare_digest(raw, key.encode()) and given is not None:
            found = name
    return found
