"""A signed appliance's ``.cert``: the manifest's signature, checked with the embedded certificate.

OVF (DSP0243, "Distribution as a Single File"): the certificate file holds a
line ``SHA256(name.mf)= <hex signature>`` (SHA1 and SHA512 too) and the
signer's X.509 certificate in PEM. The signature is over the manifest's
bytes, with the certificate's public key (what ``ovftool`` and
``openssl dgst -sign`` write). The check runs the system's ``openssl``; the
certificate itself is not checked against a trust store, so a valid signature
shows only that the manifest (and through its digests every file) is the one
the certificate's key signed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

from virtkit.errors import CorruptImageError

__all__ = ["verify"]

_SIGNATURE = re.compile(
    rb"^(?P<alg>SHA1|SHA256|SHA512)\((?P<file>[^()\r\n]{1,255})\)\s?=\s?(?P<hex>[0-9a-fA-F]{2,2048})\s*$"
)
_PEM = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]{1,65536}-----END CERTIFICATE-----"
)


def _openssl(args: list[str], where: str) -> subprocess.CompletedProcess[bytes]:
    exe = shutil.which("openssl")
    assert exe is not None
    try:
        return subprocess.run([exe, *args], capture_output=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:  # pragma: no cover - a broken host
        raise CorruptImageError(
            f"openssl could not check the signature: {exc}", path=where
        ) from exc


def verify(
    cert: bytes, cert_name: str, manifest: bytes, manifest_name: str, where: str
) -> str | None:
    """Check that ``cert`` signs ``manifest``; the signer's subject, or None without ``openssl``.

    Raises:
        CorruptImageError: the certificate file is malformed, names another
            manifest, or its signature does not verify (the manifest was
            changed after signing, or the certificate is not the signer's).
    """
    lines = [line.strip() for line in cert.splitlines() if line.strip()]
    found = [m for m in map(_SIGNATURE.match, lines) if m is not None]
    pem = _PEM.search(cert)
    if len(found) != 1 or pem is None:
        raise CorruptImageError(
            f"certificate file {cert_name!r} must hold one 'SHA256({manifest_name})= <hex>' line "
            "and a PEM certificate",
            path=where,
        )
    sig = found[0]
    if sig["file"].decode("utf-8", "replace") != manifest_name:
        raise CorruptImageError(
            f"certificate file {cert_name!r} signs {sig['file'].decode('utf-8', 'replace')!r}, "
            f"not the manifest {manifest_name!r}",
            path=where,
        )
    if len(sig["hex"]) % 2:
        raise CorruptImageError(
            f"certificate file {cert_name!r}: the signature is not whole bytes", path=where
        )
    if shutil.which("openssl") is None:
        return None
    with tempfile.TemporaryDirectory(prefix="virtkit-ovf-sig-") as tmp:
        files = {"cert.pem": pem[0] + b"\n", "sig.bin": bytes.fromhex(sig["hex"].decode()),
                 "manifest": manifest}  # fmt: skip
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as fh:
                fh.write(data)
        cert_pem, pub = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "pub.pem")
        out = _openssl(["x509", "-in", cert_pem, "-noout", "-pubkey", "-out", pub], where)
        subject = _openssl(["x509", "-in", cert_pem, "-noout", "-subject", "-nameopt", "RFC2253"],
                           where)  # fmt: skip
        if out.returncode != 0 or subject.returncode != 0:
            raise CorruptImageError(
                f"certificate file {cert_name!r}: the certificate cannot be read "
                f"({out.stderr.decode('utf-8', 'replace').strip()[:200]})",
                path=where,
            )
        alg = sig["alg"].decode().lower()
        sig_file, mf_file = os.path.join(tmp, "sig.bin"), os.path.join(tmp, "manifest")
        argv = ["dgst", f"-{alg}", "-verify", pub, "-signature", sig_file, mf_file]
        check = _openssl(argv, where)
        if check.returncode != 0:
            raise CorruptImageError(
                f"the appliance's signature ({cert_name!r}) does not verify: the manifest "
                f"{manifest_name!r} was changed after signing, or the certificate is not the "
                "signer's",
                path=where,
            )
    text = subject.stdout.decode("utf-8", "replace").strip()
    return text.removeprefix("subject=")[:300]
