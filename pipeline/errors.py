"""The two errors the command line turns into exit codes (one clear line each)."""


class BuildError(RuntimeError):
    """A build could not go on (exit code 1)."""


class BadArgument(ValueError):
    """A bad argument, or a store that does not match the arguments (exit code 2)."""


class NotAStore(BadArgument):
    """A path given as a store holds none (exit code 2): say so, rather than zarr's 'No group found'."""
