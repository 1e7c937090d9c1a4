"""``python -m udptime query HOST ...``: the same command as ``udptime``."""

from udptime.command import main

if __name__ == "__main__":
    main()
