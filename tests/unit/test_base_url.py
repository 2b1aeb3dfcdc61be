"""One check of Label Studio's base URL, for the settings, the auth, the fetcher and /setup."""

from __future__ import annotations

from pathlib import Path

import pytest

from labelloop.config import ConfigError
from labelloop.labelstudio.auth import LabelStudioAuth
from labelloop.labelstudio.fetcher import ImageFetcher
from labelloop.labelstudio.urls import BaseURLError, FetchSettings, http_base_url
from labelloop.serve.app import FetcherRegistry
from labelloop.serve.settings import settings_from

TOKEN = "1abe11009de0c0ffee5eed5ca1ab1e0123456789"

GOOD = [
    ("http://localhost:8080", "http://localhost:8080"),
    (" https://ls.example/sub/ ", "https://ls.example/sub"),
    ("http://127.0.0.1:8080/", "http://127.0.0.1:8080"),
]
BAD = ["localhost:8080", "ftp://ls.example", "http://", "http://user:secret@ls.example", "//x"]


@pytest.mark.parametrize(("value", "expected"), GOOD)
def test_usable_base_urls(value: str, expected: str) -> None:
    assert http_base_url(value) == expected


@pytest.mark.parametrize("value", BAD)
def test_unusable_base_urls_say_what_was_expected_and_what_came(value: str) -> None:
    with pytest.raises(BaseURLError) as info:
        http_base_url(value, "LABEL_STUDIO_URL")
    message = str(info.value)
    assert message.startswith("LABEL_STUDIO_URL: expected an http(s) URL with a host")
    assert "secret" not in message  # a password in the URL is never repeated
    assert f"got {value.replace('user:secret@', '…@')!r}" in message


def test_a_long_value_is_truncated() -> None:
    message = str(pytest.raises(BaseURLError, http_base_url, "x" * 5000).value)
    assert len(message) < 400


@pytest.mark.parametrize("value", BAD)
def test_every_caller_refuses_the_same_urls(value: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="LABEL_STUDIO_URL: expected an http"):
        settings_from({"model_dir": tmp_path}, {"LABEL_STUDIO_URL": value})
    with pytest.raises(BaseURLError, match="LABEL_STUDIO_URL"):
        LabelStudioAuth(value, TOKEN)
    with pytest.raises(BaseURLError, match="LABEL_STUDIO_URL"):
        ImageFetcher(FetchSettings(label_studio_url=value), None)
    registry = FetcherRegistry(settings_from({"model_dir": tmp_path}, {}))
    (warning,) = registry.remember_setup(value, TOKEN)
    assert warning.startswith("ignored the hostname /setup sent: expected an http(s) URL")
    assert registry.credentials() == (None, TOKEN)


@pytest.mark.parametrize(("value", "expected"), GOOD)
def test_every_caller_accepts_the_same_urls(value: str, expected: str, tmp_path: Path) -> None:
    settings_from({"model_dir": tmp_path}, {"LABEL_STUDIO_URL": value})
    assert LabelStudioAuth(value, TOKEN).base_url == expected
    ImageFetcher(FetchSettings(label_studio_url=value), None).close()
    registry = FetcherRegistry(settings_from({"model_dir": tmp_path}, {}))
    assert registry.remember_setup(value, TOKEN) == []
    assert registry.credentials() == (expected, TOKEN)
