"""The agent daemon: consumes its own jobs, runs them, streams output, heartbeats."""
