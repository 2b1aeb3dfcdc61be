"""LabelStudioAuth against a local stand-in for Label Studio's /api/token/refresh/."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from servers import free_port, serve_in_thread

from labelloop.labelstudio.auth import LabelStudioAuth, LabelStudioAuthError

pytestmark = pytest.mark.timeout(60)

LEGACY_TOKEN = "1abe11009de0c0ffee5eed5ca1ab1e0123456789"


def _b64(obj: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


def make_jwt(payload: dict[str, Any]) -> str:
    """An unsigned JWT: the client never verifies signatures, Label Studio does."""
    return f"{_b64({'alg': 'HS256', 'typ': 'JWT'})}.{_b64(payload)}.not-a-real-signature"


def make_pat(**extra: Any) -> str:
    return make_jwt({"token_type": "refresh", "exp": int(time.time()) + 3600, **extra})


@dataclass
class RefreshState:
    """What the fake Label Studio does and saw; reset before each test."""

    access_lifetime_s: float = 300.0
    include_exp: bool = True
    refuse: bool = False
    delay_s: float = 0.0
    exchanges: int = 0
    refresh_tokens_seen: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


STATE = RefreshState()


def _build_app() -> FastAPI:
    app = FastAPI()

    @app.post("/api/token/refresh/")
    async def refresh(request: Request) -> JSONResponse:
        body = await request.json()
        token = body.get("refresh", "")
        with STATE.lock:
            STATE.refresh_tokens_seen.append(token)
        parts = token.split(".")
        if STATE.refuse or len(parts) != 3:
            return JSONResponse(
                {"detail": "Token is invalid or expired", "code": "token_not_valid"},
                status_code=401,
            )
        if STATE.delay_s:
            # A slow exchange widens the window in which concurrent callers could race.
            await asyncio.sleep(STATE.delay_s)
        with STATE.lock:
            STATE.exchanges += 1
            number = STATE.exchanges
        payload: dict[str, Any] = {"token_type": "access", "jti": str(number)}
        if STATE.include_exp:
            payload["exp"] = int(time.time() + STATE.access_lifetime_s)
        return JSONResponse({"access": make_jwt(payload)})

    return app


@pytest.fixture(scope="module")
def ls_url() -> Iterator[str]:
    with serve_in_thread(_build_app()) as url:
        yield url


@pytest.fixture(autouse=True)
def _reset_state() -> None:
    global STATE
    STATE = RefreshState()


def test_legacy_token_is_sent_as_token_without_exchange(ls_url: str) -> None:
    auth = LabelStudioAuth(ls_url + "/", LEGACY_TOKEN)
    assert auth.base_url == ls_url
    assert not auth.is_personal_access_token()
    assert auth.headers() == {"Authorization": f"Token {LEGACY_TOKEN}"}
    assert auth.headers() == {"Authorization": f"Token {LEGACY_TOKEN}"}
    assert STATE.exchanges == 0


@pytest.mark.parametrize(
    "key",
    [
        "not-a-jwt",
        "a.b.c",  # three parts but no JSON payload
        make_jwt({"token_type": "access", "exp": 1}),  # a JWT, but not a refresh token
    ],
)
def test_anything_but_a_refresh_jwt_is_a_legacy_token(ls_url: str, key: str) -> None:
    auth = LabelStudioAuth(ls_url, key)
    assert not auth.is_personal_access_token()
    assert auth.headers() == {"Authorization": f"Token {key}"}
    assert STATE.exchanges == 0


def test_personal_access_token_is_exchanged_once_for_repeated_calls(ls_url: str) -> None:
    pat = make_pat()
    auth = LabelStudioAuth(ls_url, pat)
    assert auth.is_personal_access_token()
    first = auth.headers()
    for _ in range(5):
        assert auth.headers() == first
    assert first["Authorization"].startswith("Bearer ")
    assert first["Authorization"] != f"Bearer {pat}"  # never the refresh token itself
    assert STATE.exchanges == 1
    assert STATE.refresh_tokens_seen == [pat]


def test_uses_the_given_client(ls_url: str) -> None:
    with httpx.Client() as client:
        auth = LabelStudioAuth(ls_url, make_pat(), client=client)
        assert auth.headers()["Authorization"].startswith("Bearer ")
    assert STATE.exchanges == 1


def test_expired_access_token_is_renewed(ls_url: str) -> None:
    STATE.access_lifetime_s = -10  # every access token issued is already expired
    auth = LabelStudioAuth(ls_url, make_pat())
    first = auth.headers()
    second = auth.headers()
    assert first != second
    assert STATE.exchanges == 2


@pytest.mark.parametrize(("margin_s", "expected_exchanges"), [(30.0, 1), (90.0, 3)])
def test_renewal_margin(ls_url: str, margin_s: float, expected_exchanges: int) -> None:
    STATE.access_lifetime_s = 60  # inside a 90 s margin, outside a 30 s one
    auth = LabelStudioAuth(ls_url, make_pat(), refresh_margin_s=margin_s)
    for _ in range(3):
        auth.headers()
    assert STATE.exchanges == expected_exchanges


def test_access_token_without_exp_is_kept_for_a_while(ls_url: str) -> None:
    STATE.include_exp = False
    auth = LabelStudioAuth(ls_url, make_pat())
    auth.headers()
    auth.headers()
    assert STATE.exchanges == 1


def test_invalidate_forces_a_new_exchange(ls_url: str) -> None:
    auth = LabelStudioAuth(ls_url, make_pat())
    first = auth.headers()
    auth.invalidate()
    second = auth.headers()
    assert first != second
    assert STATE.exchanges == 2


def test_refused_token_raises_a_helpful_error(ls_url: str) -> None:
    STATE.refuse = True
    pat = make_pat()
    auth = LabelStudioAuth(ls_url, pat)
    with pytest.raises(LabelStudioAuthError) as info:
        auth.headers()
    message = str(info.value)
    assert "refused" in message
    assert "401" in message
    assert "Account & Settings" in message
    assert "Token is invalid or expired" in message
    assert pat not in message


def test_unreachable_label_studio_raises_a_helpful_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    auth = LabelStudioAuth(url, make_pat())
    with pytest.raises(LabelStudioAuthError, match="could not be reached at") as info:
        auth.headers()
    assert url in str(info.value)


def test_concurrent_callers_share_one_exchange(ls_url: str) -> None:
    STATE.delay_s = 0.3
    auth = LabelStudioAuth(ls_url, make_pat())
    barrier = threading.Barrier(8, timeout=10)
    results: list[dict[str, str]] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            barrier.wait()
            results.append(auth.headers())
        except BaseException as exc:  # surfaced by the assertions below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert not errors
    assert len(results) == 8
    assert all(r == results[0] for r in results)
    assert STATE.exchanges == 1


@pytest.mark.parametrize("url", ["localhost:8080", "ftp://ls", ""])
def test_bad_base_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="LABEL_STUDIO_URL"):
        LabelStudioAuth(url, LEGACY_TOKEN)


def test_empty_key_is_refused() -> None:
    with pytest.raises(ValueError, match="LABEL_STUDIO_API_KEY"):
        LabelStudioAuth("http://127.0.0.1:8080", "  ")


def test_repr_hides_the_key() -> None:
    pat = make_pat()
    assert pat not in repr(LabelStudioAuth("http://127.0.0.1:8080", pat))
    assert LEGACY_TOKEN not in repr(LabelStudioAuth("http://127.0.0.1:8080", LEGACY_TOKEN))


# --------------------------------------------------------------------------- as an httpx.Auth


def _mock_label_studio(refused: set[str]) -> tuple[httpx.Client, list[str | None]]:
    """A client on an in-memory Label Studio: refuses the Authorization values in ``refused``,
    issues access token N on the Nth exchange, and records what each API call carried."""
    seen: list[str | None] = []
    issued = 0

    def handle(request: httpx.Request) -> httpx.Response:
        nonlocal issued
        if request.url.path == "/api/token/refresh/":
            issued += 1
            return httpx.Response(200, json={"access": make_jwt({"jti": str(issued)})})
        header = request.headers.get("authorization")
        seen.append(header)
        return httpx.Response(401 if header in refused else 200, json={})

    return httpx.Client(base_url="http://ls", transport=httpx.MockTransport(handle)), seen


def _bearer(jti: str) -> str:
    return f"Bearer {make_jwt({'jti': jti})}"


def test_a_401_renews_the_access_token_and_retries_once() -> None:
    client, seen = _mock_label_studio(refused={_bearer("1")})
    auth = LabelStudioAuth("http://ls", make_pat(), client=client)
    assert client.get("/api/projects/", auth=auth).status_code == 200
    assert seen == [_bearer("1"), _bearer("2")]


def test_a_second_401_is_the_answer() -> None:
    client, seen = _mock_label_studio(refused={_bearer("1"), _bearer("2")})
    auth = LabelStudioAuth("http://ls", make_pat(), client=client)
    assert client.get("/api/projects/", auth=auth).status_code == 401
    assert seen == [_bearer("1"), _bearer("2")]


def test_a_legacy_token_is_not_retried() -> None:
    client, seen = _mock_label_studio(refused={f"Token {LEGACY_TOKEN}"})
    auth = LabelStudioAuth("http://ls", LEGACY_TOKEN, client=client)
    assert client.get("/api/projects/", auth=auth).status_code == 401
    assert seen == [f"Token {LEGACY_TOKEN}"]
