"""The project's error types: each is reported as one line saying what is wrong and how to fix it
(`rankclip: error: ...`, exit code 2), never as a traceback. They say what failed."""


class RankCLIPError(ValueError):
    """A problem the user can fix, reported as one line."""


class ConfigError(RankCLIPError):
    """The flags, the --config file, or a file or folder that a flag names (missing, the wrong kind)."""


class DataError(RankCLIPError):
    """Training or evaluation data that cannot be read: a CSV that does not parse or lacks a column,
    an evaluation folder of the wrong layout, too many unreadable images."""


class CheckpointError(RankCLIPError):
    """A checkpoint that cannot be read, does not fit the model, or cannot be continued as asked."""


class ReportError(RankCLIPError):
    """Run folders that a report or a plot cannot be made from (missing or malformed records)."""
