"""Bad configuration: a one-line error and exit status 2, and no image opened for writing."""

from __future__ import annotations

import json
import os
import socket

import pytest

from ivshmem_virtio.procs import run_cli


def check_exit2(args: list[str], needle: str) -> None:
    r = run_cli(args, timeout=30)
    err = r.stderr.decode().strip()
    assert r.returncode == 2, (r.returncode, err)
    assert len(err.splitlines()) == 1, err
    assert needle in err, err


def test_missing_image(procs, tmp_path):
    sock = str(tmp_path / "a.sock")
    procs.hub(sock)
    check_exit2(["blk", "--link", f"sim:{sock}", "--image", str(tmp_path / "nope.img")],
                "--image")


@pytest.mark.parametrize("link", ["tcp:1.2.3.4", "sim:", "nonsense", "uio:"])
def test_unknown_link(tmp_path, image_factory, link):
    check_exit2(["blk", "--link", link, "--image", image_factory()], "--link")


def test_link_without_hub(tmp_path, image_factory):
    check_exit2(["blk", "--link", f"sim:{tmp_path}/none.sock", "--image", image_factory()],
                "--link")


def test_missing_uio_device(tmp_path, image_factory):
    check_exit2(["blk", "--link", "uio:/dev/uio-does-not-exist", "--image", image_factory()],
                "--link")


def test_backend_id_taken(procs, tmp_path, image_factory):
    sock = str(tmp_path / "b.sock")
    procs.hub(sock)
    procs.blk(sock, image_factory())
    check_exit2(["blk", "--link", f"sim:{sock}", "--image", image_factory(name="2.img")],
                "taken")


def test_wrong_protocol_on_link(procs, tmp_path, image_factory):
    sock = str(tmp_path / "c.sock")
    procs.hub(sock, protocols="0xC024,0x8024")
    check_exit2(["blk", "--link", f"sim:{sock}", "--image", image_factory()], "protocol")


def test_hub_socket_in_use(procs, tmp_path):
    sock = str(tmp_path / "d.sock")
    procs.hub(sock)
    check_exit2(["hub", "--socket", sock], "in use")
    assert os.path.exists(sock)  # the running hub keeps its socket


def test_hub_stale_socket_is_replaced(procs, tmp_path):
    sock = str(tmp_path / "e.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(sock)
    s.close()  # a socket file nobody listens on
    procs.hub(sock)


@pytest.mark.parametrize("args,needle", [
    (["--max-peers", "1"], "--max-peers"),
    (["--vectors", "0"], "--vectors"),
    (["--vectors", "99"], "--vectors"),
    (["--rw-size", "0x1234"], "--rw-size"),
    (["--state-table-size", "0"], "--state-table-size"),
    (["--protocols", "0xC002"], "--protocols"),
    (["--protocols", "0xC002,0x18002"], "--protocols"),
    (["--rw-size", "lots"], "lots"),
])
def test_hub_impossible_geometry(tmp_path, args, needle):
    check_exit2(["hub", "--socket", str(tmp_path / "f.sock"), *args], needle)
    assert not os.path.exists(tmp_path / "f.sock")


@pytest.mark.parametrize("args,needle", [
    (["--queue-size", "100"], "--queue-size"),
    (["--queue-size", "4"], "--queue-size"),
    (["--serial", "x" * 21], "--serial"),
    (["--mode", "turbo"], "--mode"),
])
def test_blk_impossible_options(tmp_path, image_factory, args, needle):
    image = image_factory(data=b"untouched")
    before = os.stat(image).st_mtime_ns
    check_exit2(["blk", "--link", f"sim:{tmp_path}/x.sock", "--image", image, *args], needle)
    assert os.stat(image).st_mtime_ns == before


def test_tiny_image(procs, tmp_path):
    sock = str(tmp_path / "g.sock")
    procs.hub(sock)
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(b"x" * 100)
    check_exit2(["blk", "--link", f"sim:{sock}", "--image", str(tiny)], "sector")


def test_rw_section_too_small(procs, tmp_path, image_factory):
    sock = str(tmp_path / "h.sock")
    procs.hub(sock, "--rw-size", "0x1000")
    check_exit2(["blk", "--link", f"sim:{sock}", "--image", image_factory()], "two pages")


# -- serve: a console device's options ------------------------------------------------------------

def serve_config(tmp_path, image: str, console: dict, extra: list[dict] | None = None) -> str:
    """A blk device (whose image must stay untouched) and the console under test (devices[1])."""
    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return json.dumps(v)  # a JSON string or integer is TOML too

    def entry(d: dict) -> str:
        return "\n[[devices]]\n" + "".join(f"{k} = {value(v)}\n" for k, v in d.items())

    devices = [{"type": "blk", "link": f"sim:{tmp_path}/d.sock", "image": image},
               {"type": "console", "link": f"sim:{tmp_path}/c.sock", **console}, *(extra or [])]
    cfg = tmp_path / "serve.toml"
    cfg.write_text("".join(entry(d) for d in devices))
    return str(cfg)


CONSOLE_BAD = [
    ({}, "devices[1].type: a console needs one host side"),
    ({"pty": True, "log_file": "LOG"}, "devices[1].log_file: a console has one host side"),
    ({"pty": False}, "devices[1].pty: false names no host side"),
    ({"pty": "yes"}, "devices[1].pty: expected true or false"),
    ({"socket": ""}, "devices[1].socket: must not be empty"),
    ({"socket": "/nonexistent/dir/c.sock"}, "directory /nonexistent/dir does not exist"),
    ({"socket": "DIR/" + "s" * 120}, "too long for a UNIX socket"),
    ({"socket": "FILE"}, "exists and is not a socket"),
    ({"log_file": "DIR"}, "is a directory"),
    ({"log_file": "/nonexistent/dir/cell.log"}, "devices[1].log_file: /nonexistent/dir/cel"),
    ({"pty": True, "cols": 0}, "devices[1].cols: 0 is outside 1..65535"),
    ({"pty": True, "rows": 70000}, "devices[1].rows: 70000 is outside 1..65535"),
    ({"pty": True, "cols": "80"}, "devices[1].cols: expected an integer"),
    ({"pty": True, "image": "x"}, "devices[1].image: unknown option"),
    ({"pty": True, "link": "uio:protocol=0xC002"}, "devices[1].link: protocol 0xc002 is not"),
    ({"socket": "SIMLINK"}, "d.sock is also devices[0].link"),  # devices[0]'s hub socket
    ({"socket": "LIVE"}, "LIVE: in use by a running console"),  # checks out, opens not
]


@pytest.mark.parametrize(("console", "needle"), CONSOLE_BAD,
                         ids=[f"{i}-{n.split(':')[-1].strip()[:24]}"
                              for i, (_c, n) in enumerate(CONSOLE_BAD)])
def test_serve_console_bad_options(tmp_path, image_factory, console, needle):
    """One line naming the field, exit 2, before any image is opened; a file where the socket
    should go is left alone."""
    image = image_factory(data=b"untouched")
    os.utime(image, (1_000_000_000, 1_000_000_000))
    before = os.stat(image).st_mtime_ns
    (tmp_path / "FILE").write_text("keep me")
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(tmp_path / "LIVE"))
    live.listen()
    names = {"LOG": "cell.log", "FILE": "FILE", "DIR": "", "LIVE": "LIVE", "SIMLINK": "d.sock"}
    console = {k: (str(tmp_path / names[v.split("/")[0]]) + v[len(v.split("/")[0]):]
                   if isinstance(v, str) and v.split("/")[0] in names else v)
               for k, v in console.items()}
    try:
        check_exit2(["serve", "--config", serve_config(tmp_path, image, console),
                     "--lock-dir", str(tmp_path / "locks")], needle)
    finally:
        live.close()
    assert os.stat(image).st_mtime_ns == before
    assert (tmp_path / "FILE").read_text() == "keep me"


def test_serve_console_paths_shared(tmp_path, image_factory):
    """Two consoles on one socket path, or a socket on a log file: refused by name."""
    image = image_factory()
    path = str(tmp_path / "con.sock")
    other = {"type": "console", "link": f"sim:{tmp_path}/e.sock", "log_file": path}
    check_exit2(["serve", "--config", serve_config(tmp_path, image, {"socket": path}, [other]),
                 "--check"], f"devices[2].log_file: {path} is also devices[1].socket")


def test_serve_check_covers_the_console(tmp_path, image_factory):
    """``--check`` accepts a good console and opens nothing: no socket appears."""
    path = tmp_path / "con.sock"
    cfg = serve_config(tmp_path, image_factory(), {"socket": str(path), "cols": 120})
    r = run_cli(["serve", "--config", cfg, "--check"], timeout=30)
    assert r.returncode == 0, r.stderr.decode()
    assert "OK, 2 device(s)" in r.stdout.decode() and "(console on sim:" in r.stdout.decode()
    assert not path.exists()
    # --file-only: paths of another machine are fine, the values still count
    cfg = serve_config(tmp_path, image_factory(), {"socket": "/run/elsewhere/con.sock"})
    r = run_cli(["serve", "--config", cfg, "--check", "--file-only"], timeout=30)
    assert r.returncode == 0, r.stderr.decode()
    cfg = serve_config(tmp_path, image_factory(), {"pty": True, "rows": 0})
    check_exit2(["serve", "--config", cfg, "--check", "--file-only"], "devices[1].rows")
