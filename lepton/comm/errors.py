"""The one error type of the data plane."""


class CommError(RuntimeError):
    """A collective failed or timed out: a peer died, hung, or the group was torn down."""
