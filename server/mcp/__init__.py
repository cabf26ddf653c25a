"""MCP sessions: a VM's MCP client using a host stdio MCP server, judged message by message.

``filter`` is sans-IO (lines in, lines out, the verdicts of
:mod:`carapace.server.policy.mcp`); ``session`` plugs it into a CLI run
(``cli_runner``'s stdin/stdout hook) and turns each MCP call into an audit
record, metrics and a sniff entry; ``http`` applies it to the requests of an
MCP client to a server over Streamable HTTP (a ``url`` tool). The rules are in the policy package's
docstring, "MCP tools".
"""
