"""tigbev: TiG-BEV LiDAR-to-camera distillation with an offline teacher cache."""

__version__ = "0.1.0"
