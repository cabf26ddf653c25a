"""Link addresses on every transport: parsing at the edge, the socket family each opens,
unix listeners' mode, stale files and clean-up, and a real vsock round trip where the
kernel has a loopback transport."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from carapace.agent.tunnel import _is_refused
from carapace.runtime.addresses import (
    UNIX_PATH_MAX,
    VSOCK_CID_ANY,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    parse_address,
)
from carapace.runtime.options import FILE_MODE, LISTEN_ADDRESS
from carapace.runtime.transports import (
    ListenError,
    _vsock_socket,
    describe_local,
    describe_peer,
    listening,
    open_stream,
    transport_of,
    transport_of_peer,
)

HAS_VSOCK = hasattr(socket, "AF_VSOCK")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a unix socket path must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="cpt-", dir="/tmp"))
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


# -- parsing ----------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "listen", "expected"), [
    ("127.0.0.1:8765", True, TcpAddress("127.0.0.1", 8765)),
    ("tcp:[::1]:80", False, TcpAddress("::1", 80)),
    ("8765", True, TcpAddress("127.0.0.1", 8765)),
    ("unix:/run/carapace/agent.sock", True, UnixAddress("/run/carapace/agent.sock")),
    ("unix:/run/carapace/agent.sock", False, UnixAddress("/run/carapace/agent.sock")),
    ("vsock:5000", True, VsockAddress(VSOCK_CID_ANY, 5000)),
    ("vsock:3:5000", True, VsockAddress(3, 5000)),
    ("vsock:2:5000", False, VsockAddress(2, 5000)),
    ("VSOCK:2:5000", False, VsockAddress(2, 5000)),
])
def test_address_forms(text: str, listen: bool, expected: object) -> None:
    assert parse_address(text, listen=listen) == expected


@pytest.mark.parametrize(("address", "text"), [
    (TcpAddress("127.0.0.1", 8765), "tcp:127.0.0.1:8765"),
    (TcpAddress("::1", 80), "tcp:[::1]:80"),
    (UnixAddress("/run/x.sock"), "unix:/run/x.sock"),
    (VsockAddress(3, 5000), "vsock:3:5000"),
    (VsockAddress(VSOCK_CID_ANY, 5000), "vsock:5000"),
])
def test_describe_names_the_transport_and_parses_back(address: object, text: str) -> None:
    assert address.describe() == text  # type: ignore[attr-defined]
    assert parse_address(text, listen=True) == address


def test_relative_unix_path_is_made_absolute() -> None:
    assert parse_address("unix:x.sock", listen=True) == UnixAddress(os.path.abspath("x.sock"))


@pytest.mark.parametrize(("text", "listen", "says"), [
    ("vsock:5000", False, "vsock:CID:PORT"),  # a dialler must name the CID
    ("vsock:a:5000", False, "CID and PORT are numbers"),
    ("vsock:2:4294967296", False, "numbers up to"),
    ("vsock:1:2:3", True, "vsock:PORT"),
    ("unix:", True, "give the socket's path"),
    ("unix:/a\0b", True, "NUL"),
    ("unix:/" + "x" * UNIX_PATH_MAX, True, "use a shorter path"),
    ("host:99999", True, "unix:/path/to/socket or vsock:PORT"),
    ("host:", False, "vsock:CID:PORT"),
])
def test_bad_addresses_say_what_is_wrong(text: str, listen: bool, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_address(text, listen=listen)


@click.command()
@click.option("--listen", type=LISTEN_ADDRESS, multiple=True, envvar="CARAPACE_LISTEN")
@click.option("--mode", type=FILE_MODE, default="0660")
def _cli(listen: tuple[object, ...], mode: int) -> None:
    click.echo(repr((listen, mode)))


def test_listen_env_var_takes_several_addresses_separated_by_spaces() -> None:
    result = CliRunner().invoke(_cli, [], env={
        "CARAPACE_LISTEN": "127.0.0.1:1  unix:/run/a.sock\tvsock:5000"})
    assert result.exit_code == 0, result.output
    assert result.output.strip() == repr(((
        TcpAddress("127.0.0.1", 1), UnixAddress("/run/a.sock"),
        VsockAddress(VSOCK_CID_ANY, 5000)), 0o660))


def test_bad_flag_values_are_usage_errors() -> None:
    bad = CliRunner().invoke(_cli, ["--listen", "vsock:x"])
    assert bad.exit_code == 2 and "vsock:PORT" in bad.output
    assert CliRunner().invoke(_cli, ["--mode", "0600"]).output.strip().endswith("384)")
    mode = CliRunner().invoke(_cli, ["--mode", "0999"])
    assert mode.exit_code == 2 and "octal mode" in mode.output


# -- unix listeners ---------------------------------------------------------------------

async def test_unix_link_round_trip_names_the_peer_process(short_dir: Path) -> None:
    address = UnixAddress(str(short_dir / "s.sock"))
    async with listening([address]) as listeners:
        (listener,) = listeners
        assert listener.socket.family == socket.AF_UNIX
        assert describe_local(listener.socket) == address.describe()
        assert stat.S_IMODE(os.stat(address.path).st_mode) == 0o660
        client = await open_stream(address)
        server = await listener.accept()
        assert transport_of(server.socket) == "unix"
        peer = describe_peer(server.socket)
        assert peer == f"{address.describe()} pid={os.getpid()} uid={os.getuid()}"
        assert transport_of_peer(peer) == "unix"
        await client.send_all(b"ping")
        assert await server.receive_some(4) == b"ping"
        await client.aclose()
        await server.aclose()
    assert not os.path.exists(address.path), "the socket file outlived its listener"


async def test_unix_listener_mode_is_configurable(short_dir: Path) -> None:
    path = str(short_dir / "s.sock")
    async with listening([UnixAddress(path)], unix_mode=0o600):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


async def test_stale_socket_is_replaced(short_dir: Path) -> None:
    path = str(short_dir / "s.sock")
    crashed = socket.socket(socket.AF_UNIX)
    crashed.bind(path)  # a listener that died without removing its file
    crashed.close()
    async with listening([UnixAddress(path)]) as (listener,):
        client = await open_stream(UnixAddress(path))
        await (await listener.accept()).aclose()
        await client.aclose()


async def test_live_socket_is_not_taken_over(short_dir: Path) -> None:
    path = str(short_dir / "s.sock")
    async with listening([UnixAddress(path)]):
        with pytest.raises(ListenError, match="another process is already serving"):
            async with listening([UnixAddress(path)]):
                pass  # pragma: no cover
        # The first listener still has its socket.
        await (await open_stream(UnixAddress(path))).aclose()


async def test_regular_file_is_never_replaced(short_dir: Path) -> None:
    path = short_dir / "s.sock"
    path.write_text("someone's data")
    with pytest.raises(ListenError, match="exists and is not a socket; refusing"):
        async with listening([UnixAddress(str(path))]):
            pass  # pragma: no cover
    assert path.read_text() == "someone's data"


async def test_a_symlink_is_never_followed_or_replaced(short_dir: Path) -> None:
    target = short_dir / "data"
    target.write_text("someone's data")
    link = short_dir / "s.sock"
    link.symlink_to(target)
    with pytest.raises(ListenError, match="exists and is not a socket"):
        async with listening([UnixAddress(str(link))]):
            pass  # pragma: no cover
    assert link.is_symlink() and target.read_text() == "someone's data"


async def test_missing_directory_is_an_error_that_says_to_create_it(short_dir: Path) -> None:
    path = str(short_dir / "none" / "s.sock")
    with pytest.raises(ListenError, match=r"cannot listen on unix:.*does not exist; create it"):
        async with listening([UnixAddress(path)]):
            pass  # pragma: no cover


async def test_listeners_opened_before_a_failure_are_closed(short_dir: Path) -> None:
    first = str(short_dir / "a.sock")
    (short_dir / "b.sock").write_text("")
    with pytest.raises(ListenError, match=r"b\.sock"):
        async with listening([UnixAddress(first), UnixAddress(str(short_dir / "b.sock"))]):
            pass  # pragma: no cover
    assert not os.path.exists(first)


async def test_no_socket_file_counts_as_nobody_listening(short_dir: Path) -> None:
    """The agent ends its session at once when nothing listens: a missing socket file
    means what a refused TCP connection means."""
    with pytest.raises(FileNotFoundError) as caught:
        await open_stream(UnixAddress(str(short_dir / "gone.sock")))
    assert _is_refused(caught.value)


async def test_tcp_peer_keeps_its_plain_form() -> None:
    async with listening([TcpAddress("127.0.0.1", 0)]) as (listener,):
        host, port = listener.socket.getsockname()[:2]
        client = await open_stream(TcpAddress(host, port))
        server = await listener.accept()
        peer = describe_peer(server.socket)
        assert peer == f"127.0.0.1:{client.socket.getsockname()[1]}"
        assert transport_of_peer(peer) == "tcp" and transport_of(server.socket) == "tcp"
        await client.aclose()
        await server.aclose()


# -- vsock ------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_VSOCK, reason="this Python has no socket.AF_VSOCK")
async def test_vsock_addresses_open_vsock_sockets() -> None:
    sock = _vsock_socket(VsockAddress(2, 5000))
    try:
        assert sock.family == socket.AF_VSOCK and sock.type == socket.SOCK_STREAM
    finally:
        sock.close()


def _vsock_unavailable() -> str | None:
    """Why no vsock listener can be opened here, or None."""
    if not HAS_VSOCK:
        return "this Python has no socket.AF_VSOCK"
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except OSError as exc:
        return f"this kernel offers no AF_VSOCK sockets ({exc.strerror})"
    return None


def _vsock_loopback_missing() -> str | None:
    """Why a vsock connection to this machine itself cannot work here, or None.

    Without the loopback transport a connection to CID 1 goes out to the
    hypervisor instead: never attempt it, look for the module.
    """
    missing = _vsock_unavailable()
    if missing is None and not Path("/sys/module/vsock_loopback").exists():
        missing = ("the kernel has no vsock loopback transport (CONFIG_VSOCKETS_LOOPBACK; "
                   "try 'modprobe vsock_loopback'), so no vsock connection can stay on "
                   "this machine")
    return missing


VSOCK_MISSING = _vsock_unavailable()
LOOPBACK_MISSING = _vsock_loopback_missing()
# (skipif, not pytest.skip: a skip raised inside a trio test loses its reason)


@pytest.mark.skipif(VSOCK_MISSING is not None, reason=VSOCK_MISSING or "")
async def test_vsock_listener_accepts_on_any_cid() -> None:
    async with listening([VsockAddress(VSOCK_CID_ANY, 0xFFFF_FFFF)]) as (listener,):
        # Port VMADDR_PORT_ANY: the kernel picks a free one.
        assert listener.socket.family == socket.AF_VSOCK
        cid, port = listener.socket.getsockname()
        assert cid == VSOCK_CID_ANY
        assert describe_local(listener.socket) == f"vsock:{port}"


@pytest.mark.skipif(LOOPBACK_MISSING is not None, reason=LOOPBACK_MISSING or "")
async def test_vsock_round_trip_over_loopback() -> None:
    async with listening([VsockAddress(VSOCK_CID_ANY, 0xFFFF_FFFF)]) as (listener,):
        port = listener.socket.getsockname()[1]
        client = await open_stream(VsockAddress(1, port))  # VMADDR_CID_LOCAL
        server = await listener.accept()
        assert transport_of(server.socket) == "vsock"
        assert describe_peer(server.socket).startswith("vsock:")
        await client.send_all(b"ping")
        assert await server.receive_some(4) == b"ping"
        await client.aclose()
        await server.aclose()


# -- the daemons' flags -----------------------------------------------------------------

def test_help_describes_every_address_form() -> None:
    from carapace.agent.main import main as agent_main
    from carapace.server.main import main as server_main

    server_help = " ".join(CliRunner().invoke(server_main, ["--help"]).output.split())
    for words in ("HOST:PORT (TCP)", "unix:/path/to/socket", "vsock:PORT", "CARAPACE_LISTEN "
                  "takes several separated by spaces", "--unix-socket-mode", "0660"):
        assert words in server_help
    agent_help = " ".join(CliRunner().invoke(agent_main, ["--help"]).output.split())
    for words in ("HOST:PORT (TCP)", "unix:/path/to/socket", "vsock:CID:PORT",
                  "CARAPACE_SERVER_HOST + CARAPACE_SERVER_PORT"):
        assert words in agent_help


@pytest.mark.parametrize(("host", "port", "expected"), [
    ("192.168.122.1", "8765", TcpAddress("192.168.122.1", 8765)),
    ("vsock:2", "8765", VsockAddress(2, 8765)),  # what install-vm.sh --server vsock:2:8765 writes
])
def test_agent_env_vars_keep_working(monkeypatch: pytest.MonkeyPatch, host: str, port: str,
                                     expected: object) -> None:
    from carapace.agent.main import _server_address

    monkeypatch.setenv("CARAPACE_SERVER_HOST", host)
    monkeypatch.setenv("CARAPACE_SERVER_PORT", port)
    assert _server_address(None) == expected
