#!/bin/sh
# Install (or upgrade) carapace-agent and tool shims in the VM, from this checkout.
#
#   sudo deploy/install-vm.sh --server 192.168.122.1:8765 --token-file vm1.token \
#       --expose signal-cli=127.0.0.1:8080 --shim gh --shim op
#   sudo deploy/install-vm.sh --rollback          # back to the previous release
#
# Re-running it without config options upgrades: a new release venv, the 'current'
# link switched, agent.env and the token left as they are. See DEPLOYMENT.md.
set -eu

. "$(dirname -- "$0")/common.sh"

usage() {
    cat <<EOF
Usage: install-vm.sh [OPTIONS]

Installs carapace-agent, carapace-shim and carapace-debug into a venv under PREFIX,
links carapace-agent and carapace-debug into BINDIR, writes /etc/carapace/agent.env
and /etc/carapace/token, installs carapace-agent.service, tool shims, and
/etc/profile.d/carapace.sh (so shims find the agent's socket).

VM options:
  --server HOST:PORT       the carapace-server (CARAPACE_SERVER_HOST/PORT); vsock:2:PORT
                           dials the host over vsock (no network needed)
  --token-file FILE        this agent's NAME:TOKEN file, as install-host.sh --agent made it;
                           copied to /etc/carapace/token (0640 root:carapace)
  --expose TOOL=[HOST:]PORT  serve HTTP tool TOOL on a local port (repeatable)
  --shim TOOL              install a shim for CLI tool TOOL (repeatable)
  --shim-dir DIR           where shims go (default: BINDIR; it must come before the
                           real tool on users' PATH)

Users who run shims must be in group 'carapace' (usermod -aG carapace USER).

EOF
    common_usage
}

SERVER=
TOKEN_SRC=
EXPOSE=
SHIMS=
SHIM_DIR=
while [ $# -gt 0 ]; do
    common_option "$@"
    if [ "$USED" -gt 0 ]; then
        shift "$USED"
        continue
    fi
    case $1 in
        --server|--token-file|--expose|--shim|--shim-dir)
            [ $# -ge 2 ] || die "$1 needs a value"
            case $1 in
                --server) SERVER=$2 ;;
                --token-file) TOKEN_SRC=$2 ;;
                --expose) EXPOSE="$EXPOSE --expose $2" ;;
                --shim) SHIMS="$SHIMS $2" ;;
                --shim-dir) SHIM_DIR=$2 ;;
            esac
            shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done

setup_paths
SHIM_DIR=${SHIM_DIR:-$BINDIR}
case $SHIM_DIR in /*) ;; *) die "--shim-dir must be an absolute path" ;; esac
S=$ROOT$SHIM_DIR
SOCKET=$ROOT/run/carapace/agent.sock

if [ "$ROLLBACK" = 1 ]; then
    rollback_release
    say "now restart the agent: systemctl restart carapace-agent"
    exit 0
fi

env_file=$ETC/agent.env
if [ -f "$env_file" ] && [ "$FORCE_CONFIG" = 0 ] && { [ -n "$SERVER" ] || [ -n "$EXPOSE" ]; }; then
    die "$env_file exists: edit it, or pass --force-config to rewrite it (kept as .bak)"
fi
if [ ! -f "$env_file" ] || [ "$FORCE_CONFIG" = 1 ]; then
    [ -n "$SERVER" ] || die "--server HOST:PORT is needed to write $env_file"
    case $SERVER in
        *:*) SERVER_HOST=${SERVER%:*}; SERVER_PORT=${SERVER##*:} ;;
        *) die "--server must be HOST:PORT" ;;
    esac
    case $SERVER_PORT in ''|*[!0-9]*) die "--server $SERVER: the port is not a number" ;; esac
fi
if [ -n "$TOKEN_SRC" ]; then
    [ -r "$TOKEN_SRC" ] || die "--token-file $TOKEN_SRC: cannot read it"
    grep -Eq '^[A-Za-z0-9][A-Za-z0-9._-]*:.{16,}' "$TOKEN_SRC" \
        || die "$TOKEN_SRC is not a NAME:TOKEN line (make one with install-host.sh --agent NAME)"
elif [ ! -f "$ETC/token" ]; then
    die "no token yet: pass --token-file FILE (from install-host.sh --agent NAME on the host)"
fi

ensure_service_user
install_release
link_scripts carapace-agent carapace-debug
make_etc

if [ -n "$TOKEN_SRC" ]; then
    write_private "$ETC/token" <"$TOKEN_SRC"
    say "wrote $ETC/token (agent $(cut -d: -f1 "$ETC/token" | head -n 1))"
fi

if [ ! -f "$env_file" ] || [ "$FORCE_CONFIG" = 1 ]; then
    [ ! -f "$env_file" ] || cp -p "$env_file" "$env_file.bak"
    sed -e "s|/etc/carapace|$ETC|g" -e "s|/run/carapace|$ROOT/run/carapace|g" \
        "$SRC/deploy/agent.env.example" \
        | set_env CARAPACE_SERVER_HOST "$SERVER_HOST" \
        | set_env CARAPACE_SERVER_PORT "$SERVER_PORT" \
        | set_env CARAPACE_AGENT_ARGS "${EXPOSE# }" \
        | write_private "$env_file"
    say "wrote $env_file"
fi

# -- shims: symlinks to $PREFIX/current/bin/carapace-shim ----------------------------
# Run through current/bin/python so the links name current/, not this release:
# they keep working across upgrades and rollbacks.
existing=$("$P/current/bin/python" -m carapace.agent.main shims list --dir "$S" | cut -d' ' -f1)
all_shims=$(printf '%s\n' $SHIMS $existing | awk 'NF && !seen[$0]++')
if [ -n "$all_shims" ]; then
    # shellcheck disable=SC2086  # one word per tool
    "$P/current/bin/python" -m carapace.agent.main shims install --dir "$S" $all_shims
fi

# Login shells: shims must use the agent's socket (not $XDG_RUNTIME_DIR/carapace/...).
profile=$ROOT/etc/profile.d/carapace.sh
mkdir -p "$(dirname "$profile")"
{
    printf '# Written by Carapace install-vm.sh: tool shims talk to the system agent.\n'
    printf 'export CARAPACE_AGENT_SOCKET=%s\n' "$SOCKET"
    if [ "$SHIM_DIR" != "$BINDIR" ]; then
        printf 'case ":$PATH:" in *":%s:"*) ;; *) PATH="%s:$PATH" ;; esac\n' "$S" "$S"
    fi
} >"$profile.new"
chmod 0644 "$profile.new"
mv -f "$profile.new" "$profile"

install_unit carapace-agent.service
prune_releases
shim_list=$(printf '%s\n' $all_shims | paste -sd ' ' -)

cat <<EOF

Carapace agent installed ($(readlink "$P/current")).
  config:  $env_file, $ETC/token
  shims:   ${shim_list:-none} in $S (users need group carapace: usermod -aG carapace USER)
  run:     systemctl start carapace-agent
  check:   journalctl -u carapace-agent   (look for 'connected')
EOF
