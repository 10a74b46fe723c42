"""`kms-sidecar check` (permission preflight) against the moto KMS server,
and `kms-sidecar config` with a configuration file."""

import socket
import subprocess

from conftest import sidecar_binary


def run(*args, env=None, timeout=60):
    import os

    full = dict(os.environ)
    full.update(env or {})
    return subprocess.run(
        [sidecar_binary(), *args], capture_output=True, text=True, timeout=timeout, env=full
    )


def test_check_all_allowed(kms_endpoint, kms, kms_key_arn):
    alias = "alias/preflight-ok"
    kms.create_alias(AliasName=alias, TargetKeyId=kms_key_arn)
    out = run("check", "--keyring", "aws-kms", "--key-id", kms_key_arn, "--key-id", alias)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "AWS credentials: found (provider: Environment" in out.stdout
    for action in ("kms:DescribeKey", "kms:GenerateDataKey ", "kms:GenerateDataKeyWithoutPlaintext", "kms:Decrypt"):
        table = out.stdout.split("Minimal IAM policy")[0]
        lines = [l for l in table.splitlines() if action in l]
        assert lines and all(l.rstrip().endswith("allowed") for l in lines), (action, out.stdout)
    assert kms_key_arn in out.stdout
    # The policy names the ARN, never the alias, and includes DescribeKey
    # because an alias must be resolved at start.
    policy = out.stdout.split("Minimal IAM policy statement for these keys:")[1]
    assert '"kms:DescribeKey"' in policy and kms_key_arn in policy and "alias/" not in policy
    assert "OK: the sidecar can serve" in out.stdout


def test_check_missing_key_fails(kms_endpoint, kms_key_arn):
    ghost = kms_key_arn.rsplit("key/", 1)[0] + "key/00000000-0000-0000-0000-000000000000"
    out = run("check", "--keyring", "aws-kms", "--key-id", ghost)
    assert out.returncode == 1
    assert "error: NotFoundException" in out.stdout
    assert "NOT READY" in out.stdout


def test_check_unreachable_endpoint_fails(kms_key_arn):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    out = run(
        "check", "--keyring", "aws-kms", "--key-id", kms_key_arn, "--kms-timeout", "2s",
        env={"AWS_ENDPOINT_URL": dead},
    )
    assert out.returncode == 1
    assert "unreachable" in out.stdout or "timed out" in out.stdout, out.stdout
    assert "NOT READY" in out.stdout


def test_check_local_keyring(tmp_path):
    out = run("check", "--local-key-file", str(tmp_path / "k"))
    assert out.returncode == 0 and "local keyring" in out.stdout


def test_config_file_and_precedence(tmp_path):
    file = tmp_path / "kms-sidecar.toml"
    file.write_text(
        'keyring = "aws-kms"\n'
        'key-id = ["arn:aws:kms:eu-west-1:111122223333:key/from-file"]\n'
        "frame-length = 8192\n"
        'kms-timeout = "3s"\n'
    )
    out = run("config", "--config", str(file), "--frame-length", "16384",
              env={"KMS_SIDECAR_KMS_TIMEOUT": "7s"})
    assert out.returncode == 0, out.stderr
    assert "frame-length = 16384" in out.stdout, "command line over file"
    assert 'kms-timeout = "7000ms"' in out.stdout, "environment over file"
    assert "key/from-file" in out.stdout, "file over default"
    # The printed configuration is itself a valid configuration file.
    again = tmp_path / "again.toml"
    again.write_text(out.stdout)
    second = run("config", "--config", str(again))
    assert second.returncode == 0 and second.stdout.replace("7000ms", "x") == out.stdout.replace("7000ms", "x")

    file.write_text("frame-lenght = 8192\n")
    bad = run("config", "--config", str(file))
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "unknown setting" in bad.stderr
