"""TLS contexts for the agent link (stdlib ``ssl``; trio's SSLStream does the I/O).

TLS protects the link on an untrusted network; the token handshake still
runs on top, so a stolen certificate alone never authenticates an agent.
"""

from __future__ import annotations

import ssl


class TlsConfigError(Exception):
    pass


def _load(what: str, action: object) -> None:
    try:
        action()  # type: ignore[operator]
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"cannot load {what}: {exc}") from None


def server_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """TLS 1.2+ server context; with ``client_ca``, agents must present a certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(f"the server certificate {cert} / key {key}", lambda: ctx.load_cert_chain(cert, key))
    if client_ca:
        _load(f"the client CA {client_ca}", lambda: ctx.load_verify_locations(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def agent_context(
    ca: str | None = None, cert: str | None = None, key: str | None = None
) -> ssl.SSLContext:
    """TLS 1.2+ client context trusting ``ca`` (else the system store), checking the hostname."""
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca:
        _load(f"the CA file {ca}", lambda: ctx.load_verify_locations(ca))
    if cert:
        _load(f"the client certificate {cert}", lambda: ctx.load_cert_chain(cert, key))
    return ctx
