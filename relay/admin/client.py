"""A client of the admin API (docs/protocol.md), the one the CLI and the tests use.

Synchronous (urllib, the standard library): the CLI needs nothing more, and asyncio code runs
it in a thread (`asyncio.to_thread`). `request` answers whatever the API answers; `call`
raises `AdminError` for an error status or an API that cannot be reached, with a message a
user can act on.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.error
import urllib.request
from http import HTTPStatus
from typing import Any

_KNOWN = frozenset(s.value for s in HTTPStatus)


class AdminError(Exception):
    """The API refused the request (`status` set), or could not be reached (`status` None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def tls_hint(reason: object, url: str, ca_flag: str) -> str:
    """What a TLS failure means, in words, with what to try."""
    if isinstance(reason, ssl.SSLCertVerificationError):
        return (f"its TLS certificate is not trusted ({reason.verify_message}); pass "
                f"{ca_flag} with the CA that signed it")
    if isinstance(reason, ssl.SSLError):
        return f"TLS failed ({reason.reason or reason}); is {url} an http:// port?"
    return str(reason)


class AdminClient:
    def __init__(self, base: str, token: str, *, ssl_context: ssl.SSLContext | None = None,
                 timeout: float = 10.0) -> None:
        self.base = base.rstrip("/")
        self.token = token
        self.ssl_context = ssl_context
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                raw: bytes | None = None) -> tuple[int, Any]:
        """One request: its status and its answer (JSON decoded, else the text). `token=""`
        sends no Authorization header; `raw` sends those bytes as the body. Raises
        AdminError only when the API cannot be reached."""
        token = self.token if token is None else token
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout,
                                        context=self.ssl_context) as response:
                return response.status, _decode(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, _decode(exc.read())
        except urllib.error.URLError as exc:
            raise self._unreachable(tls_hint(exc.reason, self.base, "--admin-ca")) from None
        except ssl.SSLError as exc:  # (during the exchange rather than the connect)
            raise self._unreachable(tls_hint(exc, self.base, "--admin-ca")) from None
        except http.client.RemoteDisconnected as exc:
            https = " (an https:// port?)" if self.base.startswith("http://") else ""
            raise self._unreachable(f"{exc!r}{https}") from None
        except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            raise self._unreachable(repr(exc)) from None
        except ValueError as exc:
            raise AdminError(f"bad --admin-url {self.base!r}: {exc}") from None

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """The answer of a request that succeeded; AdminError ("METHOD PATH: STATUS error")
        otherwise."""
        status, answer = self.request(method, path, body)
        if status >= 400:
            message = answer.get("error") if isinstance(answer, dict) else None
            if not isinstance(message, str):  # (not the API's answer: a proxy's, say)
                message = HTTPStatus(status).phrase if status in _KNOWN else "error"
            raise AdminError(f"{method} {path}: {status} {message}", status)
        return answer

    def _unreachable(self, why: str) -> AdminError:
        return AdminError(f"cannot reach the admin API at {self.base}: {why}")


def _decode(data: bytes) -> Any:
    try:
        return json.loads(data or b"null")
    except ValueError:
        return data.decode("utf-8", "replace")
