"""TLS for Dask comms: a ``Security`` from certificate files or from Dask config.

Kept tiny on purpose: distributed already implements TLS; this module only
turns the ``--tls-ca-file/--tls-cert/--tls-key`` style of options into one
``Security`` used for client, scheduler and worker roles alike, and fails with
one clear line when files are missing instead of an ssl traceback later.
"""

from __future__ import annotations

import os
from pathlib import Path

import dask
from distributed.security import Security

__all__ = ["make_security", "temporary_security", "write_temporary_certs"]


def make_security(
    tls_ca_file: str | os.PathLike | None = None,
    tls_cert: str | os.PathLike | None = None,
    tls_key: str | os.PathLike | None = None,
) -> Security | None:
    """Return a ``Security`` for the given PEM files, else from Dask config.

    With no file given, returns ``Security()`` (which reads
    ``distributed.comm.tls.*``) when Dask config names a CA file, else None so
    that callers fall back to plain TCP. ``tls_key`` may be omitted when the
    key is inside the certificate file.
    """
    given = {"tls_ca_file": tls_ca_file, "tls_cert": tls_cert, "tls_key": tls_key}
    if all(v is None for v in given.values()):
        if dask.config.get("distributed.comm.tls.ca-file", None):
            return Security()
        return None
    if tls_ca_file is None or tls_cert is None:
        missing = [k for k in ("tls_ca_file", "tls_cert") if given[k] is None]
        raise ValueError(f"TLS needs both a CA file and a certificate; missing: {', '.join(missing)}")
    for k, v in given.items():
        if v is not None and not Path(v).is_file():
            raise ValueError(f"TLS file for {k} not found: {v}")
    ca, cert = str(tls_ca_file), str(tls_cert)
    key = str(tls_key) if tls_key is not None else None
    return Security(
        require_encryption=True,
        tls_ca_file=ca,
        tls_client_cert=cert,
        tls_client_key=key,
        tls_scheduler_cert=cert,
        tls_scheduler_key=key,
        tls_worker_cert=cert,
        tls_worker_key=key,
    )


def temporary_security() -> Security:
    """An in-memory self-signed ``Security`` (needs ``cryptography``); for tests."""
    return Security.temporary()


def write_temporary_certs(directory: str | os.PathLike) -> tuple[str, str, str]:
    """Write a temporary CA, certificate and key as PEM files; return their paths.

    ``Security.temporary()`` holds PEM text in memory; subprocesses such as the
    ``dask scheduler``/``dask worker`` CLIs need files. The key file is made
    owner-readable only.
    """
    sec = Security.temporary()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in (
        ("ca.pem", sec.tls_ca_file),
        ("cert.pem", sec.tls_client_cert),
        ("key.pem", sec.tls_client_key),
    ):
        p = d / name
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        paths.append(str(p))
    return paths[0], paths[1], paths[2]
