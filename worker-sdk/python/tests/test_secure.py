"""The Python worker as a least-privilege NATS user: Krest's own nats/accounts.conf (the
`billing` entry made for this test's app), the scheduler as user `scheduler`, the worker as
the app's user with a password. Every subject the SDK uses must be one the config allows."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, Krest, Workers, eventually

APP = "pysecure"


@pytest.fixture(scope="module")
def secure() -> Iterator[Krest]:
    dir = Path(tempfile.mkdtemp(prefix="krest-py-secure-"))
    accounts = (REPO / "nats" / "accounts.conf").read_text().replace("billing", APP)
    (dir / "accounts.conf").write_text(accounts)
    (dir / "nats.conf").write_text("include accounts.conf\n")
    passwords = {
        f"KREST_{role}_PASSWORD": f"pw-{role.lower()}"
        for role in ["SCHEDULER", "OPERATOR", "VIEWER", "BILLING", "SYS"]
    }
    import os

    os.environ.update(passwords)  # read by nats-server for the config's $VARIABLES
    k = Krest(
        dir,
        nats_args=["-c", str(dir / "nats.conf")],
        env={"NATS_USER": "scheduler", "NATS_PASSWORD": passwords["KREST_SCHEDULER_PASSWORD"]},
    )
    try:
        yield k
    finally:
        k.stop()
        shutil.rmtree(dir, ignore_errors=True)


def test_a_least_privilege_worker_runs_retries_hands_off_and_sees_cancellations(secure: Krest) -> None:
    workers = Workers(secure, "secure", app=APP)
    env = {"NATS_USER": APP, "NATS_PASSWORD": "pw-billing"}
    try:
        # A cancel marker, found before executing (a direct get on KV_krest-cancels).
        waiting = workers.job("wait", "py/wait")
        cancelled = secure.trigger(waiting)
        eventually("the run recorded", lambda: secure.run(cancelled)["run"]["status"] == "PENDING")
        secure.cli("runs", "cancel", cancelled)
        w = workers.start("w1", **env)
        assert secure.wait_run(cancelled)["run"]["status"] == "CANCELLED"
        # A run, with a log line and an output.
        d = secure.wait_run(secure.trigger(workers.job("echo", "py/echo", args={"say": "hi"})))
        assert (d["run"]["status"], d["run"]["output"]) == ("SUCCEEDED", "echo hi"), d
        # An addressed run's retry, handed to the router.
        job = workers.job(
            "rr",
            "py/flaky",
            args={"failures": 1},
            retryTimes=1,
            loadBalanceType="ROUND_ROBIN",
            retryBackoff={"initial": "100ms", "factor": 1, "max": "100ms"},
        )
        d = secure.wait_run(secure.trigger(job))
        assert d["run"]["status"] == "SUCCEEDED", d
        assert sorted((a["attempt"], a["status"]) for a in d["attempts"]) == [(1, "FAILED"), (2, "SUCCEEDED")]
        assert "Permissions Violation" not in w.log() and "permission" not in w.log().lower(), w.log()
    finally:
        workers.stop_all()


def test_a_refused_login_ends_the_worker_naming_it(secure: Krest) -> None:
    import subprocess
    import sys

    from conftest import HERE

    out = subprocess.run(
        [sys.executable, str(HERE / "scenario_worker.py")],
        env={
            **__import__("os").environ,
            "NATS_URL": secure.url,
            "KREST_APP": APP,
            "NATS_USER": APP,
            "NATS_PASSWORD": "wrong",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "refused the login" in out.stderr, out.stderr
    assert "wrong" not in out.stderr, "no secret in the message"


def certificates(dir: Path) -> dict[str, Path]:
    """A throwaway CA and a server and a client certificate signed by it (openssl), as in
    scheduler/tests/it/auth.rs."""
    import subprocess

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=dir, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", "-days", "2", "-subj", "/CN=krest-test-ca", *ec, "-keyout", "ca.key",
            "-out", "ca.pem", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, usage in [("server", "serverAuth"), ("client", "clientAuth")]:
        openssl("req", "-subj", f"/CN=krest-test-{name}", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr")
        (dir / f"{name}.ext").write_text(f"subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n")
        openssl("x509", "-req", "-days", "2", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    return {n: dir / n for n in ["ca.pem", "server.pem", "server.key", "client.pem", "client.key"]}


def test_tls_with_a_ca_and_a_client_certificate() -> None:
    dir = Path(tempfile.mkdtemp(prefix="krest-py-tls-"))
    c = certificates(dir)
    (dir / "nats.conf").write_text(
        f'tls {{ cert_file: "{c["server.pem"]}", key_file: "{c["server.key"]}", '
        f'ca_file: "{c["ca.pem"]}", verify: true, timeout: 2 }}\n'
    )
    tls = {"NATS_CA": str(c["ca.pem"]), "NATS_CERT": str(c["client.pem"]), "NATS_KEY": str(c["client.key"])}
    k = Krest(dir, nats_args=["-c", str(dir / "nats.conf")], env=tls)
    workers = Workers(k, "tls")
    try:
        workers.start("w1", **tls)
        d = k.wait_run(k.trigger(workers.job("echo", "py/echo", args={"say": "over tls"})))
        assert (d["run"]["status"], d["run"]["output"]) == ("SUCCEEDED", "echo over tls"), d
    finally:
        workers.stop_all()
        k.stop()
        shutil.rmtree(dir, ignore_errors=True)


def test_token_login_from_the_url() -> None:
    dir = Path(tempfile.mkdtemp(prefix="krest-py-token-"))
    k = Krest(dir, nats_args=["--auth", "s3cret-token"], env={"NATS_TOKEN": "s3cret-token"})
    workers = Workers(k, "token")
    try:
        host = k.url.removeprefix("nats://")
        w = workers.start("w1", NATS_URL=f"nats://s3cret-token@{host}")
        d = k.wait_run(k.trigger(workers.job("echo", "py/echo", args={"say": "token"})))
        assert (d["run"]["status"], d["run"]["output"]) == ("SUCCEEDED", "echo token"), d
        assert "s3cret" not in w.log()
    finally:
        workers.stop_all()
        k.stop()
        shutil.rmtree(dir, ignore_errors=True)


def test_nkey_logins_with_a_seed_and_a_seed_file() -> None:
    """nkey users (nats-server's `{ nkey: U… }`), keys made here with the nkeys package: the
    scheduler and the CLI log in with a seed (Krest's NATS_NKEY), the worker — the app's
    least-privilege user of nats/accounts.conf, with an nkey instead of a password — with the
    seed itself, then with a file holding it; an nkey the server does not know is refused,
    naming the problem without the seed."""
    import os
    import subprocess
    import sys

    import nkeys  # type: ignore[import-untyped, unused-ignore]

    from conftest import HERE

    def keypair() -> tuple[str, str]:
        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
        return seed.decode(), nkeys.from_seed(seed).public_key.decode()

    (scheduler_seed, scheduler_pub), (worker_seed, worker_pub), (stranger_seed, _) = (
        keypair(),
        keypair(),
        keypair(),
    )
    assert worker_seed.startswith("SU") and worker_pub.startswith("U")
    dir = Path(tempfile.mkdtemp(prefix="krest-py-nkey-"))
    accounts = (REPO / "nats" / "accounts.conf").read_text()
    for old, new in [
        ("{ user: scheduler, password: $KREST_SCHEDULER_PASSWORD }", f"{{ nkey: {scheduler_pub} }}"),
        ("{ user: billing, password: $KREST_BILLING_PASSWORD,", f"{{ nkey: {worker_pub},"),
    ]:
        assert old in accounts, old
        accounts = accounts.replace(old, new)
    app = "pynkey"
    (dir / "accounts.conf").write_text(accounts.replace("billing", app))
    (dir / "nats.conf").write_text("include accounts.conf\n")
    (dir / "worker.nk").write_text(worker_seed + "\n")
    dir.joinpath("worker.nk").chmod(0o600)
    # The other users of accounts.conf still read their passwords from the environment.
    passwords = {f"KREST_{r}_PASSWORD": f"pw-{r.lower()}" for r in ["OPERATOR", "VIEWER", "SYS"]}
    os.environ.update(passwords)
    k = Krest(dir, nats_args=["-c", str(dir / "nats.conf")], env={"NATS_NKEY": scheduler_seed})
    workers = Workers(k, "nkey", app=app)
    try:
        for instance, nkey in [("seed", worker_seed), ("file", str(dir / "worker.nk"))]:
            w = workers.start(instance, NATS_NKEY=nkey)
            d = k.wait_run(k.trigger(workers.job("echo", "py/echo", args={"say": instance})))
            assert (d["run"]["status"], d["run"]["output"]) == ("SUCCEEDED", f"echo {instance}"), d
            assert [a["worker"] for a in d["attempts"]] == [instance], d
            assert worker_seed not in w.log()
            assert "permission" not in w.log().lower(), w.log()
            assert w.terminate() == 0, w.log()
        out = subprocess.run(
            [sys.executable, str(HERE / "scenario_worker.py")],
            env={**os.environ, "NATS_URL": k.url, "KREST_APP": app, "NATS_NKEY": stranger_seed},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode != 0
        assert "refused the login" in out.stderr, out.stderr
        assert stranger_seed not in out.stderr, "no secret in the message"
    finally:
        workers.stop_all()
        k.stop()
        shutil.rmtree(dir, ignore_errors=True)


def operator_mode(dir: Path) -> tuple[Path, dict[str, Path]]:
    """A nats-server config in operator (JWT) mode, made here with the nkeys package as `nsc`
    would: an operator, a system account, account `krest` with JetStream, and `.creds` files
    (user JWT and seed) for users `scheduler` and `worker` of it, and `stranger` of an account
    the server does not know. Returns the config and the creds files."""
    import base64
    import hashlib
    import json
    import os
    import time

    import nkeys  # type: ignore[import-untyped, unused-ignore]

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).decode().rstrip("=")

    def keypair(prefix: int) -> tuple[str, str, Any]:
        seed = nkeys.encode_seed(os.urandom(32), prefix)
        kp = nkeys.from_seed(seed)
        return seed.decode(), kp.public_key.decode(), kp

    def jwt(issuer: Any, subject: str, name: str, nats: dict[str, Any]) -> str:
        claims: dict[str, Any] = {
            "iat": int(time.time()),
            "iss": issuer.public_key.decode(),
            "name": name,
            "sub": subject,
            "nats": {**nats, "version": 2},
        }
        digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
        claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
        signed = f"{b64(json.dumps({'typ': 'JWT', 'alg': 'ed25519-nkey'}).encode())}.{b64(json.dumps(claims).encode())}"
        return f"{signed}.{b64(issuer.sign(signed.encode()))}"

    _, op_pub, op = keypair(nkeys.PREFIX_BYTE_OPERATOR)
    _, acc_pub, acc = keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    _, sys_pub, _ = keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    _, _, unknown = keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    limits = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
              "wildcards": True, "conn": -1, "leaf": -1}
    jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    creds: dict[str, Path] = {}
    for name, account in [("scheduler", acc), ("worker", acc), ("stranger", unknown)]:
        seed, pub, _ = keypair(nkeys.PREFIX_BYTE_USER)
        user = jwt(account, pub, name, {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1})
        creds[name] = dir / f"{name}.creds"
        creds[name].write_text(
            f"-----BEGIN NATS USER JWT-----\n{user}\n------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n"
            "NKEYs are sensitive and should be treated as secrets.\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n"
            "*************************************************************\n"
        )
        creds[name].chmod(0o600)
    config = dir / "nats.conf"
    config.write_text(
        f'operator: "{jwt(op, op_pub, "krest-test", {"type": "operator"})}"\n'
        f"system_account: {sys_pub}\n"
        "resolver: MEMORY\n"
        "resolver_preload: {\n"
        f'  {acc_pub}: "{jwt(op, acc_pub, "krest", {"type": "account", "limits": {**limits, **jetstream}})}"\n'
        f'  {sys_pub}: "{jwt(op, sys_pub, "SYS", {"type": "account", "limits": limits})}"\n'
        "}\n"
    )
    return config, creds


def test_creds_file_login_in_operator_mode() -> None:
    """A `.creds` file (user JWT and nkey seed) against a nats-server in operator mode: the
    scheduler and the CLI (Krest's NATS_CREDS) and the Python worker log in with one each; a
    creds file of an account the server does not know is refused, naming the problem."""
    import os
    import subprocess
    import sys

    from conftest import HERE

    dir = Path(tempfile.mkdtemp(prefix="krest-py-creds-"))
    config, creds = operator_mode(dir)
    k = Krest(dir, nats_args=["-c", str(config)], env={"NATS_CREDS": str(creds["scheduler"])})
    workers = Workers(k, "creds")
    try:
        w = workers.start("w1", NATS_CREDS=str(creds["worker"]))
        d = k.wait_run(k.trigger(workers.job("echo", "py/echo", args={"say": "with creds"})))
        assert (d["run"]["status"], d["run"]["output"]) == ("SUCCEEDED", "echo with creds"), d
        seed = creds["worker"].read_text().split("-----BEGIN USER NKEY SEED-----\n")[1].split("\n")[0]
        assert seed.startswith("SU") and seed not in w.log(), "no seed in the log"
        assert w.terminate() == 0, w.log()
        out = subprocess.run(
            [sys.executable, str(HERE / "scenario_worker.py")],
            env={**os.environ, "NATS_URL": k.url, "KREST_APP": workers.app, "NATS_CREDS": str(creds["stranger"])},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode != 0
        assert "refused the login" in out.stderr, out.stderr
    finally:
        workers.stop_all()
        k.stop()
        shutil.rmtree(dir, ignore_errors=True)
