"""What the event log means: the fold into agents, jobs and rollouts, the hash chain,
who may say what, and the one driver that decodes, verifies and applies recorded events.

Shared by the master, ``fleet replay``, ``fleet audit``, ``fleet jobs`` and followers.
It knows schemas and the bus's decoded records, never NATS itself.
"""
