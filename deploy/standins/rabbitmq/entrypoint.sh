#!/bin/sh
# Runs the server as the rabbitmq user, with its files where the package keeps
# them; RABBITMQ_* settings pass through the environment, as with the official image.
set -eu
chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq
if [ "$1" = rabbitmq-server ]; then
    exec runuser -u rabbitmq -- "$@"
fi
exec "$@"
