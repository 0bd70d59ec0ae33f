"""What every process of one deployed federation must agree on: the data split.

In a local or `--scale` deployment the client nodes share one data set and each takes its own
shard; the coordinator takes the public set from the same split and the demo harness the test
split. They only agree if they build the split from the same source, parameters and seed, so
that construction lives here once. The coordinator hands its `DataConfig` and seed to each
client at registration; a node with its own log directory ignores the split entirely.
"""

from __future__ import annotations

from feddale.method.config import DataConfig
from feddale.data.sources import default_source, load_dataset
from feddale.data.splits import make_split
from feddale.data.types import FederationSplit, Session, texts_digest


def resolve_source(data: DataConfig, override: str | None = None) -> str:
    """The data source spec to load: an explicit override, the config's, or the best available."""
    source = override or data.source
    return default_source() if source == "auto" else source


def federation_split(data: DataConfig, seed: int, source: str | None = None) -> FederationSplit:
    """The deterministic split every process of a deployment derives from the same inputs."""
    dataset = load_dataset(resolve_source(data, source), seed=seed)
    return make_split(
        dataset,
        data.n_clients,
        public=data.public,
        test=data.test,
        validation=data.validation,
        natural=data.natural,
        client_anomaly_rate=data.client_anomaly_rate,
        partition=data.partition,
        dirichlet_alpha=data.dirichlet_alpha,
        max_client_sessions=data.max_client_sessions,
        seed=seed,
    )


def public_digest(sessions: tuple[Session, ...] | list[Session]) -> str:
    """The digest that names a public set on the wire (over the texts the teachers score)."""
    return texts_digest([s.text for s in sessions])
