"""The driver-side sidecar (`spark-router agent`): registers a driver, probes, heartbeats."""
