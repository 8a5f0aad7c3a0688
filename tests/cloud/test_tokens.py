"""API tokens from a file: two at once during a rotation, reloaded without a restart, refused when unusable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.cloud.conftest import Api, CloudCluster
from zstack_node.cloud.tokens import ApiTokens
from zstack_node.errors import ConfigError


def rewrite(path: Path, text: str) -> None:
    """Swap the file in as a Secret volume does (a new inode), so even a same-size rewrite is seen."""
    fresh = path.with_suffix(".new")
    fresh.write_text(text)
    os.replace(fresh, path)


def test_a_file_holds_one_or_two_tokens_and_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("old-token\n")
    tokens = ApiTokens(path=str(path))
    assert tokens.accepts("old-token") and not tokens.accepts("new-token") and not tokens.accepts("")
    rewrite(path, "old-token\nnew-token\n")
    assert tokens.accepts("old-token") and tokens.accepts("new-token")
    rewrite(path, "new-token\n")
    assert tokens.accepts("new-token") and not tokens.accepts("old-token")


def test_a_file_that_breaks_later_keeps_the_last_tokens(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("kept\n")
    tokens = ApiTokens(path=str(path))
    path.unlink()
    assert tokens.accepts("kept")
    path.write_text("a\nb\nc\n")
    assert tokens.accepts("kept") and not tokens.accepts("a")


@pytest.mark.parametrize("content", [None, "", "\n  \n", "a\nb\nc\n"])
def test_an_unusable_file_is_refused_at_start_naming_the_flag(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match="--api-token-file"):
        ApiTokens(path=str(path))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_an_mn_rotates_its_token_from_the_file_without_a_restart(cloud: CloudCluster, tmp_path: Path) -> None:
    path = tmp_path / "api-token"
    path.write_text("first-token\n")
    (node,) = cloud.start(1, env={"ZSTACK_API_TOKEN": "", "ZSTACK_API_TOKEN_FILE": str(path)})
    first, second = Api(node.url, token="first-token"), Api(node.url, token="second-token")
    assert first.request("GET", "/v1/hosts").status_code == 200
    assert second.request("GET", "/v1/hosts").status_code == 401
    rewrite(path, "first-token\nsecond-token\n")
    assert first.request("GET", "/v1/hosts").status_code == 200
    assert second.request("GET", "/v1/hosts").status_code == 200
    rewrite(path, "second-token\n")
    assert first.request("GET", "/v1/hosts").status_code == 401
    assert second.request("GET", "/v1/hosts").status_code == 200
    pid = node.process.pid
    assert node.process.pid == pid and node.process.poll() is None
    environ = (Path("/proc") / str(pid) / "environ").read_bytes()
    assert b"first-token" not in environ and b"second-token" not in environ
