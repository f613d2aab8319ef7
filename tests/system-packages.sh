#!/usr/bin/env bash
# Debian packages the test suite needs, installed only when missing (the tests fail, not skip,
# without them): WordNet for the augmentation tests; a real Slurm for tests/test_slurm.py
# (slurmctld and two slurmd, munge, and slurmdbd on MariaDB so that sacct and submitit see job
# states); unshare and nsenter (util-linux) keep the clusters of the tests inside private
# namespaces; sshd, rsync and ip (iproute2) make the SSH hosts `ray up` starts a cluster on.
set -euo pipefail
missing=()
[ -f /usr/share/wordnet/data.noun ] || missing+=(wordnet-base)
for need in slurm-wlm:/usr/sbin/slurmctld munge:/usr/sbin/munged slurmdbd:/usr/sbin/slurmdbd \
            mariadb-server:/usr/sbin/mariadbd util-linux:/usr/bin/unshare openssh-server:/usr/sbin/sshd \
            rsync:/usr/bin/rsync iproute2:/usr/sbin/ip openssh-client:/usr/bin/ssh-keygen; do
    [ -x "${need#*:}" ] || missing+=("${need%%:*}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=(); [ "$(id -u)" -eq 0 ] || sudo=(sudo)
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}"
