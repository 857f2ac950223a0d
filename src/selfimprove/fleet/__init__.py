"""Robots that run the current policy: in-process (``LocalFleet``, the default) or on a Ray cluster
(``RayFleet`` in ``fleet/ray.py``, imported only when asked for); both keep the ``Fleet`` contract."""

from selfimprove.fleet.base import BackgroundFleet, Fleet
from selfimprove.fleet.local import LocalFleet, seed_stream

__all__ = ["BackgroundFleet", "Fleet", "LocalFleet", "seed_stream"]
