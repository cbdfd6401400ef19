"""The one line a user sees when a Python module flowstep_export needs is not installed."""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

T = TypeVar("T")


def missing_module(e: ModuleNotFoundError, tool: str) -> str:
    name = (e.name or str(e)).split(".")[0]
    package = {"PIL": "pillow", "imageio_ffmpeg": "imageio-ffmpeg", "diffsynth": "diffsynth"}.get(name, name)
    return (f"error: {tool} needs the Python module `{name}` (package {package}), which is not installed: "
            "run scripts/setup_python.sh, or pip install -r export/requirements.txt")


def run_reporting_errors(tool: str, work: Callable[[], T]) -> tuple[int, T | None]:
    """Runs `work` for a command-line tool: returns (0, its result), or (1, None) after printing one
    `error:` line for a missing module, a bad input (ValueError, RuntimeError, OSError) or
    running out of memory. Files are named where they are read: the loaders turn what a corrupt
    file raises into a ValueError naming it."""
    try:
        return 0, work()
    except ModuleNotFoundError as e:
        print(missing_module(e, tool), file=sys.stderr)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
    except MemoryError:
        print(f"error: {tool} ran out of memory", file=sys.stderr)
    return 1, None
