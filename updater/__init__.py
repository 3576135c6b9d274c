"""Update bundles: build, sign, publish, announce; apply, health-check, roll back."""
