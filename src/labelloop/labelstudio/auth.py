"""Authenticate to Label Studio's API with either kind of token it issues.

Legacy API tokens are sent as ``Authorization: Token <key>``. Personal access tokens (Label
Studio 1.14+) are JWT *refresh* tokens: sent as they are they get 401, so they are exchanged at
``POST /api/token/refresh/`` for a short-lived access token (5 minutes in Label Studio 1.23),
which is sent as ``Authorization: Bearer <access>`` and renewed shortly before it expires.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
from collections.abc import Generator
from typing import Any

import httpx

from labelloop.labelstudio.urls import http_base_url

__all__ = ["LabelStudioAuth", "LabelStudioAuthError"]

logger = logging.getLogger(__name__)

_REFRESH_PATH = "/api/token/refresh/"
_EXCHANGE_TIMEOUT_S = 10.0
# Label Studio's access tokens live 5 minutes; assume that when one carries no "exp".
_DEFAULT_ACCESS_LIFETIME_S = 300.0
_ACCOUNT_HINT = (
    "Create a new access token in Label Studio (Account & Settings > Personal Access Token, or "
    "use a legacy token) and set LABEL_STUDIO_API_KEY to it."
)


class LabelStudioAuthError(RuntimeError):
    """Label Studio could not be reached or refused the token."""


def _jwt_payload(token: str) -> dict[str, Any] | None:
    """The decoded payload of a JWT, or None when ``token`` is not one.

    The signature is not verified: Label Studio verifies it; we only read the token type and
    expiry to decide how to send it and when to renew.
    """
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        return None
    body = parts[1]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        payload = json.loads(raw)
    except (binascii.Error, ValueError):  # ValueError covers bad UTF-8 and bad JSON
        return None
    return payload if isinstance(payload, dict) else None


def _expires_at(access_token: str) -> float:
    """Epoch seconds at which an access token expires (now + 5 minutes when it does not say)."""
    payload = _jwt_payload(access_token) or {}
    exp = payload.get("exp")
    if isinstance(exp, (int, float)) and not isinstance(exp, bool):
        return float(exp)
    return time.time() + _DEFAULT_ACCESS_LIFETIME_S


class LabelStudioAuth(httpx.Auth):
    """The Authorization header for Label Studio's API, for legacy or personal access tokens.

    Also an ``httpx.Auth`` (pass it as ``auth=``): every request gets fresh headers, and a 401
    to a personal access token is answered by one exchange and one retry (:meth:`auth_flow`).
    Thread-safe: concurrent callers share one cached access token, and only one of them
    exchanges the refresh token when it needs renewing.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        client: httpx.Client | None = None,
        refresh_margin_s: float = 30.0,
    ) -> None:
        key = api_key.strip()
        if not key:
            raise ValueError("the Label Studio API key is empty: set LABEL_STUDIO_API_KEY")
        self._base_url = http_base_url(base_url)
        self._api_key = key
        self._client = client
        self._refresh_margin_s = refresh_margin_s
        payload = _jwt_payload(key)
        self._is_pat = payload is not None and payload.get("token_type") == "refresh"
        self._lock = threading.Lock()
        self._access: str | None = None
        self._access_expires_at = 0.0

    def __repr__(self) -> str:  # never show the key
        kind = "personal access token" if self._is_pat else "legacy token"
        return f"LabelStudioAuth({self._base_url!r}, {kind})"

    @property
    def base_url(self) -> str:
        """Label Studio's URL without a trailing slash."""
        return self._base_url

    def is_personal_access_token(self) -> bool:
        """True for a JWT refresh token (exchanged for Bearer access tokens)."""
        return self._is_pat

    def headers(self) -> dict[str, str]:
        """The Authorization header to send; may call Label Studio to renew an access token.

        Raises LabelStudioAuthError when Label Studio is unreachable or refuses the token.
        """
        if not self._is_pat:
            return {"Authorization": f"Token {self._api_key}"}
        return {"Authorization": f"Bearer {self._access_token()}"}

    def invalidate(self) -> None:
        """Forget the access token (e.g. after a 401) so the next headers() exchanges again."""
        with self._lock:
            self._access = None
            self._access_expires_at = 0.0

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Send ``request`` with the Authorization header; on a 401 with a personal access token
        (revoked or expired early), exchange it again and retry once. A legacy token cannot be
        renewed, so its 401 is the answer. Raises LabelStudioAuthError as headers() does."""
        request.headers.update(self.headers())
        response = yield request
        if response.status_code == 401 and self._is_pat:
            logger.info("Label Studio answered 401; renewing the access token and retrying once")
            self.invalidate()
            request.headers.update(self.headers())
            yield request

    def _access_token(self) -> str:
        # The lock is held across the exchange on purpose: concurrent callers wait for the one
        # fresh token instead of each exchanging the refresh token.
        with self._lock:
            if self._access is None or time.time() >= (
                self._access_expires_at - self._refresh_margin_s
            ):
                self._access = self._exchange()
                self._access_expires_at = _expires_at(self._access)
            return self._access

    def _exchange(self) -> str:
        url = self._base_url + _REFRESH_PATH
        logger.debug("exchanging the personal access token at %s", url)
        try:
            response = self._post_refresh(url)
        except httpx.HTTPError as exc:
            raise LabelStudioAuthError(
                f"Label Studio could not be reached at {self._base_url} to exchange the personal "
                f"access token ({type(exc).__name__}: {exc}). Check LABEL_STUDIO_URL and that "
                "Label Studio is running."
            ) from exc
        if response.status_code in (400, 401, 403):
            raise LabelStudioAuthError(
                f"Label Studio refused the personal access token (HTTP {response.status_code} "
                f"from POST {url}{_detail(response)}). {_ACCOUNT_HINT}"
            )
        if not response.is_success:
            raise LabelStudioAuthError(
                f"Label Studio answered HTTP {response.status_code} to POST {url} when exchanging "
                "the personal access token. Check that LABEL_STUDIO_URL points at Label Studio "
                "1.14 or later, or use a legacy token."
            )
        access = _access_from(response)
        if access is None:
            raise LabelStudioAuthError(
                f"Label Studio's answer to POST {url} has no 'access' token. Check that "
                "LABEL_STUDIO_URL points at Label Studio, or use a legacy token."
            )
        return access

    def _post_refresh(self, url: str) -> httpx.Response:
        body = {"refresh": self._api_key}
        if self._client is not None:
            return self._client.post(url, json=body, timeout=_EXCHANGE_TIMEOUT_S)
        return httpx.post(url, json=body, timeout=_EXCHANGE_TIMEOUT_S)


def _access_from(response: httpx.Response) -> str | None:
    try:
        data = response.json()
    except ValueError:
        return None
    access = data.get("access") if isinstance(data, dict) else None
    return access if isinstance(access, str) and access else None


def _detail(response: httpx.Response) -> str:
    """Label Studio's short reason (e.g. "Token is invalid or expired"), if it gave one."""
    try:
        data = response.json()
    except ValueError:
        return ""
    detail = data.get("detail") if isinstance(data, dict) else None
    return f": {detail[:200]}" if isinstance(detail, str) and detail else ""
