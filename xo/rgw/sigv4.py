"""AWS Signature Version 4 verification (header and presigned), as S3 defines it.

The gateway recomputes the signature from the request it received, with the secret key of
the access key the client named, and compares in constant time. S3 signs the request path as
sent (no normalisation) and the payload by the hash the client put in x-amz-content-sha256,
so the body itself is checked later (`PayloadCheck`, `ChunkSigner`) while it is read.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote

from xo.rgw.errors import S3Error

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED = "UNSIGNED-PAYLOAD"
STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# AWS accepts requests whose date is within 15 minutes of its clock.
MAX_SKEW_SECONDS = 15 * 60
# A presigned URL may be valid for at most 7 days.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600
AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=([^,\s]+)\s*,\s*SignedHeaders=([^,\s]+)\s*,\s*"
    r"Signature=([0-9a-f]{64})\s*$"
)

Headers = Mapping[str, Sequence[str]]


@dataclass(frozen=True, slots=True)
class AuthResult:
    """Who signed the request and what the chunk signatures of a streaming body chain from."""

    access_key: str
    amz_date: str
    scope: str
    signing_key: bytes
    signature: str
    payload_hash: str


def uri_encode(text: str) -> str:
    """RFC 3986 encoding of one query component, as SigV4 requires."""
    return quote(text, safe="-_.~")


def canonical_query(raw_query: str, drop: str | None = None) -> str:
    """Sorted, re-encoded query string; `drop` removes a parameter (X-Amz-Signature)."""
    pairs = []
    for part in raw_query.split("&") if raw_query else []:
        name, _, value = part.partition("=")
        name, value = unquote(name), unquote(value)
        if name == drop:
            continue
        pairs.append((uri_encode(name), uri_encode(value)))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def canonical_headers(headers: Headers, signed: list[str]) -> str:
    """Canonical header block of the signed header names (values trimmed, spaces folded)."""
    lines = []
    for name in signed:
        values = headers.get(name)
        if values is None:
            raise S3Error("SignatureDoesNotMatch", f"signed header {name!r} is missing")
        folded = ",".join(" ".join(v.split()) for v in values)
        lines.append(f"{name}:{folded}\n")
    return "".join(lines)


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = hmac.new(("AWS4" + secret).encode(), date.encode(), hashlib.sha256).digest()
    for part in (region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def sign(key: bytes, string_to_sign: str) -> str:
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


def _parse_amz_date(text: str) -> float:
    try:
        return calendar.timegm(time.strptime(text, AMZ_DATE_FORMAT))
    except ValueError:
        raise S3Error("AccessDenied", f"bad X-Amz-Date {text!r}") from None


def _first(headers: Headers, name: str) -> str | None:
    values = headers.get(name)
    return values[0] if values else None


class Verifier:
    """Checks SigV4 signatures against a fixed map of access key -> secret key."""

    def __init__(self, keys: Mapping[str, str], max_skew: float = MAX_SKEW_SECONDS) -> None:
        self._keys = dict(keys)
        self._max_skew = max_skew

    def verify(
        self,
        method: str,
        path: str,
        raw_query: str,
        headers: Headers,
        now: float | None = None,
    ) -> AuthResult:
        """Verify a request; `headers` maps lower-case names to their values in order."""
        now = time.time() if now is None else now
        query = dict(_split_query(raw_query))
        auth = _first(headers, "authorization")
        if auth is not None:
            return self._verify_header(method, path, raw_query, headers, auth, now)
        if "X-Amz-Signature" in query:
            return self._verify_presigned(method, path, raw_query, headers, query, now)
        if "Signature" in query or "AWSAccessKeyId" in query:
            raise S3Error("AccessDenied", "signature version 2 is not supported")
        raise S3Error("AccessDenied", "anonymous requests are not allowed")

    def _scope(self, credential: str) -> tuple[str, str, str, str]:
        parts = credential.split("/")
        if len(parts) != 5 or parts[4] != "aws4_request" or parts[3] != "s3":
            raise S3Error("AccessDenied", f"malformed credential scope {credential!r}")
        access_key, date, region, _service, _ = parts
        if access_key not in self._keys:
            raise S3Error("InvalidAccessKeyId")
        return access_key, date, region, "/".join(parts[1:])

    def _check(
        self,
        credential: str,
        amz_date: str,
        canonical_request: str,
        signature: str,
        payload_hash: str,
    ) -> AuthResult:
        access_key, date, region, scope = self._scope(credential)
        if not amz_date.startswith(date):
            raise S3Error("SignatureDoesNotMatch", "credential date differs from X-Amz-Date")
        key = signing_key(self._keys[access_key], date, region, "s3")
        digest = hashlib.sha256(canonical_request.encode()).hexdigest()
        expected = sign(key, f"{ALGORITHM}\n{amz_date}\n{scope}\n{digest}")
        if not hmac.compare_digest(expected, signature):
            raise S3Error("SignatureDoesNotMatch")
        return AuthResult(access_key, amz_date, scope, key, signature, payload_hash)

    def _verify_header(
        self, method: str, path: str, raw_query: str, headers: Headers, auth: str, now: float
    ) -> AuthResult:
        if not auth.startswith(ALGORITHM):
            raise S3Error("AccessDenied", "only AWS4-HMAC-SHA256 authorization is supported")
        m = _AUTH_RE.match(auth)
        if m is None:
            raise S3Error("AccessDenied", "malformed Authorization header")
        credential, signed_text, signature = m.groups()
        signed = signed_text.split(";")
        if "host" not in signed:
            raise S3Error("AccessDenied", "the host header must be signed")
        amz_date = _first(headers, "x-amz-date")
        if amz_date is None:
            raise S3Error("AccessDenied", "X-Amz-Date is required")
        if abs(now - _parse_amz_date(amz_date)) > self._max_skew:
            raise S3Error("RequestTimeTooSkewed")
        payload_hash = _first(headers, "x-amz-content-sha256")
        if payload_hash is None:
            raise S3Error("InvalidRequest", "x-amz-content-sha256 is required")
        if payload_hash not in (
            UNSIGNED,
            STREAMING_SIGNED,
            STREAMING_SIGNED_TRAILER,
            STREAMING_UNSIGNED_TRAILER,
        ) and not _HEX64.fullmatch(payload_hash):
            raise S3Error("InvalidArgument", f"bad x-amz-content-sha256 {payload_hash!r}")
        canonical = "\n".join(
            [
                method,
                path,
                canonical_query(raw_query),
                canonical_headers(headers, signed),
                signed_text,
                payload_hash,
            ]
        )
        return self._check(credential, amz_date, canonical, signature, payload_hash)

    def _verify_presigned(
        self,
        method: str,
        path: str,
        raw_query: str,
        headers: Headers,
        query: dict[str, str],
        now: float,
    ) -> AuthResult:
        if query.get("X-Amz-Algorithm") != ALGORITHM:
            raise S3Error("AccessDenied", "only AWS4-HMAC-SHA256 presigned URLs are supported")
        try:
            credential = query["X-Amz-Credential"]
            amz_date = query["X-Amz-Date"]
            signed_text = query["X-Amz-SignedHeaders"]
            expires = int(query["X-Amz-Expires"])
        except (KeyError, ValueError):
            raise S3Error("AccessDenied", "incomplete presigned URL") from None
        if not 0 < expires <= MAX_PRESIGN_SECONDS:
            raise S3Error("AccessDenied", "X-Amz-Expires must be between 1 second and 7 days")
        start = _parse_amz_date(amz_date)
        if now > start + expires:
            raise S3Error("AccessDenied", "Request has expired")
        if now < start - self._max_skew:
            raise S3Error("AccessDenied", "Request is not yet valid")
        signed = signed_text.split(";")
        if "host" not in signed:
            raise S3Error("AccessDenied", "the host header must be signed")
        payload_hash = _first(headers, "x-amz-content-sha256") or UNSIGNED
        canonical = "\n".join(
            [
                method,
                path,
                canonical_query(raw_query, drop="X-Amz-Signature"),
                canonical_headers(headers, signed),
                signed_text,
                payload_hash,
            ]
        )
        return self._check(credential, amz_date, canonical, query["X-Amz-Signature"],
                           payload_hash)


def _split_query(raw_query: str) -> list[tuple[str, str]]:
    out = []
    for part in raw_query.split("&") if raw_query else []:
        name, _, value = part.partition("=")
        out.append((unquote(name), unquote(value)))
    return out


class ChunkSigner:
    """The signature chain of an aws-chunked body signed with STREAMING-AWS4-HMAC-SHA256-PAYLOAD.

    Each chunk's signature covers the previous signature and the chunk's hash, so a chunk
    cannot be altered, dropped or reordered without the chain breaking.
    """

    def __init__(self, auth: AuthResult) -> None:
        self._auth = auth
        self._previous = auth.signature

    def verify(self, data: bytes, signature: str) -> None:
        string_to_sign = "\n".join(
            [
                "AWS4-HMAC-SHA256-PAYLOAD",
                self._auth.amz_date,
                self._auth.scope,
                self._previous,
                EMPTY_SHA256,
                hashlib.sha256(data).hexdigest(),
            ]
        )
        expected = sign(self._auth.signing_key, string_to_sign)
        if not hmac.compare_digest(expected, signature):
            raise S3Error("SignatureDoesNotMatch", "chunk signature does not match")
        self._previous = signature
