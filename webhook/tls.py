"""Serving TLS: either operator-provided files (reloaded on change) or the self-bootstrapped CA.

Both paths end in ``LiveTLS.load``: the one ``ssl.SSLContext`` the server was started with gets
``load_cert_chain`` again, which affects new handshakes only; if loading fails the previous
certificate stays in use (cert and key files can be briefly out of step while being replaced).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from webhook import certs
from webhook.cluster import Cluster, ConflictError

log = logging.getLogger("webhook.tls")

Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class LiveTLS:
    """An SSLContext whose certificate can be swapped while the server runs."""

    def __init__(self) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.loaded = False

    def load(self, cert_file: str, key_file: str) -> bool:
        """Load the pair; keep the old one (and return False) if it does not load."""
        try:
            self.context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as err:
            log.warning(
                "could not load TLS certificate; keeping the previous one",
                extra={"cert_file": cert_file, "error": str(err)},
            )
            return False
        self.loaded = True
        return True

    def load_pem(self, cert_pem: bytes, key_pem: bytes) -> bool:
        """Load in-memory PEM via a private temporary directory (ssl only reads files)."""
        with tempfile.TemporaryDirectory(prefix="freeze-webhook-") as tmp:
            cert_file = Path(tmp, "tls.crt")
            key_file = Path(tmp, "tls.key")
            cert_file.write_bytes(cert_pem)
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(key_pem)
            return self.load(str(cert_file), str(key_file))


@dataclass
class FileWatcher:
    """Reload --tls-cert-file/--tls-private-key-file when either file's mtime/size changes."""

    cert_file: str
    key_file: str
    tls: LiveTLS
    interval: float = 10.0
    _seen: tuple[tuple[float, int], ...] = ()

    def _stamp(self) -> tuple[tuple[float, int], ...]:
        stamps = []
        for path in (self.cert_file, self.key_file):
            try:
                st = os.stat(path)
                stamps.append((st.st_mtime, st.st_size))
            except OSError:
                stamps.append((0.0, -1))
        return tuple(stamps)

    def check(self) -> bool:
        """Load when changed; True if a new certificate was loaded."""
        stamp = self._stamp()
        if stamp == self._seen:
            return False
        if self.tls.load(self.cert_file, self.key_file):
            self._seen = stamp
            log.info("loaded TLS certificate", extra={"cert_file": self.cert_file})
            return True
        return False

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.check()


@dataclass
class CertReconciler:
    """Keep the Secret, the caBundle and the served certificate in agreement.

    Restart-safe without churn: a valid Secret is reused as is, and the caBundle is only patched
    when it differs. Concurrent replicas settle through optimistic concurrency on the Secret.
    """

    cluster: Cluster
    tls: LiveTLS
    namespace: str
    service: str
    secret_name: str
    webhook_config: str
    clock: Clock = utcnow
    interval: float = 600.0
    served: bytes = b""
    extra_sans: tuple[str, ...] = ()  # --extra-san: more names/IPs on the serving certificate

    async def reconcile(self) -> certs.CertBundle:
        """One pass; returns the bundle now served. Raises on API errors (caller retries)."""
        for _attempt in range(5):
            stored = await self.cluster.read_secret(self.namespace, self.secret_name)
            bundle, changed, why = certs.ensure(
                stored.data if stored else None,
                self.service,
                self.namespace,
                self.clock(),
                extra_sans=self.extra_sans,
            )
            if changed:
                try:
                    await self.cluster.write_secret(
                        self.namespace,
                        self.secret_name,
                        bundle.to_secret_data(),
                        stored.resource_version if stored else None,
                    )
                except ConflictError:
                    log.info("certificate Secret changed concurrently; re-reading")
                    continue
                log.info(
                    "stored new webhook certificates",
                    extra={"secret": f"{self.namespace}/{self.secret_name}", "reason": why},
                )
            break
        else:
            raise ConflictError("certificate Secret kept changing; will retry")
        await self._sync_ca_bundle(bundle.ca_bundle)
        if bundle.server_cert != self.served:
            if self.tls.load_pem(bundle.server_cert + bundle.ca_bundle, bundle.server_key):
                self.served = bundle.server_cert
                log.info("serving certificate loaded", extra={"reason": why})
        return bundle

    async def _sync_ca_bundle(self, ca_bundle: bytes) -> None:
        hooks = await self.cluster.read_ca_bundles(self.webhook_config)
        stale = {i: (name, ca_bundle) for i, (name, cur) in enumerate(hooks) if cur != ca_bundle}
        if stale:
            await self.cluster.patch_ca_bundles(self.webhook_config, stale)
            log.info(
                "patched caBundle",
                extra={"webhook_config": self.webhook_config, "webhooks": len(stale)},
            )

    async def run(self, first_retry: float = 1.0) -> None:
        """Reconcile forever: quickly retry until the first success, then every ``interval``."""
        delay = first_retry
        while True:
            try:
                await self.reconcile()
                delay = self.interval
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("certificate reconcile failed; will retry")
                delay = min(delay * 2, 60.0) if not self.tls.loaded else min(delay, 60.0)
            await asyncio.sleep(delay)
