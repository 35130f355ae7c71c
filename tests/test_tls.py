"""TLS and mutual TLS: the server speaks only TLS when given a certificate."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from allocator_client import NO_RETRY, AllocatorClient
from allocator_client.v1 import allocator_pb2 as pb
from prometheus_client import CollectorRegistry

from allocator.server import create_server
from tests.conftest import server_config

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not found")


def _cert(
    tmp: Path, name: str, ca: tuple[Path, Path] | None = None, bits: int = 2048
) -> tuple[Path, Path]:
    key, crt = tmp / f"{name}.key", tmp / f"{name}.crt"
    subj = ["-subj", f"/CN={name}"]
    if ca is None:
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                f"rsa:{bits}",
                "-nodes",
                "-days",
                "2",
                "-keyout",
                str(key),
                "-out",
                str(crt),
                *subj,
                "-addext",
                "subjectAltName=IP:127.0.0.1,DNS:localhost",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
            ],
            check=True,
            capture_output=True,
        )
        return key, crt
    csr = tmp / f"{name}.csr"
    ext = tmp / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    subprocess.run(
        [
            "openssl",
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(csr),
            *subj,
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(ca[1]),
            "-CAkey",
            str(ca[0]),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            str(crt),
            "-extfile",
            str(ext),
        ],
        check=True,
        capture_output=True,
    )
    return key, crt


def test_tls_and_mutual_tls(tmp_path: Path) -> None:
    ca_key, ca_crt = _cert(tmp_path, "ca")
    srv_key, srv_crt = _cert(tmp_path, "server", (ca_key, ca_crt))
    cli_key, cli_crt = _cert(tmp_path, "client", (ca_key, ca_crt))
    config = server_config(
        f"sqlite:///{tmp_path / 'tls.sqlite'}",
        tls_cert=str(srv_crt),
        tls_key=str(srv_key),
        tls_client_ca=str(ca_crt),
    )
    running = create_server(config, registry=CollectorRegistry())
    target = f"localhost:{running.port}"
    try:
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca_crt.read_bytes(),
            private_key=cli_key.read_bytes(),
            certificate_chain=cli_crt.read_bytes(),
        )
        with AllocatorClient(target, credentials=creds, timeout=5) as c:
            c.create_experiment(pb.ExperimentSpec(name="tls", variants=["a", "b"]))
            assert c.assign("tls").variant in ("a", "b")
        # Server-authenticated only: refused, the server requires a client certificate.
        no_cert = grpc.ssl_channel_credentials(root_certificates=ca_crt.read_bytes())
        with (
            AllocatorClient(target, credentials=no_cert, timeout=3, retries=NO_RETRY) as c,
            pytest.raises(grpc.RpcError) as err,
        ):
            c.assign("tls")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # Plaintext is refused too.
        with grpc.insecure_channel(target) as ch:
            fut = grpc.channel_ready_future(ch)
            with pytest.raises(grpc.FutureTimeoutError):
                fut.result(timeout=1.0)
    finally:
        running.stop(1.0)


def test_a_bad_certificate_or_key_is_named_not_reported_as_a_bind_failure(
    tmp_path: Path,
) -> None:
    """grpc says only 'cannot bind' for a key that doesn't match its certificate or a file
    that isn't PEM; the server checks them first and names the flag."""
    srv_key, srv_crt = _cert(tmp_path, "server")
    other_key, _ = _cert(tmp_path, "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    url = f"sqlite:///{tmp_path / 'bad.sqlite'}"
    for cert, key, ca, flag in [
        (srv_crt, other_key, "", "--tls-key"),
        (garbage, srv_key, "", "--tls-cert"),
        (srv_crt, srv_key, str(garbage), "--tls-client-ca"),
    ]:
        config = server_config(url, tls_cert=str(cert), tls_key=str(key), tls_client_ca=ca)
        with pytest.raises(OSError) as err:
            create_server(config, registry=CollectorRegistry())
        assert flag in str(err.value) and "cannot bind" not in str(err.value), err.value


def test_files_grpc_accepts_are_not_refused_by_the_diagnosis(tmp_path: Path) -> None:
    """The TLS check runs only when grpc could not bind: a 1024-bit key, which grpc's own
    TLS library takes and OpenSSL's default security level refuses, still serves."""
    key, crt = _cert(tmp_path, "small", bits=1024)
    config = server_config(
        f"sqlite:///{tmp_path / 'small.sqlite'}", tls_cert=str(crt), tls_key=str(key)
    )
    running = create_server(config, registry=CollectorRegistry())
    running.stop(1.0)
