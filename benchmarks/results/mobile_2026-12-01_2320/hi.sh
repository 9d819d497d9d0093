#!/bin/bash
# run "$@" in its own session (autogroup) with the autogroup's nice at -20, so bench.sh's nice -20 is effective across sessions
exec setsid -w bash -c 'echo -20 > /proc/self/autogroup; exec "$@"' _ "$@"
