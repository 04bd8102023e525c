"""TLS for NBD_OPT_STARTTLS: the server's ssl context from the configuration.

The server presents an x509 certificate; with a CA configured it also asks
every client for a certificate signed by that CA and refuses the handshake
without one, which is how clients are authenticated.
"""

import asyncio
import ssl

from qcownbd.errors import ConfigError


def server_context(cert: str, key: str, ca: str | None = None,
                   verify_client: bool | None = None) -> ssl.SSLContext:
    """A server-side context; ``verify_client`` defaults to "yes when a CA is given".

    Every unreadable or mismatched file is a one-line ConfigError naming it.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate {cert} / key {key}: "
                          f"{_reason(exc)}") from None
    if verify_client is None:
        verify_client = ca is not None
    if verify_client:
        if not ca:
            raise ConfigError("verifying client certificates needs a CA file")
        try:
            context.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS CA {ca}: {_reason(exc)}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)


def peer_subject(transport) -> str:
    """The client certificate's subject CN for the log, or "" without one."""
    cert = transport.get_extra_info("peercert") or {}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return ""


async def start_server_tls(transport, protocol, context: ssl.SSLContext):
    """(TLS transport, "") over ``transport`` for ``protocol``, or (None, why not)."""
    loop = asyncio.get_running_loop()
    try:
        tls = await loop.start_tls(transport, protocol, context, server_side=True)
    except (ssl.SSLError, OSError) as exc:
        return None, str(getattr(exc, "reason", None) or exc)
    except asyncio.CancelledError:
        return None, "the handshake was cancelled"
    if tls is None or tls.is_closing():
        return None, "the client went away"
    return tls, ""
