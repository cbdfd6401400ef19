"""The Wan DiT and its encoders in DiffSynth-Studio's module structure and state-dict names."""
