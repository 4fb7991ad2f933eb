#!/usr/bin/env bash
# `make docker-check`: run cases/stacks (raw stacks -> prepare -> mesh -> fit -> posterior) on the
# host and in the image, serially and under `mpirun -n 2`, as a non-root user, and compare the
# summary.json files. Usage: docker/check.sh IMAGE HOST_FEMKIN
#   IMAGE        the image to check (built by `make docker`)
#   HOST_FEMKIN  the host's femkin executable (.venv/bin/femkin)
# Runs as the calling user; when that is root, as CHECK_UID:CHECK_GID (default 1000:1000), so
# that the container never runs as root. Each run has a time limit (CHECK_TIMEOUT s, default
# 1800): a hang fails the check instead of blocking it.
set -euo pipefail
image=${1:?image}
host_femkin=${2:?host femkin}
uid=$(id -u) gid=$(id -g)
if [ "$uid" = 0 ]; then uid=${CHECK_UID:-1000} gid=${CHECK_GID:-1000}; fi
limit=${CHECK_TIMEOUT:-1800}
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/femkin-docker-check.XXXXXX")
for run in host host-mpi serial mpi; do
  mkdir -p "$work/$run"
  cp -r "$here/cases/stacks/case.toml" "$here/cases/stacks/raw" "$work/$run/"
done
if [ "$(id -u)" = 0 ]; then chown -R "$uid:$gid" "$work/serial" "$work/mpi"; fi

# timed NAME CMD...: run CMD with its output in $work/NAME.log; set t_NAME to its wall time (s)
timed() {
  local name=$1 t0=$SECONDS
  shift
  if ! "$@" > "$work/$name.log" 2>&1; then
    echo "docker-check: the $name run failed (or ran past ${limit} s); see $work/$name.log" >&2
    tail -5 "$work/$name.log" >&2
    exit 1
  fi
  printf -v "t_$name" %d $((SECONDS - t0))
}
in_image() {
  local run=$1
  shift
  # --init: a signal (the time limit's TERM) reaches mpirun/femkin, and the container stops
  timeout "$limit" docker run --rm --init --network none --user "$uid:$gid" \
    -v "$work/$run:/case" "$image" "$@"
}
timed host timeout "$limit" "$host_femkin" run "$work/host"
timed host_mpi timeout "$limit" "${host_femkin%/femkin}/mpirun" -n 2 "$host_femkin" run "$work/host-mpi"
timed serial in_image serial femkin run /case
timed mpi in_image mpi mpirun -n 2 femkin run /case
owner=$(stat -c %u:%g "$work/mpi/results/summary.json")
[ "$owner" = "$uid:$gid" ] || { echo "docker-check: results owned by $owner, not $uid:$gid" >&2; exit 1; }
# The same arithmetic in and out of the image: equal to 1e-6 (serial with serial, 2 ranks with
# 2 ranks). Serial against 2 ranks differs only by the order of sums, amplified by a fit that
# stops at its iteration budget: reported, with a looser tolerance.
py="${host_femkin%/femkin}/python"
"$py" "$here/docker/compare_summary.py" "$work/host/results/summary.json" \
  "$work/serial/results/summary.json"
"$py" "$here/docker/compare_summary.py" "$work/host-mpi/results/summary.json" \
  "$work/mpi/results/summary.json"
"$py" "$here/docker/compare_summary.py" --rtol 1e-2 "$work/host/results/summary.json" \
  "$work/host-mpi/results/summary.json"
echo "docker-check: wall time host ${t_host} s, host mpirun -n 2 ${t_host_mpi} s, container" \
  "serial ${t_serial} s, container mpirun -n 2 ${t_mpi} s (user $uid:$gid); results in $work"
