"""The teacher cache: its contract (``schema``: layout, versions, fingerprints; no torch), the zarr/pyarrow reader
and writer (``store``), writer leases (``lease``) and the verify / info / dump tools (``tools``).

Nothing here imports the data, model or stage layers; the package ``__init__`` imports nothing, so that
``tigbev.cache.schema`` stays importable without zarr.
"""
