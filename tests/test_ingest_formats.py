"""Loghub <Field> line formats: compiling, matching, refusing bad formats, bounded matching."""

import time

import pytest

from feddale.ingest.formats import FormatError, compile_format


def test_fields_and_content_are_split():
    fmt = compile_format("<Date> <Time> <Level> <Component>: <Content>")
    assert fmt.fields == ("Date", "Time", "Level", "Component", "Content")
    assert fmt.split("2024-01-02 10:00:01 INFO app.Main: started in 3 ms  ") == {
        "Date": "2024-01-02", "Time": "10:00:01", "Level": "INFO", "Component": "app.Main",
        "Content": "started in 3 ms",
    }


def test_runs_of_spaces_match_any_whitespace_and_optional_groups_give_empty_fields():
    fmt = compile_format(r"<Month>  <Day> <Component>(\[<PID>\])?: <Content>")
    assert fmt.split("Jun\t14 sshd[19939]: hello")["PID"] == "19939"
    without = fmt.split("Jun 14 kernel: hello")
    assert without is not None and without["PID"] == "" and without["Component"] == "kernel"


def test_a_field_followed_by_a_literal_may_hold_spaces():
    fmt = compile_format(r"\[<Time>\] <Program> - <Content>")
    assert fmt.split("[10.30 16:49:06] chrome.exe *64 - open through proxy")["Program"] == "chrome.exe *64"


def test_a_line_in_another_format_does_not_match():
    assert compile_format("<Date> <Time> <Level>: <Content>").split("no colon here at all") is None


@pytest.mark.parametrize(
    "text, reason",
    [
        ("<Date> <Time>", "no <Content>"),
        ("", "empty"),
        ("<Content> <Content>", "more than once"),
        ("<Date> ([ <Content>", "not a valid pattern"),
        ("<Time> [<Thread>] <Content>", "escape literal brackets"),
    ],
)
def test_unusable_formats_are_refused_with_the_reason(text, reason):
    with pytest.raises(FormatError, match=reason):
        compile_format(text)


@pytest.mark.parametrize(
    "line",
    ["a " * 500_000, "[] [] " * 150_000, ": " * 400_000, "a - " * 200_000, "x" * 1_000_000],
)
def test_a_megabyte_line_cannot_make_the_matcher_backtrack_for_long(line):
    formats = [
        "<Date> <Time> <Pid> <Level> <Component>: <Content>",
        r"\[<Time>\] \[<Level>\] <Content>",
        r"<Date> <Time> - <Level>  \[<Node>:<Component>@<Id>\] - <Content>",
        r"\[<Time>\] <Program> - <Content>",
    ]
    for text in formats:
        start = time.perf_counter()
        compile_format(text).split(line)
        assert time.perf_counter() - start < 1.0, text
