# shellcheck shell=bash
# A throwaway PostgreSQL cluster for the test run (sourced by .ci/run; tests/pg.py does the same
# from Python when a developer runs pytest without it).
#
#   ci_postgres_start   install Debian's postgresql where initdb/pg_ctl are missing, initdb a cluster in
#                       a temp dir owned by the postgres user, start it on 127.0.0.1:<free port> and a
#                       unix socket in that dir (trust auth for local connections only), create the
#                       database sovereign_test and export SOVEREIGN_TEST_POSTGRES_URL
#   ci_postgres_stop    stop it and remove every file (safe to call twice, or when nothing started)
#
# Needs root (the server itself runs as the postgres user: PostgreSQL refuses root).

CI_PG_DIR=""
CI_PG_CTL=""

ci_pg_bin() {  # $1: initdb, pg_ctl, ... -> its path (PATH first, else Debian's newest version dir)
  command -v "$1" 2>/dev/null && return 0
  local found
  found=$(ls -1d /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | sort -V | tail -n 1 || true)
  [ -n "$found" ] && [ -x "$found" ] && echo "$found"
}

ci_postgres_start() {
  if [ -z "$(ci_pg_bin initdb)" ] || [ -z "$(ci_pg_bin pg_ctl)" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }
  fi
  local initdb createdb port
  initdb=$(ci_pg_bin initdb) && CI_PG_CTL=$(ci_pg_bin pg_ctl) && createdb=$(ci_pg_bin createdb) || {
    echo "ci: PostgreSQL's initdb/pg_ctl/createdb not found after installing Debian's postgresql" >&2; return 1; }
  id -u postgres >/dev/null 2>&1 \
    || useradd --system --user-group --home-dir /var/lib/postgresql --shell /usr/sbin/nologin postgres
  CI_PG_DIR=$(mktemp -d /tmp/sovereign-ci-pg.XXXXXX)
  chown postgres: "$CI_PG_DIR"
  # cd: the postgres user may not be allowed into the checkout
  ( cd "$CI_PG_DIR" && runuser -u postgres -- "$initdb" -D "$CI_PG_DIR/data" -U postgres -A trust -E UTF8 \
      --locale=C.UTF-8 --no-instructions >"$CI_PG_DIR/initdb.log" 2>&1 ) \
    || { echo "ci: initdb failed:" >&2; tail -n 20 "$CI_PG_DIR/initdb.log" >&2; return 1; }
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  ( cd "$CI_PG_DIR" && runuser -u postgres -- "$CI_PG_CTL" -D "$CI_PG_DIR/data" -l "$CI_PG_DIR/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $CI_PG_DIR -c max_connections=200" start >/dev/null ) \
    || { echo "ci: PostgreSQL did not start:" >&2; tail -n 20 "$CI_PG_DIR/server.log" >&2; return 1; }
  ( cd "$CI_PG_DIR" && runuser -u postgres -- "$createdb" -h "$CI_PG_DIR" -p "$port" -U postgres sovereign_test )
  export SOVEREIGN_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:$port/sovereign_test"
  echo "ci: PostgreSQL $("$CI_PG_CTL" --version | awk '{print $3}') on 127.0.0.1:$port (data in $CI_PG_DIR)"
}

ci_postgres_stop() {
  if [ -n "$CI_PG_DIR" ] && [ -d "$CI_PG_DIR/data" ] && [ -n "$CI_PG_CTL" ]; then
    ( cd "$CI_PG_DIR" && runuser -u postgres -- "$CI_PG_CTL" -D "$CI_PG_DIR/data" -m immediate -w stop ) \
      >/dev/null 2>&1 || true
  fi
  if [ -n "$CI_PG_DIR" ]; then rm -rf "$CI_PG_DIR"; fi
  CI_PG_DIR=""
}
