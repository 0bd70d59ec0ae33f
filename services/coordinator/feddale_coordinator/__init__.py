"""FedDALE coordinator: client registry, runs and rounds in Redis, artifacts on disk, FedAvg,
student work on RQ, student publishing. It never sees a raw log line or a label."""
