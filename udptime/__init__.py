"""udptime: a UDP time server (ctime, RFC 867 daytime, RFC 868 time) for Twisted."""

__version__ = "0.1.0"
