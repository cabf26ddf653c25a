"""Carapace's shared runtime: the trio-level pieces both daemons and the operator CLI use.

Frames over sockets, immediate socket reads and writes, addresses, TLS
contexts, token files, logging, HTTP/1.1 facts and the exception-group
walker. It imports only :mod:`carapace.protocol` and third-party libraries,
so the server, the agent and the debug CLI can all build on it without
importing each other.
"""
