"""Glue around the stages: provenance, run directories, plots, device choice."""
