"""Liveness: `POST /v1/heartbeat`, the one request every client node and detector makes on a timer.

A node used to count as alive only when it polled for tasks, which it does between training
steps, so a node busy training for minutes read as dead. Nodes now beat from a thread of their
own every ``interval_s`` (a quarter of the TTL, at most 5 s), whatever their work loop is doing;
a node is alive while its last request of any kind is younger than FEDDALE_CLIENT_TTL_S.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Depends

from feddale.protocol.messages import Heartbeat, HeartbeatAck

from feddale_coordinator.store import ClientRecord, Store

MAX_INTERVAL_S = 5.0


def beat_interval(ttl_s: float) -> float:
    """How often nodes beat: four beats per TTL, so one or two lost beats never read as a dead node."""
    return min(ttl_s / 4, MAX_INTERVAL_S)


def liveness_router(store: Store, ttl_s: float, principal: Callable[..., ClientRecord]) -> APIRouter:
    router = APIRouter(tags=["clients"])

    @router.post("/v1/heartbeat", response_model=HeartbeatAck)
    def heartbeat(body: Heartbeat, who: ClientRecord = Depends(principal)) -> HeartbeatAck:
        """A client node or detector is alive; its status is kept for `GET /v1/clients` and the dashboard."""
        store.beat(who.client_id, body.model_dump(mode="json"), series=body.detector is not None)
        return HeartbeatAck(interval_s=beat_interval(ttl_s), ttl_s=ttl_s)

    return router
