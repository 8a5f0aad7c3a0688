"""zstack_kube.login without a cluster: which kubeconfig is read, the client options, and the namespace."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from zstack_kube import login as login_module
from zstack_kube.errors import KubeError
from zstack_kube.login import configuration, login, namespace, without_retries


def kubeconfig(path: Path, server: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "dev",
        "clusters": [{"name": "dev", "cluster": {"server": server, "insecure-skip-tls-verify": True,
                                                 "tls-server-name": "kubernetes"}}],
        "users": [{"name": "me", "user": {"token": "t0k3n"}}],
        "contexts": [{"name": "dev", "context": {"cluster": "dev", "user": "me"}}]}))
    return path


@pytest.fixture
def outside_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)


def test_an_explicit_kubeconfig(tmp_path: Path) -> None:
    cfg = configuration(kubeconfig(tmp_path / "kc", "https://10.0.0.1:6443"))
    assert cfg.host == "https://10.0.0.1:6443"
    assert cfg.api_key["BearerToken"] == "Bearer t0k3n" and cfg.tls_server_name == "kubernetes"


@pytest.mark.usefixtures("outside_a_cluster")
def test_outside_a_cluster_the_kubeconfig_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "kc", "https://10.0.0.2:6443")))
    assert configuration().host == "https://10.0.0.2:6443"


@pytest.mark.usefixtures("outside_a_cluster")
def test_no_credentials_at_all_is_a_kube_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(KubeError, match="cannot log in to Kubernetes"):
        configuration()
    with pytest.raises(KubeError, match="cannot log in to Kubernetes"):
        login(tmp_path / "missing")


def test_login_options(tmp_path: Path) -> None:
    path = kubeconfig(tmp_path / "kc", "https://10.0.0.1:6443")
    default = login(path)
    assert default.configuration.retries == 1  # one quick retry, then the caller decides
    tuned = login(path, retries=0, pool_maxsize=64, user_agent="zstack-test")
    assert tuned.configuration.retries == 0 and tuned.configuration.connection_pool_maxsize == 64
    assert tuned.user_agent == "zstack-test"
    bare = without_retries(default)
    assert bare.configuration.retries == 0 and default.configuration.retries == 1
    assert bare.configuration.host == default.configuration.host
    for api_client in (default, tuned, bare):
        api_client.close()


def test_namespace_explicit_else_the_service_accounts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert namespace("given") == "given"
    monkeypatch.setattr(login_module, "SA_NAMESPACE_FILE", tmp_path / "namespace")
    (tmp_path / "namespace").write_text("zstack\n")
    assert namespace(None) == "zstack"


def test_an_unknown_namespace_is_a_kube_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(login_module, "SA_NAMESPACE_FILE", tmp_path / "namespace")
    with pytest.raises(KubeError, match="namespace is unknown"):
        namespace("")
