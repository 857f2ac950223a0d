"""Episodes on disk: schema, writer/reader, splits and fractions, steps-to-go labels."""

from selfimprove.data.episode import Episode, steps_to_go_labels
from selfimprove.data.store import EpisodeStore, EpisodeWriter, Frames, read_info, split_episodes

__all__ = ["Episode", "EpisodeStore", "EpisodeWriter", "Frames", "read_info", "split_episodes",
           "steps_to_go_labels"]
