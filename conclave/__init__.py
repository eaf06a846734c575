"""conclave."""
