"""Imported last by the forkserver (``cluster.forkserver``), once every preload module is in.

It freezes the objects the imports created (``gc.freeze``), so that the garbage collector of a worker
forked from the server never walks them. Measured on a 2-core machine with torch and distributed
imported: each freshly forked worker ran a full collection over those objects before it started,
150 ms on the way to the cluster being up, and every later full collection walked them again, writing
to (so copying) pages the workers would otherwise share with the server.
"""
import gc

gc.freeze()
