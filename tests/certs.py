"""A throw-away CA and a certificate for localhost/127.0.0.1 (trustme), as files, for live TLS tests."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import NamedTuple

import pytest


class CertFiles(NamedTuple):
    certfile: str  # the certificate chain
    keyfile: str
    combined: str  # chain and key in one file (HAProxy's "crt")
    client_context: ssl.SSLContext  # trusts the CA


def make_cert_files(folder: Path) -> CertFiles:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    certfile, keyfile, combined = folder / "cert.pem", folder / "key.pem", folder / "combined.pem"
    for index, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(str(certfile), append=index > 0)
    cert.private_key_pem.write_to_path(str(keyfile))
    combined.write_bytes(certfile.read_bytes() + keyfile.read_bytes())
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return CertFiles(str(certfile), str(keyfile), str(combined), context)
