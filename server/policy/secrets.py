"""Secret naming: which ``env_inject`` names hold secrets, which names may not pass through."""

from __future__ import annotations

import re
from typing import Final

__all__ = ["env_name_is_secret", "passthrough_refusal"]


# Passthrough refusals: names that let whoever sets them run code, load
# libraries, redirect traffic or change trust in the host process. The
# passthrough list is already an allowlist; this stops an operator from
# opening one of these doors by accident.
_REFUSED_PASSTHROUGH: Final = frozenset(
    {
        "PATH", "HOME", "ENV", "BASH_ENV", "IFS", "CDPATH", "SHELL", "SHELLOPTS",
        "BASHOPTS", "PS4", "PROMPT_COMMAND", "GLOBIGNORE", "EDITOR", "VISUAL",
        "PAGER", "BROWSER", "LESSOPEN", "LESSCLOSE", "GCONV_PATH", "LOCPATH",
        "NLSPATH", "HOSTALIASES", "RESOLV_HOST_CONF", "LOCALDOMAIN", "RES_OPTIONS",
        "GLIBC_TUNABLES", "TZDIR", "NODE_OPTIONS", "NODE_PATH", "NODE_EXTRA_CA_CERTS",
        "PERLLIB", "RUBYLIB", "RUBYOPT", "CLASSPATH", "JAVA_TOOL_OPTIONS",
        "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "SSL_CERT_FILE", "SSL_CERT_DIR",
        "CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "OPENSSL_CONF", "OPENSSL_ENGINES",
        "SSLKEYLOGFILE", "XDG_CONFIG_HOME", "XDG_CONFIG_DIRS", "SSH_AUTH_SOCK",
        "SSH_ASKPASS", "SUDO_ASKPASS", "GNUPGHOME",
    }
)
_REFUSED_PASSTHROUGH_PREFIXES: Final = (
    "LD_", "DYLD_", "BASH_FUNC_", "PYTHON", "PERL5", "RUBY", "GIT_", "MALLOC_", "LC_",
)
_REFUSED_PASSTHROUGH_SUFFIXES: Final = ("_PROXY",)


_CAMEL_SPLIT: Final = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")
_SECRET_INFIXES: Final = (
    "TOKEN", "SECRET", "PASSWORD", "PASSWD", "PASSPHRASE", "CREDENTIAL", "SESSION",
    "COOKIE", "AUTHORIZATION",
)


def env_name_is_secret(name: str) -> bool:
    """Whether an ``env_inject`` variable name marks its value as a secret.

    Word-based (see the package docstring) so that ``GOG_KEYRING_BACKEND``
    is not a secret but ``GOG_KEYRING_PASSWORD`` is.
    """
    for word in _CAMEL_SPLIT.split(name):
        w = word.upper()
        if not w:
            continue
        if any(marker in w for marker in _SECRET_INFIXES):
            return True
        if w.endswith("AUTH") or (w.startswith("AUTH") and not w.startswith("AUTHOR")):
            return True
        if w.endswith(("KEY", "KEYS")) or w == "PASS":
            return True
    return False


def passthrough_refusal(name: str) -> str | None:
    """Why ``name`` may not be in ``env_passthrough``, or None if it may.

    LC_* is refused too: the base environment fixes the locale, and locale
    variables can point glibc at attacker-chosen locale data.
    """
    upper = name.upper()
    if upper in _REFUSED_PASSTHROUGH or upper == "LANG":
        return "it controls how the host process finds programs, libraries or its locale"
    if upper.startswith(_REFUSED_PASSTHROUGH_PREFIXES):
        return "variables with this prefix steer loaders, interpreters or git"
    if upper.endswith(_REFUSED_PASSTHROUGH_SUFFIXES) or upper == "PROXY":
        return "proxy variables could route the tool's traffic (and credentials) to the VM"
    return None
