"""The operator side: the admin HTTP listener, the records it shows, and the CLI's client."""
