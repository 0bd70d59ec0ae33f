"""FedDALE core library: federated, unsupervised log anomaly detection with small LMs."""
__version__ = "0.1.0"
