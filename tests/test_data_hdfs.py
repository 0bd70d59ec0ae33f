"""HDFS importers, the prepared-import format, data specs and the fetch pipeline (offline)."""

import csv
import hashlib
import re
import zipfile
from pathlib import Path

import pytest

from feddale.data.fetch import convert_raw, download, extract_hdfs, fetch_hdfs
from feddale.data.hdfs import (
    load_event_csv,
    load_raw_log,
    load_sessions_jsonl,
    parse_raw_log,
    read_block_labels,
    write_sessions_jsonl,
)
from feddale.data.sources import DATA_DIR_ENV, default_source, load_dataset
from feddale.data.types import Dataset, Session

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hdfs"
needs_real = pytest.mark.skipif(not (REAL / "sessions.csv").is_file(), reason="real HDFS data absent")

RAW_LINES = [
    "081109 203518 143 INFO dfs.DataNode$DataXceiver: Receiving block blk_-1608999687919862906 "
    "src: /10.250.19.102:54106 dest: /10.250.19.102:50010",
    "081109 203518 35 INFO dfs.FSNamesystem: BLOCK* NameSystem.allocateBlock: /mnt/job_1/part-0. "
    "blk_-1608999687919862906",
    "this line is not in the HDFS format",
    "081109 203519 145 INFO dfs.DataNode$PacketResponder: PacketResponder 2 for block blk_77 terminating",
    "081109 203520 19 INFO dfs.FSNamesystem: BLOCK* ask 10.250.18.114:50010 to delete  "
    "blk_-1608999687919862906 blk_77",
    "081109 203521 7 INFO dfs.DataNode: shutting down, no block here",
]
LABELS = "BlockId,Label\nblk_-1608999687919862906,Anomaly\nblk_77,Normal\n"


@pytest.fixture
def raw_log(tmp_path: Path) -> Path:
    path = tmp_path / "HDFS.log"
    path.write_text("\n".join(RAW_LINES) + "\n\n")
    (tmp_path / "anomaly_label.csv").write_text(LABELS)
    return path


def test_parse_raw_log_groups_by_block_in_order(raw_log: Path) -> None:
    parsed = parse_raw_log(raw_log)
    assert (parsed.lines, parsed.malformed, parsed.without_block) == (6, 1, 1)
    first, second = parsed.sessions
    assert first.id == "blk_-1608999687919862906" and second.id == "blk_77"
    assert first.messages == (
        "Receiving block blk_<*> src: /<*> dest: /<*>",
        "BLOCK* NameSystem.allocateBlock: /<*> blk_<*>",
        "BLOCK* ask <*> to delete blk_<*>",
    )
    assert second.messages == (
        "PacketResponder <*> for block blk_<*> terminating",
        "BLOCK* ask <*> to delete blk_<*>",
    )


def test_load_raw_log_with_and_without_labels(raw_log: Path, caplog: pytest.LogCaptureFixture) -> None:
    unlabeled = load_raw_log(raw_log)
    assert unlabeled.labels is None and len(unlabeled) == 2
    assert "skipped 1 malformed lines and 1 lines naming no block" in caplog.text
    labeled = load_raw_log(raw_log, raw_log.parent / "anomaly_label.csv")
    assert labeled.labels == (1, 0)


def test_raw_log_errors(tmp_path: Path, raw_log: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_raw_log(tmp_path / "absent.log")
    junk = tmp_path / "junk.log"
    junk.write_text("nothing\nto see\n")
    with pytest.raises(ValueError, match="no sessions found in 2 lines"):
        load_raw_log(junk)
    partial = tmp_path / "partial.csv"
    partial.write_text("BlockId,Label\nblk_77,Normal\n")
    with pytest.raises(ValueError, match="no label for 1 blocks"):
        load_raw_log(raw_log, partial)
    bad = tmp_path / "bad.csv"
    bad.write_text("BlockId,Label\nblk_77,Weird\n")
    with pytest.raises(ValueError, match="Normal or Anomaly"):
        read_block_labels(bad)
    (tmp_path / "header.csv").write_text("id,y\nblk_77,Normal\n")
    with pytest.raises(ValueError, match="BlockId,Label"):
        read_block_labels(tmp_path / "header.csv")


@pytest.mark.skipif(not (REAL / "HDFS_2k.log").is_file(), reason="real HDFS data absent")
def test_hdfs_2k_sessions_look_like_templates() -> None:
    log = REAL / "HDFS_2k.log"
    parsed = parse_raw_log(log)
    assert (parsed.lines, parsed.malformed, parsed.without_block) == (2000, 0, 0)
    text = log.read_text()
    assert {s.id for s in parsed.sessions} == set(re.findall(r"blk_-?\d+", text))
    with (REAL / "templates.csv").open() as handle:
        templates = {row["template"] for row in csv.DictReader(handle)}
    messages = [m for s in parsed.sessions for m in s.messages]
    assert len(messages) >= 2000
    others = {m for m in messages if m not in templates}
    assert others == {"BLOCK* ask <*> to delete blk_<*>"}  # a namenode line outside the 29
    assert all(not re.search(r"\d", m) for m in messages)
    # Order of appearance: the first session is the block of the first line.
    first_block = re.search(r"blk_-?\d+", text.splitlines()[0]).group(0)
    assert parsed.sessions[0].id == first_block


TEMPLATES = "event_id,template\nE1,a <*>\nE2,b\n"


def _write_csv_dir(folder: Path, sessions: str, templates: str = TEMPLATES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "templates.csv").write_text(templates)
    (folder / "sessions.csv").write_text(sessions)
    return folder


def test_load_event_csv_renders_templates(tmp_path: Path) -> None:
    folder = _write_csv_dir(tmp_path / "d", "session_id,pool,label,events\ns1,p,0,E1 E2 E1\ns2,p,1,E2\n")
    data = load_event_csv(folder)
    assert data.labels == (0, 1)
    assert data.sessions[0] == Session("s1", ("a <*>", "b", "a <*>"))
    assert data.sessions[0].text == "a <*> ;-; b ;-; a <*>"
    unlabeled = load_event_csv(_write_csv_dir(tmp_path / "u", "session_id,events\ns1,E1\n"))
    assert unlabeled.labels is None


@pytest.mark.parametrize(
    ("sessions", "templates", "message"),
    [
        ("session_id,events\ns1,E1 E9\n", TEMPLATES, r"unknown event ids \['E9'\]"),
        ("session_id,events\n", TEMPLATES, "no sessions"),
        ("session_id,events\ns1,\n", TEMPLATES, "has no events"),
        ("session_id,events\ns1,E1\ns1,E2\n", TEMPLATES, "duplicate session id"),
        ("session_id,label,events\ns1,0,E1\ns2,,E2\n", TEMPLATES, "labels must be 0 or 1"),
        ("id,events\ns1,E1\n", TEMPLATES, "missing columns"),
        ("session_id,events\ns1,E1\n", "event_id,template\n", "no templates"),
        ("session_id,events\ns1,E1\n", "event_id,template\nE1,a\nE1,b\n", "duplicate event id"),
    ],
)
def test_load_event_csv_errors(tmp_path: Path, sessions: str, templates: str, message: str) -> None:
    folder = _write_csv_dir(tmp_path, sessions, templates)
    with pytest.raises(ValueError, match=message):
        load_event_csv(folder)


def test_load_event_csv_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_event_csv(tmp_path / "absent")
    (tmp_path / "templates.csv").write_text("event_id,template\nE1,a\n")
    with pytest.raises(FileNotFoundError, match="sessions.csv"):
        load_event_csv(tmp_path)


@needs_real
def test_load_event_csv_on_real_data() -> None:
    data = load_event_csv(REAL)
    assert len(data) == 33693
    assert data.labels.count(0) == 10855 and data.labels.count(1) == 22838
    assert data.sessions[0].messages[0] == "Receiving block blk_<*> src: /<*> dest: /<*>"
    assert all(" ;-; " in s.text for s in data.sessions[:100])


def test_sessions_jsonl_round_trip_and_errors(tmp_path: Path) -> None:
    data = Dataset("x", (Session("a", ("m 1", "m 2")), Session("b", ("ü",))), (0, 1))
    path = write_sessions_jsonl(data, tmp_path / "out" / "sessions.jsonl")
    assert load_sessions_jsonl(path).sessions == data.sessions
    assert load_sessions_jsonl(path.parent).labels == (0, 1)
    assert list(path.parent.iterdir()) == [path]  # no temporary left behind
    write_sessions_jsonl(Dataset("x", data.sessions, None), path)
    assert load_sessions_jsonl(path).labels is None
    path.write_text('{"id": "a", "messages": ["m"], "label": 0}\n{"id": "b", "messages": ["m"]}\n')
    with pytest.raises(ValueError, match="some sessions have labels"):
        load_sessions_jsonl(path)
    path.write_text('{"id": "a"}\n')
    with pytest.raises(ValueError, match="line 1: bad session record"):
        load_sessions_jsonl(path)
    path.write_text('{"id": "a", "messages": ["m"], "label": 2}\n')
    with pytest.raises(ValueError, match="label must be 0"):
        load_sessions_jsonl(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="no sessions"):
        load_sessions_jsonl(path)


def test_load_dataset_specs(tmp_path: Path, raw_log: Path) -> None:
    assert len(load_dataset("synthetic:30,10")) == 40
    assert load_dataset("synthetic:30,10", seed=1) != load_dataset("synthetic:30,10", seed=2)
    csv_dir = _write_csv_dir(tmp_path / "csv", "session_id,label,events\ns1,0,E1\n")
    assert load_dataset(f"hdfs-csv:{csv_dir}").sessions == load_dataset(str(csv_dir)).sessions
    labels = raw_log.parent / "anomaly_label.csv"
    assert load_dataset(f"hdfs-raw:{raw_log},{labels}").labels == (1, 0)
    assert load_dataset(str(raw_log)).labels is None
    jsonl = write_sessions_jsonl(load_dataset("synthetic:5,5"), tmp_path / "prep" / "sessions.jsonl")
    for spec in (f"jsonl:{jsonl}", f"jsonl:{jsonl.parent}", str(jsonl), str(jsonl.parent)):
        assert len(load_dataset(spec)) == 10
    for bad, message in [
        ("nonsense", "unknown data spec"),
        ("synthetic:10", "synthetic:N_NORMAL,N_ANOMALOUS"),
        ("synthetic:a,b", "synthetic:N_NORMAL,N_ANOMALOUS"),
        ("hdfs-csv:", "names no path"),
        (str(tmp_path), "neither sessions.jsonl nor sessions.csv"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_dataset(bad)


def test_default_source_prefers_a_prepared_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "hdfs"))
    assert default_source() == "synthetic"
    write_sessions_jsonl(load_dataset("synthetic:5,5"), tmp_path / "hdfs" / "sessions.jsonl")
    assert default_source() == f"jsonl:{tmp_path / 'hdfs'}"
    assert len(load_dataset(default_source())) == 10


def _archive(tmp_path: Path, log: Path) -> Path:
    archive = tmp_path / "upstream" / "HDFS_v1.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.write(log, "HDFS.log")
        bundle.writestr("preprocessed/anomaly_label.csv", LABELS)
        bundle.writestr("README.md", "readme")
    return archive


def test_fetch_pipeline_offline(tmp_path: Path, raw_log: Path) -> None:
    archive = _archive(tmp_path, raw_log)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    dest = fetch_hdfs(tmp_path / "data", url=archive.as_uri(), md5=md5, progress=False)
    data = load_sessions_jsonl(dest)
    assert [s.id for s in data.sessions] == ["blk_-1608999687919862906", "blk_77"]
    assert data.labels == (1, 0)
    assert not (dest / "raw").exists() and (dest / "HDFS_v1.zip").is_file()
    # A second run reuses the verified archive.
    fetch_hdfs(dest, url="file:///nonexistent/never/read.zip", md5=md5, progress=False)


def test_download_rejects_a_wrong_digest(tmp_path: Path, raw_log: Path) -> None:
    archive = _archive(tmp_path, raw_log)
    target = tmp_path / "dl" / "HDFS_v1.zip"
    with pytest.raises(ValueError, match="md5 is"):
        download(archive.as_uri(), target, md5="0" * 32, progress=False)
    assert not target.exists() and not target.with_name("HDFS_v1.zip.part").exists()
    with pytest.raises(ValueError, match="expected 1 bytes"):
        download(archive.as_uri(), target, size=1, progress=False)


def test_download_restarts_a_partial_file_when_ranges_are_unsupported(tmp_path: Path, raw_log: Path) -> None:
    archive = _archive(tmp_path, raw_log)
    target = tmp_path / "dl" / "HDFS_v1.zip"
    target.parent.mkdir()
    target.with_name("HDFS_v1.zip.part").write_bytes(b"garbage")
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert download(archive.as_uri(), target, sha256=sha, progress=False).read_bytes() == archive.read_bytes()


def test_extract_requires_both_members(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("HDFS.log", "x")
    with pytest.raises(ValueError, match="anomaly_label.csv"):
        extract_hdfs(archive, tmp_path / "out")


@pytest.mark.skipif(not (REAL / "HDFS_2k.log").is_file(), reason="real HDFS data absent")
def test_convert_raw_on_hdfs_2k(tmp_path: Path) -> None:
    out = convert_raw(REAL / "HDFS_2k.log", None, tmp_path)
    data = load_sessions_jsonl(out)
    assert data.labels is None
    assert data.sessions == parse_raw_log(REAL / "HDFS_2k.log").sessions
