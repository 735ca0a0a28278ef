"""The router's cluster file: engine URLs, one engine listed twice under two names, and one-line YAML errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tropical_sched.serve.config import ClusterFileError, check_base_url, engine_address, load_router_config


def _cluster(tmp_path: Path, *urls: str) -> Path:
    """A cluster file with one instance per URL (prefill first, then multiplexing), each ``url`` on line 2i+2."""
    roles = ["prefill", *["multiplexing"] * (len(urls) - 1)]
    body = "".join(f"  - url: {url}\n    role: {role}\n" for url, role in zip(urls, roles, strict=True))
    path = tmp_path / "cluster.yaml"
    path.write_text("instances:\n" + body)
    return path


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://", "has no host"),
        ("http://:8000", "has no host"),
        ("http://10.0.0.1:99999", "has port '99999', which is not a port number in 1-65535"),
        ("http://10.0.0.1:0", "has port '0', which is not a port number in 1-65535"),
        ("http://10.0.0.1:http", "has port 'http', which is not a port number in 1-65535"),
        ("ftp://10.0.0.1:21", "must start with http:// or https://"),
        ("10.0.0.1:8000", "must start with http:// or https://"),
        ("http://10.0.0.1:8000/?model=x", "must not have a query or fragment"),
        ("http://[::1:8000", "is not a URL"),
    ],
)
def test_a_bad_instance_url_is_refused_with_the_field_value_and_line(tmp_path: Path, url: str, problem: str) -> None:
    path = _cluster(tmp_path, "http://10.0.0.1:8000", url)
    with pytest.raises(ClusterFileError) as caught:
        load_router_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:4: field instances[1].url = {url!r}: {problem}")
    assert "\n" not in message


@pytest.mark.parametrize(
    "url", ["http://10.0.0.1:8000", "https://engine.example/", "http://[::1]:8000", "http://e:1/prefix", "HTTP://e:1"]
)
def test_good_instance_urls_pass(url: str) -> None:
    assert check_base_url(url) == url


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("http://localhost:8000", "http://127.0.0.1:8000"),
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000/"),
        ("http://[::1]:8000", "http://LOCALHOST:8000"),
        ("http://0.0.0.0:8000", "http://127.0.1.1:8000"),
        ("http://[::ffff:127.0.0.1]:8000", "http://localhost:8000"),
        ("http://10.0.0.1", "http://10.0.0.1:80"),
        ("https://engine.example", "https://engine.example:443/"),
    ],
)
def test_one_engine_under_two_names_is_refused_at_the_second(tmp_path: Path, first: str, second: str) -> None:
    path = _cluster(tmp_path, "http://10.9.9.9:8000", first, second)
    with pytest.raises(ClusterFileError) as caught:
        load_router_config(path)
    message = str(caught.value)
    assert message.startswith(
        f"{path}:6: field instances[2].url = {second!r}: the same engine as instances[1].url = {first!r}"
    )
    assert "\n" not in message


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8001"),
        ("http://10.0.0.1:8000", "http://10.0.0.2:8000"),
        ("http://10.0.0.1", "https://10.0.0.1"),  # ports 80 and 443
        ("http://proxy:80/a", "http://proxy:80/b"),
    ],
)
def test_different_engines_are_kept(tmp_path: Path, first: str, second: str) -> None:
    config = load_router_config(_cluster(tmp_path, first, second))
    assert [i.url for i in config.instances] == [first, second]
    assert engine_address(first) != engine_address(second)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "instances:\n  - url: http://a:1\n    role: prefill\n   - url: http://b:1\n",
            ":4: not valid YAML: expected <block end>, but found '<block sequence start>' (column 4), while parsing a "
            "block collection at line 2",
        ),
        (
            'instances:\n  - url: "http://a:1\n    role: prefill\n',
            ":4: not valid YAML: found unexpected end of stream (column 1), while scanning a quoted scalar at line 2",
        ),
        ("instances:\n\t- url: http://a:1\n", ":2: not valid YAML: found character '\\t' that cannot start any token"),
    ],
)
def test_broken_yaml_is_one_line_with_file_line_and_problem(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(ClusterFileError) as caught:
        load_router_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}{expected}")
    assert "\n" not in message


def test_a_config_built_in_code_names_both_spellings_of_the_engine() -> None:
    from pydantic import ValidationError

    from tropical_sched.serve.config import RouterConfig

    instances = [{"url": "http://localhost:8000", "role": "prefill"}, {"url": "http://[::1]:8000", "role": "decode"}]
    with pytest.raises(ValidationError, match=r"instances\[1\].url = 'http://\[::1\]:8000': the same engine as "):
        RouterConfig.model_validate({"instances": instances})
