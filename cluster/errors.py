"""The cluster's error type, on its own so that every module of ``cluster`` can raise it without
importing the others (``targets`` uses ``preflight``'s checks, and both raise it)."""


class ClusterError(RuntimeError):
    """A cluster could not be reached or does not offer what was asked; one clear line."""
