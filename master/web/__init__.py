"""The master's read-only status page (see :mod:`master.web.server`)."""
