# Shared by install-host.sh and install-vm.sh (sourced, not run). POSIX sh.
#
# Layout it creates (ROOT is empty for a real install):
#   $ROOT$PREFIX/releases/VERSION-STAMP/   one venv per install (kept for rollback)
#   $ROOT$PREFIX/current -> releases/...    the release in use (units run from here)
#   $ROOT$BINDIR/carapace-*                 symlinks to $PREFIX/current/bin/carapace-*
#   $ROOT/etc/carapace/                     env files, tokens, policy (root:carapace 0750)
#   $ROOT/etc/systemd/system/*.service      the units, with the paths above filled in

SRC=$(CDPATH= cd -- "$(dirname -- "$0")/.." && pwd)
ROOT=${CARAPACE_ROOT:-}
PREFIX=${CARAPACE_PREFIX:-/opt/carapace}
BINDIR=${CARAPACE_BINDIR:-/usr/local/bin}
PYTHON=${CARAPACE_PYTHON:-python3}
PIP_ARGS=${CARAPACE_PIP_ARGS:-}
SERVICE_USER=carapace
KEEP=3
UNITS=1
SYSTEMCTL=1
ROLLBACK=0
FORCE_CONFIG=0

say() { printf '%s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

# Set up the derived paths once the options are parsed.
setup_paths() {
    case $PREFIX in /*) ;; *) die "--prefix must be an absolute path: $PREFIX" ;; esac
    case $BINDIR in /*) ;; *) die "--bindir must be an absolute path: $BINDIR" ;; esac
    if [ -n "$ROOT" ]; then
        mkdir -p "$ROOT"
        ROOT=$(CDPATH= cd -- "$ROOT" && pwd)
    fi
    P=$ROOT$PREFIX            # where the releases live, as seen from here
    B=$ROOT$BINDIR
    ETC=$ROOT/etc/carapace
    LOGDIR=$ROOT/var/log/carapace
    UNITDIR=$ROOT/etc/systemd/system
    # systemctl only for a real install by root on a systemd machine.
    if [ "$SYSTEMCTL" = 1 ]; then
        if [ -n "$ROOT" ] || ! is_root || ! command -v systemctl >/dev/null 2>&1 \
            || [ ! -d /run/systemd/system ]; then
            SYSTEMCTL=0
        fi
    fi
}

have_service_user() { id "$SERVICE_USER" >/dev/null 2>&1; }

# The dedicated user the units run as (real installs by root only).
ensure_service_user() {
    if [ -n "$ROOT" ] || ! is_root; then
        return 0
    fi
    if ! have_service_user; then
        useradd --system --user-group --home-dir /var/lib/carapace --no-create-home \
            --shell /usr/sbin/nologin "$SERVICE_USER"
        say "created system user $SERVICE_USER"
    fi
}

# chown root:carapace (or the given owner) when we can; a test install keeps its owner.
own() {
    owner=$1
    shift
    if [ -z "$ROOT" ] && is_root && have_service_user; then
        chown "$owner" "$@"
    fi
}

check_python() {
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set CARAPACE_PYTHON)"
    "$PYTHON" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
        || die "$PYTHON is older than 3.11 (or has no venv module: apt-get install python3-venv)"
    # A venv runs its base interpreter in place. The services run as user carapace
    # with ProtectHome=yes, so that interpreter must not live under /root or /home
    # (pyenv, conda, ~/.local builds): they could neither see nor run it.
    base=$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.base_prefix))')
    case $base in
        /root|/root/*|/home/*|/run/user/*)
            if [ -z "$ROOT" ]; then
                die "$PYTHON lives in $base, which the services cannot reach (ProtectHome, user $SERVICE_USER): use a system Python, e.g. --python /usr/bin/python3"
            fi ;;
    esac
}

project_version() {
    sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$SRC/pyproject.toml" | head -n 1
}

# Install the checkout into a new release venv and make it current.
install_release() {
    check_python
    [ -f "$SRC/pyproject.toml" ] || die "$SRC is not a Carapace checkout"
    version=$(project_version)
    rev=$(git -C "$SRC" rev-parse --short HEAD 2>/dev/null || true)
    stamp=$(date -u +%Y%m%dT%H%M%SZ)
    name="$version-$stamp${rev:+-$rev}"
    rel=$P/releases/$name
    [ ! -e "$rel" ] || die "$rel already exists"
    mkdir -p "$P/releases"
    say "installing Carapace $version${rev:+ ($rev)} into $rel"
    "$PYTHON" -m venv "$rel"
    # Build from a copy, so the checkout gets no build/ or egg-info droppings.
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    # The code folders are the ones pyproject.toml's [tool.setuptools.package-dir] maps,
    # so a new top-level package cannot be left out of the release.
    folders=$(sed -n 's/^"carapace\.[a-z_]*" *= *"\([A-Za-z0-9_]*\)"$/\1/p' "$SRC/pyproject.toml")
    [ -n "$folders" ] || die "$SRC/pyproject.toml maps no carapace.* package folders"
    for f in pyproject.toml README.md $folders; do
        cp -R "$SRC/$f" "$build/"
    done
    find "$build" -name __pycache__ -type d -prune -exec rm -rf {} +
    # shellcheck disable=SC2086  # PIP_ARGS is a list of words on purpose
    "$rel/bin/python" -m pip install --quiet --disable-pip-version-check $PIP_ARGS "$build" \
        || die "pip install failed (offline? see DEPLOYMENT.md, 'No internet access')"
    rm -rf "$build"
    trap - EXIT
    doc=$rel/share/doc/carapace
    mkdir -p "$doc/examples" "$doc/deploy"
    [ ! -f "$SRC/DEPLOYMENT.md" ] || cp "$SRC/DEPLOYMENT.md" "$doc/"
    [ ! -d "$SRC/examples/policies" ] || cp -R "$SRC/examples/policies" "$doc/examples/"
    cp "$SRC"/deploy/*.service "$SRC"/deploy/*.env.example "$doc/deploy/"
    "$rel/bin/carapace-debug" --version >/dev/null || die "the new release does not run"
    switch_current "releases/$name"
}

# Point $P/current at a release (relative link, replaced atomically).
switch_current() {
    ln -s "$1" "$P/.current.new"
    mv -f -T "$P/.current.new" "$P/current" 2>/dev/null || {
        rm -f "$P/current"
        mv -f "$P/.current.new" "$P/current"
    }
    say "current release: $1"
}

# Switch back to the release installed before the current one.
rollback_release() {
    [ -L "$P/current" ] || die "no current release under $P"
    cur=$(basename "$(readlink "$P/current")")
    prev=$(ls -1 "$P/releases" | sort | awk -v cur="$cur" '$0 == cur { print last; exit } { last = $0 }')
    [ -n "$prev" ] || die "no release older than $cur in $P/releases"
    switch_current "releases/$prev"
}

# Keep the newest $KEEP releases and always the current one.
prune_releases() {
    [ "$KEEP" -gt 0 ] || return 0
    cur=$(basename "$(readlink "$P/current")")
    ls -1 "$P/releases" | sort -r | awk -v keep="$KEEP" 'NR > keep' | while read -r old; do
        if [ "$old" != "$cur" ]; then
            rm -rf "${P:?}/releases/$old"
            say "removed old release $old"
        fi
    done
}

# Symlink BINDIR/NAME -> $PREFIX/current/bin/NAME for each NAME.
link_scripts() {
    mkdir -p "$B"
    for s in "$@"; do
        target=$P/current/bin/$s
        link=$B/$s
        if [ -e "$link" ] && [ ! -L "$link" ]; then
            die "$link exists and is not a symlink; refusing to replace it"
        fi
        ln -sfn "$target" "$link"
    done
    say "linked $* into $B"
}

# Config directory: root:carapace 0750 (the service reads, never writes).
make_etc() {
    mkdir -p "$ETC"
    chmod 0750 "$ETC"
    own root:"$SERVICE_USER" "$ETC"
}

# Write a root:carapace 0640 file from stdin (atomically, never world-readable).
write_private() {
    dest=$1
    tmp="$dest.new.$$"
    (umask 077 && cat >"$tmp")
    chmod 0640 "$tmp"
    own root:"$SERVICE_USER" "$tmp"
    mv -f "$tmp" "$dest"
}

# Replace the value of KEY=... in an env file read on stdin. A value with spaces is
# double-quoted, which both systemd's EnvironmentFile= and sh read the same way.
set_env() {
    key=$1
    value=$2
    case $value in *[[:space:]]*) value="\"$value\"" ;; esac
    awk -v key="$key" -v value="$value" '
        index($0, key "=") == 1 { print key "=" value; done = 1; next }
        { print }
        END { if (!done) print key "=" value }'
}

# Render a unit: our default paths replaced by the chosen ones.
render_unit() {
    sed -e "s|/opt/carapace|$P|g" \
        -e "s|/etc/carapace|$ETC|g" \
        -e "s|/var/log/carapace|$LOGDIR|g" \
        "$SRC/deploy/$1"
}

install_unit() {
    unit=$1
    [ "$UNITS" = 1 ] || return 0
    mkdir -p "$UNITDIR"
    render_unit "$unit" >"$UNITDIR/$unit.new"
    chmod 0644 "$UNITDIR/$unit.new"
    mv -f "$UNITDIR/$unit.new" "$UNITDIR/$unit"
    say "wrote $UNITDIR/$unit"
    if [ "$SYSTEMCTL" = 1 ]; then
        systemctl daemon-reload
        systemctl enable "$unit" >/dev/null 2>&1 || systemctl enable "$unit"
        say "enabled $unit (start it with: systemctl start ${unit%.service})"
    fi
}

common_usage() {
    cat <<EOF
Common options:
  --prefix DIR     where releases live (default /opt/carapace; env CARAPACE_PREFIX)
  --bindir DIR     where console scripts are linked (default /usr/local/bin; CARAPACE_BINDIR)
  --root DIR       install into a self-contained tree under DIR instead of / (for tests and
                   staging: every path, the ones written into env files and units too, gets
                   DIR in front; no user is created and systemctl is never run; CARAPACE_ROOT)
  --python PY      interpreter for the venv, >= 3.11 (default python3; CARAPACE_PYTHON)
  --pip-args ARGS  extra pip arguments, e.g. "--no-index --find-links /srv/wheels" for an
                   offline install (CARAPACE_PIP_ARGS)
  --keep N         releases to keep for rollback (default 3; 0 keeps all)
  --no-units       do not write systemd units
  --no-systemctl   write units but do not run systemctl (daemon-reload, enable)
  --force-config   rewrite existing env files (the old one is kept as FILE.bak)
  --rollback       switch back to the previous release and exit (then restart the service)
  -h, --help       this help
EOF
}

# Parse one common option: sets USED to how many arguments it took (0: not ours).
common_option() {
    USED=1
    case $1 in
        --prefix|--bindir|--root|--python|--pip-args|--keep)
            [ $# -ge 2 ] || die "$1 needs a value"
            USED=2
            case $1 in
                --prefix) PREFIX=$2 ;;
                --bindir) BINDIR=$2 ;;
                --root) ROOT=$2 ;;
                --python) PYTHON=$2 ;;
                --pip-args) PIP_ARGS=$2 ;;
                --keep) KEEP=$2 ;;
            esac ;;
        --no-units) UNITS=0 ;;
        --no-systemctl) SYSTEMCTL=0 ;;
        --force-config) FORCE_CONFIG=1 ;;
        --rollback) ROLLBACK=1 ;;
        *) USED=0 ;;
    esac
}

# bubblewrap confines the CLI tools the server runs (DEPLOYMENT.md, "Confinement").
# A real install by root gets it from the distribution's packages when it is
# missing; then it is checked as the service user, since unprivileged user
# namespaces may be turned off (sysctl, AppArmor) and the server would then run
# its tools unconfined (it says so: WARNING at start, carapace-debug health).
ensure_bubblewrap() {
    if ! command -v bwrap >/dev/null 2>&1; then
        if [ -z "$ROOT" ] && is_root && command -v apt-get >/dev/null 2>&1; then
            say "installing bubblewrap (confines CLI tools)"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null \
                || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
                     apt-get install -y -qq bubblewrap >/dev/null; } \
                || warn "installing bubblewrap failed: CLI tools will run unconfined"
        else
            warn "bubblewrap (bwrap) is not installed: CLI tools will run unconfined" \
                "until it is (apt-get install bubblewrap)"
            return 0
        fi
    fi
    [ -z "$ROOT" ] && is_root && have_service_user || return 0
    command -v runuser >/dev/null 2>&1 || return 0
    if ! runuser -u "$SERVICE_USER" -- bwrap --ro-bind / / --dev /dev --proc /proc \
            --unshare-user --unshare-pid true >/dev/null 2>&1; then
        warn "bwrap does not work for user $SERVICE_USER (unprivileged user namespaces" \
            "off?): CLI tools will run unconfined; see DEPLOYMENT.md, Confinement"
    fi
}

