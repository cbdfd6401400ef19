"""The one line a user sees when a Python module flowstep_export needs is not installed."""

from __future__ import annotations


def missing_module(e: ModuleNotFoundError, tool: str) -> str:
    name = (e.name or str(e)).split(".")[0]
    package = {"PIL": "pillow", "imageio_ffmpeg": "imageio-ffmpeg", "diffsynth": "diffsynth"}.get(name, name)
    return (f"error: {tool} needs the Python module `{name}` (package {package}), which is not installed: "
            "run scripts/setup_python.sh, or pip install -r export/requirements.txt")
