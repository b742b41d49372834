"""The dev CA: certificates chain to the CA, carry the identity, keys are private files."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from xo.pki import DevCA, PkiError, make_lab_pki


def test_lab_pki_issues_verifiable_host_certificates(tmp_path: Path) -> None:
    files = make_lab_pki(tmp_path, ["f0", "b0"])
    ca = x509.load_pem_x509_certificate(files["f0"].ca.read_bytes())
    for name, f in files.items():
        cert = x509.load_pem_x509_certificate(f.cert.read_bytes())
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [name]
        assert stat.S_IMODE(f.key.stat().st_mode) == 0o600


def test_two_cas_do_not_trust_each_other() -> None:
    a, b = DevCA(), DevCA()
    cert = x509.load_pem_x509_certificate(a.issue("f0")[0])
    with pytest.raises(InvalidSignature):
        cert.verify_directly_issued_by(b.cert)


@pytest.mark.parametrize("bad", ["", "two words"])
def test_bad_identity_is_refused(bad: str) -> None:
    with pytest.raises(PkiError, match="identity"):
        DevCA().issue(bad)
