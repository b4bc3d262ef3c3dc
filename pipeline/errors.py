"""The two errors the command line turns into exit codes (one clear line each)."""


class BuildError(RuntimeError):
    """A build could not go on (exit code 1)."""


class BadArgument(ValueError):
    """A bad argument, or a store that does not match the arguments (exit code 2)."""


class NotAStore(BadArgument):
    """A path given as a store holds none (exit code 2): say so, rather than zarr's 'No group found'."""


class BuildStopped(BuildError):
    """A fault of the world stopped the build (``pipeline.faults``; exit code 75): the message is the
    one line to print, naming the store, image location or scheduler, the cause, and what to do."""

    exit_code = 75

    def __init__(self, line: str, kind: str = ""):
        super().__init__(line)
        self.kind = kind
