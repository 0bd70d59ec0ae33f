"""Coordinator state in Redis: client registry, enrollments, runs, rounds, uploads and byte counters.

Everything the coordinator must remember lives here (or on disk in the artifact store), so a
restarted coordinator picks a run up where it was. Run documents are JSON values changed only
under a per-run Redis lock; per-round sets (expected clients, uploads) use Redis' own atomic
set/hash operations so concurrent requests cannot lose each other's updates.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import redis
from pydantic import BaseModel

from feddale.protocol.messages import PseudoLabelSummary, Role
from feddale.service.auth import hash_token, new_token, token_matches

log = logging.getLogger(__name__)

P = "feddale:"
LOCK_TTL_S = 15.0
LOCK_WAIT_S = 600.0
RunStatus = Literal["fedavg", "distill", "student_training", "published", "failed", "cancelled"]
FINAL = ("published", "failed", "cancelled")
BEATS_KEPT = 720  # a detector's recent heartbeats: an hour at the default 5 s interval


class ClientRecord(BaseModel):
    client_id: str
    name: str
    role: Role
    token_hash: str
    shard: int | None
    registered_at: float
    joined_by: Literal["bootstrap", "enrollment"] = "bootstrap"  # which credential created it (audit)


class EnrollmentRecord(BaseModel):
    """A name the admin reserved for one node; only the hash of its one-time token is kept."""

    name: str
    role: Role
    token_hash: str
    issued_at: float
    expires_at: float


class Refused(Exception):
    """A registry change the caller may not make; ``status`` is its HTTP answer (409 taken, 403 not allowed)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class RoundSummary(BaseModel):
    round: int
    kind: Literal["fedavg", "distill"]
    participants: list[str]
    dropped: list[str] = []  # uploaded, but the file could not be read when the round closed
    closed_by: Literal["all", "deadline"]
    closed_at: float


class RunRecord(BaseModel):
    run_id: str
    mode: Literal["one_shot", "few_shot"]
    status: RunStatus
    reason: str | None = None
    round: int = 0
    fedavg_rounds: int
    min_clients: int
    round_deadline_s: float
    config: dict[str, Any]
    created_at: float
    updated_at: float
    round_started_at: float | None = None
    public_digest: str
    public_count: int
    student_version: str | None = None
    job_id: str | None = None
    job_token_hash: str | None = None
    job_token_expires_at: float | None = None
    pseudo_labels: PseudoLabelSummary | None = None
    outliers: list[str] = []  # clients whose payloads disagreed with the rest
    adapter_shapes: dict[str, list[int]] | None = None  # few-shot: what every uploaded adapter must match
    history: list[RoundSummary] = []

    def round_kind(self, round_no: int | None = None) -> Literal["fedavg", "distill"]:
        return "fedavg" if (round_no or self.round) <= self.fedavg_rounds else "distill"


class Store:
    def __init__(self, r: redis.Redis, lock_ttl_s: float = LOCK_TTL_S) -> None:
        self.r = r
        self.lock_ttl_s = lock_ttl_s

    def ping(self) -> bool:
        try:
            return bool(self.r.ping())
        except redis.RedisError:
            return False

    # ----------------------------------------------------------------- clients

    def _registry_lock(self) -> redis.lock.Lock:
        return self.r.lock(P + "lock:registry", timeout=10, blocking_timeout=10)

    def _pending(self, name: str) -> EnrollmentRecord | None:
        """The unexpired enrollment reserving ``name``, if any (Redis expires the record itself)."""
        token_hash = self.r.hget(P + "enrollment_names", name)
        raw = self.r.get(P + f"enrollment:{token_hash.decode()}") if token_hash else None
        return EnrollmentRecord.model_validate_json(raw) if raw else None

    def _check_free(self, name: str) -> None:
        """409 unless ``name`` is neither registered nor reserved: a name is never taken over."""
        if self.r.hexists(P + "client_names", name):
            raise Refused(409, f"the name {name!r} is taken; a node rejoins with its own token, "
                               "and the admin frees a name with `feddale clients revoke`")
        if self._pending(name) is not None:
            raise Refused(409, f"the name {name!r} is reserved by a pending enrollment")

    def enroll(self, name: str, role: Role, ttl_s: float) -> tuple[EnrollmentRecord, str]:
        """Reserve a free ``name`` for one node with ``role``; returns the record and its one-time token.

        Only the token's hash is stored, under a key Redis deletes at expiry, so an unused token
        dies on its own. Enrolling a revoked name re-admits it (the admin decided so).
        """
        token = new_token()
        now = time.time()
        with self._registry_lock():
            self._check_free(name)
            record = EnrollmentRecord(name=name, role=role, token_hash=hash_token(token), issued_at=now,
                                      expires_at=now + ttl_s)
            pipe = self.r.pipeline()
            pipe.set(P + f"enrollment:{record.token_hash}", record.model_dump_json(), px=max(1, int(ttl_s * 1000)))
            pipe.hset(P + "enrollment_names", name, record.token_hash)
            pipe.srem(P + "revoked_names", name)
            pipe.execute()
        return record, token

    def register(self, name: str, role: Role, num_shards: int) -> tuple[ClientRecord, str]:
        """A new identity for a holder of the bootstrap secret: never a taken, reserved or revoked name."""
        with self._registry_lock():
            if self.r.sismember(P + "revoked_names", name):
                raise Refused(403, f"the name {name!r} was revoked; the admin must enroll it again")
            self._check_free(name)
            pipe = self.r.pipeline()
            created = self._create(pipe, name, role, num_shards, "bootstrap")
            pipe.execute()
            return created

    def redeem(self, token: str, num_shards: int, *, name: str | None = None,
               role: Role | None = None) -> tuple[ClientRecord, str] | None:
        """Exchange an enrollment token for the identity it reserved; None when it is unknown, used or expired.

        Name and role come from the enrollment; a caller asking for others is refused before the
        token is spent. The enrollment is deleted in the same transaction that creates the
        identity, so a token works exactly once.
        """
        token_hash = hash_token(token)
        with self._registry_lock():
            raw = self.r.get(P + f"enrollment:{token_hash}")
            if raw is None:
                return None
            enrollment = EnrollmentRecord.model_validate_json(raw)
            if role not in (None, enrollment.role) or name not in (None, enrollment.name):
                raise Refused(403, f"this enrollment token is for {enrollment.role} {enrollment.name!r}; "
                                   "name and role are fixed by the admin")
            if self.r.hexists(P + "client_names", enrollment.name):  # cannot happen: the name was reserved
                raise Refused(409, f"the name {enrollment.name!r} is taken")
            pipe = self.r.pipeline()
            pipe.delete(P + f"enrollment:{token_hash}")
            pipe.hdel(P + "enrollment_names", enrollment.name)
            created = self._create(pipe, enrollment.name, enrollment.role, num_shards, "enrollment")
            pipe.execute()
            return created

    def _create(self, pipe: redis.client.Pipeline, name: str, role: Role, num_shards: int,
                joined_by: Literal["bootstrap", "enrollment"]) -> tuple[ClientRecord, str]:
        """A new identity for ``name``, written by ``pipe`` (the caller holds the registry lock).

        N fresh replicas get N distinct shards: the lowest shard nobody holds, or, once all are
        held, round-robin (more replicas than shards share shards).
        """
        client_id = f"{role[0]}-{uuid.uuid4().hex[:12]}"
        shard = None
        if role == "client":
            held = [c.shard for c in self.clients("client") if c.shard is not None]
            free = [s for s in range(num_shards) if s not in held]
            shard = free[0] if free else len(held) % num_shards
        token = f"{client_id}.{new_token()}"
        record = ClientRecord(
            client_id=client_id, name=name, role=role, token_hash=hash_token(token),
            shard=shard, registered_at=time.time(), joined_by=joined_by,
        )
        pipe.hset(P + "clients", client_id, record.model_dump_json())
        pipe.hset(P + "client_names", name, client_id)
        return record, token

    def revoke(self, name: str) -> tuple[ClientRecord | None, EnrollmentRecord | None]:
        """Delete ``name``'s identity and any pending enrollment: its token gets 401 from now on.

        The name is free for the admin's next enrollment, but the bootstrap secret can no longer
        claim it, or a revoked node holding that secret would simply register again.
        """
        with self._registry_lock():
            client_id = self.r.hget(P + "client_names", name)
            record = self.client(client_id.decode()) if client_id else None
            pending = self._pending(name)
            if record is None and pending is None:
                return None, None
            pipe = self.r.pipeline()
            pipe.hdel(P + "client_names", name)
            if record is not None:
                pipe.hdel(P + "clients", record.client_id)
                pipe.zrem(P + "last_seen", record.client_id)
            if pending is not None:
                pipe.delete(P + f"enrollment:{pending.token_hash}")
                pipe.hdel(P + "enrollment_names", name)
            pipe.sadd(P + "revoked_names", name)
            pipe.execute()
            return record, pending

    def client(self, client_id: str) -> ClientRecord | None:
        raw = self.r.hget(P + "clients", client_id)
        return ClientRecord.model_validate_json(raw) if raw else None

    def authenticate(self, token: str) -> ClientRecord | None:
        """The registered principal a token belongs to, or None (constant-time hash compare)."""
        client_id, sep, _ = token.partition(".")
        if not sep:
            return None
        record = self.client(client_id)
        if record is None or not token_matches(token, record.token_hash):
            return None
        return record

    def clients(self, role: Role | None = None) -> list[ClientRecord]:
        records = [ClientRecord.model_validate_json(v) for v in self.r.hvals(P + "clients")]
        return sorted((c for c in records if role is None or c.role == role), key=lambda c: c.registered_at)

    def touch(self, client_id: str) -> None:
        self.r.zadd(P + "last_seen", {client_id: time.time()})

    def alive(self, ttl_s: float) -> set[str]:
        since = time.time() - ttl_s
        return {m.decode() for m in self.r.zrangebyscore(P + "last_seen", since, "+inf")}

    def beat(self, client_id: str, status: dict[str, Any], series: bool) -> None:
        """Record a heartbeat: seen now, its status kept; ``series`` also appends it to the principal's
        recent beats (detectors' counters, which the dashboard turns into rates)."""
        now = time.time()
        pipe = self.r.pipeline()
        pipe.zadd(P + "last_seen", {client_id: now})
        pipe.hset(P + "status", client_id, json.dumps({**status, "at": now}))
        if series:
            pipe.rpush(P + f"beats:{client_id}", json.dumps({**status, "at": now}))
            pipe.ltrim(P + f"beats:{client_id}", -BEATS_KEPT, -1)
        pipe.execute()

    def last_seen(self) -> dict[str, float]:
        return {m.decode(): float(t) for m, t in self.r.zrange(P + "last_seen", 0, -1, withscores=True)}

    def statuses(self) -> dict[str, dict[str, Any]]:
        """The latest heartbeat of every principal that sent one."""
        return {k.decode(): json.loads(v) for k, v in self.r.hgetall(P + "status").items()}

    def beats(self, client_id: str) -> list[dict[str, Any]]:
        """A principal's recent heartbeats (at most ``BEATS_KEPT``), oldest first."""
        return [json.loads(v) for v in self.r.lrange(P + f"beats:{client_id}", 0, -1)]

    # ----------------------------------------------------------------- runs

    @contextmanager
    def run_lock(self, run_id: str) -> Iterator[None]:
        """The run's Redis lock, held for as long as the block runs, and no longer than its holder lives.

        The lock expires ``lock_ttl_s`` after its last renewal and a helper thread renews it
        while the block runs, so a long section (loading a teacher, FedAvg over many adapters)
        keeps it, while a coordinator killed inside the block (SIGKILL, OOM, node loss) leaves
        a lock that frees itself within seconds: the restarted coordinator is not locked out
        of its own run.
        """
        lock = self.r.lock(P + f"lock:run:{run_id}", timeout=self.lock_ttl_s, blocking_timeout=LOCK_WAIT_S,
                           thread_local=False)  # the renewer thread must see the token
        if not lock.acquire():
            raise redis.exceptions.LockError(f"run {run_id} stayed locked for {LOCK_WAIT_S:g} s")
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.lock_ttl_s / 3):
                try:
                    lock.reacquire()
                except redis.RedisError as exc:  # Redis away, or the lock already lost: say so
                    log.warning("could not renew the lock of run %s: %s", run_id, exc)

        renewer = threading.Thread(target=renew, name=f"lock-{run_id}", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            done.set()
            renewer.join()
            try:
                lock.release()
            except redis.exceptions.LockNotOwnedError:
                log.warning("the lock of run %s expired while held", run_id)

    def claim_active(self, run_id: str) -> bool:
        """Make ``run_id`` the one active run; False when another run is still going."""
        return bool(self.r.set(P + "active_run", run_id, nx=True))

    def active_run_id(self) -> str | None:
        raw = self.r.get(P + "active_run")
        return raw.decode() if raw else None

    def release_active(self, run_id: str) -> None:
        pipe = self.r.pipeline()
        pipe.watch(P + "active_run")
        if pipe.get(P + "active_run") == run_id.encode():
            pipe.multi()
            pipe.delete(P + "active_run")
            pipe.execute()
        else:
            pipe.reset()

    def save_run(self, run: RunRecord) -> None:
        run.updated_at = time.time()
        pipe = self.r.pipeline()
        pipe.set(P + f"run:{run.run_id}", run.model_dump_json())
        pipe.zadd(P + "runs", {run.run_id: run.created_at}, nx=True)
        pipe.execute()

    def run(self, run_id: str) -> RunRecord | None:
        raw = self.r.get(P + f"run:{run_id}")
        return RunRecord.model_validate_json(raw) if raw else None

    def run_ids(self) -> list[str]:
        return [m.decode() for m in self.r.zrange(P + "runs", 0, -1)]

    # ----------------------------------------------------------------- rounds

    def expect(self, run_id: str, round_no: int, client_ids: set[str] | list[str]) -> None:
        if client_ids:
            self.r.sadd(P + f"run:{run_id}:round:{round_no}:expected", *client_ids)

    def expected(self, run_id: str, round_no: int) -> set[str]:
        return {m.decode() for m in self.r.smembers(P + f"run:{run_id}:round:{round_no}:expected")}

    def leave_round(self, run_id: str, round_no: int, client_id: str) -> None:
        """``client_id`` is neither waited for nor counted in this round (a revoked client)."""
        pipe = self.r.pipeline()
        pipe.srem(P + f"run:{run_id}:round:{round_no}:expected", client_id)
        pipe.hdel(P + f"run:{run_id}:round:{round_no}:uploads", client_id)
        pipe.execute()

    def put_upload(self, run_id: str, round_no: int, client_id: str, info: dict[str, Any]) -> None:
        """Record an accepted upload; a repeat from the same client overwrites (counted once)."""
        self.r.hset(P + f"run:{run_id}:round:{round_no}:uploads", client_id, json.dumps(info))

    def uploads(self, run_id: str, round_no: int) -> dict[str, dict[str, Any]]:
        raw = self.r.hgetall(P + f"run:{run_id}:round:{round_no}:uploads")
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def add_bytes(self, run_id: str, client_id: str, *, up: int = 0, down: int = 0) -> None:
        pipe = self.r.pipeline()
        if up:
            pipe.hincrby(P + f"run:{run_id}:bytes", f"{client_id}:up", up)
        if down:
            pipe.hincrby(P + f"run:{run_id}:bytes", f"{client_id}:down", down)
        pipe.execute()

    def bytes(self, run_id: str) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for field, value in self.r.hgetall(P + f"run:{run_id}:bytes").items():
            client_id, _, direction = field.decode().rpartition(":")
            out.setdefault(client_id, {"up": 0, "down": 0})[direction] = int(value)
        return out

    # ----------------------------------------------------------------- students and public sets

    def publish_student(self, info: dict[str, Any]) -> None:
        pipe = self.r.pipeline()
        pipe.hset(P + "students", info["version"], json.dumps(info))
        pipe.set(P + "student:latest", info["version"])
        pipe.execute()

    def student(self, version: str) -> dict[str, Any] | None:
        raw = self.r.hget(P + "students", version)
        return json.loads(raw) if raw else None

    def latest_student(self) -> dict[str, Any] | None:
        version = self.r.get(P + "student:latest")
        return self.student(version.decode()) if version else None
