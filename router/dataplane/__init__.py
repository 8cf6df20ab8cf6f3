"""The data plane: the way one call travels (intake, identify, forward, relay)."""
