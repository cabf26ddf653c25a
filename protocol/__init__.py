"""Carapace wire protocol, sans-IO: frames, messages, handshake, SSE, flow control,
keepalive, per-request states and session resumption.

Nothing in this package performs I/O, reads a clock or imports trio: it turns
bytes into typed messages and back and keeps the state that says what may come
next (time, where it matters, is passed in), so the server, the agent and the shim
(which must start fast) all share it.
"""
