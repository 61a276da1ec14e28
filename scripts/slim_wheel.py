"""Rewrite a wheel in place without the files it does not need on one machine.

    python scripts/slim_wheel.py WHEEL --drop REGEX [--keep REGEX]

A file whose path matches --drop (and not --keep) leaves the archive and its RECORD line; everything
else is copied unchanged. scripts/gpu-wheels.sh uses it to carry bitsandbytes with only the CUDA 13 and
CPU libraries (torch on the GPU machine is a CUDA 13 build): the wheel falls from 43 MB to a few.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import zipfile


def slim(path: str, drop: str, keep: str | None) -> tuple[int, int]:
    dropped = re.compile(drop)
    kept = re.compile(keep) if keep else None

    def leaves(name: str) -> bool:
        return bool(dropped.search(name)) and not (kept and kept.search(name))

    before = os.path.getsize(path)
    fd, tmp = tempfile.mkstemp(suffix=".whl", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        names = [info.filename for info in src.infolist()]
        if not any(leaves(n) for n in names):
            os.unlink(tmp)
            sys.exit(f"slim_wheel: nothing in {path} matches {drop!r}")
        for info in src.infolist():
            if leaves(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not leaves(line.split(",", 1)[0])).encode()
            dst.writestr(info, data)
    os.replace(tmp, path)
    return before, os.path.getsize(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel")
    parser.add_argument("--drop", required=True, help="regex of paths to leave out")
    parser.add_argument("--keep", help="regex of paths kept even when --drop matches")
    args = parser.parse_args()
    before, after = slim(args.wheel, args.drop, args.keep)
    print(f"slim_wheel: {os.path.basename(args.wheel)} {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
