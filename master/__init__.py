"""The master: projections of the event log, registry of agents, status, rollouts."""
