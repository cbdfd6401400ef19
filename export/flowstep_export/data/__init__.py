"""Data tools: videos and prompts into dataset samples, DiffSynth conversions, the toy world."""
