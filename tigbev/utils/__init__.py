"""Run-time utilities below every stage: provenance and device choice, run directories, training logs, plots."""
