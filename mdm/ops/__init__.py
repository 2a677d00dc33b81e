"""Running the bridge: logging, the status socket and Prometheus metrics."""
