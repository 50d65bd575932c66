"""docs/runbook.md stays true: a section per alert, working links, real commands and settings."""

from __future__ import annotations

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
    alerts = {r["alert"]: r["annotations"]["runbook_url"]
              for g in rules["groups"] for r in g["rules"] if "alert" in r}
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
    used = re.findall(r"(?:^|[\s;(&|/])dovecote ([a-z]+)(?![\w/.-])(?: ([a-z]+)(?![\w/.-]))?",
                      blocks, re.MULTILINE)
    assert used
    for command, sub in used:
        assert command in main.commands, f"dovecote {command}"
        group = main.commands[command]
        if isinstance(group, Group) and sub:
            assert sub in group.commands, f"dovecote {command} {sub}"
    known = {f"DOVECOTE_{name.upper()}" for name in Settings.model_fields}
    for variable in set(re.findall(r"DOVECOTE_[A-Z_]+[A-Z]", RUNBOOK)):
        assert variable in known, variable
