"""GET semantics: Range parsing, conditional requests (RFC 7232 order), listing pages."""

from __future__ import annotations

from email.utils import formatdate

import pytest

from xo.rgw.errors import S3Error
from xo.rgw.gateway import AFTER_PREFIX, _conditional, _page, parse_range
from xo.rgw.http import Request
from xo.rgw.store import ObjectMeta

META = ObjectMeta("k", 100, "abc123", 1_000_000.0)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-9", (0, 10)),
        ("bytes=10-", (10, 90)),
        ("bytes=-10", (90, 10)),
        ("bytes=-1000", (0, 100)),
        ("bytes=90-1000", (90, 10)),
        ("bytes=99-99", (99, 1)),
        ("bytes=5-2", None),  # invalid: ignored, whole object
        ("bytes=0-1,5-6", None),  # several ranges: S3 serves the whole object
        ("items=0-1", None),
        ("bytes=abc", None),
    ],
)
def test_parse_range(header: str, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize(("header", "size"), [("bytes=100-", 100), ("bytes=-0", 100),
                                              ("bytes=0-", 0), ("bytes=500-600", 100)])
def test_unsatisfiable_range(header: str, size: int) -> None:
    with pytest.raises(S3Error) as e:
        parse_range(header, size)
    assert e.value.code == "InvalidRange" and e.value.status == 416


def req(**headers: str) -> Request:
    return Request("GET", "/b/k", "HTTP/1.1",
                   {k.replace("_", "-"): [v] for k, v in headers.items()})


BEFORE = formatdate(META.mtime - 10, usegmt=True)
AFTER = formatdate(META.mtime + 10, usegmt=True)


def test_conditionals() -> None:
    assert _conditional(req(), META) == 200
    assert _conditional(req(if_match='"abc123"'), META) == 200
    assert _conditional(req(if_match='"x", "abc123"'), META) == 200
    assert _conditional(req(if_match="*"), META) == 200
    assert _conditional(req(if_none_match='"abc123"'), META) == 304
    assert _conditional(req(if_none_match='"other"'), META) == 200
    assert _conditional(req(if_modified_since=AFTER), META) == 304
    assert _conditional(req(if_modified_since=BEFORE), META) == 200
    assert _conditional(req(if_unmodified_since=AFTER), META) == 200
    # If-None-Match wins over If-Modified-Since; If-Match over If-Unmodified-Since
    assert _conditional(req(if_none_match='"other"', if_modified_since=AFTER), META) == 200
    assert _conditional(req(if_match='"abc123"', if_unmodified_since=BEFORE), META) == 200
    assert _conditional(req(if_modified_since="not a date"), META) == 200


@pytest.mark.parametrize("headers", [{"if_match": '"other"'}, {"if_unmodified_since": BEFORE}])
def test_precondition_failed(headers: dict[str, str]) -> None:
    with pytest.raises(S3Error) as e:
        _conditional(req(**headers), META)
    assert e.value.code == "PreconditionFailed" and e.value.status == 412


def metas(*keys: str) -> list[ObjectMeta]:
    return [ObjectMeta(k, 1, "e", 0.0) for k in keys]


def test_page_with_delimiter_and_resume() -> None:
    entries = metas("a", "d/1", "d/2", "e/1", "f")
    contents, prefixes, truncated, last = _page(entries, "", "/", "", 2)
    assert [m.key for m in contents] == ["a"] and prefixes == ["d/"] and truncated
    assert last == "d/" + AFTER_PREFIX
    contents, prefixes, truncated, last = _page(entries, "", "/", last, 2)
    assert [m.key for m in contents] == ["f"] and prefixes == ["e/"] and not truncated


def test_page_prefix_and_zero_keys() -> None:
    entries = metas("p/a", "p/b/1", "p/b/2", "p/c")
    contents, prefixes, truncated, _ = _page(entries, "p/", "/", "", 1000)
    assert [m.key for m in contents] == ["p/a", "p/c"] and prefixes == ["p/b/"]
    assert not truncated
    assert _page(entries, "p/", "/", "", 0)[:3] == ([], [], True)
