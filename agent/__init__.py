"""carapace-agent and carapace-shim, the VM side: local HTTP and tool shims, tunnelled to
the server over one authenticated link.

``main.py`` is the click CLI; ``tunnel.py`` dials, authenticates, keeps the
link alive, reconnects and resumes; ``multiplexer.py`` routes each request's
frames; ``http_listener.py`` serves an HTTP tool on a local port;
``shim_socket.py`` is the unix socket the shims talk to; ``shim.py`` is
``carapace-shim`` itself (stdlib, msgpack and :mod:`carapace.protocol` only,
so it starts fast) and ``shim_install.py`` the ``shims`` subcommand. It never
imports the server package or the debug CLI.
"""
