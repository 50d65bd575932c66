"""DIDComm v1 (Aries RFCs) on the same durable core as v2.

envelope: RFC 0019 pack/unpack; messages: the v1 plaintext shapes; mediator: the data
path for v1 envelopes; one module per protocol family.
"""
