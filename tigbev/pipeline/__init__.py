"""Drivers above the stages: ``tigbev demo`` (the whole chain on a synthetic world) and ``tigbev ablate``."""
