#!/usr/bin/env python3
"""Zero the GPU code a CUDA library carries for every architecture but one, in place of
size: prune_cuda_fatbin.py IN.so OUT.so 90

onnxruntime-gpu's CUDA provider (284 MB) holds cubins for sm_75, 80, 86, 89, 90 and 120 in
its `.nv_fatbin` section; only the lent machines' sm_90 (H100/H200) is ever loaded there. The
payloads of the others are overwritten with zeros, leaving every header, size and offset as
it was (the driver picks the sm_90 image by its header), so the file compresses from 195 MB
to about 60 MB with xz and fits the device tool's 64 MiB per call in two calls instead of four.
The result runs only on that architecture.
"""

import struct
import subprocess
import sys

FATBIN_MAGIC = 0xBA55ED50


def fatbin_section(path: str) -> tuple[int, int]:
    out = subprocess.check_output(["readelf", "-S", "-W", path], text=True)
    for line in out.splitlines():
        if ".nv_fatbin" in line:
            fields = line.split("]", 1)[1].split()
            return int(fields[3], 16), int(fields[4], 16)
    raise SystemExit(f"{path}: no .nv_fatbin section")


def main() -> int:
    src, dst, keep = sys.argv[1], sys.argv[2], int(sys.argv[3])
    data = bytearray(open(src, "rb").read())
    start, size = fatbin_section(src)
    pos, end, kept, zeroed = start, start + size, 0, 0
    while pos < end:
        magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:  # alignment padding between fatbins
            pos += 8
            continue
        entry, fat_end = pos + header_size, pos + header_size + fat_size
        while entry < fat_end:
            # Entry header: kind u16, version u16, header size u32, padded payload size u32, ...,
            # SM architecture u32 at byte 28.
            _kind, _ver, entry_header, padded = struct.unpack_from("<HHII", data, entry)
            (arch,) = struct.unpack_from("<I", data, entry + 28)
            payload = entry + entry_header
            if arch == keep:
                kept += padded
            else:
                data[payload:payload + padded] = bytes(padded)
                zeroed += padded
            entry = payload + padded
        pos = fat_end
    if not kept:
        raise SystemExit(f"{src}: no sm_{keep} code; refusing to write a library that cannot run")
    open(dst, "wb").write(data)
    print(f"{dst}: kept {kept / 1e6:.1f} MB of sm_{keep} code, zeroed {zeroed / 1e6:.1f} MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
