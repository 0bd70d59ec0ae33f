"""Template ids for masked messages: Drain3, refined, and kept on disk per source.

Drain3 (He et al.'s Drain as a streaming library) groups messages of one length whose tokens
mostly agree, and turns the tokens that differ into ``<*>``. On the Loghub-2k benchmark stock
Drain3 groups about three lines in four correctly (``feddale logs bench-parse``); its two
systematic mistakes, and what this module does about them:

* **Words that name different events become a wildcard.** ``VM Started`` / ``VM Resumed`` /
  ``VM Paused`` differ in one token of seven, so Drain merges them; a user name is a one-token
  difference too, but a real variable. What tells them apart is how many values the position
  takes: a handful of words are event names, dozens are data. Each cluster keeps, per position,
  the distinct words seen there up to ``max_values``; while a position has no more than that, a
  line's word there stays part of its template (and of its id). Past that, the position is a
  variable for good. A ``key=`` or ``key:`` prefix that all values share stays in the template
  (``user=<*>``, not ``<*>``), so ``... rhost=<*> user=<*>`` is not ``... rhost=<*>``.
* **Optional variables change the token count.** ``bytes sent`` vs ``bytes (1.2 KB) sent``, or
  ``from host ()`` vs ``from host (name)``: Drain only compares messages of equal length, so one
  event becomes several clusters. Templates that are the same text once their variables and
  the brackets left empty by them are removed get one id.

The similarity threshold and tree depth are one global setting, chosen on the benchmark as a
whole, not per system (0.6 and 4; Drain3's defaults are 0.4 and 4, which merge too much once
the messages are masked well).

Ids are ``T1``, ``T2``, ... in order of first appearance and never change meaning; with a
``state_dir`` the Drain3 snapshot (Drain3's own persistence format) and this module's
refinement state are written there, so a restart continues with the same ids.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from drain3 import TemplateMiner
from drain3.persistence_handler import PersistenceHandler
from drain3.template_miner_config import TemplateMinerConfig
from pydantic import BaseModel, ConfigDict, Field

from feddale.method.preprocess import WILDCARD

# Drain3 logs each miner's start at INFO; one per source and command is noise on a CLI's stderr.
logging.getLogger("drain3").setLevel(logging.WARNING)

_EMPTY_BRACKETS = re.compile(r"\(\s*\)|\[\s*\]|\{\s*\}")
_STATE_VERSION = 1


class MinerSettings(BaseModel):
    """How templates are mined; the same for every system (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    sim_th: float = Field(0.6, gt=0.0, le=1.0, description="Drain similarity threshold")
    depth: int = Field(4, ge=3, le=20, description="Drain prefix-tree depth")
    max_children: int = Field(100, ge=2, description="Drain children per tree node")
    max_values: int = Field(
        4, ge=0, le=64,
        description="a position with at most this many distinct words keeps them in the template",
    )


@dataclass(frozen=True)
class TemplateMatch:
    """What one message was matched to."""

    template_id: str
    template: str
    cluster_id: int  # the Drain3 cluster, before refinement


@dataclass
class _Position:
    """What one wildcard position of a cluster has seen: a few words, or many, and their prefix."""

    values: set[str] | None = field(default_factory=set)  # None: too many to be event names
    prefix: str | None = None

    def observe(self, token: str, limit: int) -> None:
        """Count one more token seen here (``limit``: the most words that still name events)."""
        if self.values is not None and WILDCARD not in token and token not in self.values:
            self.values.add(token)
            if len(self.values) > limit:
                self.values = None
        if self.prefix is None:
            self.prefix = token
        elif self.prefix and not token.startswith(self.prefix):
            self.prefix = os.path.commonprefix([self.prefix, token])

    def slot(self, token: str) -> str:
        """What this position contributes to the template of a line with ``token`` there."""
        if self.values is not None and WILDCARD not in token:
            return token
        prefix = self.prefix or ""
        cut = max(prefix.rfind("="), prefix.rfind(":"))
        return prefix[: cut + 1] + WILDCARD if cut > 0 else WILDCARD


@dataclass
class _Cluster:
    """Refinement state of one Drain3 cluster.

    Only wildcard positions need statistics: every line so far had the template's own token at
    a constant position, so when Drain turns it into a wildcard, that token is all it has seen.
    ``matches`` caches the result per combination of slots; it is cleared when the template
    changes, so it never answers from an older template.
    """

    template: tuple[str, ...]
    positions: dict[int, _Position]
    matches: dict[tuple[str, ...], TemplateMatch] = field(default_factory=dict)
    wildcards: list[int] = field(default_factory=list)  # sorted keys of positions

    def __post_init__(self) -> None:
        self.wildcards = sorted(self.positions)

    def follow(self, template: tuple[str, ...], limit: int) -> None:
        """Catch up with a template Drain3 just generalised."""
        for index, (old, new) in enumerate(zip(self.template, template)):
            if new == WILDCARD and index not in self.positions:
                position = self.positions[index] = _Position()
                position.observe(old, limit)
        self.template = template
        self.wildcards = sorted(self.positions)
        self.matches.clear()


_MATCH_CACHE = 4096  # combinations of slots remembered per cluster


class _AtomicFile(PersistenceHandler):
    """Drain3's file persistence, written through a temporary file and a rename, so a crash
    while saving leaves the previous snapshot instead of half a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def save_state(self, state: bytes) -> None:
        _write_atomic(self.path, state)

    def load_state(self) -> bytes | None:
        return self.path.read_bytes() if self.path.is_file() else None


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False)
    try:
        with handle:
            handle.write(data)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def template_key(template: str) -> str:
    """The text of a template without its variables: templates with the same key are one event."""
    return " ".join(_EMPTY_BRACKETS.sub("", template.replace(WILDCARD, "")).split())


class TemplateStore:
    """Assigns template ids to masked messages as they stream in.

    ``add`` learns from the message; ``resolve`` re-reads a message seen earlier under what the
    store knows now (templates generalise as lines arrive, so a batch job such as the parsing
    benchmark asks again at the end). Not thread-safe: one store per source and process.
    """

    DRAIN_FILE = "drain3.state"
    REFINE_FILE = "refinement.json"

    def __init__(self, settings: MinerSettings | None = None, state_dir: str | os.PathLike[str] | None = None):
        self.settings = settings or MinerSettings()
        config = TemplateMinerConfig()
        config.drain_sim_th = self.settings.sim_th
        config.drain_depth = self.settings.depth
        config.drain_max_children = self.settings.max_children
        config.masking_instructions = []  # messages arrive masked (feddale.ingest.masking)
        # No persistence handler while mining: Drain3 would snapshot the whole tree on every new
        # cluster. The store saves when asked (save()), through the same Drain3 format.
        self._miner = TemplateMiner(config=config)
        self._clusters: dict[int, _Cluster] = {}
        self._ids: dict[str, str] = {}
        self._state_dir = Path(state_dir) if state_dir is not None else None
        if self._state_dir is not None:
            self._load()

    @property
    def template_count(self) -> int:
        """Distinct template ids handed out so far."""
        return len(self._ids)

    def add(self, masked: str) -> TemplateMatch:
        """Learn from one masked message and return its template id and template."""
        # Straight to the Drain tree: TemplateMiner.add_log_message would mask (nothing to do
        # here), profile and build a result dict per line, a third of the mining time.
        drained, _ = self._miner.drain.add_log_message(masked)
        cluster_id = int(drained.cluster_id)
        template = drained.log_template_tokens
        tokens = masked.split()
        cluster = self._clusters.get(cluster_id)
        if cluster is None:
            cluster = self._clusters[cluster_id] = _Cluster(
                tuple(template), {i: _Position() for i, t in enumerate(template) if t == WILDCARD}
            )
        elif template != cluster.template:
            cluster.follow(tuple(template), self.settings.max_values)
        limit = self.settings.max_values
        for index, position in cluster.positions.items():
            position.observe(tokens[index], limit)
        return self._refine(cluster_id, cluster, tokens)

    def resolve(self, cluster_id: int, masked: str) -> TemplateMatch:
        """The id a message added earlier (to ``cluster_id``) has under the current state."""
        return self._refine(cluster_id, self._clusters[cluster_id], masked.split())

    def _refine(self, cluster_id: int, cluster: _Cluster, tokens: list[str]) -> TemplateMatch:
        slots = tuple(cluster.positions[i].slot(tokens[i]) for i in cluster.wildcards)
        found = cluster.matches.get(slots)
        if found is not None:
            return found
        out = list(cluster.template)
        for index, slot in zip(cluster.wildcards, slots):
            out[index] = slot
        template = " ".join(out)
        key = template_key(template)
        template_id = self._ids.get(key)
        if template_id is None:
            template_id = self._ids[key] = f"T{len(self._ids) + 1}"
        if len(cluster.matches) >= _MATCH_CACHE:
            cluster.matches.clear()
        found = cluster.matches[slots] = TemplateMatch(template_id, template, cluster_id)
        return found

    # --- persistence ---------------------------------------------------------------------

    def save(self) -> None:
        """Write the Drain3 snapshot and the refinement state to the state folder (atomic each)."""
        if self._state_dir is None:
            return
        self._miner.persistence_handler = _AtomicFile(self._state_dir / self.DRAIN_FILE)
        try:
            self._miner.save_state("feddale save")
        finally:
            self._miner.persistence_handler = None
        state = {
            "version": _STATE_VERSION,
            "settings": self.settings.model_dump(),
            "ids": self._ids,
            "clusters": {
                str(cid): {
                    "template": list(cluster.template),
                    "positions": {
                        str(i): [sorted(p.values) if p.values is not None else None, p.prefix]
                        for i, p in cluster.positions.items()
                    },
                }
                for cid, cluster in self._clusters.items()
            },
        }
        _write_atomic(self._state_dir / self.REFINE_FILE, json.dumps(state).encode("utf-8"))

    def _load(self) -> None:
        assert self._state_dir is not None
        drain_file = self._state_dir / self.DRAIN_FILE
        refine_file = self._state_dir / self.REFINE_FILE
        if not drain_file.exists() and not refine_file.exists():
            return
        if not (drain_file.is_file() and refine_file.is_file()):
            raise ValueError(
                f"template state in {self._state_dir} is incomplete (need {self.DRAIN_FILE} and "
                f"{self.REFINE_FILE}); remove the folder to start afresh"
            )
        try:
            state = json.loads(refine_file.read_bytes())
            if state.get("version") != _STATE_VERSION:
                raise ValueError(f"unknown state version {state.get('version')!r}")
            saved = MinerSettings(**state["settings"])
            clusters = {
                int(cid): _Cluster(
                    tuple(entry["template"]),
                    {
                        int(i): _Position(set(values) if values is not None else None, prefix)
                        for i, (values, prefix) in entry["positions"].items()
                    },
                )
                for cid, entry in state["clusters"].items()
            }
            ids = {str(k): str(v) for k, v in state["ids"].items()}
            self._miner.persistence_handler = _AtomicFile(drain_file)
            self._miner.load_state()
        except Exception as error:  # a corrupt or foreign file, whatever the parser raised
            raise ValueError(f"cannot read template state in {self._state_dir}: {error}") from None
        finally:
            self._miner.persistence_handler = None
        if saved != self.settings:
            raise ValueError(
                f"template state in {self._state_dir} was mined with {saved.model_dump()}, "
                f"not {self.settings.model_dump()}; use the same settings or another state folder"
            )
        drained = self._miner.drain.id_to_cluster
        if set(clusters) != set(drained) or any(
            c.template != tuple(drained[cid].log_template_tokens) for cid, c in clusters.items()
        ):
            raise ValueError(f"template state in {self._state_dir}: the two files do not belong together")
        self._clusters, self._ids = clusters, ids
