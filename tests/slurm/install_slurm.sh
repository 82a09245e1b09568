# shellcheck shell=bash
# Source this file: `ensure_slurm` installs Debian's slurm-wlm and munge when one of their
# commands is missing (needs root), keeping the packages' own services from starting: the tests
# run private daemons only.
ensure_slurm() {
    local cmd
    for cmd in munged slurmctld slurmd sbatch srun scontrol; do
        command -v "$cmd" >/dev/null || break
    done
    command -v "$cmd" >/dev/null && return 0
    echo "installing slurm-wlm and munge" >&2
    local policy=/usr/sbin/policy-rc.d added=""
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && added=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge
    [[ -n $added ]] && rm -f "$policy"
    return 0
}
