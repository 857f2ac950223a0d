"""Robots that run the current policy: in-process (default) or, later, on a Ray cluster."""

from selfimprove.fleet.base import Fleet
from selfimprove.fleet.local import LocalFleet, seed_stream

__all__ = ["Fleet", "LocalFleet", "seed_stream"]
