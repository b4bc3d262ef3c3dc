"""Resident factories for tests/test_cluster.py (imported by Dask workers)."""

import os

LOADS = 0  # per process: how many times make_counter ran here


class Counter:
    def __init__(self, tag):
        self.pid = os.getpid()
        self.tag = tag
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return {"pid": self.pid, "tag": self.tag, "x": x * 2, "loads": LOADS}


def make_counter(tag="t"):
    global LOADS
    LOADS += 1
    return Counter(tag)


def broken(**kwargs):
    raise RuntimeError("checkpoint weights.safetensors is corrupt (test)")
