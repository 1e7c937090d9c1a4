"""Roughtime (RFC 10049), version 1.

- :mod:`udptime.roughtime.wire`: messages, packets, requests, responses (pure).
- :mod:`udptime.roughtime.merkle`: the Merkle tree over a batch (pure).
- :mod:`udptime.roughtime.keys`: root key, delegations, and their files.
- :mod:`udptime.roughtime.responder`: answers one batch with one signature.
- :mod:`udptime.roughtime.verify`: the client's checks, server lists, reports.
- :mod:`udptime.roughtime.cli`: ``udptime roughtime`` and a blocking query.
"""
