"""The headless batch client for cron: one job, a secret file, fixed return codes."""
