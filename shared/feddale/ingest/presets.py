"""Built-in sources for the 15 Loghub-2k systems and BGL, by lowercase system name.

The line formats are Loghub's (the notation of the log-parsing benchmarks); they ship here, in
the package, so a preset works on a machine without the Loghub data. Session rules follow what
each system logs: HDFS by block id and OpenStack by instance id (the id is in the message);
the rest by time window per node, host or process, the usual way to cut continuous system logs
into sessions. The timestamp formats were checked against the Loghub-2k samples
(``tests/test_ingest_presets.py``). Nothing here is tuned per line or per system beyond that:
template mining uses one global setting (:class:`feddale.ingest.templates.MinerSettings`).
"""

from __future__ import annotations

from typing import Any

from feddale.ingest.sources import Source, build_source

_MINUTE = 60.0

PRESETS: dict[str, dict[str, Any]] = {
    "hdfs": {
        "format": "<Date> <Time> <Pid> <Level> <Component>: <Content>",
        "key": r"blk_-?\d+",
        "timestamp": {"fields": ["Date", "Time"], "format": "%y%m%d %H%M%S"},
    },
    "hadoop": {
        "format": r"<Date> <Time> <Level> \[<Process>\] <Component>: <Content>",
        "timestamp": {"fields": ["Date", "Time"], "format": "%Y-%m-%d %H:%M:%S,%f"},
        "window": {"by": "Process", "seconds": _MINUTE},
    },
    "spark": {
        "format": "<Date> <Time> <Level> <Component>: <Content>",
        "timestamp": {"fields": ["Date", "Time"], "format": "%y/%m/%d %H:%M:%S"},
        "window": {"by": None, "seconds": _MINUTE},
    },
    "zookeeper": {
        "format": r"<Date> <Time> - <Level>  \[<Node>:<Component>@<Id>\] - <Content>",
        "timestamp": {"fields": ["Date", "Time"], "format": "%Y-%m-%d %H:%M:%S,%f"},
        "window": {"by": "Node", "seconds": _MINUTE},
    },
    "hpc": {
        "format": "<LogId> <Node> <Component> <State> <Time> <Flag> <Content>",
        "timestamp": {"fields": ["Time"], "format": "epoch"},
        "window": {"by": "Node", "seconds": _MINUTE},
    },
    "thunderbird": {
        "format": (
            r"<Label> <Timestamp> <Date> <User> <Month> <Day> <Time> <Location> "
            r"<Component>(\[<PID>\])?: <Content>"
        ),
        "timestamp": {"fields": ["Timestamp"], "format": "epoch"},
        "window": {"by": "User", "seconds": _MINUTE},  # Loghub's "User" column is the node
        "label_field": "Label",
        "normal_label": "-",
    },
    "bgl": {
        "format": (
            "<Label> <Timestamp> <Date> <Node> <Time> <NodeRepeat> <Type> <Component> "
            "<Level> <Content>"
        ),
        "timestamp": {"fields": ["Timestamp"], "format": "epoch"},
        "window": {"by": "Node", "seconds": _MINUTE},
        "label_field": "Label",
        "normal_label": "-",
    },
    "windows": {
        "format": "<Date> <Time>, <Level>                  <Component>    <Content>",
        "timestamp": {"fields": ["Date", "Time"], "format": "%Y-%m-%d %H:%M:%S"},
        "window": {"by": "Component", "seconds": _MINUTE},
    },
    "linux": {
        "format": r"<Month> <Date> <Time> <Level> <Component>(\[<PID>\])?: <Content>",
        "timestamp": {"fields": ["Month", "Date", "Time"], "format": "%b %d %H:%M:%S"},
        "window": {"by": "Level", "seconds": _MINUTE},  # Loghub's "Level" column is the host
    },
    "android": {
        "format": "<Date> <Time>  <Pid>  <Tid> <Level> <Component>: <Content>",
        "timestamp": {"fields": ["Date", "Time"], "format": "%m-%d %H:%M:%S.%f"},
        "window": {"by": "Pid", "seconds": _MINUTE},
    },
    "healthapp": {
        "format": r"<Time>\|<Component>\|<Pid>\|<Content>",
        "timestamp": {"fields": ["Time"], "format": "%Y%m%d-%H:%M:%S:%f"},
        "window": {"by": "Pid", "seconds": _MINUTE},
    },
    "apache": {
        "format": r"\[<Time>\] \[<Level>\] <Content>",
        "timestamp": {"fields": ["Time"], "format": "%a %b %d %H:%M:%S %Y"},
        "window": {"by": None, "seconds": _MINUTE},
    },
    "openssh": {
        "format": r"<Date> <Day> <Time> <Component> sshd\[<Pid>\]: <Content>",
        "timestamp": {"fields": ["Date", "Day", "Time"], "format": "%b %d %H:%M:%S"},
        "window": {"by": "Pid", "seconds": _MINUTE},  # one sshd process serves one connection
    },
    "openstack": {
        "format": r"<Logrecord> <Date> <Time> <Pid> <Level> <Component> \[<ADDR>\] <Content>",
        "key": r"instance: ([0-9a-f-]{36})",
        "timestamp": {"fields": ["Date", "Time"], "format": "%Y-%m-%d %H:%M:%S.%f"},
    },
    "mac": {
        "format": r"<Month>  <Date> <Time> <User> <Component>\[<PID>\]( \(<Address>\))?: <Content>",
        "timestamp": {"fields": ["Month", "Date", "Time"], "format": "%b %d %H:%M:%S"},
        "window": {"by": "Component", "seconds": _MINUTE},
    },
    "proxifier": {
        "format": r"\[<Time>\] <Program> - <Content>",
        "timestamp": {"fields": ["Time"], "format": "%m.%d %H:%M:%S"},
        "window": {"by": "Program", "seconds": _MINUTE},
    },
}

# The Loghub-2k folder name of each preset (bench-parse walks these).
LOGHUB_NAMES: dict[str, str] = {
    "hdfs": "HDFS", "hadoop": "Hadoop", "spark": "Spark", "zookeeper": "Zookeeper", "hpc": "HPC",
    "thunderbird": "Thunderbird", "windows": "Windows", "linux": "Linux", "android": "Android",
    "healthapp": "HealthApp", "apache": "Apache", "openssh": "OpenSSH", "openstack": "OpenStack",
    "mac": "Mac", "proxifier": "Proxifier", "bgl": "BGL",
}


def preset_document(name: str) -> dict[str, Any]:
    """The settings of a preset as a plain document (``name`` included)."""
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return {"name": key, **PRESETS[key]}


def preset(name: str) -> Source:
    """The built-in source for a system, by its name (case-insensitive)."""
    return build_source(preset_document(name), f"preset {name}")
