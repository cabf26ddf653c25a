"""Carapace wire protocol: sans-IO frames, messages, handshake, SSE and flow control.

Nothing in this package performs I/O, reads a clock or imports trio: it turns
bytes into typed messages and back, so the server, the agent and the shim
(which must start fast) all share it.
"""
