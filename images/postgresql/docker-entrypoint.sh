#!/bin/bash
# The part of the public postgres image's entrypoint the operator relies on (docs/IMAGES.md): on an empty
# PGDATA, initdb with POSTGRES_USER and POSTGRES_PASSWORD, password (scram-sha-256) auth over TCP, and the
# database POSTGRES_DB; on an existing one, nothing. Then `postgres` (the CMD) replaces this script.
#
# It writes only to PGDATA, /var/run/postgresql and /tmp, so the root filesystem may be read-only.
set -Eeuo pipefail

if [ "${1:0:1}" = '-' ]; then  # `docker run <image> -c shared_buffers=256MB` passes options to postgres
    set -- postgres "$@"
fi
if [ "$1" != postgres ]; then  # any other command (bash, psql, ...) runs as is
    exec "$@"
fi
if [ "$(id -u)" = 0 ]; then
    echo >&2 "error: PostgreSQL does not run as root; run the image as its user (70:70, the image's USER)"
    exit 1
fi

: "${PGDATA:?PGDATA must name the data directory}"
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
: "${POSTGRES_HOST_AUTH_METHOD:=scram-sha-256}"
if [ ! -s "$PGDATA/PG_VERSION" ] && [ -z "${POSTGRES_PASSWORD:-}" ] && [ "$POSTGRES_HOST_AUTH_METHOD" != trust ]
then
    echo >&2 "error: $PGDATA holds no database and POSTGRES_PASSWORD is empty: set it (the superuser's" \
             "password, which TCP clients must give)"
    exit 1
fi
# PGDATA may be a subdirectory of a fresh volume (the operator's .../data/pgdata): made here, private.
mkdir -p "$PGDATA"
chmod 700 "$PGDATA" 2>/dev/null || :

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    # Local socket connections are trusted (this container's own), TCP ones need the password, loopback's too.
    options=(--username="$POSTGRES_USER" --auth-local=trust --auth-host="$POSTGRES_HOST_AUTH_METHOD")
    if [ -n "${POSTGRES_PASSWORD:-}" ]; then
        options+=(--pwfile=/dev/stdin)
    fi
    # shellcheck disable=SC2086 # POSTGRES_INITDB_ARGS is a list of options, as in the public image
    initdb "${options[@]}" ${POSTGRES_INITDB_ARGS:-} <<< "${POSTGRES_PASSWORD:-}"
    printf '\nhost all all all %s\n' "$POSTGRES_HOST_AUTH_METHOD" >> "$PGDATA/pg_hba.conf"
    if [ "$POSTGRES_DB" != postgres ]; then
        # A server on the socket only, for this one statement.
        pg_ctl --pgdata="$PGDATA" --silent --wait --options="-c listen_addresses=''" start
        psql --quiet --no-psqlrc --set=ON_ERROR_STOP=1 --username="$POSTGRES_USER" --dbname=postgres \
             --set=db="$POSTGRES_DB" <<< 'CREATE DATABASE :"db";'
        pg_ctl --pgdata="$PGDATA" --silent --wait --mode=fast stop
    fi
    echo "PostgreSQL init process complete; ready for start up."
fi

exec "$@"
