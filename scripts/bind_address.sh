#!/bin/sh
# The address `make run` binds: prints HOST:PORT for gunicorn --bind, or refuses (exit 2).
#
# The backend answers /predict and /webhook and reads Label Studio with its API key: open on every
# interface without basic auth, anyone who reaches the port can use it. So:
#   * HOST unset: 127.0.0.1 without BASIC_AUTH_USER/BASIC_AUTH_PASS (a message says how to open
#     it), 0.0.0.0 with them;
#   * HOST set to anything but loopback without both auth variables: refused, unless ALLOW_OPEN=1.
# Environment: HOST, PORT (default 9090), BASIC_AUTH_USER, BASIC_AUTH_PASS, ALLOW_OPEN.
port="${PORT:-9090}"
auth=0
if [ -n "${BASIC_AUTH_USER:-}" ] && [ -n "${BASIC_AUTH_PASS:-}" ]; then auth=1; fi

how="To listen on all interfaces: HOST=0.0.0.0 BASIC_AUTH_USER=<user> BASIC_AUTH_PASS=<password> make run
(then give Label Studio the backend URL with those credentials under Basic Authentication),
or, on a network you trust, HOST=0.0.0.0 ALLOW_OPEN=1 make run to accept an open backend."

host="${HOST:-}"
if [ -z "$host" ]; then
    if [ "$auth" = 1 ]; then
        host=0.0.0.0
    else
        host=127.0.0.1
        echo "make run: listening on 127.0.0.1:$port only: BASIC_AUTH_USER/BASIC_AUTH_PASS are not set." >&2
        echo "$how" >&2
    fi
fi

case "$host" in
    127.*|localhost|::1|\[::1\]) ;;
    *)
        if [ "$auth" != 1 ] && [ "${ALLOW_OPEN:-}" != 1 ]; then
            echo "make run: refusing to listen on $host:$port without basic auth: anyone who reaches it could run" >&2
            echo "predictions and read Label Studio with this backend's API key." >&2
            echo "$how" >&2
            exit 2
        fi
        ;;
esac

case "$host" in
    \[*) echo "$host:$port" ;;
    *:*) echo "[$host]:$port" ;;  # IPv6: gunicorn wants brackets
    *) echo "$host:$port" ;;
esac
