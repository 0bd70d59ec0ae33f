"""Masking for any system, and the promise that a raw HDFS line reads as its template does."""

import csv
from pathlib import Path

import pytest

from feddale.data.synthetic import EVENT_TEMPLATES
from feddale.ingest.masking import Masker
from feddale.ingest.parsing import LineParser
from feddale.ingest.presets import preset
from feddale.ingest.reader import read_lines
from feddale.method.preprocess import mask

HDFS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hdfs"
needs_hdfs = pytest.mark.skipif(not (HDFS / "HDFS_2k.log").is_file(), reason="real HDFS data absent")


@pytest.mark.parametrize(
    "message, masked",
    [
        ("connection from 1.2.3.4 (a-1.bflony.adelphia.net) at Fri Jul  1 04:28:47 2005",
         "connection from <*> (<*>) at <*>"),
        ("proxy.cse.cuhk.edu.hk:5070 open through proxy proxy.cse.cuhk.edu.hk:5070 HTTPS",
         "<*> open through proxy <*> HTTPS"),
        ("chrome.exe close, 403 bytes (0.39 KB) sent, 426 bytes received, lifetime <1 sec",
         "chrome.exe close, <*> bytes (<*>) sent, <*> bytes received, lifetime <*>"),
        ('10.11.10.1 "GET /v2/servers/detail?all_tenants=True&changes-since=2017 HTTP/1.1" status: 200',
         '<*> "GET /<*> HTTP/<*>" status: <*>'),
        ("org.apache.hadoop.ipc.Server: IPC Server handler 3 on 62270", "org.apache.hadoop.ipc.Server: IPC Server handler <*> on <*>"),
    ],
)
def test_general_rules_mask_what_the_hdfs_rules_leave_half_masked(message, masked):
    assert Masker()(message) == masked


def test_a_sources_own_patterns_go_first_and_whole():
    import re

    masker = Masker([re.compile(r"req-[0-9a-f-]+")])
    assert masker("handled req-38101a0b-2096-447d in 3 ms") == "handled <*> in <*>"
    assert Masker()("handled req-38101a0b-2096-447d") != "handled <*>"


def test_masking_is_deterministic_and_remembers_nothing_wrong():
    masker = Masker(memo_size=2)
    texts = [f"worker {i} done" for i in range(5)] * 2
    assert [masker(t) for t in texts] == ["worker <*> done"] * 10


def test_every_hdfs_template_rendered_as_a_raw_message_masks_back_to_itself():
    for text in EVENT_TEMPLATES.values():
        assert Masker()(text) == text == mask(text)


@needs_hdfs
def test_raw_hdfs_lines_mask_to_the_text_the_event_sequence_path_renders():
    with (HDFS / "templates.csv").open(encoding="utf-8", newline="") as handle:
        rendered = {row["template"] for row in csv.DictReader(handle)}
    parser = LineParser(preset("hdfs"))
    outside = []
    lines = 0
    for raw in read_lines(HDFS / "HDFS_2k.log"):
        parsed = parser.parse(raw)
        assert parsed.masked is not None, raw.text
        lines += 1
        if parsed.masked not in rendered:
            outside.append(parsed.masked)
        assert parsed.masked == mask(parsed.content)  # what hdfs-raw gives for the same line
    assert lines == 2000
    # The namenode's "ask ... to delete" is the one message the 29 templates leave out.
    assert set(outside) == {"BLOCK* ask <*> to delete blk_<*>"} and len(outside) == 5
