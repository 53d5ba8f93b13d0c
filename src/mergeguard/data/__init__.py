"""Data: image folders, procedural tasks and triggers, all in [0, 1] pixel space."""
