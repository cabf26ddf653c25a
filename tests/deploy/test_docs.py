"""DEPLOYMENT.md, the example policies, the env files and the install scripts say
only what the programs really do: every flag a documented command uses exists,
every variable an env file sets is read, every policy command in the docs runs
and decides as its comment says. Cheap: no installs here (see test_install.py).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

from carapace.agent.main import main as agent_main
from carapace.debug.main import cli as debug_main
from carapace.server.main import main as server_main
from carapace.server.main import reload_command
from helpers.procs import script

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "DEPLOYMENT.md"
DEPLOY = REPO / "deploy"
EXAMPLES = REPO / "examples" / "policies"

COMMANDS: dict[str, click.Command] = {
    "carapace-server": server_main,
    "carapace-agent": agent_main,
    "carapace-debug": debug_main,
}


# --------------------------------------------------------------------------- helpers


def doc_commands(text: str) -> list[str]:
    """Command lines in fenced blocks (continuations joined) and in inline code."""
    found: list[str] = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        found += block.replace("\\\n", " ").splitlines()
    spans = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    found += [" ".join(span.split()) for span in spans]
    pattern = re.compile(r"(?:^|[;&|(]\s*|sudo\s+)((?:carapace-(?:server|agent|debug)|"
                         r"deploy/install-(?:host|vm)\.sh)(?=\s|$)[^;&|)#]*)")
    commands = []
    for line in found:
        line = re.sub(r"\s#.*$", "", line.strip())
        commands += [m.group(1).strip() for m in pattern.finditer(line)]
    return commands


def click_options(argv: list[str]) -> tuple[str, set[str]]:
    """The command path named by argv's leading words, and every option along it."""
    prog, *rest = argv
    cmd: click.Command = COMMANDS[prog]
    path = [prog]
    if prog == "carapace-server" and rest[:1] == ["reload"]:
        cmd, rest, path = reload_command, rest[1:], [prog, "reload"]
    opts = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    for word in rest:
        if isinstance(cmd, click.Group) and word in cmd.commands:
            cmd = cmd.commands[word]
            path.append(word)
            opts |= {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        elif not word.startswith("-"):
            break
    return " ".join(path), opts | {"-h", "--help"}


def script_options(name: str) -> set[str]:
    out = subprocess.run(["sh", str(DEPLOY / name), "--help"], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return set(re.findall(r"--[a-z][a-z-]*", out))


def envvars(cmd: click.Command) -> set[str]:
    names: set[str] = set()
    stack = [cmd]
    while stack:
        c = stack.pop()
        for p in c.params:
            if isinstance(p.envvar, str):
                names.add(p.envvar)
        if isinstance(c, click.Group):
            stack += list(c.commands.values())
    return names


# --------------------------------------------------------------------------- the doc


def test_every_documented_flag_exists() -> None:
    commands = doc_commands(DOC.read_text())
    assert len(commands) > 30, commands
    script_opts = {s: script_options(s) for s in ("install-host.sh", "install-vm.sh")}
    problems = []
    for command in commands:
        try:
            argv = shlex.split(command)
        except ValueError:
            argv = command.split()
        if argv[0].startswith("deploy/"):
            where, known = argv[0], script_opts[Path(argv[0]).name] | {"-h"}
        else:
            where, known = click_options(argv)
        for word in argv[1:]:
            if word == "--":
                break  # what follows is the tool's own command line
            if " " in word:
                continue  # a quoted option value, such as --pip-args "--no-index ..."
            flag = word.split("=", 1)[0]
            if flag.startswith("--") and flag not in known:
                problems.append(f"{where}: {flag} (in: {command})")
    assert not problems, "\n".join(problems)


def test_every_documented_variable_is_read() -> None:
    known = (envvars(server_main) | envvars(agent_main) | envvars(debug_main)
             | envvars(reload_command)
             | {"CARAPACE_SERVER_HOST", "CARAPACE_SERVER_PORT",  # read by the agent itself
                "CARAPACE_AGENT_SOCKET",                          # read by carapace-shim
                "CARAPACE_SERVER_ARGS", "CARAPACE_AGENT_ARGS"})   # expanded by the units
    texts = [DOC.read_text(), *(p.read_text() for p in DEPLOY.glob("*.env.example")),
             *(p.read_text() for p in DEPLOY.glob("*.service"))]
    used = set(re.findall(r"\bCARAPACE_[A-Z_]+[A-Z]\b", "\n".join(texts)))
    assert used - known == set()


def test_env_examples_match_their_programs() -> None:
    server_vars = envvars(server_main) | {"CARAPACE_SERVER_ARGS"}
    agent_vars = envvars(agent_main) | {"CARAPACE_SERVER_HOST", "CARAPACE_SERVER_PORT",
                                        "CARAPACE_AGENT_ARGS"}
    for name, allowed in (("server.env.example", server_vars),
                          ("agent.env.example", agent_vars)):
        text = (DEPLOY / name).read_text()
        names = set(re.findall(r"^#?(CARAPACE_[A-Z_]+)=", text, flags=re.M))
        assert names and names <= allowed, (name, names - allowed)
    for unit, args in (("carapace-server.service", "$CARAPACE_SERVER_ARGS"),
                       ("carapace-agent.service", "$CARAPACE_AGENT_ARGS")):
        text = (DEPLOY / unit).read_text()
        assert args in text and "EnvironmentFile=/etc/carapace/" in text


@pytest.fixture(scope="module")
def combined_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example policies in one file, as an operator would combine them."""
    tools: dict[str, object] = {}
    for name in ("signal-cli", "op", "gh", "gog"):
        tools.update(yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())["tools"])
    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    path.write_text(yaml.safe_dump({"tools": tools}, sort_keys=False))
    return path


def test_documented_policy_checks_run(combined_policy: Path) -> None:
    checks = [c for c in doc_commands(DOC.read_text())
              if c.startswith("carapace-debug policy check /etc/carapace/policy.yaml")]
    assert len(checks) >= 5
    for command in checks:
        argv = shlex.split(command.replace("/etc/carapace/policy.yaml", str(combined_policy)))
        done = subprocess.run([script(argv[0]), *argv[1:]], capture_output=True, text=True,
                              timeout=30)
        # 0 allowed, 1 denied; 2 would be a usage error or a policy that does not load.
        assert done.returncode in (0, 1), (command, done.stdout, done.stderr)


# --------------------------------------------------------------------------- examples


@pytest.mark.parametrize("name", ["signal-cli", "op", "gh", "gog"])
def test_example_policy_loads_and_its_comments_hold(name: str) -> None:
    path = EXAMPLES / f"{name}.yaml"
    debug = script("carapace-debug")
    lint = subprocess.run([debug, "policy", "lint", str(path)], capture_output=True,
                          text=True, timeout=30)
    # Warnings are expected (placeholders, binaries this machine lacks); 2 = does not load.
    assert lint.returncode in (0, 1), lint.stdout + lint.stderr
    text = path.read_text().replace("\\\n#", " ")
    commented = re.findall(r"^#\s+(carapace-debug policy check .*)$", text, flags=re.M)
    assert commented, f"{path.name} shows no policy check example"
    for line in commented:
        denied = bool(re.search(r"#\s*denied", line))
        argv = shlex.split(re.sub(r"\s+#.*$", "", line))
        done = subprocess.run([debug, *argv[1:]], capture_output=True, text=True, timeout=30,
                              cwd=EXAMPLES)
        assert done.returncode == (1 if denied else 0), (line, done.stdout, done.stderr)


def test_example_policies_use_the_new_keys() -> None:
    text = "\n".join(p.read_text() for p in EXAMPLES.glob("*.yaml"))
    for key in ("allow_paths:", "env_passthrough:", "headers_inject:", "env_inject:"):
        assert key in text, key


# --------------------------------------------------------------------------- scripts


@pytest.mark.parametrize("name", ["common.sh", "install-host.sh", "install-vm.sh"])
def test_scripts_parse_as_posix_sh(name: str) -> None:
    for shell in ("sh", "dash", "bash"):
        exe = shutil.which(shell)
        if exe:
            done = subprocess.run([exe, "-n", str(DEPLOY / name)], capture_output=True,
                                  text=True, timeout=30)
            assert done.returncode == 0, (shell, done.stderr)
    if shutil.which("shellcheck"):
        done = subprocess.run(["shellcheck", "-s", "sh", "-x", str(DEPLOY / name)],
                              capture_output=True, text=True, timeout=60, cwd=DEPLOY)
        assert done.returncode == 0, done.stdout


def _fake_release_tree(root: Path, names: list[str], current: str) -> Path:
    prefix = root / "opt/carapace"
    for n in names:
        (prefix / "releases" / n / "bin").mkdir(parents=True)
    (prefix / "current").symlink_to(f"releases/{current}")
    return prefix


def test_rollback_switches_to_the_previous_release(tmp_path: Path) -> None:
    names = ["0.1.0-20260101T000000Z", "0.1.0-20260201T000000Z", "0.1.0-20260301T000000Z"]
    prefix = _fake_release_tree(tmp_path, names, names[2])
    done = subprocess.run(["sh", str(DEPLOY / "install-host.sh"), "--root", str(tmp_path),
                           "--rollback"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert (prefix / "current").readlink() == Path("releases", names[1])
    subprocess.run(["sh", str(DEPLOY / "install-vm.sh"), "--root", str(tmp_path),
                    "--rollback"], capture_output=True, text=True, timeout=30, check=True)
    assert (prefix / "current").readlink() == Path("releases", names[0])
    again = subprocess.run(["sh", str(DEPLOY / "install-vm.sh"), "--root", str(tmp_path),
                            "--rollback"], capture_output=True, text=True, timeout=30)
    assert again.returncode != 0 and "no release older" in again.stderr


def test_vm_script_refuses_to_clobber_config_or_run_without_a_token(tmp_path: Path) -> None:
    def vm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", str(DEPLOY / "install-vm.sh"), "--root", str(tmp_path),
                               *args], capture_output=True, text=True, timeout=30,
                              env={"PATH": "/usr/bin:/bin", "CARAPACE_PYTHON": sys.executable})

    no_token = vm("--server", "127.0.0.1:8765")
    assert no_token.returncode != 0 and "--token-file" in no_token.stderr
    etc = tmp_path / "etc/carapace"
    etc.mkdir(parents=True)
    (etc / "agent.env").write_text("CARAPACE_SERVER_HOST=kept\n")
    (etc / "token").write_text("vm1:" + "x" * 43 + "\n")
    clobber = vm("--server", "127.0.0.1:8765")
    assert clobber.returncode != 0 and "--force-config" in clobber.stderr
    assert (etc / "agent.env").read_text() == "CARAPACE_SERVER_HOST=kept\n"
    assert not (tmp_path / "opt").exists(), "it installed before checking"
