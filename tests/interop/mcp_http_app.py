"""A Streamable HTTP MCP server built with the official MCP SDK, for the interop tests.

``python mcp_http_app.py PORT``: serves ``/mcp`` (event-stream answers, the
SDK's default) with tools ``get_time``, ``print_secret`` (the value of
``$CARAPACE_TEST_TOKEN``: what the host policy injects as its bearer token)
and ``delete_everything``.
"""

from __future__ import annotations

import os
import sys

import uvicorn
from mcp.server.mcpserver import MCPServer

server = MCPServer("carapace-interop-http")


@server.tool()
def get_time() -> str:
    """A fixed time."""
    return "2026-01-01T00:00:00Z"


@server.tool()
def print_secret() -> str:
    """The credential this server was given."""
    return "the token is " + os.environ.get("CARAPACE_TEST_TOKEN", "(unset)")


@server.tool()
def delete_everything() -> str:
    """What the host policy denies."""
    return "everything deleted"


if __name__ == "__main__":
    port = int(sys.argv[1])
    uvicorn.run(server.streamable_http_app(), host="127.0.0.1", port=port, log_level="warning")
