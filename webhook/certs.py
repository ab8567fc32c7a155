"""Pure certificate logic for the self-bootstrapped webhook TLS (no I/O; the clock is an argument).

Shape, after knative.dev/pkg's certificate controller but with less churn: one CA (long-lived,
its key kept in the Secret) signs a short-lived serving certificate for every DNS form of the
Service. Renewing the serving certificate re-signs with the same CA, so the MutatingWebhook
caBundle does not change; only a CA near its end (or a broken Secret) starts over. When the CA is
replaced the previous one stays in the bundle while it is valid, so API servers still holding the
old caBundle keep trusting the webhook during the switch.

``extra_sans`` (flag ``--extra-san``) adds DNS names or IP addresses to the serving certificate,
for a webhook reached other than through its Service (run outside the cluster, or registered with
``clientConfig.url``). A stored certificate lacking one of them is re-signed by the same CA, so the
caBundle does not change.

Secret keys (Knative's names plus the CA key): ``ca-cert.pem`` (the bundle: current CA first),
``ca-key.pem``, ``server-cert.pem``, ``server-key.pem``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT_KEY = "ca-cert.pem"
CA_KEY_KEY = "ca-key.pem"
SERVER_CERT_KEY = "server-cert.pem"
SERVER_KEY_KEY = "server-key.pem"
SECRET_KEYS = (CA_CERT_KEY, CA_KEY_KEY, SERVER_CERT_KEY, SERVER_KEY_KEY)

CA_VALIDITY = dt.timedelta(days=365)
CA_RENEW_BEFORE = dt.timedelta(days=30)
SERVER_VALIDITY = dt.timedelta(days=7)
SERVER_RENEW_BEFORE = dt.timedelta(days=1)
CLOCK_SKEW = dt.timedelta(minutes=5)
_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class CertBundle:
    """PEM bytes of everything the Secret holds."""

    ca_bundle: bytes
    ca_key: bytes
    server_cert: bytes
    server_key: bytes

    def to_secret_data(self) -> dict[str, bytes]:
        return {
            CA_CERT_KEY: self.ca_bundle,
            CA_KEY_KEY: self.ca_key,
            SERVER_CERT_KEY: self.server_cert,
            SERVER_KEY_KEY: self.server_key,
        }

    @classmethod
    def from_secret_data(cls, data: Mapping[str, bytes]) -> CertBundle | None:
        """None when any key is missing or empty (e.g. the empty Secret config/ ships)."""
        if not all(data.get(key) for key in SECRET_KEYS):
            return None
        return cls(data[CA_CERT_KEY], data[CA_KEY_KEY], data[SERVER_CERT_KEY], data[SERVER_KEY_KEY])


def dns_names(service: str, namespace: str, cluster_domain: str = "cluster.local") -> list[str]:
    """Every name the API server may use to reach the Service."""
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.{cluster_domain}",
    ]


def san_entry(value: str) -> x509.GeneralName:
    """An extra SAN: an IP address (v4 or v6) or a DNS name (``*.`` wildcard allowed).

    Raises ValueError naming what is wrong, so the flag parser can refuse it.
    """
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    name = value.lower().rstrip(".")
    labels = name.split(".")
    if labels[0] == "*" and len(labels) > 1:
        labels = labels[1:]
    if len(name) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise ValueError(f"{value!r} is neither an IP address nor a DNS name")
    return x509.DNSName(name)


def _san_text(entry: x509.GeneralName) -> str:
    return str(entry.value)


def expected_sans(service: str, namespace: str, extra_sans: Sequence[str] = ()) -> list[str]:
    """Every SAN the serving certificate must carry, as ``server_sans`` spells them."""
    names = dns_names(service, namespace)
    for extra in extra_sans:
        text = _san_text(san_entry(extra))
        if text not in names:
            names.append(text)
    return names


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(
    common_name: str, now: dt.datetime, validity: dt.timedelta
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    now: dt.datetime,
    validity: dt.timedelta,
    usage: x509.ObjectIdentifier,
    sans: Sequence[str] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate signed by the CA, for one extended key usage (server or client auth)."""
    key = _new_key()
    entries: list[x509.GeneralName] = []
    for text in sans:
        entry = san_entry(text)
        if entry not in entries:
            entries.append(entry)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(min(now + validity, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if entries:
        builder = builder.add_extension(x509.SubjectAlternativeName(entries), False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _make_server(
    names: list[str],
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: dt.datetime,
    validity: dt.timedelta,
    extra_sans: Sequence[str] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[-1])])
    return issue_leaf(
        ca_cert,
        ca_key,
        subject,
        now,
        validity,
        ExtendedKeyUsageOID.SERVER_AUTH,
        [*names, *extra_sans],
    )


def generate(
    service: str,
    namespace: str,
    now: dt.datetime,
    *,
    previous_ca: bytes | None = None,
    ca_validity: dt.timedelta = CA_VALIDITY,
    server_validity: dt.timedelta = SERVER_VALIDITY,
    extra_sans: Sequence[str] = (),
) -> CertBundle:
    """A fresh CA and serving cert; a still-valid ``previous_ca`` is kept in the bundle."""
    ca_cert, ca_key = make_ca(f"freeze-webhook-ca.{namespace}", now, ca_validity)
    server_cert, server_key = _make_server(
        dns_names(service, namespace), ca_cert, ca_key, now, server_validity, extra_sans
    )
    bundle = cert_pem(ca_cert)
    if previous_ca:
        for old in _load_certs(previous_ca)[:1]:
            if old.not_valid_after_utc > now:
                bundle += cert_pem(old)
    return CertBundle(bundle, key_pem(ca_key), cert_pem(server_cert), key_pem(server_key))


def renew_server(
    bundle: CertBundle,
    service: str,
    namespace: str,
    now: dt.datetime,
    *,
    server_validity: dt.timedelta = SERVER_VALIDITY,
    extra_sans: Sequence[str] = (),
) -> CertBundle:
    """A new serving cert signed by the bundle's current CA; the caBundle is unchanged."""
    ca_cert = _load_certs(bundle.ca_bundle)[0]
    ca_key = serialization.load_pem_private_key(bundle.ca_key, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("CA key is not an EC key")
    cert, key = _make_server(
        dns_names(service, namespace), ca_cert, ca_key, now, server_validity, extra_sans
    )
    return CertBundle(bundle.ca_bundle, bundle.ca_key, cert_pem(cert), key_pem(key))


def _load_certs(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def server_sans(cert_pem: bytes) -> list[str]:
    """The DNS and IP SANs of a PEM certificate, DNS names first (for tests and log lines)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    ips = [str(ip) for ip in ext.value.get_values_for_type(x509.IPAddress)]
    return [*ext.value.get_values_for_type(x509.DNSName), *ips]


def needs_rotation(
    bundle: CertBundle | None,
    service: str,
    namespace: str,
    now: dt.datetime,
    *,
    ca_renew_before: dt.timedelta = CA_RENEW_BEFORE,
    server_renew_before: dt.timedelta = SERVER_RENEW_BEFORE,
    extra_sans: Sequence[str] = (),
) -> tuple[str, str]:
    """Decide ("keep" | "server" | "all", why) for what the Secret holds.

    "server": only the serving cert needs re-signing; "all": start over with a new CA.
    """
    if bundle is None:
        return "all", "no certificates stored"
    try:
        cas = _load_certs(bundle.ca_bundle)
        ca = cas[0]
        ca_key = serialization.load_pem_private_key(bundle.ca_key, password=None)
        server = x509.load_pem_x509_certificate(bundle.server_cert)
        server_key = serialization.load_pem_private_key(bundle.server_key, password=None)
    except (ValueError, TypeError, IndexError) as err:
        return "all", f"stored certificates do not parse: {err}"
    if _public_der(ca_key.public_key()) != _public_der(ca.public_key()):
        return "all", "CA key does not match CA certificate"
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        return "all", "CA key is not an EC key"
    if ca.not_valid_after_utc - now < ca_renew_before:
        return "all", f"CA expires at {ca.not_valid_after_utc.isoformat()}"
    if _public_der(server_key.public_key()) != _public_der(server.public_key()):
        return "server", "server key does not match server certificate"
    try:
        server.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "server", "server certificate is not signed by the current CA"
    try:
        sans = set(server_sans(bundle.server_cert))
    except x509.ExtensionNotFound:
        sans = set()
    missing = set(expected_sans(service, namespace, extra_sans)) - sans
    if missing:
        return "server", f"server certificate lacks names {sorted(missing)}"
    if server.not_valid_before_utc > now + CLOCK_SKEW:
        return "server", "server certificate is not valid yet"
    if server.not_valid_after_utc - now < server_renew_before:
        return "server", f"server certificate expires at {server.not_valid_after_utc.isoformat()}"
    return "keep", "certificates valid"


def _public_der(key: object) -> bytes:
    public_bytes = getattr(key, "public_bytes", None)
    if public_bytes is None:
        return b""
    der: bytes = public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def ensure(
    stored: Mapping[str, bytes] | None,
    service: str,
    namespace: str,
    now: dt.datetime,
    *,
    extra_sans: Sequence[str] = (),
    **thresholds: dt.timedelta,
) -> tuple[CertBundle, bool, str]:
    """(bundle to use, whether it differs from what is stored, why) — the whole decision."""
    bundle = CertBundle.from_secret_data(stored) if stored is not None else None
    decision, why = needs_rotation(
        bundle, service, namespace, now, extra_sans=extra_sans, **thresholds
    )
    if decision == "keep" and bundle is not None:
        return bundle, False, why
    if decision == "server" and bundle is not None:
        return renew_server(bundle, service, namespace, now, extra_sans=extra_sans), True, why
    previous = bundle.ca_bundle if bundle is not None else None
    try:
        return (
            generate(service, namespace, now, previous_ca=previous, extra_sans=extra_sans),
            True,
            why,
        )
    except ValueError:
        return generate(service, namespace, now, extra_sans=extra_sans), True, why
