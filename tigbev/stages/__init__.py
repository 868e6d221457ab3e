"""The pipeline's stages; each is ``run(cfg) -> Result`` and talks to the others only through files."""
