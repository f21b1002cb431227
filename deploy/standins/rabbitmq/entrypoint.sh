#!/bin/sh
# Runs the server as the rabbitmq user, with its files where the package keeps
# them; RABBITMQ_* settings pass through the environment, as with the official
# image. RABBITMQ_ERLANG_COOKIE (the nodes of one cluster share it) is written
# to the cookie file the server and its command-line tools read.
set -eu
chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq
if [ -n "${RABBITMQ_ERLANG_COOKIE:-}" ]; then
    cookie=/var/lib/rabbitmq/.erlang.cookie
    printf '%s' "$RABBITMQ_ERLANG_COOKIE" >"$cookie"
    chown rabbitmq:rabbitmq "$cookie"
    chmod 400 "$cookie"
fi
if [ "$1" = rabbitmq-server ]; then
    # HOME is where Erlang looks for the cookie.
    exec runuser -u rabbitmq -- env HOME=/var/lib/rabbitmq "$@"
fi
exec "$@"
