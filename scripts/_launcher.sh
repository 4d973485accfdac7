#!/bin/bash
# Sourced by the finetune scripts. run_launcher CMD...: run a DeepSpeed launcher in a process group of its own so
# that a SIGTERM, SIGINT or SIGHUP to the script reaches all of it (DeepSpeed's single-node runner dies on
# SIGTERM without passing it on, which left the launcher and its workers training with nobody to report to);
# returns when every process of the group has ended, with the launcher's exit status.
run_launcher() {
    setsid "$@" &
    local launcher=$!
    # shellcheck disable=SC2064  # the group id is fixed now
    trap "kill -TERM -- -$launcher 2>/dev/null || true" TERM INT HUP
    local status=0
    wait "$launcher" || status=$?
    while kill -0 -- "-$launcher" 2>/dev/null; do  # stopped by a signal: wait until every worker has ended
        sleep 0.5
    done
    return "$status"
}
