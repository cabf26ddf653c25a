#!/bin/sh
# Install (or upgrade) carapace-server on the host, from this checkout.
#
#   sudo deploy/install-host.sh --agent vm1 --agent vm2
#   sudo deploy/install-host.sh --rollback          # back to the previous release
#
# Re-running it upgrades: a new release venv, the 'current' link switched, config
# and tokens left as they are (new --agent names are added). See DEPLOYMENT.md.
set -eu

. "$(dirname -- "$0")/common.sh"

usage() {
    cat <<EOF
Usage: install-host.sh [OPTIONS]

Installs carapace-server and carapace-debug into a venv under PREFIX, links them
into BINDIR, creates /etc/carapace (server.env, tokens, a deny-all policy.yaml if
there is none), /var/log/carapace, the user 'carapace' and carapace-server.service.
Installs bubblewrap (which confines the CLI tools) with apt-get if it is missing.

Host options:
  --agent NAME       make a token for agent NAME (repeatable): a NAME:TOKEN line in
                     /etc/carapace/tokens and a copy for the VM in
                     /etc/carapace/agents/NAME.token (mode 0600; copy it, then delete it)
  --rotate NAME      replace agent NAME's token (the old one stops working at the next
                     reload: systemctl reload carapace-server)
  --listen HOST:PORT where agents connect (CARAPACE_LISTEN; default 0.0.0.0:8765); also
                     unix:/path/to/socket or vsock:PORT, several separated by spaces
  --policy FILE      use FILE as /etc/carapace/policy.yaml when there is none yet

EOF
    common_usage
}

AGENTS=
ROTATE=
LISTEN=
POLICY_SRC=
while [ $# -gt 0 ]; do
    common_option "$@"
    if [ "$USED" -gt 0 ]; then
        shift "$USED"
        continue
    fi
    case $1 in
        --agent|--rotate|--listen|--policy)
            [ $# -ge 2 ] || die "$1 needs a value"
            case $1 in
                --agent) AGENTS="$AGENTS $2" ;;
                --rotate) ROTATE="$ROTATE $2" ;;
                --listen) LISTEN=$2 ;;
                --policy) POLICY_SRC=$2 ;;
            esac
            shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done

setup_paths

if [ "$ROLLBACK" = 1 ]; then
    rollback_release
    say "now restart the server: systemctl restart carapace-server"
    exit 0
fi

for name in $AGENTS $ROTATE; do
    printf '%s' "$name" | grep -Eq '^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$' \
        || die "agent name '$name' is not valid (letters, digits, '.', '_', '-')"
done
if [ -n "$POLICY_SRC" ] && [ ! -f "$POLICY_SRC" ]; then
    die "--policy $POLICY_SRC: no such file"
fi

ensure_service_user
ensure_bubblewrap
install_release
link_scripts carapace-server carapace-debug
make_etc
PY=$P/current/bin/python

# -- server.env -----------------------------------------------------------------
env_file=$ETC/server.env
if [ ! -f "$env_file" ] || [ "$FORCE_CONFIG" = 1 ]; then
    [ ! -f "$env_file" ] || cp -p "$env_file" "$env_file.bak"
    sed -e "s|/etc/carapace|$ETC|g" -e "s|/var/log/carapace|$LOGDIR|g" -e "s|/opt/carapace|$P|g" \
        -e "s|/run/carapace-server|$ROOT/run/carapace-server|g" \
        "$SRC/deploy/server.env.example" \
        | set_env CARAPACE_LISTEN "${LISTEN:-0.0.0.0:8765}" \
        | write_private "$env_file"
    say "wrote $env_file"
elif [ -n "$LISTEN" ]; then
    die "$env_file exists: edit CARAPACE_LISTEN there, or pass --force-config to rewrite it"
fi

# -- tokens: one NAME:TOKEN line per agent ---------------------------------------
tokens=$ETC/tokens
[ -f "$tokens" ] || { [ -n "$AGENTS" ] || AGENTS=default; }
has_agent() {
    [ -f "$tokens" ] && awk -v n="$1:" 'index($0, n) == 1 { found = 1 } END { exit !found }' "$tokens"
}
new_token() {
    "$PY" -c 'import secrets; print(secrets.token_urlsafe(32))'
}
agent_copy() {
    # The VM's copy of one agent's line: root-only, to be moved to the VM.
    mkdir -p "$ETC/agents"
    chmod 0700 "$ETC/agents"
    (umask 077 && printf '%s:%s\n' "$1" "$2" >"$ETC/agents/$1.token")
    say "  agent $1: token for the VM in $ETC/agents/$1.token"
}
umask 077
for name in $AGENTS; do
    if has_agent "$name"; then
        say "  agent $name: already has a token (use --rotate $name to replace it)"
        continue
    fi
    token=$(new_token)
    { [ ! -f "$tokens" ] || cat "$tokens"; printf '%s:%s\n' "$name" "$token"; } \
        | write_private "$tokens"
    agent_copy "$name" "$token"
done
for name in $ROTATE; do
    has_agent "$name" || die "no agent $name in $tokens"
    token=$(new_token)
    awk -v name="$name" -v line="$name:$token" \
        'index($0, name ":") == 1 { print line; next } { print }' "$tokens" \
        | write_private "$tokens"
    agent_copy "$name" "$token"
    say "  agent $name: token replaced; run 'systemctl reload carapace-server' to cut the old one"
done
umask 022

# -- policy ----------------------------------------------------------------------
policy=$ETC/policy.yaml
if [ ! -f "$policy" ]; then
    if [ -n "$POLICY_SRC" ]; then
        write_private "$policy" <"$POLICY_SRC"
    else
        write_private "$policy" <<EOF
# $policy: what the VMs may do. Nothing yet: every request is denied.
# Start from an example in $P/current/share/doc/carapace/examples/policies/,
# check it with 'carapace-debug policy lint $policy',
# then apply it with 'systemctl reload carapace-server'.
tools: {}
EOF
    fi
    say "wrote $policy"
fi
rc=0
"$P/current/bin/carapace-debug" policy lint "$policy" >/dev/null 2>&1 || rc=$?
[ "$rc" -ne 2 ] || die "$policy does not load: run carapace-debug policy lint $policy"
[ "$rc" -ne 1 ] || warn "carapace-debug policy lint $policy has warnings"

# -- audit log directory ------------------------------------------------------------
mkdir -p "$LOGDIR"
chmod 0750 "$LOGDIR"
own "$SERVICE_USER:$SERVICE_USER" "$LOGDIR"

install_unit carapace-server.service
prune_releases

cat <<EOF

Carapace server installed ($(readlink "$P/current")).
  config:  $ETC/server.env, $policy, $tokens
  audit:   $LOGDIR/audit.jsonl
  run:     systemctl start carapace-server    (reload after policy or token edits)
  check:   carapace-debug health
Copy each $ETC/agents/NAME.token to its VM (install-vm.sh --token-file), then delete it.
EOF
