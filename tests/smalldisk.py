"""A real small disk for the world-fault tests: a tmpfs in a private mount namespace.

The namespace is held open by one anchor process (``sleep infinity``); the tmpfs is mounted
inside it, so nothing outside the namespace sees it, and killing the anchor (with every process
the test started in it) frees it: a failed test leaves no mount behind.  Processes that must see
the disk run under ``nsenter --mount`` into the anchor's namespace (``cmd``); their children,
such as Dask workers, are in it too.  Needs root and util-linux (``unshare``, ``nsenter``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path


def why_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "a tmpfs in a mount namespace needs root"
    for tool in ("unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (util-linux)"
    return None


class SmallDisk:
    def __init__(self, mountpoint: Path, size: str = "16m"):
        self.mountpoint = Path(mountpoint)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.anchor = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "infinity"])
        mine = os.readlink("/proc/self/ns/mnt")
        deadline = time.monotonic() + 10
        while True:
            try:
                if os.readlink(f"/proc/{self.anchor.pid}/ns/mnt") != mine:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.anchor.poll() is not None:
                self.close()
                raise RuntimeError("unshare --mount did not make a namespace")
            time.sleep(0.02)
        self.sh(f"mount -t tmpfs -o size={size} pagecube-test {self.mountpoint}")

    def cmd(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the disk's mount namespace."""
        return ["nsenter", f"--target={self.anchor.pid}", "--mount", *map(str, argv)]

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.cmd(["sh", "-c", script]), capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{script}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def fill(self) -> None:
        """Fill the disk to the last byte (a file named ``filler``)."""
        self.sh(f"dd if=/dev/zero of={self.mountpoint}/filler bs=64k 2>/dev/null; true")

    def free(self) -> None:
        self.sh(f"rm -f {self.mountpoint}/filler")

    def remount(self, options: str, tries: int = 50) -> None:
        """``mount -o remount,OPTIONS``; a read-only remount is refused while a file is open for writing
        (the build writes all the time), so it is tried again for a moment."""
        for _ in range(tries):
            if self.sh(f"mount -o remount,{options} {self.mountpoint}", check=False).returncode == 0:
                return
            time.sleep(0.02)
        self.sh(f"mount -o remount,{options} {self.mountpoint}")

    def count(self, folder: str) -> int:
        """Entries in ``folder`` (relative to the disk) as the namespace sees it; 0 when absent."""
        out = self.sh(f"ls -1 {self.mountpoint}/{folder} 2>/dev/null | wc -l", check=False).stdout
        return int(out.strip() or 0)

    def copy_out(self, relative: str, dest: Path) -> Path:
        """A copy of ``relative`` (on the disk) at ``dest`` (outside it), for the test to read."""
        self.sh(f"rm -rf {dest} && cp -a {self.mountpoint}/{relative} {dest}")
        return Path(dest)

    def close(self) -> None:
        if self.anchor.poll() is None:
            self.anchor.kill()
        self.anchor.wait(10)

    def __enter__(self) -> "SmallDisk":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
