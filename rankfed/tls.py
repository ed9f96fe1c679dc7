"""Transport security shared by the coordinator and the edge client: gRPC credentials from
PEM files, channels that are TLS or plain from one call, and the peer identity a
coordinator reads from a verified client certificate.

    # edge client (TLS: the coordinator's CA; mutual TLS: also the device's cert and key)
    tls = TlsOptions(ca_file="ca.pem", cert_file="dev-1.pem", key_file="dev-1.key")
    channel = channel_for("coordinator.example.org:50051", tls)            # grpc.Channel
    channel = aio_channel_for("coordinator.example.org:50051", tls)        # grpc.aio.Channel
    channel = channel_for("127.0.0.1:50051", None)                         # plaintext (loopback)

No certificate is generated here (deploy/make-certs.sh does that with openssl); this
module only reads PEM files, so it needs nothing beyond grpcio.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = [
    "OPERATOR_OU",
    "PeerIdentity",
    "TlsError",
    "TlsOptions",
    "aio_channel_for",
    "channel_for",
    "client_channel_credentials",
    "is_loopback_address",
    "peer_identity",
    "server_credentials",
]

# Organizational unit that marks an operator's client certificate (AdminService access).
OPERATOR_OU = "operators"


class TlsError(ValueError):
    """A TLS file is missing, unreadable or not PEM; the message names the file and the setting."""


@dataclass(frozen=True)
class TlsOptions:
    """Client side TLS: `ca_file` verifies the coordinator; `cert_file` + `key_file` are the
    client's own certificate for mutual TLS (both or neither). `server_name` overrides the
    name checked against the coordinator's certificate (default: the host of the address)."""

    ca_file: str | Path | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None
    server_name: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise TlsError("a client certificate needs both cert_file and key_file (or neither)")


def _read(path: str | Path, setting: str) -> bytes:
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise TlsError(f"{setting}: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise TlsError(f"{setting}: {str(path)!r} is not a PEM file (no '-----BEGIN' line)")
    return data


def server_credentials(
    cert_file: str | Path, key_file: str | Path, client_ca_file: str | Path | None = None
) -> grpc.ServerCredentials:
    """TLS server credentials; with `client_ca_file`, mutual TLS: every client must present
    a certificate signed by that CA (the handshake fails otherwise)."""
    pair = [(_read(key_file, "server.tls_key_file"), _read(cert_file, "server.tls_cert_file"))]
    if client_ca_file:
        return grpc.ssl_server_credentials(
            pair, root_certificates=_read(client_ca_file, "server.tls_client_ca_file"), require_client_auth=True
        )
    return grpc.ssl_server_credentials(pair)


def client_channel_credentials(
    ca_file: str | Path | None = None, cert_file: str | Path | None = None, key_file: str | Path | None = None
) -> grpc.ChannelCredentials:
    """Channel credentials for a client: `ca_file` (None: the system roots) verifies the
    server; `cert_file`/`key_file` present a client certificate for mutual TLS."""
    TlsOptions(ca_file, cert_file, key_file)  # same both-or-neither check
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file, "tls ca_file") if ca_file else None,
        private_key=_read(key_file, "tls key_file") if key_file else None,
        certificate_chain=_read(cert_file, "tls cert_file") if cert_file else None,
    )


def _channel_args(tls: TlsOptions | None, options: Sequence[tuple[str, object]]) -> list[tuple[str, object]]:
    args = list(options)
    if tls is not None and tls.server_name:
        args.append(("grpc.ssl_target_name_override", tls.server_name))
    return args


def channel_for(
    address: str, tls: TlsOptions | None, options: Sequence[tuple[str, object]] = ()
) -> grpc.Channel:
    """A blocking-API channel: TLS when `tls` is given, plaintext when it is None."""
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    creds = client_channel_credentials(tls.ca_file, tls.cert_file, tls.key_file)
    return grpc.secure_channel(address, creds, options=_channel_args(tls, options))


def aio_channel_for(
    address: str, tls: TlsOptions | None, options: Sequence[tuple[str, object]] = ()
) -> grpc.aio.Channel:
    """The same for grpc.aio; create it inside the event loop that will use it."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    creds = client_channel_credentials(tls.ca_file, tls.cert_file, tls.key_file)
    return grpc.aio.secure_channel(address, creds, options=_channel_args(tls, options))


# --------------------------------------------------------------------------- server side


@dataclass(frozen=True)
class PeerIdentity:
    """Who is on the other end of a verified mutual-TLS connection."""

    common_name: str
    organizational_units: tuple[str, ...]
    dns_names: tuple[str, ...]

    @property
    def is_operator(self) -> bool:
        return OPERATOR_OU in self.organizational_units

    def names(self) -> tuple[str, ...]:
        """Every name this certificate vouches for (CN first, then DNS SANs)."""
        return tuple(dict.fromkeys(n for n in (self.common_name, *self.dns_names) if n))


def _text(values: Iterable[bytes] | None) -> list[str]:
    return [v.decode("utf-8", "replace") for v in values or ()]


def _rdns(subject: str) -> list[str]:
    """Split an RFC 2253 subject on its unescaped commas (and plus signs)."""
    parts, current, escaped = [], [], False
    for ch in subject:
        if escaped:
            current.append("\\" + ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in ",+":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _subject_field(subject: str, key: str) -> list[str]:
    # grpc renders the subject as RFC 2253 ("CN=alice,OU=operators,O=RankFed"), escaping
    # commas inside values: a CN of "x,OU=operators" must not read as an OU.
    out = []
    for part in _rdns(subject):
        k, eq, v = part.strip().partition("=")
        if eq and k.strip().upper() == key:
            out.append(v.strip())
    return out


def peer_identity(auth_context: Mapping[str, Iterable[bytes]] | None) -> PeerIdentity | None:
    """The verified client certificate's identity from `context.auth_context()`, or None on
    a plaintext or server-only TLS connection. gRPC fills these keys only after it verified
    the chain against server.tls_client_ca_file."""
    if not auth_context or b"ssl" not in (auth_context.get("transport_security_type") or ()):
        return None
    cn = _text(auth_context.get("x509_common_name"))
    subject = _text(auth_context.get("x509_subject"))
    if not cn and not subject:
        return None
    ous = tuple(_subject_field(subject[0], "OU")) if subject else ()
    dns = tuple(_text(auth_context.get("x509_dns_subject_alternative_name")))
    return PeerIdentity(common_name=cn[0] if cn else "", organizational_units=ous, dns_names=dns)


def is_loopback_address(address: str) -> bool:
    """Whether host:port listens on loopback only (127.0.0.0/8, ::1, localhost)."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def peer_is_loopback(peer: str) -> bool:
    """Whether a grpc peer string ("ipv4:127.0.0.1:5555", "ipv6:[::1]:5555", "unix:...") is local."""
    kind, _, rest = peer.partition(":")
    if kind == "unix":
        return True
    if kind not in ("ipv4", "ipv6"):
        return False
    return is_loopback_address(rest)


# --------------------------------------------------------------------------- preflight

_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def transport_mismatch(address: str, tls: TlsOptions | None, *, timeout: float = 5.0) -> str | None:
    """One line naming a TLS mismatch between this client and the server at `address`, or
    None when they agree (or the server cannot be reached: that is retried elsewhere).

    Why: gRPC reports every mismatch as UNAVAILABLE "Socket closed" or a handshake failure,
    which a client retries for minutes. A raw TLS handshake, unverified, tells the cases
    apart in one round trip: plaintext client vs TLS server, TLS client vs plaintext server,
    and a mutual-TLS server that refuses a client without a certificate."""
    import socket
    import ssl

    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "localhost"
    try:
        raw = socket.create_connection((host, int(port)), timeout=timeout)
    except (OSError, ValueError):
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only asking "does it speak TLS?"; gRPC verifies later
    context.set_alpn_protocols(["h2"])
    if tls is not None and tls.cert_file and tls.key_file:
        try:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        except (OSError, ssl.SSLError):
            return None  # unreadable files get their own, clearer error from the channel
    with raw:
        try:
            conn = context.wrap_socket(raw, server_hostname=host)
        except (ssl.SSLError, OSError):
            speaks_tls = False
        else:
            speaks_tls = True
            with conn:
                try:
                    # Under TLS 1.3 a server that wants a client certificate refuses only after
                    # the handshake: it closes (or alerts) instead of answering the HTTP/2
                    # preface with its SETTINGS frame.
                    conn.sendall(_H2_PREFACE)
                    refused = conn.recv(1) == b""
                except ssl.SSLError:
                    refused = True
                except OSError:
                    refused = False  # a timeout or reset: no evidence either way
    if tls is None and speaks_tls:
        return (f"the coordinator at {address} speaks TLS and this client plaintext: add --tls-ca CA.pem "
                "(the CA that signed its certificate) or --tls")
    if tls is not None and not speaks_tls:
        return (f"the coordinator at {address} does not speak TLS (a plaintext server, or not a coordinator): "
                "drop the --tls* options, or configure TLS on the coordinator (server.tls_cert_file)")
    if speaks_tls and refused:
        if tls is not None and tls.cert_file:
            return (f"the coordinator at {address} refused this client's certificate {tls.cert_file} (mutual TLS): "
                    "use one signed by the CA in its server.tls_client_ca_file")
        return (f"the coordinator at {address} requires a client certificate (mutual TLS): pass --tls-cert "
                "and --tls-key with a certificate its CA signed (deploy/make-certs.sh --device NAME)")
    return None
