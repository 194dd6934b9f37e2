"""ahamoment: the DeepSeek-R1 recipe end to end, small enough to read and run on a laptop."""

__version__ = "0.1.0"
