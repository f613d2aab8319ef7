"""`unshare --net python tests/netns_exec.py CMD ...`: bring loopback up in the new (empty) network
namespace, then become CMD (same pid). Ray binds to the host's address whatever its flags say; in
here the only address is 127.0.0.1, so nothing a test's Ray does leaves loopback."""

import os
import sys

from ray_cluster import bring_up_loopback

if __name__ == "__main__":
    bring_up_loopback()
    os.execvp(sys.argv[1], sys.argv[1:])
