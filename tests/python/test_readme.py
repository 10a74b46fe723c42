"""The README's newcomer path, run as written: wrap a file through the
sidecar with grpcurl, decrypt it with the README's official-SDK script."""

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO, start_sidecar
from test_grpcurl import GRPCURL


def readme_block(name: str, lang: str = "python") -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- readme-test: {re.escape(name)} -->\n```{lang}\n(.*?)```", text, re.S)
    assert match, f"README block {name} not found"
    return match.group(1)


def test_readme_wrap_file_then_decrypt_with_official_sdk(tmp_path):
    # Zero-config sidecar: default key file location, namespace and key name.
    sidecar = start_sidecar([], env={"XDG_DATA_HOME": str(tmp_path / "data")})
    try:
        # A file well over the 128 KiB a command-line argument can carry.
        document = tmp_path / "report.pdf"
        document.write_bytes(os.urandom(1_000_000) + "é€ end".encode())
        # The README's shell command, as written, against this sidecar.
        command = readme_block("wrap.sh", "sh").replace("127.0.0.1:50051", sidecar.tcp)
        env = dict(os.environ)
        env["PATH"] = f"{Path(GRPCURL).parent}:{Path(sys.executable).parent}:{env['PATH']}"
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        envelope = tmp_path / "report.pdf.enc"
        assert envelope.stat().st_size > 1_000_000
    finally:
        assert sidecar.stop() == 0

    script = tmp_path / "decrypt_local.py"
    script.write_text(readme_block("decrypt_local.py"))
    key_file = tmp_path / "data" / "kms-sidecar" / "local-key"
    decrypted = tmp_path / "report.pdf.out"
    run = subprocess.run(
        [sys.executable, str(script), str(key_file), str(envelope), str(decrypted)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert decrypted.read_bytes() == document.read_bytes()
    assert "'doc': 'report'" in run.stderr
