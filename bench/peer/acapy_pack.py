"""Pre-pack DIDComm v1 forwards for the ACA-Py peer (runs in bench/peer/.venv-acapy).

    .venv-acapy/bin/python acapy_pack.py INVITATION.json COUNT OUT.bin [PAD]

INVITATION.json is an out-of-band invitation created by a recipient agent that has
mediation from the ACA-Py mediator: its service carries the recipient key, the mediator's
routing key and the mediator's endpoint. Each forward is what a third party sends: a
basic message anoncrypted (DIDComm v1 pack, no sender) for the recipient key, inside a
routing/1.0 forward anoncrypted for the mediator's routing key - the same two layers as
the DIDComm v2 forwards sent to Dovecote. Output: length-prefixed envelopes (the format
bench/forwards.py reads).
"""

from __future__ import annotations

import json
import struct
import sys
import uuid

from aries_cloudagent.askar.didcomm.v1 import pack_message
from aries_cloudagent.utils.multiformats import multibase, multicodec


def verkey(did_key: str) -> str:
    """did:key:z6Mk...#z6Mk... -> base58 Ed25519 verkey."""
    fingerprint = did_key.split("#")[0].removeprefix("did:key:")
    _codec, raw = multicodec.unwrap(multibase.decode(fingerprint))
    from aries_cloudagent.utils.multiformats.multibase import Base58BtcEncoder

    encoded: str = Base58BtcEncoder().encode(raw)
    return encoded


def main() -> None:
    invitation = json.load(open(sys.argv[1]))
    invitation = invitation.get("invitation", invitation)
    count, out = int(sys.argv[2]), sys.argv[3]
    pad = int(sys.argv[4]) if len(sys.argv) > 4 else 200
    service = invitation["services"][0]
    recipient = verkey(service["recipientKeys"][0])
    router = verkey(service["routingKeys"][0])
    with open(out, "wb") as handle:
        for i in range(count):
            inner = pack_message(
                [recipient],
                None,
                json.dumps(
                    {
                        "@type": "https://didcomm.org/basicmessage/1.0/message",
                        "@id": str(uuid.uuid4()),
                        "content": "x" * pad,
                        "n": i,
                    }
                ).encode(),
            )
            forward = {
                "@type": "https://didcomm.org/routing/1.0/forward",
                "@id": str(uuid.uuid4()),
                "to": recipient,
                "msg": json.loads(inner),
            }
            outer = pack_message([router], None, json.dumps(forward).encode())
            handle.write(struct.pack("<I", len(outer)))
            handle.write(outer)
    print(
        json.dumps(
            {
                "recipient": recipient,
                "router": router,
                "count": count,
                "endpoint": service["serviceEndpoint"],
            }
        )
    )


if __name__ == "__main__":
    main()
