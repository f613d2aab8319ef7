"""`unshare --net python tests/netns_exec.py [--second-address ADDR] CMD ...`: bring loopback up in
the new (empty) network namespace, optionally give it a second loopback address (see
ray_cluster.add_loopback_address), then become CMD (same pid). Ray binds to the host's address
whatever its flags say; in here the only interface is lo, so nothing a test's Ray does leaves it."""

import os
import sys

from ray_cluster import add_loopback_address, bring_up_loopback

if __name__ == "__main__":
    argv = sys.argv[1:]
    bring_up_loopback()
    if argv[0] == "--second-address":
        add_loopback_address(argv[1])
        argv = argv[2:]
    os.execvp(argv[0], argv)
