"""Models: the LiDAR teacher (teacher/), the camera student (student/), the shared CenterHead, losses."""
