"""Episodes on disk: schema, writer/reader, splits and fractions."""

from selfimprove.data.episode import Episode
from selfimprove.data.store import EpisodeStore, EpisodeWriter, Frames, read_info, split_episodes

__all__ = ["Episode", "EpisodeStore", "EpisodeWriter", "Frames", "read_info", "split_episodes"]
