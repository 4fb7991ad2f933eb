"""Data in and out: the STXM video contract (:mod:`femkin.io.video`)."""

from femkin.io.video import (
    Video,
    pixel_centres,
    read_video,
    validate_video,
    voltage_to_mu_e,
    write_video,
)

__all__ = [
    "Video",
    "pixel_centres",
    "read_video",
    "validate_video",
    "voltage_to_mu_e",
    "write_video",
]
