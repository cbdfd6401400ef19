"""Reading the files users hand to the tools (often downloaded from strangers) and writing outputs.

Inputs are opened only when they are regular files (a FIFO would hang, /dev/zero never ends),
small text files are read with a size limit, torch files are unpickled with `weights_only=True`
(a pickle can run any code), and tensors must not claim more elements than their storage holds
(a broadcast view would materialise gigabytes from a few bytes). Outputs are written under a
temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

TEXT_LIMIT = 64 << 20  # metadata.csv, captions, prompt files: far above any real one


def kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def file_problem(path: Path) -> str | None:
    """Why `path` is not a regular file one can read (links followed), or None."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as e:
        return f"cannot read it ({e.strerror})"
    return None if stat.S_ISREG(mode) else f"is {kind_of(mode)}, expected a file"


def require_regular_file(path: Path, label: str | None = None) -> None:
    """ValueError naming `label` (default: the path) unless `path` is a regular file."""
    if (problem := file_problem(path)) is not None:
        raise ValueError(f"{label or path}: {problem}")


def read_text(path: Path, label: str | None = None, limit: int = TEXT_LIMIT) -> str:
    """A small UTF-8 text file, its BOM removed. Opened without blocking and checked to be regular
    on the open descriptor, so a FIFO swapped in after a check cannot hang the read."""
    label = label or str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ValueError(f"{label}: no such file") from None
    except OSError as e:
        raise ValueError(f"{label}: cannot read it ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"{label}: is {kind_of(mode)}, expected a text file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{label}: larger than {limit >> 20} MiB; not a text file this tool reads")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # No guessed fallback: a wrong guess would train on garbled captions without a word.
        raise ValueError(f"{label}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                         "save it as UTF-8") from None


def warn_if_outside(path: Path, root: Path, label: str) -> None:
    """One warning line when `path`, inside `root` by name, is a link to a file outside it (what
    is not a regular file is refused where it is read)."""
    target = path.resolve()
    if file_problem(path) is None and not target.is_relative_to(root.resolve()):
        print(f"warning: {label} is a link to {target}, outside {root}", file=sys.stderr)


def sha256_of_file(path: Path) -> str:
    """The file's sha256 in hex, read in chunks (a text encoder checkpoint is 11 GB)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] if text else type(e).__name__


def check_tensor_storage(path: Path, name: str, t) -> None:
    """ValueError unless tensor `t` holds no more elements than its storage: a stride-0 view of a
    few bytes can claim any shape, and converting it would allocate that shape."""
    if t.numel() * t.element_size() > t.untyped_storage().nbytes():
        raise ValueError(f"{path}: tensor `{name}` of shape {list(t.shape)} is a view larger than the data stored for it")


def load_torch_file(path: Path, stand_ins: tuple = ()):
    """`torch.load` with `weights_only=True`: tensors and plain values only; `stand_ins` are
    (class, "module.Name") pairs that unpickle the named class as that harmless class instead.
    A pickle that needs anything else is refused, naming what it needs; a corrupt file is
    one line naming it."""
    import pickle
    import warnings

    import torch

    require_regular_file(path)
    try:
        with torch.serialization.safe_globals(list(stand_ins)), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": not the user's concern
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            needs = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - {n for _, n in stand_ins})
        except Exception:  # the scan reads the same broken pickle: then the file is corrupt, not refused
            needs = []
        if needs:
            raise ValueError(f"{path}: refused: loading this pickle would call {', '.join(needs)} (a pickle can run any "
                             "command); flowstep loads only tensors and plain values from torch files") from None
        # torch's message is a page of advice; its reason is the line after "WeightsUnpickler error:".
        reason = str(e).rpartition("WeightsUnpickler error:")[2].partition("Check the documentation")[0]
        raise ValueError(f"{path}: not a readable torch file ({one_line(reason)})") from None
    except MemoryError:
        raise ValueError(f"{path}: out of memory while reading it") from None
    except Exception as e:  # torch.load raises many types (EOFError, RuntimeError, KeyError...) on a corrupt file
        raise ValueError(f"{path}: not a readable torch file ({type(e).__name__}"
                         f"{': ' + one_line(e) if str(e).strip() else ''})") from None


def load_safetensors_file(path: Path) -> dict:
    from safetensors.torch import load_file

    require_regular_file(path)
    try:
        return load_file(str(path))
    except MemoryError:
        raise ValueError(f"{path}: out of memory while reading it") from None
    except Exception as e:  # safetensors raises its own SafetensorError, and OSError
        raise ValueError(f"{path}: not a readable safetensors file ({one_line(e)})") from None


def save_tensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """Writes a .safetensors file under a temporary name, then renames it: a half-written file
    never carries the final name."""
    from safetensors.torch import save_file

    temp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(temp), metadata=metadata)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    try:
        temp.write_text(text)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def publish_files(out: Path, names: tuple[str, ...], write):
    """Runs `write(temp)` in a temporary folder inside `out`, then moves `names` into `out` in
    order, the manifest (the last name) last, after removing the old manifest, so that a
    manifest never describes files of another export. Returns what `write` returned."""
    out.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=".publish-", dir=out))
    try:
        result = write(temp)
        (out / names[-1]).unlink(missing_ok=True)
        for name in names:
            os.replace(temp / name, out / name)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return result
