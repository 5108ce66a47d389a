"""TLS on the NBD export (STARTTLS, the NBD spec's "TLS support"): real clients over it, the
rules of the negotiation, and one-line errors for bad certificates.

A throw-away CA and a server certificate for ``localhost`` are made with ``openssl`` per test
module; libnbd (GnuTLS) and QEMU find the CA as ``ca-cert.pem`` in a directory, Python's ssl
takes it as a file.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import struct
import subprocess
from pathlib import Path

import pytest

from ivshmem_virtio.frontend import nbd
from ivshmem_virtio.frontend.cli import tls_context
from ivshmem_virtio.frontend.nbd import NbdServer, serve_nbd
from ivshmem_virtio.procs import cli

from .test_nbd import TIMEOUT, MemTarget, RawClient, ServerThread, make_image, require, run, sha256

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA (``ca-cert.pem``) and a server certificate + key for localhost, in one folder."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl not found: install the Debian package openssl", pytrace=False)
    d = tmp_path_factory.mktemp("pki")

    def sh(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    sh("req", "-x509", *ec, "-days", "2", "-subj", "/CN=ivshmem-virtio test CA",
       "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
       "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    sh("req", *ec, "-subj", "/CN=localhost", "-keyout", "server-key.pem", "-out", "server.csr")
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n")
    sh("x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
       "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "server-cert.pem")
    return d


def server_ctx(pki: Path) -> ssl.SSLContext:
    ctx = tls_context(str(pki / "server-cert.pem"), str(pki / "server-key.pem"), False)
    assert ctx is not None
    return ctx


def client_ctx(pki: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki / "ca-cert.pem"))


class TlsServerThread(ServerThread):
    def __init__(self, target: MemTarget, sock: Path, tls: ssl.SSLContext, required: bool):
        super().__init__(target, sock)
        self.tls, self.required = tls, required

    def __enter__(self) -> TlsServerThread:
        self.thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            serve_nbd(self.target, unix_path=str(self.sock), tls=self.tls,
                      tls_required=self.required), self.loop)
        self.server = fut.result(TIMEOUT)
        return self

    def tls_uri(self, pki: Path) -> str:
        return f"nbds+unix:///?socket={self.sock}&tls-certificates={pki}"


def test_real_clients_over_tls_and_the_clear_refused(tmp_path: Path, pki: Path) -> None:
    """nbdcopy writes an image through TLS, qemu-img reads it back through TLS, nbdinfo reports
    TLS; with TLS required a client in the clear gets nothing."""
    nbdcopy = require("nbdcopy", "libnbd-bin")
    nbdinfo = require("nbdinfo", "libnbd-bin")
    qemu_img = require("qemu-img", "qemu-utils")
    src, out = tmp_path / "src.img", tmp_path / "out.img"
    image = make_image(src)
    target = MemTarget(len(image), fill=0xA5)
    with TlsServerThread(target, tmp_path / "nbd.sock", server_ctx(pki), True) as srv:
        info = json.loads(run([nbdinfo, "--json", srv.tls_uri(pki)]).stdout)
        assert info["TLS"] is True and info["exports"][0]["export-size"] == len(image)
        run([nbdcopy, "--flush", str(src), srv.tls_uri(pki)])
        assert sha256(target.buf) == sha256(image)
        creds = f"tls-creds-x509,id=tls0,dir={pki},endpoint=client"
        opts = (f"driver=nbd,server.type=unix,server.path={srv.sock},tls-creds=tls0,"
                "tls-hostname=localhost")
        run([qemu_img, "convert", "--object", creds, "--image-opts", opts, "-O", "raw",
             str(out)])
        clear = subprocess.run([nbdinfo, srv.uri], capture_output=True, text=True,
                               timeout=60)
        assert clear.returncode != 0, clear.stdout
    assert sha256(out.read_bytes()) == sha256(image)
    assert target.flushes >= 1


def run_tls_server(tmp_path: Path, tls: ssl.SSLContext | None, required: bool, body) -> None:
    sock = tmp_path / "nbd.sock"

    async def main() -> None:
        server = await serve_nbd(MemTarget(MiB, fill=0x5A), unix_path=str(sock), tls=tls,
                                 tls_required=required)
        assert isinstance(server, NbdServer)
        try:
            await body(sock)
        finally:
            server.close()
            await asyncio.wait_for(server.wait_closed(), TIMEOUT)

    asyncio.run(main())


def test_negotiation_rules(tmp_path: Path, pki: Path) -> None:
    """TLS required: every option but STARTTLS and ABORT is answered TLS_REQD and EXPORT_NAME
    hangs up; after STARTTLS what was negotiated in the clear is void (structured replies),
    a second STARTTLS or one with data is invalid."""

    async def body(sock: Path) -> None:
        c = await RawClient.unix(sock)
        await c.greet()
        for option in (nbd.OPT_LIST, nbd.OPT_STRUCTURED_REPLY, nbd.OPT_GO, 0x4242):
            data = struct.pack(">IH", 0, 0) if option == nbd.OPT_GO else b""
            assert (await c.option(option, data))[-1] == (nbd.REP_ERR_TLS_REQD,
                                                          b"TLS is required")
        assert (await c.option(nbd.OPT_STARTTLS, b"x"))[-1][0] == nbd.REP_ERR_INVALID
        assert await c.option(nbd.OPT_STARTTLS) == [(nbd.REP_ACK, b"")]
        await c.writer.start_tls(client_ctx(pki), server_hostname="localhost")
        assert c.writer.get_extra_info("ssl_object") is not None
        assert (await c.option(nbd.OPT_STARTTLS))[-1][0] == nbd.REP_ERR_INVALID
        size, _flags = await c.go()
        assert size == MiB
        # no STRUCTURED_REPLY after TLS: a simple reply
        assert await c.request(nbd.CMD_READ, 0, 512) == (0, b"\x5a" * 512)
        assert c.chunks == []
        c.send(nbd.CMD_DISC)
        assert await c.at_eof()
        await c.close()

        c = await RawClient.unix(sock)  # EXPORT_NAME in the clear: no error reply exists
        await c.greet()
        c.send_option(nbd.OPT_EXPORT_NAME, b"")
        assert await c.at_eof()
        await c.close()

        c = await RawClient.unix(sock)  # garbage instead of a TLS handshake: that one dropped
        await c.greet()
        assert await c.option(nbd.OPT_STARTTLS) == [(nbd.REP_ACK, b"")]
        c.writer.write(b"\x16\x03\x01\x00\x05hello, not TLS" * 4)
        assert await c.at_eof()
        await c.close()

        c = await RawClient.unix(sock)  # and the next client is served
        await c.greet()
        assert await c.option(nbd.OPT_STARTTLS) == [(nbd.REP_ACK, b"")]
        await c.writer.start_tls(client_ctx(pki), server_hostname="localhost")
        assert (await c.option(nbd.OPT_STRUCTURED_REPLY))[-1] == (nbd.REP_ACK, b"")
        assert (await c.go())[0] == MiB
        await c.close()

    run_tls_server(tmp_path, server_ctx(pki), True, body)


def test_tls_offered_not_required_and_not_configured(tmp_path: Path, pki: Path) -> None:
    async def offered(sock: Path) -> None:
        c = await RawClient.unix(sock)
        await c.greet()
        assert (await c.go())[0] == MiB  # the clear is allowed
        await c.close()
        c = await RawClient.unix(sock)  # structured replies agreed in the clear, then TLS
        await c.greet()
        assert (await c.option(nbd.OPT_STRUCTURED_REPLY))[-1] == (nbd.REP_ACK, b"")
        assert await c.option(nbd.OPT_STARTTLS) == [(nbd.REP_ACK, b"")]
        await c.writer.start_tls(client_ctx(pki), server_hostname="localhost")
        assert (await c.go())[0] == MiB
        assert await c.request(nbd.CMD_READ, 0, 512) == (0, b"\x5a" * 512)
        assert c.chunks == [], "structured replies agreed before STARTTLS must not count"
        await c.close()

    async def none(sock: Path) -> None:
        c = await RawClient.unix(sock)
        await c.greet()
        assert (await c.option(nbd.OPT_STARTTLS))[-1] == (nbd.REP_ERR_UNSUP,
                                                          b"no TLS configured")
        assert (await c.go())[0] == MiB
        await c.close()

    run_tls_server(tmp_path, server_ctx(pki), False, offered)
    run_tls_server(tmp_path, None, False, none)


def test_tls_options_one_line_errors(tmp_path: Path, pki: Path) -> None:
    link = ["--link", "sim:" + str(tmp_path / "none.sock"), "--socket", str(tmp_path / "x.nbd")]
    cases = [(["--tls-required"], "--tls-required goes with --tls-cert"),
             (["--tls-key", str(pki / "server-key.pem")], "--tls-key goes with --tls-cert"),
             (["--tls-cert", str(tmp_path / "missing.pem")], "No such file"),
             (["--tls-cert", str(pki / "server-cert.pem"), "--tls-key",
               str(pki / "ca-key.pem")], "not a certificate chain with its key")]
    for args, text in cases:
        out = subprocess.run(cli("nbd", *link, *args), capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert text in out.stderr, out.stderr
