"""Batched UDP I/O for Linux: ``recvmmsg``/``sendmmsg`` through ctypes.

Twisted's ``udp.Port`` makes two system calls, a ``(host, port)`` tuple and
a handful of Python frames per datagram. Here up to 64 datagrams move per
system call each way. ``libc`` holds the C layouts and calls, ``receive``
and ``send`` the two halves, ``port`` the Twisted port that drives them.
"""
