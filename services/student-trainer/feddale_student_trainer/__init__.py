"""FedDALE student-trainer: an RQ worker whose job filters pseudo-labels from the clients'
accuracy payloads and trains the student, talking to the coordinator only over HTTP."""
