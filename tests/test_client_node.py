"""The client node's own-log detection: a newly published student scores the node's private sessions."""

from __future__ import annotations

import httpx

from feddale.data.types import Session
from feddale.method.config import StudentConfig
from feddale.method.student import train_student
from feddale.service.http import CoordinatorSession
from feddale.service.observability import Metrics
from feddale.service.serving import load_student

from feddale_client_node.agent import FLAGGED_IDS_SHOWN, ClientAgent

NORMAL = ["Receiving block blk_<*> src: /<*> dest: /<*>", "PacketResponder <*> for block blk_<*> terminating"]
ANOMALOUS = ["Got exception while serving blk_<*> to /<*>:", "writeBlock blk_<*> received exception"]


def test_a_new_student_scores_the_nodes_own_sessions() -> None:
    cfg = StudentConfig(base="tiny:bert", steps=30, batch_size=4, micro_batch=4, max_len=32, lr=1e-2, onnx=False)
    model = load_student(train_student(NORMAL + ANOMALOUS, [0, 0, 1, 1], cfg, progress=False).to_bytes())
    session = CoordinatorSession("http://coordinator", "secret", "node", "client",
                                 transport=httpx.MockTransport(lambda request: httpx.Response(503)))
    metrics = Metrics("t")
    agent = ClientAgent(session, metrics=metrics)
    agent.sessions = tuple(
        Session(id=f"s{i}", messages=(NORMAL[i % 2],) if i % 3 else (ANOMALOUS[i % 2],)) for i in range(150)
    )

    agent.detect_own_logs(model)

    probs = model.detector.predict_proba([s.messages for s in agent.sessions])
    flagged = [s.id for s, p in zip(agent.sessions, probs) if p >= model.detector.threshold]
    report = agent.report
    assert report is not None and report["model_version"] == model.version
    assert report["sessions"] == 150 and report["flagged"] == len(flagged)
    assert report["flagged_ids"] == flagged[:FLAGGED_IDS_SHOWN]
    assert metrics.value("own_sessions_flagged") == len(flagged)
    assert 0 < len(flagged) < 150  # the student tells the two kinds apart
