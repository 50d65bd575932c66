"""docs/runbook.md stays true: a section per alert, working links, real commands and settings."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from click import Group

from dovecote.cli import main
from dovecote.ops.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK = (ROOT / "docs" / "runbook.md").read_text()
RULES = ROOT / "deploy" / "prometheus" / "dovecote-rules.yml"


def _slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


ANCHORS = {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", RUNBOOK, re.MULTILINE)}


def test_every_alert_has_the_section_its_runbook_url_names() -> None:
    rules = yaml.safe_load(RULES.read_text())
    alerts = {
        r["alert"]: r["annotations"]["runbook_url"]
        for g in rules["groups"]
        for r in g["rules"]
        if "alert" in r
    }
    assert alerts
    for name, url in alerts.items():
        anchor = url.split("#", 1)[1]
        assert anchor in ANCHORS, f"{name}: no section #{anchor} in docs/runbook.md"


def test_links_inside_the_runbook_resolve() -> None:
    for anchor in re.findall(r"\]\(#([^)]+)\)", RUNBOOK):
        assert anchor in ANCHORS, anchor
    for target in re.findall(r"\]\(([\w\-]+\.md)", RUNBOOK):
        assert (ROOT / "docs" / target).exists(), target


def test_dovecote_commands_and_settings_exist() -> None:
    blocks = "\n".join(re.findall(r"```(?:sh|ini|yaml)?\n(.*?)```", RUNBOOK, re.DOTALL))
    used = re.findall(
        r"(?:^|[\s;(&|/])dovecote ([a-z]+)(?![\w/.-])(?: ([a-z]+)(?![\w/.-]))?",
        blocks,
        re.MULTILINE,
    )
    assert used
    for command, sub in used:
        assert command in main.commands, f"dovecote {command}"
        group = main.commands[command]
        if isinstance(group, Group) and sub:
            assert sub in group.commands, f"dovecote {command} {sub}"
    known = {f"DOVECOTE_{name.upper()}" for name in Settings.model_fields}
    for variable in set(re.findall(r"DOVECOTE_[A-Z_]+[A-Z]", RUNBOOK)):
        assert variable in known, variable


# ---------------------------------------------------------------------------------------
# Every `dovecote` / `dovecote-client` command line in README.md and docs/ is a real one.

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Prose like "a `dovecote serve --flag`" names no real option.
PLACEHOLDER_OPTIONS = {"--flag", "--option"}
PROGRAM = re.compile(r"^(?:(?:\.venv|/opt/dovecote)/bin/)?(dovecote(?:-client)?)$")


def _segments(text: str) -> list[str]:
    """Shell command segments (split at ;, &&, ||, |, $( and backticks), env prefixes off."""
    out = []
    for segment in re.split(r"&&|\|\||;|\||\$\(|\)|`", text):
        segment = re.sub(r"^\s*(?:[A-Z_][A-Z0-9_]*=\S*\s+)*", "", segment).strip()
        if segment:
            out.append(segment)
    return out


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) for each documented invocation of our two programs."""
    found: list[tuple[str, list[str]]] = []
    for path in DOCS:
        text = path.read_text()
        pieces = [
            b.replace("\\\n", " ") for b in re.findall(r"```[a-z]*\n(.*?)```", text, re.DOTALL)
        ]
        outside = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
        pieces += re.findall(r"`([^`\n]+)`", outside)
        for piece in pieces:
            for line in piece.splitlines():
                line = re.sub(r"(^|\s)#(\s.*|$)", "", line)  # shell comments
                for segment in _segments(line):
                    words = segment.split()
                    if words and PROGRAM.match(words[0]) and len(words) > 1:
                        found.append((f"{path.name}: {segment[:80]}", words))
    return found


def _check_invocation(where: str, words: list[str]) -> None:
    from click import Command, Option

    from dovecote.client.cli import main as client_main

    command: Command = main if PROGRAM.match(words[0]).group(1) == "dovecote" else client_main  # type: ignore[union-attr]
    args = iter(words[1:])
    for word in args:
        word = word.strip("'\"")
        if word.startswith("--") and len(word) > 2:
            name = word.split("=", 1)[0]
            if name in PLACEHOLDER_OPTIONS:
                continue
            options = {
                o: p
                for p in command.params
                if isinstance(p, Option)
                for o in (*p.opts, *p.secondary_opts)
            }
            options["--help"] = Option(["--help"], is_flag=True)
            if command is main:
                options["--version"] = Option(["--version"], is_flag=True)
            assert name in options, f"{where}: {command.name} has no option {name}"
            option = options[name]
            if not option.is_flag and "=" not in word and not option.count:
                next(args, None)  # its value
        elif isinstance(command, Group):
            if re.fullmatch(r"[a-z][a-z-]*", word):
                assert word in command.commands, f"{where}: no command {word!r}"
                command = command.commands[word]
            else:
                return  # a placeholder (<did>, list|add, ...): nothing more to check
        # else: an argument of a command (paths, DIDs, text)


def test_every_documented_command_line_is_valid() -> None:
    commands = documented_commands()
    assert len(commands) > 40, commands  # the extraction works
    problems = []
    for where, words in commands:
        try:
            _check_invocation(where, words)
        except AssertionError as exc:
            problems.append(str(exc).splitlines()[0])
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------
# The README walkthrough, typed as a newcomer types it, against `dovecote serve` started
# as `make serve` starts it (defaults, data in ./data), on a free port instead of 8080.


def _walkthrough_script(port: int, bin_dir: Path) -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Two-minute walkthrough", 1)[1].split("\n## ", 1)[0]
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL):
        for line in block.splitlines():
            if not line.strip() or line.strip() == "make serve":
                continue  # the test runs the server itself
            line = line.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
            line = line.replace(".venv/bin/", f"{bin_dir}/")
            line = line.replace("examples/", f"{ROOT}/examples/")
            if " rooms tail " in line:  # runs until Ctrl-C: read its output, then Ctrl-C
                line = (
                    f"{line.split('#')[0]} > tail.out & TAIL=$!\n"
                    "for i in $(seq 150); do grep -q message.posted tail.out && break; "
                    "sleep 0.2; done\nkill -INT $TAIL; wait $TAIL || true; cat tail.out"
                )
            lines.append(line)
    return "set -euo pipefail\n" + "\n".join(lines) + "\n"


def test_readme_walkthrough_runs(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from support.server import free_port

    port = free_port()
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOVECOTE_")}
    env.update(HOME=str(home), DOVECOTE_LOG_FORMAT="json")
    bin_dir = Path(sys.executable).parent
    server = subprocess.Popen(
        [str(bin_dir / "dovecote"), "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        banner = [server.stdout.readline() for _ in range(5)]
        assert f"Invitation: http://127.0.0.1:{port}/oob" in "".join(banner), banner
        script = _walkthrough_script(port, bin_dir)
        done = subprocess.run(
            ["bash", "-c", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        out = done.stdout
        assert done.returncode == 0, script + "\n" + out[-3000:] + done.stderr[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert "A received 'hello #0 from B'" in out and "done" in out  # the example
    assert '"content": "hello, alice"' in out  # the CLI round trip
    assert '"type": "message.posted"' in out and "hello, room" in out  # rooms post + tail
    assert '"degradation": "normal"' in out and "dovecote_messages_accepted_total" in out
    assert f"http://127.0.0.1:{port}/?_oob=" in out
    assert (tmp_path / "invitation.png").read_bytes().startswith(b"\x89PNG")
    assert re.search(r"^did:peer:2\.\S+$", out, re.MULTILINE)
    assert f"http://127.0.0.1:{port}/oob" in out and "█" in out  # invitation --qr
    assert "0 dead letter(s)" in out
    assert "--public-url" in out  # serve --help


def test_check_a_deployment_block_runs(server_factory) -> None:  # type: ignore[no-untyped-def]
    """The runbook's "Check a deployment" commands, against a local instance."""
    import os
    import subprocess
    import sys

    server = server_factory()
    block = RUNBOOK.split("### Check a deployment", 1)[1].split("```sh\n", 1)[1]
    block = block.split("```", 1)[0]
    bin_dir = Path(sys.executable).parent
    script = "set -euo pipefail\n" + block.replace(
        "https://relay.example.com", server.base_url
    ).replace("dovecote ", f"{bin_dir}/dovecote ")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOVECOTE_")}
    env["DOVECOTE_DATA_DIR"] = str(server.data_dir)  # the instance's own settings
    done = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, script + done.stdout + done.stderr
    out = done.stdout
    assert '{"status":"ok"}' in out and '"ready":true' in out and '"degradation":"normal"' in out
    assert f"{server.base_url}/?_oob=" in out
    assert re.search(r"alive\s+normal", out), out
    assert re.search(r"^OK\s+\d+ ms", out, re.MULTILINE), out


def test_rooms_development_issuer_block_runs(server_factory) -> None:  # type: ignore[no-untyped-def]
    """docs/rooms.md's development-issuer example, against a local instance."""
    import os
    import subprocess
    import sys

    server = server_factory()
    doc = (ROOT / "docs" / "rooms.md").read_text()
    block = doc.split("**development issuer**", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    bin_dir = Path(sys.executable).parent
    script = "set -euo pipefail\n" + block.replace(
        "http://127.0.0.1:8080", server.base_url
    ).replace("$(dovecote ", f"$({bin_dir}/dovecote ")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOVECOTE_")}
    env["DOVECOTE_DATA_DIR"] = str(server.data_dir)
    done = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, script + done.stdout + done.stderr
    room = json.loads(done.stdout)
    assert room["id"] == "r1", room
