"""``python -m pipeline.cli`` is the ``pagecube`` command."""
from . import run

run()
