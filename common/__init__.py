"""What every program here shares (router, agent, load test): imports nothing else of ours."""
