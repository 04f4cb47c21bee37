#!/bin/sh
# Container entrypoint. With SHOTSTREAM_DOWNLOAD=1, first fetch the real weights into
# $SHOTSTREAM_WEIGHTS (`shotstream download`: completed repos are skipped, so later starts
# only re-check the files' headers); then run the command, as PID 1 so that SIGTERM reaches
# the server and drains it.
set -eu
if [ "${SHOTSTREAM_DOWNLOAD:-0}" = "1" ] && [ -n "${SHOTSTREAM_WEIGHTS:-}" ]; then
    shotstream download --dir "$SHOTSTREAM_WEIGHTS" --preset "${SHOTSTREAM_PRESET:-wan2.1-1.3b}"
fi
exec "$@"
