#!/usr/bin/env bash
# A whole GPU check in one run of limited time (a GPU machine that is yours for minutes): set-up and exactness
# (bench/gpu_run.sh), then the decode step at 32K and 131K with its profiles, the first token at
# 32K in chunks of 2048 and 8192, at 131K in chunks of 8192, and the batch case. The parts run in
# that order (what the open issues need first), each under its own time limit and all within
# DEADLINE seconds (default 570), so a part that overruns leaves the next ones their time and a
# part with less than MIN_PART seconds left (default 60) is skipped. From the repository root, with .gpu_wheels copied
# with the tree (docs/gpu.md):
#
#   bash bench/gpu_session.sh [OUT_DIR]   (OUT_DIR default: bench/out)
#
# OUT_DIR holds two files: session.log, how each part ended, and session.tar.gz, every part's NAME.log (and
# NAME.json, a part stopped at its limit writing the rows it finished) and profiles, packed again after each
# part, so that a copy of OUT_DIR taken at any time holds what is done. Where the set-up's install or build
# fails, the parts after it are skipped. The exit status is the worst part's.
set -uo pipefail
out=${1:-bench/out}
deadline=${DEADLINE:-570}
min_part=${MIN_PART:-60}
py=${PYTHON:-python3}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
worst=0

log() {
    echo "$1" | tee -a "$out/session.log"
}

pack() {  # the parts' files so far, in one archive, put in place whole
    cp "$out/session.log" "$work/" 2>/dev/null
    tar czf "$out/session.tar.gz.partial" -C "$work" . && mv "$out/session.tar.gz.partial" "$out/session.tar.gz"
}

part() {  # part NAME LIMIT COMMAND...: the command under min(LIMIT, time left), its exit status logged
    local name=$1 limit=$2
    shift 2
    local left=$((deadline - SECONDS))
    if ((left < min_part)); then
        log "$name: skipped, ${left} s left"
        return
    fi
    ((limit > left)) && limit=$left
    timeout "$limit" "$@" >"$work/$name.log" 2>&1
    local status=$?
    local how="exit $status"
    ((status == 124)) && how="stopped at its limit of $limit s"
    ((status > worst)) && worst=$status
    log "$name: $how after ${SECONDS} s of the session"
    pack
}

check() {  # check NAME LIMIT ARGS...: bench.gpu_check with ARGS, its rows in NAME.json
    local name=$1 limit=$2
    shift 2
    part "$name" "$limit" "$py" -m bench.gpu_check --json "$work/$name.json" "$@"
}

part setup 200 bash bench/gpu_run.sh "$work" --cases exactness
if [[ ! -f "$work/installed" ]]; then  # the rest would time the image's own packages, or no extension
    log "the set-up's install or build failed (setup.log, build.log): the other parts skipped"
    exit $((worst > 0 ? worst : 1))
fi
check decode 200 --cases decode --contexts 32768 131072 --profile "$work/prof"
check prefill_32k 80 --cases prefill --prefill 32768 --chunk 2048 8192
check prefill_131k 150 --cases prefill --prefill 131072 --chunk 8192
check batch 120 --cases batch
exit "$worst"
