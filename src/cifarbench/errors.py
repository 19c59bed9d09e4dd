"""User-facing errors: the CLI prints their message as one line and exits with status 1."""


class CifarbenchError(Exception):
    """Something the user can fix (missing data, a bad file, a bad flag); never a bug."""


class DataError(CifarbenchError):
    """A data set is missing, fails verification or is malformed."""


class DownloadError(DataError):
    """A download failed, or what arrived is not what was expected."""
