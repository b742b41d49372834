"""SigV4 verification against AWS's published S3 examples (docs: "Signature Calculations for
the Authorization Header" and "Authenticating Requests: Using Query Parameters") and tampering."""

from __future__ import annotations

import calendar

import pytest

from xo.rgw.errors import S3Error
from xo.rgw.sigv4 import ChunkSigner, Verifier, canonical_query

KEYS = {"AKIAIOSFODNN7EXAMPLE": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}
NOW = calendar.timegm((2013, 5, 24, 0, 0, 0))
EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
CRED = "Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request"
HOST = "examplebucket.s3.amazonaws.com"
# AWS's streaming example: seed and chunk signatures of 65536 + 1024 bytes of "a".
SEED = "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"
CHUNK_SIGS = [
    (65536, "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648"),
    (1024, "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497"),
    (0, "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9"),
]


def headers(**kw: str) -> dict[str, list[str]]:
    return {k.replace("_", "-"): [v] for k, v in kw.items()}


GET_SIGNATURE = "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"


def get_object_headers(signature: str = GET_SIGNATURE,
                       range_: str = "bytes=0-9") -> dict[str, list[str]]:
    return headers(
        host=HOST, range=range_, x_amz_content_sha256=EMPTY, x_amz_date="20130524T000000Z",
        authorization=f"AWS4-HMAC-SHA256 {CRED},SignedHeaders=host;range;x-amz-content-sha256;"
                      f"x-amz-date,Signature={signature}",
    )


def streaming_headers() -> dict[str, list[str]]:
    return headers(
        host="s3.amazonaws.com", x_amz_date="20130524T000000Z",
        x_amz_storage_class="REDUCED_REDUNDANCY",
        x_amz_content_sha256="STREAMING-AWS4-HMAC-SHA256-PAYLOAD", content_encoding="aws-chunked",
        x_amz_decoded_content_length="66560", content_length="66824",
        authorization=f"AWS4-HMAC-SHA256 {CRED},SignedHeaders=content-encoding;content-length;"
                      "host;x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length;"
                      f"x-amz-storage-class,Signature={SEED}",
    )


PRESIGNED = (
    "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2F"
    "us-east-1%2Fs3%2Faws4_request&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&"
    "X-Amz-SignedHeaders=host&X-Amz-Signature="
    "aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
)


def test_get_object_example() -> None:
    auth = Verifier(KEYS).verify("GET", "/test.txt", "", get_object_headers(), NOW)
    assert auth.access_key == "AKIAIOSFODNN7EXAMPLE"
    assert auth.scope == "20130524/us-east-1/s3/aws4_request"
    assert auth.payload_hash == EMPTY


def test_put_object_example_with_escaped_path() -> None:
    h = headers(
        host=HOST, date="Fri, 24 May 2013 00:00:00 GMT",
        x_amz_content_sha256="44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072",
        x_amz_date="20130524T000000Z", x_amz_storage_class="REDUCED_REDUNDANCY",
        authorization=f"AWS4-HMAC-SHA256 {CRED},SignedHeaders=date;host;x-amz-content-sha256;"
                      "x-amz-date;x-amz-storage-class,Signature="
                      "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd",
    )
    auth = Verifier(KEYS).verify("PUT", "/test%24file.text", "", h, NOW)
    assert auth.payload_hash.startswith("44ce7dd6")


def test_list_objects_example_sorts_query() -> None:
    h = headers(
        host=HOST, x_amz_content_sha256=EMPTY, x_amz_date="20130524T000000Z",
        authorization=f"AWS4-HMAC-SHA256 {CRED},SignedHeaders=host;x-amz-content-sha256;"
                      "x-amz-date,Signature="
                      "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
    )
    # The client may send the parameters in any order: the canonical query sorts them.
    Verifier(KEYS).verify("GET", "/", "prefix=J&max-keys=2", h, NOW)


def test_presigned_example() -> None:
    auth = Verifier(KEYS).verify("GET", "/test.txt", PRESIGNED, headers(host=HOST), NOW + 60)
    assert auth.payload_hash == "UNSIGNED-PAYLOAD"


def test_presigned_expired_and_not_yet_valid() -> None:
    v = Verifier(KEYS)
    with pytest.raises(S3Error, match="expired") as e:
        v.verify("GET", "/test.txt", PRESIGNED, headers(host=HOST), NOW + 86401)
    assert e.value.code == "AccessDenied"
    with pytest.raises(S3Error, match="not yet valid"):
        v.verify("GET", "/test.txt", PRESIGNED, headers(host=HOST), NOW - 3600)


def test_presigned_tampered_path_or_query() -> None:
    v = Verifier(KEYS)
    with pytest.raises(S3Error) as e:
        v.verify("GET", "/other.txt", PRESIGNED, headers(host=HOST), NOW)
    assert e.value.code == "SignatureDoesNotMatch" and e.value.status == 403
    with pytest.raises(S3Error) as e:
        v.verify("GET", "/test.txt", PRESIGNED + "&x-id=GetObject", headers(host=HOST), NOW)
    assert e.value.code == "SignatureDoesNotMatch"


def test_tampered_signed_header() -> None:
    with pytest.raises(S3Error) as e:
        Verifier(KEYS).verify("GET", "/test.txt", "", get_object_headers(range_="bytes=0-99"),
                              NOW)
    assert e.value.code == "SignatureDoesNotMatch"


def test_wrong_secret_and_unknown_key() -> None:
    with pytest.raises(S3Error) as e:
        Verifier({"AKIAIOSFODNN7EXAMPLE": "other"}).verify(
            "GET", "/test.txt", "", get_object_headers(), NOW)
    assert e.value.code == "SignatureDoesNotMatch"
    with pytest.raises(S3Error) as e:
        Verifier({"SOMEONEELSE": "x"}).verify("GET", "/test.txt", "", get_object_headers(), NOW)
    assert e.value.code == "InvalidAccessKeyId"


def test_clock_skew_and_anonymous_and_v2() -> None:
    v = Verifier(KEYS)
    with pytest.raises(S3Error) as e:
        v.verify("GET", "/test.txt", "", get_object_headers(), NOW + 16 * 60)
    assert e.value.code == "RequestTimeTooSkewed"
    with pytest.raises(S3Error, match="anonymous") as e:
        v.verify("GET", "/test.txt", "", headers(host=HOST), NOW)
    assert e.value.code == "AccessDenied"
    with pytest.raises(S3Error, match="version 2"):
        v.verify("GET", "/t", "AWSAccessKeyId=A&Signature=x&Expires=1", headers(host=HOST), NOW)


def test_malformed_authorization() -> None:
    h = get_object_headers()
    h["authorization"] = ["AWS4-HMAC-SHA256 Credential=nonsense"]
    with pytest.raises(S3Error, match="malformed") as e:
        Verifier(KEYS).verify("GET", "/test.txt", "", h, NOW)
    assert e.value.code == "AccessDenied"


def test_streaming_chunk_chain() -> None:
    auth = Verifier(KEYS).verify("PUT", "/examplebucket/chunkObject.txt", "",
                                 streaming_headers(), NOW)
    signer = ChunkSigner(auth)
    for size, sig in CHUNK_SIGS:
        signer.verify(b"a" * size, sig)


def test_streaming_chunk_altered_or_reordered() -> None:
    auth = Verifier(KEYS).verify("PUT", "/examplebucket/chunkObject.txt", "",
                                 streaming_headers(), NOW)
    signer = ChunkSigner(auth)
    with pytest.raises(S3Error) as e:
        signer.verify(b"a" * 65535 + b"b", CHUNK_SIGS[0][1])
    assert e.value.code == "SignatureDoesNotMatch"
    with pytest.raises(S3Error):  # the second chunk first: its chain does not start at the seed
        ChunkSigner(auth).verify(b"a" * 1024, CHUNK_SIGS[1][1])


def test_canonical_query_encoding() -> None:
    assert canonical_query("b=2&a=1&a=0") == "a=0&a=1&b=2"
    assert canonical_query("prefix=a%20b&uploads") == "prefix=a%20b&uploads="
    assert canonical_query("k=%7E%2F") == "k=~%2F"
    assert canonical_query("X-Amz-Signature=x&a=1", drop="X-Amz-Signature") == "a=1"
