"""Operating FedDALE: the command line and the local process launcher."""
