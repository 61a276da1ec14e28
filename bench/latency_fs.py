"""A passthrough FUSE filesystem that adds a fixed delay to every read: a stand-in for a network volume.

    python bench/latency_fs.py SOURCE MOUNTPOINT --latency-ms 1.0

Each read() the kernel sends costs one round trip, as on NFS or a FUSE network volume; large
sequential reads need fewer of them than page-fault driven memory-mapped reads. Used only by
bench/bench_model_loading.py --latency-ms (needs /dev/fuse, libfuse2 and `pip install fusepy`).
"""

from __future__ import annotations

import argparse
import errno
import os
import time

from fuse import FUSE, FuseOSError, Operations


class LatencyFS(Operations):
    def __init__(self, root: str, latency_s: float):
        self.root = root
        self.latency_s = latency_s

    def _full(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def getattr(self, path, fh=None):
        try:
            st = os.lstat(self._full(path))
        except FileNotFoundError:
            raise FuseOSError(errno.ENOENT)
        return {key: getattr(st, key) for key in ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime",
                                                  "st_nlink", "st_size", "st_uid")}

    def readdir(self, path, fh):
        return [".", "..", *os.listdir(self._full(path))]

    def open(self, path, flags):
        return os.open(self._full(path), os.O_RDONLY)

    def read(self, path, size, offset, fh):
        time.sleep(self.latency_s)  # the round trip
        return os.pread(fh, size, offset)

    def release(self, path, fh):
        os.close(fh)

    def statfs(self, path):
        st = os.statvfs(self._full(path))
        return {key: getattr(st, key) for key in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                                                  "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    parser.add_argument("--latency-ms", type=float, default=1.0)
    args = parser.parse_args()
    FUSE(LatencyFS(args.source, args.latency_ms / 1000), args.mountpoint, foreground=True, ro=True,
         nothreads=False, max_read=1024 * 1024)
