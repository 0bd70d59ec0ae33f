"""The round protocol: what crosses the wire (``messages``) and what each side does in a round (``rounds``).

The simulator, the benchmark and the four services all drive the same functions in ``rounds``;
only the transport differs (in-process calls there, HTTP and RQ here), the way Flower runs one
strategy in simulation and in deployment.
"""
