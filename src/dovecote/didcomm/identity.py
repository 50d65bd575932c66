"""The mediator's keys and did:peer:2 DID, created once and kept in the data directory.

The keys never change once made. The DID embeds the public service URLs, so when the
configured public URL changes a new DID is derived from the same keys; earlier DIDs stay
valid for decryption (their key ids are kept), so mediatees holding an older routing DID
keep working.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from aries_askar import Key, KeyAlg

from dovecote.didcomm.peer import peer_did
from dovecote.files import write_private

log = structlog.get_logger("dovecote.identity")

IDENTITY_FILE = "identity.json"
OOB_INVITATION = "https://didcomm.org/out-of-band/2.0/invitation"
GOAL_REQUEST_MEDIATE = "request-mediate"
V1_FIELD = "v1_ed25519"


# Invitation ids derived from the DID (until an operator rotates the invitation).
INVITATION_NAMESPACE = uuid.UUID("7b1f3c8e-4d52-4f0e-9d2a-5c6e8f1a2b3c")


class IdentityMissing(Exception):
    """No identity file yet (read-only commands do not create one)."""


@dataclass
class Identity:
    """The mediator's signing and key-agreement keys and its DIDs (current first)."""

    signing_key: Key
    agreement_key: Key
    dids: list[str] = field(default_factory=list)
    # Stored after `dovecote invitation rotate`; otherwise derived from the DID, so the
    # invitation stays the same across restarts and instances sharing the keys.
    rotated_invitation_id: str = ""
    path: Path | None = None
    _stamp: tuple[int, int] | None = None
    # DIDComm v1 (Aries) key: its own ed25519 key, so the v2 keys keep a single use.
    v1_key: Key | None = None

    @property
    def did(self) -> str:
        return self.dids[0]

    @property
    def invitation_id(self) -> str:
        return self.rotated_invitation_id or str(uuid.uuid5(INVITATION_NAMESPACE, self.did))

    def refresh(self) -> None:
        """Pick up an invitation rotated by `dovecote invitation rotate` (a stat per call)."""
        if self.path is None:
            return
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                self._stamp = stamp
                self.rotated_invitation_id = str(
                    json.loads(self.path.read_text()).get("invitation_id") or ""
                )
        except (OSError, ValueError) as exc:
            log.warning("identity.unreadable", error=str(exc)[:200])

    def invitation(self) -> dict[str, Any]:
        """An Out-of-Band 2.0 invitation to request mediation from this mediator."""
        return {
            "type": OOB_INVITATION,
            "id": self.invitation_id,
            "from": self.did,
            "body": {
                "goal_code": GOAL_REQUEST_MEDIATE,
                "goal": "Request mediation from this Dovecote mediator",
                "accept": ["didcomm/v2"],
            },
        }

    def invitation_url(self, base_url: str) -> str:
        """The invitation as `<base>/?_oob=<base64url, unpadded>`."""
        minified = json.dumps(self.invitation(), separators=(",", ":")).encode()
        encoded = base64.urlsafe_b64encode(minified).decode().rstrip("=")
        return f"{base_url.rstrip('/')}/?_oob={encoded}"


def make_did(signing_key: Key, agreement_key: Key, endpoints: list[str]) -> str:
    """A did:peer:2 with both keys and one DIDCommMessaging service per endpoint."""
    services = [
        {
            "type": "DIDCommMessaging",
            "serviceEndpoint": {"uri": uri, "accept": ["didcomm/v2"], "routingKeys": []},
        }
        for uri in endpoints
    ]
    return peer_did(signing_key, agreement_key, services)


def _file(path: Path) -> Path:
    return path / IDENTITY_FILE if path.is_dir() or path.suffix != ".json" else path


def load(path: Path, endpoints: list[str] | None = None) -> Identity:
    """Read the identity without writing anything (IdentityMissing if there is none).

    With `endpoints`, the current DID is the one for them (as the server would make it);
    without, it is the one the server last recorded.
    """
    path = _file(path)
    if not path.exists():
        raise IdentityMissing(f"no mediator identity in {path}")
    stored = json.loads(path.read_text())
    signing = Key.from_secret_bytes(KeyAlg.ED25519, base64.b64decode(stored["ed25519"]))
    agreement = Key.from_secret_bytes(KeyAlg.X25519, base64.b64decode(stored["x25519"]))
    dids: list[str] = list(stored.get("dids") or [])
    if endpoints is not None or not dids:
        current = make_did(signing, agreement, endpoints or [])
        dids = [current, *[d for d in dids if d != current]]
    v1_key = (
        Key.from_secret_bytes(KeyAlg.ED25519, base64.b64decode(stored[V1_FIELD]))
        if stored.get(V1_FIELD)
        else None
    )
    return Identity(
        signing, agreement, dids, str(stored.get("invitation_id") or ""), path, v1_key=v1_key
    )


def rotate_invitation(path: Path) -> str:
    """Give the invitation a new id (servers pick it up at their next invitation request)."""
    path = _file(path)
    if not path.exists():
        raise IdentityMissing(f"no mediator identity in {path}")
    stored = json.loads(path.read_text())
    stored["invitation_id"] = str(uuid.uuid4())
    write_private(path, json.dumps(stored, indent=2))
    return str(stored["invitation_id"])


def service_urls(did: str) -> list[str]:
    """The service endpoint URIs a did:peer:2 advertises, in order."""
    from did_peer_2 import resolve

    doc = resolve(did)
    urls: list[str] = []
    for service in doc.get("service") or []:
        endpoint = service.get("serviceEndpoint")
        for item in endpoint if isinstance(endpoint, list) else [endpoint]:
            uri = item.get("uri") if isinstance(item, dict) else item
            if isinstance(uri, str):
                urls.append(uri)
    return urls


def load_or_create(path: Path, endpoints: list[str]) -> Identity:
    """Load the identity file, creating keys on first start (file mode 0600).

    Several instances may share one file (a mounted secret or a shared volume): creation
    uses O_EXCL, so when two start at once one creates and the other reads its keys.
    A read-only file (a Kubernetes Secret) is used as is.
    """
    path = _file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        signing = Key.generate(KeyAlg.ED25519)
        agreement = Key.generate(KeyAlg.X25519)
        fresh = {
            "created_at": time.time(),
            "ed25519": base64.b64encode(signing.get_secret_bytes()).decode(),
            "x25519": base64.b64encode(agreement.get_secret_bytes()).decode(),
            "dids": [make_did(signing, agreement, endpoints)],
            V1_FIELD: base64.b64encode(_derive_v1_key(signing).get_secret_bytes()).decode(),
        }
        if _create_exclusive(path, json.dumps(fresh, indent=2)):
            log.info("identity.created", path=str(path))
    stored = json.loads(path.read_text())
    signing = Key.from_secret_bytes(KeyAlg.ED25519, base64.b64decode(stored["ed25519"]))
    agreement = Key.from_secret_bytes(KeyAlg.X25519, base64.b64decode(stored["x25519"]))
    dids: list[str] = list(stored.get("dids") or [])
    current = make_did(signing, agreement, endpoints)
    changed = False
    if stored.get(V1_FIELD):
        v1_key = Key.from_secret_bytes(KeyAlg.ED25519, base64.b64decode(stored[V1_FIELD]))
    else:
        v1_key = _derive_v1_key(signing)  # an identity file from before v1 support
        stored[V1_FIELD] = base64.b64encode(v1_key.get_secret_bytes()).decode()
        changed = True
    if not dids or dids[0] != current:
        if dids:
            log.warning("identity.did_changed", reason="public endpoints changed")
        dids = [current, *[d for d in dids if d != current]]
        stored["dids"] = dids
        changed = True
    if changed:
        try:
            write_private(path, json.dumps(stored, indent=2))
        except OSError as exc:
            # A read-only secret mount: the new DID is still valid (same keys).
            log.warning("identity.not_saved", error=str(exc))
    ident = Identity(
        signing, agreement, dids, str(stored.get("invitation_id") or ""), path, v1_key=v1_key
    )
    ident.refresh()
    return ident


def _derive_v1_key(signing: Key) -> Key:
    """The v1 key for an identity: derived from the v2 signing key, not random, so that
    instances sharing a read-only identity file (or racing to add the field) agree."""
    seed = hashlib.sha256(b"dovecote didcomm v1 key\0" + signing.get_secret_bytes())
    return Key.from_seed(KeyAlg.ED25519, seed.digest())


def _create_exclusive(path: Path, text: str) -> bool:
    """Create `path` with mode 0600 unless it exists; True if this call created it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(tmp, path)  # atomic, and fails if another process created it first
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
