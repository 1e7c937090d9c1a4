"""``python -m udptime query HOST ...``: the same command as ``udptime``."""

from udptime.client import main

if __name__ == "__main__":
    main()
