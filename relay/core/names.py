"""The names the admin API accepts: environment ids and flag keys. One rule, which the API
enforces and the CLI checks before it sends anything (an id goes into a URL path: one with
`?`, `#` or `/` would name another resource)."""

from __future__ import annotations

import re

ENV_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ENV_ID_RULE = ("environment ids are 1-128 characters of letters, digits, '.', '_' and '-', "
               "starting with a letter or digit")
MAX_SDK_KEYS = 100  # per environment
MAX_SDK_KEY = 512  # characters
MAX_FLAG_KEY = 256
FLAG_KEY_RULE = f"flag keys are non-empty strings of at most {MAX_FLAG_KEY} characters"


def is_env_id(env: str) -> bool:
    return ENV_ID.fullmatch(env) is not None


def is_flag_key(key: object) -> bool:
    """A non-empty string of at most MAX_FLAG_KEY characters that can be stored (lone
    surrogates cannot be encoded)."""
    if not isinstance(key, str) or not 0 < len(key) <= MAX_FLAG_KEY:
        return False
    try:
        key.encode()
    except UnicodeEncodeError:
        return False
    return True
