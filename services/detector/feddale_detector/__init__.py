"""FedDALE detector: serves the latest published student over REST (`POST /v1/detect`)."""
