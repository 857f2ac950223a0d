"""Bimanual Aloha peg-in-socket insertion on MuJoCo (gym-aloha's scene), the paper's second embodiment.

- ``scene.py``: the stock MJCF made cheap to render (box stand-ins for the arm meshes), the cameras
- ``world.py``: ``AlohaInsertionEnv`` (10 Hz joint-target control, randomised objects, success)
- ``expert.py``: the scripted waypoint expert (inverse kinematics to joint targets)

Needs the optional ``aloha`` extra. See docs/aloha.md.
"""
