"""FedDALE client node: trains a teacher on private logs and uploads only adapters or compact
accuracy payloads; serves /v1/detect on its own logs with the published student."""
