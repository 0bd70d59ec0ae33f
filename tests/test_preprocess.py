"""Masking, header stripping, joining and windowing."""

import ipaddress
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feddale.method.preprocess import SEPARATOR, as_view, compact_view, join_messages, mask, strip_header, window, window_spans

RAW_TO_TEMPLATE = [
    (
        "Receiving block blk_-1608999687919862906 src: /10.250.19.102:54106 dest: /10.250.19.102:50010",
        "Receiving block blk_<*> src: /<*> dest: /<*>",
    ),
    (
        "BLOCK* NameSystem.allocateBlock: /user/root/rand/_temporary/_task_200811092030_0001_m_000590_0/"
        "part-00590. blk_-1727475099218615100",
        "BLOCK* NameSystem.allocateBlock: /<*> blk_<*>",
    ),
    (
        "10.251.30.85:50010:Got exception while serving blk_-2918118818249673980 to /10.251.90.64:",
        "<*>:Got exception while serving blk_<*> to /<*>:",
    ),
    (
        "Deleting block blk_1781953582842324563 file /mnt/hadoop/dfs/data/current/subdir5/blk_1781953582842324563",
        "Deleting block blk_<*> file /<*>",
    ),
    (
        "BLOCK* NameSystem.addStoredBlock: blockMap updated: 10.251.73.220:50010 is added to "
        "blk_7128370237687728475 size 67108864",
        "BLOCK* NameSystem.addStoredBlock: blockMap updated: <*> is added to blk_<*> size <*>",
    ),
    (
        "PacketResponder 1 for block blk_38865049064139660 terminating",
        "PacketResponder <*> for block blk_<*> terminating",
    ),
    (
        "BLOCK* ask 10.250.14.224:50010 to replicate blk_-6547 to datanode(s) 10.251.215.16:50010 10.251.1.1:50010",
        "BLOCK* ask <*> to replicate blk_<*> to datanode(s) <*>",
    ),
    (
        "PacketResponder blk_-5 2 Exception java.io.InterruptedIOException: Interruped while waiting",
        "PacketResponder blk_<*> <*> Exception java.io.InterruptedIOException: Interruped while waiting",
    ),
    ("BLOCK* ask 10.250.18.114:50010 to delete  blk_-51 blk_80 blk_3", "BLOCK* ask <*> to delete blk_<*>"),
]


@pytest.mark.parametrize(("raw", "expected"), RAW_TO_TEMPLATE)
def test_mask_matches_hdfs_template_style(raw: str, expected: str) -> None:
    assert mask(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("connect to [2001:db8::1]:8080 failed", "connect to <*> failed"),
        ("peer fe80::1%eth0 gone", "peer <*> gone"),
        ("fetch https://example.org/a/b?x=1. done", "fetch <*>. done"),
        ("at 2008-11-09T20:36:15.123Z and 20:36:15", "at <*> and <*>"),
        ("addr 0x1f3A hash deadbeef00112233 id 123e4567-e89b-12d3-a456-426614174000", "addr <*> hash <*> id <*>"),
        ("read 1,024 bytes in 3.5 s, offset -12", "read <*> bytes in <*> s, offset <*>"),
        ("I/O error on a/b in std::vector", "I/O error on a/b in std::vector"),
        ("dir subdir19 of job_2008_01", "dir subdir<*> of job_<*>_<*>"),
        ("a   b\tc\n", "a b c"),
    ],
)
def test_mask_general_values(raw: str, expected: str) -> None:
    assert mask(raw) == expected


WORDS = st.sampled_from(["block", "to", "from", "size", "ERROR", "a-b", "x:", "(ok)", "std::map", "I/O", "="])
IPV4 = st.ip_addresses(v=4).map(str)
IPV6 = st.ip_addresses(v=6).map(lambda a: a.compressed)
PORTED = st.tuples(st.one_of(IPV4, IPV6.map(lambda a: f"[{a}]")), st.integers(0, 65535)).map(
    lambda t: f"{t[0]}:{t[1]}"
)
PATHS = st.lists(st.from_regex(r"[A-Za-z0-9_.\-]{1,8}", fullmatch=True), min_size=1, max_size=5).map(
    lambda parts: "/" + "/".join(parts)
)
NUMBERS = st.one_of(st.integers(-(10**12), 10**12).map(str), st.floats(0, 1e6, allow_nan=False).map(str))
HEXES = st.integers(0, 2**64).map(hex)
BLOCKS = st.integers(-(2**63), 2**63).map(lambda n: f"blk_{n}")
VARIABLES = st.one_of(IPV4, IPV6, PORTED, PATHS, NUMBERS, HEXES, BLOCKS)
LINES = st.lists(st.one_of(WORDS, VARIABLES), min_size=1, max_size=12).map(" ".join)


def _has_ip(text: str) -> bool:
    if re.search(r"\d{1,3}(?:\.\d{1,3}){3}", text):
        return True
    for token in re.split(r"[\s\[\]/]+", text):
        try:
            ipaddress.IPv6Address(token)
        except ValueError:
            continue
        return True
    return False


@settings(max_examples=300, deadline=None)
@given(LINES)
def test_mask_leaves_no_variables(line: str) -> None:
    masked = mask(line)
    assert not re.search(r"\d", masked)
    assert not _has_ip(masked)
    assert not re.search(r"(?:^|\s)/(?!<\*>)\S", masked)  # only "/<*>" remains of any path
    assert mask(masked) == masked


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_mask_is_idempotent_and_removes_digits_on_any_text(text: str) -> None:
    masked = mask(text)
    assert mask(masked) == masked
    assert not re.search(r"\d", masked)


def test_strip_header_returns_content_after_component() -> None:
    line = (
        "081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block "
        "blk_38865049064139660 terminating\n"
    )
    assert strip_header(line) == "PacketResponder 1 for block blk_38865049064139660 terminating"
    assert strip_header("081109 214043 2561 WARN dfs.DataNode$DataXceiver: 10.1.1.1:50010:Got x") == (
        "10.1.1.1:50010:Got x"
    )


@pytest.mark.parametrize("bad", ["", "hello world", "081109 203615 INFO dfs.X: missing thread id"])
def test_strip_header_rejects_other_formats(bad: str) -> None:
    with pytest.raises(ValueError, match="not a Loghub HDFS log line"):
        strip_header(bad)


def test_join_messages_uses_separator() -> None:
    assert SEPARATOR == " ;-; "
    assert join_messages(["a", "b c"]) == "a ;-; b c"
    assert join_messages([]) == ""


def test_window_examples() -> None:
    assert window([1, 2, 3], 5) == [[1, 2, 3]]
    assert window(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert window(list(range(10)), 4, overlap=2) == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert window([], 4) == []


@pytest.mark.parametrize(("max_len", "overlap"), [(0, 0), (4, 4), (4, -1)])
def test_window_rejects_bad_arguments(max_len: int, overlap: int) -> None:
    with pytest.raises(ValueError):
        window([1, 2, 3], max_len, overlap)


@given(st.lists(st.integers(), max_size=60), st.integers(1, 12), st.data())
def test_window_covers_every_token_and_overlaps_as_asked(ids: list[int], max_len: int, data) -> None:
    overlap = data.draw(st.integers(0, max_len - 1))
    windows = window(ids, max_len, overlap)
    spans = window_spans(len(ids), max_len, overlap)
    assert all(1 <= len(w) <= max_len for w in windows)
    # Taking each window's tokens from where the previous window's end left off rebuilds the input.
    rebuilt: list[int] = []
    for (start, end), part in zip(spans, windows):
        assert part == ids[start:end]
        rebuilt += part[len(rebuilt) - start :]
    assert rebuilt == ids
    for (s1, e1), (s2, _) in zip(spans, spans[1:]):
        assert e1 - s2 == overlap


def test_compact_view_keeps_distinct_messages_in_first_seen_order_with_counts():
    text = SEPARATOR.join(["a <*>", "b", "a <*>", "c", "a <*>"])
    assert compact_view(text) == SEPARATOR.join(["a <*> [x3]", "b", "c"])
    assert compact_view("only") == "only"


def test_as_view_selects_the_view_and_refuses_unknown_ones() -> None:
    text = "a ;-; b ;-; a"
    assert as_view(text, "full") == text
    assert as_view(text, "compact") == compact_view(text)
    with pytest.raises(ValueError, match="unknown view"):
        as_view(text, "tiny")  # type: ignore[arg-type]
