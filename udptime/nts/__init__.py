"""Network Time Security (RFC 8915) for the ``ntp`` format.

- :mod:`udptime.nts.records`: NTS-KE records, encode and parse (pure).
- :mod:`udptime.nts.cookies`: stateless cookies and the rotating master keys.
- :mod:`udptime.nts.extensions`: NTS extension fields in NTP packets (pure).
- :mod:`udptime.nts.ke`: the NTS-KE server (TLS 1.3, ALPN ``ntske/1``).
- :mod:`udptime.nts.responder`: an NTP responder that also answers NTS.
- :mod:`udptime.nts.options`: command-line options and services for the tap.
"""
