# ruff: noqa: E501  (the kubectl example below is one shell line)
"""Regenerate the plain manifests in this directory from the Helm chart's default values.

    pip install helm-python-sdk pyyaml   # Helm's own Go template engine, no helm binary
    python deploy/kubernetes/render.py           # rewrite the manifests
    python deploy/kubernetes/render.py --check   # exit 1 if they are out of date

The output equals `helm template dovecote deploy/helm/dovecote` (release name "dovecote",
default values) with the Helm-only parts removed: the helm.sh/chart and
app.kubernetes.io/managed-by labels and the checksum/* pod annotations. Apply with
`kubectl apply -n NAMESPACE -f deploy/kubernetes/` after creating the Secret (see
deployment.yaml's header). tests/deploy/test_k8s_manifests.py compares the two.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHART = HERE.parent / "helm" / "dovecote"
RELEASE = "dovecote"
NAMESPACE = "default"
# The chart requires a public URL (the DID embeds it); change it in configmap.yaml.
PUBLIC_URL = "https://relay.example.com"
VALUES = {"config": {"publicUrl": PUBLIC_URL}}

HEADER = """\
# GENERATED from deploy/helm/dovecote with its default values and
# config.publicUrl=https://relay.example.com (release "dovecote") by
# deploy/kubernetes/render.py. Do not edit: change the chart and run the script.
"""

SECRET_NOTE = """\
# Before applying: set DOVECOTE_PUBLIC_URL in configmap.yaml, and create the Secret "dovecote" with the keys DOVECOTE_STORE (PostgreSQL
# URL), identity.json (mediator keys) and, optionally, DOVECOTE_ADMIN_TOKEN:
#   kubectl create secret generic dovecote \\
#     --from-literal=DOVECOTE_STORE='postgresql://USER:PASS@pg1,pg2,pg3/dovecote?target_session_attrs=read-write' \\
#     --from-literal=DOVECOTE_ADMIN_TOKEN="$(openssl rand -hex 32)" \\
#     --from-file=identity.json=./identity/identity.json
# servicemonitor.yaml needs the Prometheus Operator CRDs; skip it on clusters without them.
"""

# Lines that only make sense in a Helm release.
HELM_ONLY = re.compile(r"^\s*(helm\.sh/chart|app\.kubernetes\.io/managed-by|checksum/[\w.-]+):")


def strip_helm_only(text: str) -> str:
    """Drop Helm-only lines, then any `annotations:` key left without entries."""
    lines = [line for line in text.splitlines() if not HELM_ONLY.match(line)]
    kept: list[str] = []
    for i, line in enumerate(lines):
        if line.strip() == "annotations:":
            indent = len(line) - len(line.lstrip())
            following = next((n for n in lines[i + 1 :] if n.strip()), "")
            if len(following) - len(following.lstrip()) <= indent:
                continue
        kept.append(line)
    return "\n".join(kept).strip("\n") + "\n"


def render() -> dict[str, str]:
    """File name -> manifest text, for every template that renders to something."""
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(VALUES, name=RELEASE, namespace=NAMESPACE)
    files: dict[str, str] = {}
    for path, text in rendered.items():
        name = Path(path).name
        if not name.endswith(".yaml") or not text.strip() or "/tests/" in path:
            continue  # (templates/tests/: `helm test` hooks, not part of the deployment)
        body = strip_helm_only(text)
        header = HEADER + (SECRET_NOTE if name == "deployment.yaml" else "")
        files[name] = header + body
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args()
    files = render()
    existing = {p.name for p in HERE.glob("*.yaml")}
    stale = sorted(
        name
        for name in files.keys() | existing
        if name not in files or name not in existing or (HERE / name).read_text() != files[name]
    )
    if args.check:
        for name in stale:
            print(f"out of date: deploy/kubernetes/{name}")
        return 1 if stale else 0
    for name in existing - files.keys():
        (HERE / name).unlink()
    for name, text in files.items():
        (HERE / name).write_text(text)
    print(f"wrote {len(files)} manifests to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
