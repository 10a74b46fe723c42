"""deploy/: every kustomize overlay renders and validates offline against
the Kubernetes schemas (strict) for the oldest and newest versions it
supports; the Dockerfile passes hadolint; checkov passes on both."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

LINT = Path(os.environ.get("KMS_SIDECAR_LINT_VENV", REPO / ".venv-lint")) / "bin"
# Native sidecars need Kubernetes >= 1.29; the classic layout works on older
# clusters (1.25 is the oldest schema the validator ships).
OVERLAYS = {
    "base": ["1.29.0", "1.37.0"],
    "overlays/classic": ["1.25.0", "1.37.0"],
}


def tool(name):
    path = LINT / name
    assert path.exists(), f"{path} missing: run tests/run.sh (it installs .venv-lint)"
    return str(path)


def render(overlay):
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render the overlays"
    out = subprocess.run(
        [kubectl, "kustomize", str(REPO / "deploy/kustomize" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("overlay,version", [(o, v) for o, vs in OVERLAYS.items() for v in vs])
def test_overlay_validates_strictly(overlay, version):
    rendered = render(overlay)
    out = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", version, "-"],
        input=rendered,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "deployment/example-app" in out.stdout + out.stderr


def test_native_sidecar_is_rejected_by_old_schema():
    """The validation has teeth: the native-sidecar base is not valid 1.25."""
    out = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", "1.25.0", "-"],
        input=render("base"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "restartPolicy" in out.stdout + out.stderr


def test_rendered_sidecar_settings():
    import yaml

    docs = [d for d in yaml.safe_load_all(render("base")) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    sidecar = pod["initContainers"][0]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    assert sidecar["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert "kms_sidecar.v1.KeyService" in sidecar["readinessProbe"]["exec"]["command"]
    assert "--service" not in sidecar["livenessProbe"]["exec"]["command"], "liveness = process only"
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert "eks.amazonaws.com/role-arn" in sa["metadata"]["annotations"]
    classic = [d for d in yaml.safe_load_all(render("overlays/classic")) if d]
    cpod = next(d for d in classic if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert "initContainers" not in cpod
    assert [c["name"] for c in cpod["containers"]] == ["app", "kms-sidecar"]


def test_dockerfile_hadolint():
    out = subprocess.run(
        [tool("hadolint"), str(REPO / "deploy/Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_checkov_dockerfile_and_manifests(tmp_path):
    files = ["-f", str(REPO / "deploy/Dockerfile")]
    for name in OVERLAYS:
        path = tmp_path / (name.replace("/", "-") + ".yaml")
        path.write_text(render(name))
        files += ["-f", str(path)]
    out = subprocess.run(
        [tool("checkov"), "--skip-download", "--quiet", "--compact", *files],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
