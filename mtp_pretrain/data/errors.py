"""The one exception type of the data pipeline."""


class DataError(ValueError):
    """A dataset, shard or tokenizer is missing, corrupt or inconsistent.

    The message always names the offending file and what is wrong with it, so that a failing
    start-up points straight at the file to rebuild.
    """
