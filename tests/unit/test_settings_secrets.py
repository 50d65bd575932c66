"""Secrets in Settings are SecretStr: usable through get_secret_value(), shown nowhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from dovecote.client.config import ClientConfig
from dovecote.ops.settings import Settings

ADMIN_TOKEN = "admin-secret-0123456789abcdef0123456789"
PUSH_TOKEN = "push-secret-4242"
PASSWORD = "db-password-hunter2"
DSN = f"postgresql://dovecote:{PASSWORD}@db1/dovecote"
SECRETS = (ADMIN_TOKEN, PUSH_TOKEN, PASSWORD)


def _settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, admin_token=ADMIN_TOKEN, push_token=PUSH_TOKEN, store=DSN)


def test_secret_fields_are_secretstr_and_usable(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    for name in ("admin_token", "push_token", "store"):
        assert isinstance(getattr(settings, name), SecretStr), name
    assert settings.admin_token.get_secret_value() == ADMIN_TOKEN
    assert settings.push_token.get_secret_value() == PUSH_TOKEN
    assert settings.store_url == DSN
    assert Settings(data_dir=tmp_path).store_url.startswith("sqlite:///")
    assert not Settings(data_dir=tmp_path).admin_token  # empty: admin disabled


def test_secrets_appear_in_no_repr_str_or_dump(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    shown = [
        repr(settings),
        str(settings),
        json.dumps(settings.model_dump(mode="json")),
        settings.model_dump_json(),
        repr(settings.model_dump()),
    ]
    for text in shown:
        for secret in SECRETS:
            assert secret not in text, (secret, text[:200])


def test_a_short_admin_token_is_refused_without_echoing_it(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(data_dir=tmp_path, admin_token="short-secret")
    messages = " ".join(str(e["msg"]) for e in caught.value.errors())
    assert "at least 32 characters" in messages and "short-secret" not in messages


def test_serve_help_shows_no_secret_from_the_environment(tmp_path: Path) -> None:
    env = {
        "DOVECOTE_ADMIN_TOKEN": ADMIN_TOKEN,
        "DOVECOTE_PUSH_TOKEN": PUSH_TOKEN,
        "DOVECOTE_STORE": DSN,
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": ":".join(sys.path),
    }
    out = subprocess.run(
        [sys.executable, "-m", "dovecote", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    for secret in SECRETS:
        assert secret not in out.stdout + out.stderr


def test_the_client_config_keeps_its_rooms_token_out_of_repr(tmp_path: Path) -> None:
    config = ClientConfig(data_dir=tmp_path, rooms_token=ADMIN_TOKEN)
    assert config.rooms_token == ADMIN_TOKEN and ADMIN_TOKEN not in repr(config)


def test_a_mistyped_store_scheme_does_not_print_the_dsn() -> None:
    from dovecote.store import open_store

    with pytest.raises(ValueError) as refused:
        open_store("postgress://user:s3cret-pw@db.example/dovecote")
    assert "s3cret-pw" not in str(refused.value)
    assert "postgress" in str(refused.value)
