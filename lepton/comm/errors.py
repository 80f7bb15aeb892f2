"""The errors of the data plane."""


class CommError(RuntimeError):
    """A collective failed or timed out: a peer died, hung, or the group was torn down."""


class Unreachable(Exception):
    """This rank's data-plane address cannot be reached by its peers (a wrong ``--iface``, a firewall,
    an address behind NAT): the worker cannot take part in any generation, so it stops with the reason
    rather than have every regroup fail on it (probe.py)."""
