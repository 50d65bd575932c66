"""docs/configuration.md documents every setting and `serve --help` lists every flag."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from dovecote.ops.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def _generator() -> object:
    spec = importlib.util.spec_from_file_location("gen", ROOT / "scripts" / "gen_config_doc.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_doc_is_current() -> None:
    rendered = _generator().render()  # type: ignore[attr-defined]
    current = (ROOT / "docs" / "configuration.md").read_text()
    assert current == rendered, "run: .venv/bin/python scripts/gen_config_doc.py"


def test_settings_fields_table_is_current() -> None:
    rendered = _generator().render_fields()  # type: ignore[attr-defined]
    current = (ROOT / "src" / "dovecote" / "ops" / "settings_fields.py").read_text()
    assert current == rendered, "run: .venv/bin/python scripts/gen_config_doc.py"


def test_serve_help_documents_every_setting() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dovecote", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in out
        assert f"DOVECOTE_{name.upper()}" in out.replace("\n", "").replace(" ", "")


def test_env_and_flag_precedence(monkeypatch: object, tmp_path: Path) -> None:
    import pytest

    mp: pytest.MonkeyPatch = monkeypatch  # type: ignore[assignment]
    toml = tmp_path / "dovecote.toml"
    toml.write_text('port = 9000\nmediation_allowlist = ["did:peer:2.a"]\nlog_level = "debug"\n')
    mp.setenv("DOVECOTE_CONFIG", str(toml))
    mp.setenv("DOVECOTE_LOG_LEVEL", "warning")
    settings = Settings()
    assert settings.port == 9000
    assert settings.mediation_allowlist == ["did:peer:2.a"]
    assert settings.log_level == "warning"
    assert Settings(port=9100).port == 9100
    mp.setenv("DOVECOTE_ADMIN_ALLOW", "10.0.0.0/8, 127.0.0.1/32")
    assert Settings().admin_allow == ["10.0.0.0/8", "127.0.0.1/32"]


def test_unspecified_advertised_address_is_detected() -> None:
    for host in ("0.0.0.0", "::", ""):
        assert Settings(host=host).advertises_unspecified_address, host
        assert not Settings(
            host=host, public_url="https://relay.example.com"
        ).advertises_unspecified_address
    assert not Settings().advertises_unspecified_address
    assert Settings(public_url="http://0.0.0.0:8080").advertises_unspecified_address


def test_serve_refuses_to_advertise_an_unspecified_address(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dovecote",
            "serve",
            "--host",
            "::",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "DOVECOTE_PUBLIC_URL" in out.stderr and "http://:::0" in out.stderr


def test_backup_help_shows_the_real_step_defaults() -> None:
    from dovecote.ops.backup import STEP_PAGES, STEP_SLEEP

    out = subprocess.run(
        [sys.executable, "-m", "dovecote", "backup", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    flat = " ".join(out.split())
    assert f"[default: {STEP_PAGES} pages]" in flat and f"[default: {STEP_SLEEP} s]" in flat


def test_operator_subcommands_show_only_their_own_options() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dovecote", "dlq", "list", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert len(out.splitlines()) < 40
    assert "--store" in out and "--data-dir" in out and "--rate-limit-ip" not in out

    # Every command but `serve` (present and future ones): no server-only options.
    import click

    from dovecote.cli import main

    def walk(group: click.Group, path: list[str]) -> list[tuple[list[str], click.Command]]:
        found = []
        for name, command in group.commands.items():
            found.append(([*path, name], command))
            if isinstance(command, click.Group):
                found += walk(command, [*path, name])
        return found

    for path, command in walk(main, []):
        names = {o for p in command.params for o in getattr(p, "opts", [])}
        if path != ["serve"]:
            assert "--rate-limit-ip" not in names, f"dovecote {' '.join(path)}"
