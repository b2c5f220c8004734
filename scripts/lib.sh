# Shared helpers for fogcdn's scripts. Source it; do not run it.

# One build directory for every clone, so a fresh clone reuses the (slow, RocksDB) build.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fogcdn/target}"
FOG_BIN="$CARGO_TARGET_DIR/release"

log() { printf '%s\n' "$*" >&2; }

# ensure_packages PKG...: installs the Debian packages that are missing (as root, or through sudo).
ensure_packages() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing missing system packages: ${missing[*]}"
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null; then sudo="sudo"; else
            log "error: need root (or sudo) to install: ${missing[*]}"; return 1
        fi
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# ensure_build_deps: what compiling fogcdn needs (librocksdb-sys runs bindgen, which needs libclang).
ensure_build_deps() {
    command -v cargo >/dev/null || { log "error: cargo not found; install Rust from rustup.rs"; return 1; }
    ensure_packages libclang-dev clang curl
}

# ensure_geckodriver: Firefox's WebDriver server, which Debian does not package: from crates.io, pinned, into
# ~/.cache/fogcdn/tools (its own build directory, not the workspace's), where the browser tests look for it.
ensure_geckodriver() {
    local version=0.37.1 bin="$HOME/.cache/fogcdn/tools/bin/geckodriver"
    [ "$("$bin" --version 2>/dev/null | head -n1)" = "geckodriver $version" ] && return 0
    env -u CARGO_TARGET_DIR cargo install geckodriver --locked --version "$version" --root "$HOME/.cache/fogcdn/tools" >&2
}

# pg_cmd CMD...: runs a PostgreSQL program of the packaged server, as the postgres user when root
# (PostgreSQL refuses to run as root).
pg_cmd() {
    local bin; bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- env PATH="$bin:$PATH" "$@"; else env PATH="$bin:$PATH" "$@"; fi
}

# start_postgres DIR PORT: a throwaway PostgreSQL server in DIR (its parent must be traversable by the
# postgres user) on 127.0.0.1:PORT with a database fogcdn, trusting local connections; prints its
# connection string. stop_postgres DIR stops it.
start_postgres() {
    local dir=$1 port=$2
    mkdir -p "$dir" && chmod 700 "$dir"
    if [ "$(id -u)" = 0 ]; then chown postgres "$dir"; fi
    pg_cmd initdb -D "$dir" -U postgres --auth=trust > /dev/null
    pg_cmd pg_ctl -D "$dir" -l "$dir/server.log" -w -o "-c listen_addresses=127.0.0.1 -c port=$port \
-c unix_socket_directories='$dir' -c shared_buffers=32MB" start > /dev/null
    pg_cmd createdb -h 127.0.0.1 -p "$port" -U postgres fogcdn
    printf 'host=127.0.0.1 port=%s user=postgres dbname=fogcdn\n' "$port"
}
stop_postgres() { pg_cmd pg_ctl -D "$1" -m fast stop > /dev/null 2>&1 || true; }

build_release() {
    log "building (release; the first build compiles RocksDB and takes ~20 min) into $CARGO_TARGET_DIR"
    cargo build --release --locked --workspace
}

# wait_listening LOGFILE: prints the address a fogcdn process logged as "listening on ADDR".
wait_listening() {
    local logfile=$1 addr=""
    for _ in $(seq 1 600); do
        addr=$(grep -o 'listening on [^ ]*' "$logfile" 2>/dev/null | head -n1 | sed 's/^listening on //; s#^http://##') || true
        [ -n "$addr" ] && { printf '%s\n' "$addr"; return 0; }
        sleep 0.1
    done
    log "error: $(basename "$logfile" .log) did not start; its log:"; cat "$logfile" >&2; return 1
}
