"""ACA-Py as the comparison peer: a DIDComm mediator from another project, set up and
measured on the same work (accepting forwards for a mediated recipient).

Set-up, all on loopback, in a temporary HOME (ACA-Py keeps its askar wallets there):
1. mediator:  aca-py start --open-mediation --enable-undelivered-queue, HTTP inbound.
2. recipient: aca-py start --mediator-invitation <the mediator's OOB invitation>; it
   connects (DID Exchange), gets mediation granted, and an invitation it then creates
   carries its recipient key + the mediator's routing key (keylist-update done by ACA-Py).
3. The recipient is stopped: from then on it is an offline mailbox owner, as in the
   Dovecote runs (the mediator keeps, or retries, what it cannot deliver).
4. acapy_pack.py (in ACA-Py's venv) packs the forwards with ACA-Py's own DIDComm v1 code.
Differences from the Dovecote runs, stated in the report: DIDComm v1 envelopes
(Aries RFC 0019 with crypto_box/XChaCha20) instead of v2 JWE; ACA-Py answers 200 once the
inbound message is queued in memory for its dispatcher, before anything is written to disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench import servers
from bench.forwards import _read

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-acapy"
ACAPY = VENV / "bin" / "aca-py"
WIRE = b"application/ssi-agent-wire"


def installed() -> str:
    """Empty when ACA-Py is installed, else why not."""
    if not ACAPY.exists():
        return "ACA-Py not installed: run `sh bench/peer/install-acapy.sh`"
    return ""


def _start(
    work: Path, label: str, port: int, admin: int, extra: Sequence[str]
) -> subprocess.Popen[bytes]:
    log = open(work / f"{label}.log", "ab")
    return subprocess.Popen(
        [
            str(ACAPY),
            "start",
            "--label",
            label,
            "-it",
            "http",
            "127.0.0.1",
            str(port),
            "-ot",
            "http",
            "--admin",
            "127.0.0.1",
            str(admin),
            "--admin-insecure-mode",
            "-e",
            f"http://127.0.0.1:{port}",
            "--wallet-type",
            "askar",
            "--wallet-name",
            label,
            "--wallet-key",
            f"{label}-key",
            "--auto-provision",
            "--no-ledger",
            "--auto-accept-invites",
            "--auto-accept-requests",
            "--log-level",
            "error",
            *extra,
        ],
        env={**os.environ, "HOME": str(work)},
        preexec_fn=servers.server_preexec,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=work,
    )


HANDSHAKE = {"handshake_protocols": ["https://didcomm.org/didexchange/1.0"]}


def version() -> str:
    return subprocess.run([str(ACAPY), "--version"], capture_output=True, text=True).stdout.strip()


def recipient_forwards(work: Path, mediator_invitation: str, forwards: int) -> list[bytes]:
    """ACA-Py as the client: a recipient mediated from `mediator_invitation` (any v1
    mediator: ACA-Py's or Dovecote's /invitation/v1), then stopped (an offline mailbox
    owner), and `forwards` forwards for it packed by ACA-Py's own DIDComm v1 code."""
    r_port, r_admin = servers.free_port(), servers.free_port()
    recipient = _start(
        work, "recipient", r_port, r_admin, ["--mediator-invitation", mediator_invitation]
    )
    try:
        servers.wait_http(
            f"http://127.0.0.1:{r_admin}/status/ready", recipient, 120, work / "recipient.log"
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = httpx.get(f"http://127.0.0.1:{r_admin}/mediation/requests", timeout=10).json()[
                "results"
            ]
            if any(m["state"] == "granted" for m in found):
                break
            time.sleep(0.5)
        else:
            raise RuntimeError("ACA-Py recipient was not granted mediation in 60 s")
        invitation = httpx.post(
            f"http://127.0.0.1:{r_admin}/out-of-band/create-invitation", json=HANDSHAKE, timeout=30
        ).json()
        (work / "invitation.json").write_text(json.dumps(invitation))
        # The invitation key reaches the mediator in a keylist-update sent after the
        # invitation is made: wait for the mediator's confirmation before stopping.
        key = invitation["invitation"]["services"][0]["recipientKeys"][0].split("#")[0]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            routes = httpx.get(
                f"http://127.0.0.1:{r_admin}/mediation/keylists",
                params={"role": "client"},
                timeout=10,
            ).json()["results"]
            if any(str(r.get("recipient_key", "")).split("#")[0] == key for r in routes):
                break
            time.sleep(0.5)
        else:
            raise RuntimeError("the mediator did not confirm the invitation key in 60 s")
    finally:
        servers.stop_process(recipient)
    out = work / "forwards.bin"
    subprocess.run(
        [
            str(VENV / "bin" / "python"),
            str(HERE / "acapy_pack.py"),
            str(work / "invitation.json"),
            str(forwards),
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    return _read(out)


class AcaPyMediator:
    """A running ACA-Py mediator with one offline mediated recipient and packed forwards."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port, self.admin = servers.free_port(), servers.free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.version = ""

    def start(self, forwards: int) -> list[bytes]:
        self.version = version()
        self.proc = _start(
            self.work,
            "mediator",
            self.port,
            self.admin,
            ["--open-mediation", "--enable-undelivered-queue"],
        )
        servers.wait_http(
            f"http://127.0.0.1:{self.admin}/status/ready",
            self.proc,
            120,
            self.work / "mediator.log",
        )
        url = httpx.post(
            f"http://127.0.0.1:{self.admin}/out-of-band/create-invitation",
            json=HANDSHAKE,
            timeout=30,
        ).json()["invitation_url"]
        return recipient_forwards(self.work, url, forwards)

    def stop(self) -> None:
        servers.stop_process(self.proc)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def describe(mediator: AcaPyMediator) -> dict[str, Any]:
    return {"version": mediator.version, "port": mediator.port}
