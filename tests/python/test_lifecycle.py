"""Field case B10 with real processes and signals: shutdown ordering in the
classic two-container layout and in the native-sidecar layout, plus the
`health` exec probe."""

import os
import signal
import subprocess
import threading
import time

import grpc
import pytest

from conftest import sidecar_binary, start_sidecar


def health(sidecar, service=""):
    return subprocess.run(
        [sidecar_binary(), "health", "--addr", f"unix://{sidecar.unix}", "--service", service],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_health_subcommand_exit_codes(local_key, tmp_path):
    sidecar = start_sidecar(["--local-key-file", str(local_key[0])])
    try:
        assert health(sidecar).returncode == 0
        assert health(sidecar, "kms_sidecar.v1.KeyService").returncode == 0
        unknown = health(sidecar, "no.such.Service")
        assert unknown.returncode == 1 and "NotFound" in unknown.stderr
    finally:
        assert sidecar.stop() == 0
    gone = subprocess.run(
        [sidecar_binary(), "health", "--addr", f"unix://{tmp_path}/none.sock", "--timeout", "1s"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert gone.returncode == 1 and "failed" in gone.stderr


def test_b10_classic_layout_serves_through_the_app_drain(local_key, pb):
    """SIGTERM reaches the sidecar and the app together; the app keeps
    calling for 3 s (its drain) on existing and new connections: zero
    failures, readiness NOT_SERVING at once, then the sidecar exits 0 once
    the app is quiet, and removes its socket."""
    messages, services = pb
    sidecar = start_sidecar(
        [
            "--local-key-file",
            str(local_key[0]),
            "--drain-window",
            "30s",
            "--drain-quiet-period",
            "1s",
        ]
    )
    stub = services.KeyServiceStub(sidecar.channel("unix"))
    failures, calls = [], [0]
    stop = threading.Event()

    def app():
        while not stop.is_set():
            try:
                env = stub.Wrap(messages.WrapRequest(plaintext=b"x" * 100)).envelope
                stub.Unwrap(messages.UnwrapRequest(envelope=env))
                calls[0] += 1
            except grpc.RpcError as e:
                failures.append(e.code())
            time.sleep(0.02)  # about 50 calls per second

    worker = threading.Thread(target=app)
    worker.start()
    time.sleep(0.5)
    sidecar.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    time.sleep(0.3)
    assert health(sidecar, "kms_sidecar.v1.KeyService").returncode == 1, "readiness NOT_SERVING"
    assert health(sidecar).returncode == 0, "liveness still SERVING"
    # A new connection during the drain is served too.
    fresh = services.KeyServiceStub(sidecar.channel("tcp"))
    assert fresh.Wrap(messages.WrapRequest(plaintext=b"late")).envelope
    time.sleep(2.7)
    stop.set()
    worker.join()
    assert not failures, f"{len(failures)} failed calls: {failures[:3]}"
    assert calls[0] > 50
    assert sidecar.proc.wait(timeout=20) == 0
    elapsed = time.monotonic() - t0
    assert elapsed < 10, f"exited {elapsed:.1f}s after SIGTERM (app quiet after 3s)"
    assert not os.path.exists(sidecar.unix), "socket removed"
    sidecar.stop()


def test_b10_native_sidecar_exits_fast_despite_idle_connection(local_key, pb):
    """Native layout: SIGTERM arrives after the app is gone. One idle
    connection stays open and one streaming call is still in flight: the
    call completes, and the sidecar exits 0 within 5 s, socket removed."""
    messages, services = pb
    sidecar = start_sidecar(["--local-key-file", str(local_key[0])])
    idle = sidecar.channel("unix")
    health_pb = __import__("grpc_health.v1.health_pb2", fromlist=["x"])
    health_grpc = __import__("grpc_health.v1.health_pb2_grpc", fromlist=["x"])
    health_grpc.HealthStub(idle).Check(health_pb.HealthCheckRequest())  # idle from now on

    stub = services.KeyServiceStub(sidecar.channel("tcp"))
    result = {}

    def slow_stream():
        def requests():
            yield messages.WrapStreamRequest()
            for _ in range(15):
                time.sleep(0.1)
                yield messages.WrapStreamRequest(chunk=b"y" * 1000)

        try:
            result["bytes"] = sum(len(r.chunk) for r in stub.WrapStream(requests()))
        except grpc.RpcError as e:
            result["error"] = e.code()

    worker = threading.Thread(target=slow_stream)
    worker.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    sidecar.proc.send_signal(signal.SIGTERM)
    worker.join()
    assert "error" not in result, result
    assert result["bytes"] > 15 * 1000
    assert sidecar.proc.wait(timeout=20) == 0
    elapsed = time.monotonic() - t0
    assert elapsed < 5, f"exited {elapsed:.1f}s after SIGTERM"
    assert not os.path.exists(sidecar.unix)
    sidecar.stop()


@pytest.mark.parametrize("transport", ["unix"])
def test_socket_mode_and_group(local_key, transport):
    gid = os.getgid()
    sidecar = start_sidecar(
        [
            "--local-key-file",
            str(local_key[0]),
            "--unix-socket-mode",
            "600",
            "--unix-socket-group",
            str(gid),
        ]
    )
    try:
        st = os.stat(sidecar.unix)
        assert st.st_mode & 0o777 == 0o600
        assert st.st_gid == gid
    finally:
        assert sidecar.stop() == 0
