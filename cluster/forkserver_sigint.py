"""Imported first by the forkserver (``cluster.forkserver``): the server, and every worker forked from
it, ignore SIGINT and print their threads' stacks on SIGUSR1 (``cluster.interrupts`` says why).

Python's forkserver ignores SIGINT too, but only once its preload imports are done (a Ctrl-C during
them printed the imports' traceback), and it forks each process with the handler it found before.
"""
from .interrupts import ignore_sigint, stacks_on_sigusr1

ignore_sigint()
stacks_on_sigusr1()
