"""carapace-server, the host side: agents connect here, and every tool call they ask
for is decided, limited, audited and run on this host.

``main.py`` (the click CLI) parses flags into ``config.py``'s typed config;
``daemon.py`` accepts links, owns sessions, reloads and shuts down; ``link.py``
is one connection, ``session.py`` one agent's session (it outlives links);
``pipeline.py`` takes each request through decide → limit → audit → run →
complete, with the ``policy/`` and ``audit/`` packages, ``upstream/`` for
HTTP tools and ``cli_runner.py`` for CLI tools; ``masking/`` scrubs injected
secrets from answers; ``streams.py`` is one request's half of the tunnel;
``operator_api.py``, ``metrics.py``, ``stats.py`` and ``view.py`` are the
operator's view. It never imports :mod:`carapace.agent` or :mod:`carapace.debug`.
"""
