"""DIDComm v2: the mediator's identity, pack/unpack, and one module per protocol."""
