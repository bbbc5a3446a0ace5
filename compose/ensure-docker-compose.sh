#!/bin/sh
# Run by `make test` before the tests. tests/test_deploy_compose.py validates every compose file
# with Debian's docker-compose (`docker-compose config` needs no Docker daemon). Installs it only
# when it is missing and only as root (CI is root); without it the compose tests skip and say why.
# --no-install-recommends: the Docker engine itself is not wanted here.
set -u
command -v docker-compose >/dev/null 2>&1 && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: docker-compose is not installed and this is not root with apt-get: the compose tests will skip" >&2
    exit 0
fi
echo "installing Debian's docker-compose for the compose tests..." >&2
log="${TMPDIR:-/tmp}/mlfarm-docker-compose-install.log"
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        docker-compose; } >"$log" 2>&1; then
    echo "warning: installing docker-compose failed (see $log): the compose tests will skip" >&2
fi
exit 0
