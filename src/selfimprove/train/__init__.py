"""Trainers: stage 1 (sft) and the stage 2 learner (improve)."""
