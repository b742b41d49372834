"""The S3 XML documents the gateway reads and writes."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from urllib.parse import quote
from xml.sax.saxutils import escape

from xo.rgw.errors import S3Error
from xo.rgw.store import ObjectMeta

NS = "http://s3.amazonaws.com/doc/2006-03-01/"
HEADER = '<?xml version="1.0" encoding="UTF-8"?>\n'
MAX_XML_BYTES = 2 * 1024 * 1024
MAX_DELETE_KEYS = 1000


def iso8601(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def _el(name: str, value: object) -> str:
    return f"<{name}>{escape(str(value))}</{name}>"


def list_buckets(buckets: Iterable[tuple[str, float]], owner: str) -> bytes:
    items = "".join(
        f"<Bucket>{_el('Name', n)}{_el('CreationDate', iso8601(t))}</Bucket>" for n, t in buckets
    )
    return (
        f'{HEADER}<ListAllMyBucketsResult xmlns="{NS}"><Owner>{_el("ID", owner)}'
        f'{_el("DisplayName", owner)}</Owner><Buckets>{items}</Buckets></ListAllMyBucketsResult>'
    ).encode()


def _contents(m: ObjectMeta, url_encode: bool) -> str:
    key = quote(m.key, safe="") if url_encode else m.key
    return (
        f"<Contents>{_el('Key', key)}{_el('LastModified', iso8601(m.mtime))}"
        f"{_el('ETag', chr(34) + m.etag + chr(34))}{_el('Size', m.size)}"
        f"{_el('StorageClass', 'STANDARD')}</Contents>"
    )


def list_objects(
    bucket: str,
    fields: list[tuple[str, object]],
    contents: list[ObjectMeta],
    prefixes: list[str],
    url_encode: bool,
) -> bytes:
    """ListBucketResult (v1 and v2 differ only in the leading fields the caller passes)."""
    head = "".join(_el(k, v) for k, v in fields)
    body = "".join(_contents(m, url_encode) for m in contents)
    common = "".join(
        f"<CommonPrefixes>{_el('Prefix', quote(p, safe='') if url_encode else p)}"
        "</CommonPrefixes>"
        for p in prefixes
    )
    return (
        f'{HEADER}<ListBucketResult xmlns="{NS}">{_el("Name", bucket)}{head}{body}{common}'
        "</ListBucketResult>"
    ).encode()


def initiate_upload(bucket: str, key: str, upload_id: str) -> bytes:
    return (
        f'{HEADER}<InitiateMultipartUploadResult xmlns="{NS}">{_el("Bucket", bucket)}'
        f'{_el("Key", key)}{_el("UploadId", upload_id)}</InitiateMultipartUploadResult>'
    ).encode()


def complete_upload(location: str, bucket: str, key: str, etag: str) -> bytes:
    return (
        f'{HEADER}<CompleteMultipartUploadResult xmlns="{NS}">{_el("Location", location)}'
        f'{_el("Bucket", bucket)}{_el("Key", key)}{_el("ETag", chr(34) + etag + chr(34))}'
        "</CompleteMultipartUploadResult>"
    ).encode()


def copy_result(etag: str, mtime: float) -> bytes:
    return (
        f'{HEADER}<CopyObjectResult xmlns="{NS}">{_el("LastModified", iso8601(mtime))}'
        f'{_el("ETag", chr(34) + etag + chr(34))}</CopyObjectResult>'
    ).encode()


def location(region: str) -> bytes:
    value = "" if region == "us-east-1" else escape(region)
    return f'{HEADER}<LocationConstraint xmlns="{NS}">{value}</LocationConstraint>'.encode()


def delete_result(deleted: list[str], errors: list[tuple[str, S3Error]], quiet: bool) -> bytes:
    ok = "" if quiet else "".join(f"<Deleted>{_el('Key', k)}</Deleted>" for k in deleted)
    bad = "".join(
        f"<Error>{_el('Key', k)}{_el('Code', e.code)}{_el('Message', e.message)}</Error>"
        for k, e in errors
    )
    return f'{HEADER}<DeleteResult xmlns="{NS}">{ok}{bad}</DeleteResult>'.encode()


def _parse(data: bytes) -> ET.Element:
    if len(data) > MAX_XML_BYTES:
        raise S3Error("MalformedXML", "document too large")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise S3Error("MalformedXML", str(e)) from None
    for el in root.iter():  # drop namespaces: clients send the S3 one or none
        el.tag = el.tag.rpartition("}")[2]
    return root


def parse_complete(data: bytes) -> list[tuple[int, str]]:
    """CompleteMultipartUpload -> [(part number, etag)] in document order."""
    root = _parse(data)
    if root.tag != "CompleteMultipartUpload":
        raise S3Error("MalformedXML", f"unexpected root {root.tag}")
    parts = []
    for part in root.findall("Part"):
        number, etag = part.findtext("PartNumber"), part.findtext("ETag")
        if number is None or etag is None or not number.strip().isdigit():
            raise S3Error("MalformedXML", "a Part needs PartNumber and ETag")
        parts.append((int(number), etag.strip().strip('"')))
    return parts


def parse_delete(data: bytes) -> tuple[list[str], bool]:
    """Delete (DeleteObjects) -> (keys, quiet)."""
    root = _parse(data)
    if root.tag != "Delete":
        raise S3Error("MalformedXML", f"unexpected root {root.tag}")
    keys = [k for o in root.findall("Object") if (k := o.findtext("Key"))]
    if len(keys) > MAX_DELETE_KEYS:
        raise S3Error("MalformedXML", f"at most {MAX_DELETE_KEYS} keys per request")
    quiet = (root.findtext("Quiet") or "").strip().lower() == "true"
    return keys, quiet
