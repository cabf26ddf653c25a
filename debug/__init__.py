"""carapace-debug, the operator's command line, plus the test upstream and the demo.

``main.py`` is the click group; ``ops.py`` (health, connections, audit),
``sniff.py``, ``policy_cmd.py`` and ``sse_test.py`` are its commands;
``client.py`` is what the commands that read a server's debug listener
share; ``upstream/`` is a signal-cli look-alike and generic HTTP/SSE test
server; ``demo.py`` is ``make demo``. It reads a running server over the
operator API; ``policy check`` and ``lint`` load a policy file with the
server's own :mod:`carapace.server.policy`, so they decide exactly as the
server would. It never imports :mod:`carapace.agent`.
"""
