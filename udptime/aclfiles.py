"""Access lists kept in files (``--allow-file``/``--deny-file``), reloaded on SIGHUP.

A file holds one CIDR a line; ``#`` starts a comment; blank lines are
ignored. The lists from the command line always apply; a file's networks
are added to them. A reload that finds a bad file keeps the lists in force
and says which file and line, so serving never stops for a typo.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from udptime.policy import Network, Policy, PolicyError, parse_cidr


def parse_acl(text: str, name: str) -> tuple[Network, ...]:
    """The networks in an access-list file's *text*; ``ValueError`` names the line."""
    networks = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            networks.append(parse_cidr(entry))
        except PolicyError as exc:
            raise ValueError(f"{name} line {number}: {exc}") from None
    return tuple(networks)


def read_acl(path: str) -> tuple[Network, ...]:
    """The networks in the file at *path*; ``ValueError`` says what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise ValueError(f"{path}: {reason or exc}") from None
    return parse_acl(text, path)


@dataclass
class AclFiles:
    """The policies' lists: fixed ones plus those read from files."""

    policies: Sequence[Policy]
    allow: tuple[Network, ...]
    deny: tuple[Network, ...]
    allow_file: str | None = None
    deny_file: str | None = None
    #: what the files held at the last successful (re)load
    loaded: tuple[tuple[Network, ...], tuple[Network, ...]] = ((), ())

    def lists(self) -> tuple[tuple[Network, ...], tuple[Network, ...]]:
        """Read both files (``ValueError`` for either) without applying them."""
        allow = read_acl(self.allow_file) if self.allow_file else ()
        deny = read_acl(self.deny_file) if self.deny_file else ()
        return allow, deny

    def apply(self, allow: tuple[Network, ...], deny: tuple[Network, ...]) -> None:
        for policy in self.policies:
            policy.replace_lists(self.allow + allow, self.deny + deny)
        self.loaded = (allow, deny)

    def reload(self) -> str:
        """SIGHUP: re-read the files; what changed (``ValueError``: nothing did)."""
        allow, deny = self.lists()
        if (allow, deny) == self.loaded:
            return "access lists unchanged"
        before = self.loaded
        self.apply(allow, deny)
        return (
            f"allow file {len(before[0])} -> {len(allow)} networks, "
            f"deny file {len(before[1])} -> {len(deny)} networks"
        )
