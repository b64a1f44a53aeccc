"""edgeproxy.config: pure tests, no sockets.

Error tests assert the one line a user sees (SPEC §1): `relay.yaml: <yaml path>: <problem>`.
Each test writes its YAML to tmp_path/relay.yaml and chdirs there, so the file shows up
as `relay.yaml`, exactly as an operator running `edgeproxy check` would see it.
"""

from __future__ import annotations

import os
import random
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgeproxy.config import (
    Config,
    ConfigError,
    Price,
    Timeouts,
    load_config,
    summary,
)

SHIPPED = Path(__file__).resolve().parent.parent / "relay.yaml"
PROVIDER_ENV = {"OPENAI_API_KEY": "sk-openai", "ANTHROPIC_API_KEY": "sk-ant", "GEMINI_API_KEY": "g"}

Write = Callable[[str], str]


@pytest.fixture
def write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Write:
    monkeypatch.chdir(tmp_path)

    def write(text: str) -> str:
        Path("relay.yaml").write_text(textwrap.dedent(text), encoding="utf-8")
        return "relay.yaml"

    return write


def load(write: Write, text: str, env: dict[str, str] | None = None) -> Config:
    return load_config(write(text), env or {})


def error(write: Write, text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(write, text, env)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("relay.yaml: ")
    return info.value


ONE_UPSTREAM = """
upstreams:
  - name: up
    kind: openai
    base_url: http://127.0.0.1:9/v1/
    api_keys: [k1]
    models: [m]
"""


# --- the shipped relay.yaml ------------------------------------------------------------------


def test_shipped_relay_yaml_runs_out_of_the_box() -> None:
    config = load_config(SHIPPED, {})
    assert [u.name for u in config.upstreams] == ["demo"]
    assert config.warnings == (
        "upstreams[0] (openai): every api_key is empty; skipped",
        "upstreams[1] (anthropic): every api_key is empty; skipped",
        "upstreams[2] (gemini): every api_key is empty; skipped",
    )
    demo = config.upstreams[0]
    assert (demo.kind, demo.base_url, demo.api_keys) == (
        "openai",
        "http://127.0.0.1:8079/v1",
        ("demo-upstream-key",),
    )
    assert demo.serves("demo-chat") and demo.serves("demo-embedding")
    assert config.listen == ("0.0.0.0", 8080)
    assert config.metrics_listen == ("127.0.0.1", 9464)
    assert config.database == str(SHIPPED.parent / "edgeproxy.db")
    assert config.admin_token == ""
    assert config.max_request_body == 32 * 1024 * 1024
    assert config.usage_retention == 400 * 86400
    assert config.model_rule("demo-chat").price.input > 0


def test_shipped_relay_yaml_matches_the_spec_with_provider_keys() -> None:
    env = {**PROVIDER_ENV, "EDGEPROXY_DEMO": "false", "EDGEPROXY_ADMIN_TOKEN": "adm"}
    config = load_config(SHIPPED, env)
    assert [u.name for u in config.upstreams] == ["openai", "anthropic", "gemini"]
    assert config.warnings == ("upstreams[3] (demo): enabled is false; skipped",)
    openai = config.upstreams[0]
    assert openai.weight == 10
    assert openai.upstream_model("gpt-4o-mini") == "gpt-4o-mini-2024-07-18"
    assert openai.timeouts == Timeouts(first_byte=300.0)  # merged over the global defaults
    assert config.upstreams[1].timeouts == Timeouts()
    assert config.retry.on == {
        429,
        500,
        502,
        503,
        504,
        "connect_error",
        "timeout",
        "empty_response",
    }
    assert config.admin_token == "adm"
    opus = config.model_rule("claude-opus-4-8")
    assert opus.price == Price(input=5, output=25, cached_input=0.5, cache_write=6.25)
    assert opus.params.drop == ("temperature", "top_p")
    assert config.model_rule("gpt-5-mini").params.rename == {"max_tokens": "max_completion_tokens"}


def test_shipped_relay_yaml_demo_and_listen_come_from_the_environment() -> None:
    env = {"EDGEPROXY_DEMO_URL": "http://10.0.0.2:7000/v1/", "EDGEPROXY_LISTEN": "[::1]:9000"}
    config = load_config(SHIPPED, env)
    assert config.upstreams[0].base_url == "http://10.0.0.2:7000/v1"
    assert config.listen == ("::1", 9000)


def test_shipped_relay_yaml_documents_every_key() -> None:
    """Every key the loader knows appears in the shipped file (commented or set)."""
    text = SHIPPED.read_text()
    for key in (
        *("listen", "metrics_listen", "workers", "database", "admin_token", "max_request_body"),
        *("max_connections", "max_inflight", "shutdown_grace", "usage_retention", "per_key"),
        "connect",
        *("first_byte", "idle", "client_read", "client_keepalive", "attempts", "backoff"),
        *("max_backoff", "on", "eject_after", "eject_for", "name", "kind", "base_url"),
        *("api_keys", "models", "model_map", "weight", "priority", "headers", "stream_usage"),
        *("enabled", "price", "input", "output", "cached_input", "cache_write", "rename", "drop"),
    ):
        assert f"{key}:" in text, key


# --- environment expansion -------------------------------------------------------------------


def test_env_expansion_with_defaults(write: Write) -> None:
    config = load(
        write,
        """
        listen: ${LISTEN:-127.0.0.1:8000}
        admin_token: "${TOKEN}-${SUFFIX:-x}"
        workers: ${WORKERS:-2}
        upstreams:
          - name: up
            kind: openai
            base_url: ${URL:-http://127.0.0.1:9/v1}
            api_keys: ["${KEY:-}", "${EMPTY:-fallback}"]
            models: [m]
            weight: ${WEIGHT:-3}
            enabled: ${ENABLED:-yes}
        """,
        {"TOKEN": "t", "EMPTY": "", "WORKERS": "4"},
    )
    assert config.listen == ("127.0.0.1", 8000)
    assert config.admin_token == "t-x"
    assert config.workers == 4
    # `:-` applies to an empty variable as in the shell, so EMPTY="" gives the default.
    assert config.upstreams[0].api_keys == ("fallback",)
    assert config.upstreams[0].weight == 3


def test_env_set_but_empty_without_default_is_empty(write: Write) -> None:
    config = load(write, "admin_token: ${TOKEN}\n" + ONE_UPSTREAM, {"TOKEN": ""})
    assert config.admin_token == ""


def test_missing_env_var_names_it_and_the_path(write: Write) -> None:
    text = ONE_UPSTREAM.replace("[k1]", '["${OPENAI_API_KEY}"]')
    assert str(error(write, text)) == (
        "relay.yaml: upstreams[0].api_keys[0]: "
        "environment variable OPENAI_API_KEY is not set and has no default"
    )


def test_env_value_cannot_inject_yaml(write: Write) -> None:
    env = {"TOKEN": "x\nlisten: 1.2.3.4:1\nworkers: 9"}
    config = load(write, "admin_token: ${TOKEN}\n" + ONE_UPSTREAM, env)
    assert config.admin_token == env["TOKEN"]
    assert config.workers == 1 and config.listen == ("0.0.0.0", 8080)


def test_env_value_is_not_expanded_again(write: Write) -> None:
    config = load(write, "admin_token: ${TOKEN}\n" + ONE_UPSTREAM, {"TOKEN": "${HOME}"})
    assert config.admin_token == "${HOME}"


def test_malformed_reference_is_an_error_not_a_literal(write: Write) -> None:
    text = ONE_UPSTREAM.replace("[k1]", '["${OPENAI_API_KEY"]')
    err = error(write, text)
    assert err.path == "upstreams[0].api_keys[0]"
    assert "malformed ${...}" in err.problem


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("false", False), ("yes", True), ("no", False), ("1", True), ("0", False)],
)
def test_bool_fields_accept_expanded_strings(write: Write, value: str, expected: bool) -> None:
    text = "metrics:\n  per_key: ${PK}\n" + ONE_UPSTREAM + "    enabled: ${PK}\n"
    config = load(write, text, {"PK": value})
    assert config.metrics.per_key is expected
    assert len(config.upstreams) == (1 if expected else 0)


# --- scalars ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "seconds"),
    [
        ("200ms", 0.2),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("45", 45.0),
        ("90 s", 90.0),
        (30, 30.0),
        (0.25, 0.25),
    ],
)
def test_durations(write: Write, given: Any, seconds: float) -> None:
    config = load(write, f"timeouts: {{idle: {given!r}}}\n".replace("'", '"') + ONE_UPSTREAM)
    assert config.timeouts.idle == pytest.approx(seconds)
    assert config.upstreams[0].timeouts.idle == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("given", "size"),
    [
        ("512B", 512),
        ("1KB", 1000),
        ("1KiB", 1024),
        ("32MiB", 32 * 2**20),
        ("2MB", 2_000_000),
        ("1GB", 10**9),
        ("1.5GiB", 3 * 2**29),
        ("4096", 4096),
        (65536, 65536),
    ],
)
def test_sizes(write: Write, given: Any, size: int) -> None:
    config = load(write, f"max_request_body: {given}\n" + ONE_UPSTREAM)
    assert config.max_request_body == size


@pytest.mark.parametrize(
    ("given", "address"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("[::1]:8080", ("::1", 8080)),
        (":8080", ("0.0.0.0", 8080)),
        ("localhost:1", ("localhost", 1)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_listen(write: Write, given: str, address: tuple[str, int]) -> None:
    config = load(write, f'listen: "{given}"\nmetrics_listen: "{given}"\n' + ONE_UPSTREAM)
    assert config.listen == address
    assert config.metrics_listen == address


@pytest.mark.parametrize("off", ['""', "off", "OFF", "null", "~", "", "false"])
def test_metrics_listen_can_be_turned_off(write: Write, off: str) -> None:
    assert load(write, f"metrics_listen: {off}\n" + ONE_UPSTREAM).metrics_listen is None


def test_defaults_when_keys_are_missing(write: Write) -> None:
    config = load(write, ONE_UPSTREAM)
    assert config.listen == ("0.0.0.0", 8080)
    assert config.metrics_listen == ("127.0.0.1", 9464)
    assert (config.workers, config.max_connections, config.max_inflight) == (1, 4096, 1024)
    assert config.timeouts == Timeouts()
    assert config.retry.attempts == 3 and config.health.eject_after == 5
    assert config.usage_retention == 400 * 86400  # 13 months: compare with a year before
    up = config.upstreams[0]
    assert (up.weight, up.priority, up.stream_usage, up.enabled) == (1, 0, "inject", True)
    assert up.base_url == "http://127.0.0.1:9/v1"  # trailing slash stripped
    assert config.path == os.path.abspath("relay.yaml")


@pytest.mark.parametrize(
    ("given", "seconds"),
    [
        ("400d", 400 * 86400.0),
        ("2 D", 2 * 86400.0),
        ("1.5d", 1.5 * 86400.0),
        ("9600h", 400 * 86400.0),
        ("1440m", 86400.0),
        (86400, 86400.0),
        (0, 0.0),  # keep forever
        ('"0"', 0.0),
        ('"${RETENTION:-30d}"', 30 * 86400.0),
    ],
)
def test_usage_retention(write: Write, given: Any, seconds: float) -> None:
    config = load(write, f"usage_retention: {given}\n" + ONE_UPSTREAM)
    assert config.usage_retention == pytest.approx(seconds)


def test_workers_auto(write: Write) -> None:
    assert load(write, "workers: auto\n" + ONE_UPSTREAM).workers == (os.cpu_count() or 1)


def test_database_is_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "relay.yaml").write_text("database: data/ledger.db\n" + ONE_UPSTREAM)
    monkeypatch.chdir(tmp_path)
    config = load_config("etc/relay.yaml", {})
    assert config.database == str(tmp_path / "etc" / "data" / "ledger.db")
    assert os.path.isabs(config.database)


def test_yaml_1_1_words_stay_strings(write: Write) -> None:
    """`on`, `off` and dates would be a bool key, a bool and a date under YAML 1.1."""
    config = load(
        write,
        """
        retry: {on: [429, "503", timeout]}
        upstreams:
          - name: up
            kind: anthropic
            base_url: https://api.anthropic.com
            api_keys: k
            models: ["claude-*"]
            stream_usage: off
            headers: {anthropic-beta: 2023-06-01}
        """,
    )
    assert config.retry.on == {429, 503, "timeout"}
    assert config.upstreams[0].stream_usage == "off"
    assert config.upstreams[0].headers == {"anthropic-beta": "2023-06-01"}


# --- upstreams -------------------------------------------------------------------------------


def test_api_keys_empty_strings_are_dropped(write: Write) -> None:
    text = ONE_UPSTREAM.replace("[k1]", '["", "${A:-}", " k2 ", k3]')
    assert load(write, text).upstreams[0].api_keys == ("k2", "k3")


def test_api_keys_single_string_may_hold_several_keys(write: Write) -> None:
    text = ONE_UPSTREAM.replace("[k1]", "${KEYS}")
    assert load(write, text, {"KEYS": "a,b, c"}).upstreams[0].api_keys == ("a", "b", "c")


def test_upstream_without_keys_is_skipped_with_a_warning(write: Write) -> None:
    text = (
        ONE_UPSTREAM
        + """
  - name: anthropic
    kind: anthropic
    base_url: https://api.anthropic.com
    api_keys: ["${ANTHROPIC_API_KEY:-}"]
    models: ["claude-*"]
"""
    )
    config = load(write, text)
    assert [u.name for u in config.upstreams] == ["up"]
    assert config.warnings == ("upstreams[1] (anthropic): every api_key is empty; skipped",)


def test_no_usable_upstream_still_loads_with_a_warning(write: Write) -> None:
    config = load(write, ONE_UPSTREAM.replace("[k1]", "[]"))
    assert config.upstreams == ()
    assert config.warnings[-1].startswith("no usable upstream")
    assert load(write, "listen: :8080\n").upstreams == ()


def test_upstream_timeouts_are_merged_over_the_global_ones(write: Write) -> None:
    text = "timeouts: {connect: 3s, idle: 60s}\n" + ONE_UPSTREAM
    config = load(write, text + "    timeouts: {idle: 5m, client_read: 1s}\n")
    assert config.upstreams[0].timeouts == Timeouts(
        connect=3.0, first_byte=120.0, idle=300.0, client_read=1.0, client_keepalive=75.0
    )
    assert config.timeouts.idle == 60.0


def test_full_upstream(write: Write) -> None:
    text = ONE_UPSTREAM + textwrap.indent(
        textwrap.dedent(
            """\
            model_map: {m: m-2024}
            weight: "7"
            priority: 2
            headers: {OpenAI-Organization: org-1}
            stream_usage: inject
            """
        ),
        "    ",
    )
    up = load(write, text).upstreams[0]
    assert (up.weight, up.priority, up.model_map) == (7, 2, {"m": "m-2024"})
    assert up.headers == {"OpenAI-Organization": "org-1"}
    assert up.upstream_model("m") == "m-2024" and up.upstream_model("x") == "x"


def test_duplicate_upstream_names(write: Write) -> None:
    assert str(error(write, ONE_UPSTREAM + ONE_UPSTREAM.split("\n", 2)[2])) == (
        "relay.yaml: upstreams[1].name: duplicate upstream name 'up'"
    )


def test_bad_kind(write: Write) -> None:
    assert str(error(write, ONE_UPSTREAM.replace("kind: openai", "kind: azure"))) == (
        "relay.yaml: upstreams[0].kind: must be one of openai, anthropic, gemini, got 'azure'"
    )


def test_bad_url(write: Write) -> None:
    text = ONE_UPSTREAM.replace("http://127.0.0.1:9/v1/", "api.openai.com/v1")
    assert str(error(write, text)) == (
        "relay.yaml: upstreams[0].base_url: "
        "must be an http:// or https:// URL, got 'api.openai.com/v1'"
    )


def test_negative_weight_is_the_spec_example(write: Write) -> None:
    text = ONE_UPSTREAM + "".join(
        ONE_UPSTREAM.split("\n", 2)[2].replace("name: up", f"name: up{i}") for i in (1, 2)
    )
    text += "    weight: -1\n"
    assert str(error(write, text)) == (
        "relay.yaml: upstreams[2].weight: must be a positive integer, got -1"
    )


def test_weight_rejects_bools_and_floats(write: Write) -> None:
    assert error(write, ONE_UPSTREAM + "    weight: true\n").problem.endswith("got true")
    assert error(write, ONE_UPSTREAM + "    weight: 1.5\n").problem.endswith("got 1.5")


def test_relay_owned_headers_are_refused(write: Write) -> None:
    for name in ("Authorization", "x-api-key", "X-Goog-Api-Key", "Host", "content-length"):
        err = error(write, ONE_UPSTREAM + f"    headers: {{{name}: secret-value}}\n")
        assert err.path == f"upstreams[0].headers.{name}"
        assert "secret-value" not in str(err)


# --- unknown keys, at every level --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (
            "lisen: :8080\n" + ONE_UPSTREAM,
            "relay.yaml: unknown key 'lisen' (did you mean 'listen'?)",
        ),
        (
            "timeouts: {idel: 5s}\n",
            "relay.yaml: timeouts: unknown key 'idel' (did you mean 'idle'?)",
        ),
        (
            ONE_UPSTREAM + "    wieght: 2\n",
            "relay.yaml: upstreams[0]: unknown key 'wieght' (did you mean 'weight'?)",
        ),
        (
            ONE_UPSTREAM + "    timeouts: {conect: 1s}\n",
            "relay.yaml: upstreams[0].timeouts: unknown key 'conect' (did you mean 'connect'?)",
        ),
        (
            'models: {"gpt-5*": {price: {inptu: 1}}}\n',
            "relay.yaml: models.\"gpt-5*\".price: unknown key 'inptu' (did you mean 'input'?)",
        ),
        (
            "models: {gpt-4o: {prices: {input: 1}}}\n",
            "relay.yaml: models.gpt-4o: unknown key 'prices' (did you mean 'price'?)",
        ),
        (
            "models: {gpt-4o: {params: {rname: {}}}}\n",
            "relay.yaml: models.gpt-4o.params: unknown key 'rname' (did you mean 'rename'?)",
        ),
        (
            "retry: {attempt: 2}\n",
            "relay.yaml: retry: unknown key 'attempt' (did you mean 'attempts'?)",
        ),
        (
            "health: {xyz: 2}\n",
            "relay.yaml: health: unknown key 'xyz' (expected eject_after, eject_for)",
        ),
        (
            "metrics: {perkey: true}\n",
            "relay.yaml: metrics: unknown key 'perkey' (did you mean 'per_key'?)",
        ),
    ],
)
def test_unknown_keys(write: Write, text: str, line: str) -> None:
    assert str(error(write, text)) == line


# --- whole-file problems -----------------------------------------------------------------------


def test_yaml_syntax_error_is_one_line_with_the_line_number(write: Write) -> None:
    err = error(write, "listen: :8080\nupstreams: [\n  - name: x\n")
    assert err.path == ""
    assert str(err).startswith("relay.yaml: YAML syntax error at line ")


def test_duplicate_yaml_key_is_an_error(write: Write) -> None:
    err = error(write, "listen: :1\nworkers: 2\nlisten: :2\n")
    assert str(err) == "relay.yaml: YAML syntax error at line 3, column 1: duplicate key 'listen'"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "file is empty"),
        ("# only a comment\n", "file is empty"),
        ("- a\n- b\n", "the top level must be a mapping of keys, got a list"),
        ("just words\n", "the top level must be a mapping of keys, got 'just words'"),
        ("a: &x [*x]\n", "a[0]: a YAML alias refers to itself"),
    ],
)
def test_bad_top_level(write: Write, text: str, problem: str) -> None:
    assert problem in str(error(write, text))


def test_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config("relay.yaml", {})
    assert str(info.value) == "relay.yaml: no such file"


def test_not_utf8(write: Write) -> None:
    Path(write("")).write_bytes(b"listen: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"^relay\.yaml: is not UTF-8 text"):
        load_config("relay.yaml", {})


@pytest.mark.parametrize("value", ["!!timestamp x", "!!timestamp", "!!bool maybe"])
def test_explicit_yaml_tag_with_a_bad_value_is_one_line(write: Write, value: str) -> None:
    """PyYAML's own constructors raise AttributeError / KeyError here (found by the fuzz test)."""
    err = error(write, f"shutdown_grace: {value}\n" + ONE_UPSTREAM)
    assert str(err) == "relay.yaml: YAML syntax error: a value does not fit its explicit !!tag"


# --- the models catalogue ------------------------------------------------------------------------


def test_model_rules_exact_wins_over_glob_and_file_order_is_kept(write: Write) -> None:
    config = load(
        write,
        """
        models:
          "gpt-*":
            price: {input: 1}
          gpt-4o:
            price: {input: 2, output: "3.5"}
          "gpt-4*":
            price: {input: 3}
          listed-only:
        """,
    )
    assert [rule.pattern for rule in config.models] == ["gpt-*", "gpt-4o", "gpt-4*", "listed-only"]
    assert config.model_rule("gpt-4o").price == Price(input=2, output=3.5)
    assert config.model_rule("gpt-4o-mini").pattern == "gpt-*"  # first glob in file order
    assert config.model_rule("listed-only").price is None
    assert not config.model_rule("listed-only").params
    assert config.model_rule("claude-3") is None


# --- summary -------------------------------------------------------------------------------------


def test_summary_shows_routes_and_never_secrets(write: Write) -> None:
    config = load(
        write,
        """
        admin_token: admin-secret-token
        upstreams:
          - name: main
            kind: openai
            base_url: https://user:pass-secret@relay.example.com:8443/private/v1
            api_keys: [sk-secret-one, sk-secret-two]
            models: [gpt-4o, "gpt-5*"]
            headers: {X-Custom: header-secret}
          - name: backup
            kind: openai
            base_url: http://10.0.0.1/v1
            api_keys: [sk-secret-three]
            models: [gpt-4o]
            priority: 1
          - name: off
            kind: gemini
            base_url: https://x.example
            api_keys: [""]
            models: [gemini-x]
        models:
          gpt-4o: {price: {input: 2.5, output: 10}}
          unserved: {price: {input: 1}}
        """,
    )
    text = "\n".join(summary(config))
    for secret in ("secret", "pass", "/private"):
        assert secret not in text
        assert secret not in repr(config)
    assert "main: openai at https://relay.example.com:8443" in text
    assert "2 api keys, extra headers X-Custom" in text
    assert (
        "backup: openai at http://10.0.0.1, models gpt-4o, weight 1, priority 1, 1 api key" in text
    )
    assert "  gpt-4o -> main (priority 0, weight 1), backup (priority 1, weight 1)" in text
    assert "  gpt-5* -> main (priority 0, weight 1) [no price: not billed]" in text
    assert "  unserved -> nothing: no usable upstream serves it" in text
    assert "warning: upstreams[2] (off): every api_key is empty; skipped" in text
    assert "admin API: on" in text


def test_summary_of_the_shipped_file() -> None:
    lines = summary(load_config(SHIPPED, {}))
    assert "  demo-chat -> demo (priority 0, weight 1)" in lines
    assert sum(line.startswith("warning: ") for line in lines) == 3


# --- the table of broken configs -----------------------------------------------------------------

DELETE = object()


def broken(top: dict[str, Any] | None = None, up: dict[str, Any] | None = None) -> str:
    """A valid three-upstream config, with `top` keys set and `up` keys set on upstreams[2]."""
    ups = [
        {"name": f"up{i}", "kind": "openai", "base_url": "http://127.0.0.1:9/v1"}
        | {"api_keys": [f"k{i}"], "models": ["m"]}
        for i in range(3)
    ]
    for key, value in (up or {}).items():
        if value is DELETE:
            del ups[2][key]
        else:
            ups[2][key] = value
    return yaml.safe_dump({"upstreams": ups, **(top or {})}, sort_keys=False)


BROKEN: list[tuple[str, str, str]] = [
    (broken({"listen": 8080}), "listen", "must look like host:port"),
    (broken({"listen": "0.0.0.0:70000"}), "listen", "port must be 1..65535, got 70000"),
    (broken({"listen": "::1:80"}), "listen", "must look like host:port"),
    (broken({"metrics_listen": "localhost"}), "metrics_listen", "must look like host:port"),
    (broken({"workers": 0}), "workers", 'must be a positive integer or "auto", got 0'),
    (broken({"workers": "many"}), "workers", "got 'many'"),
    (broken({"database": ":memory:"}), "database", "must be a file path"),
    (broken({"database": ["a"]}), "database", "must be a string, got a list"),
    (
        broken({"admin_token": 12345}),
        "admin_token",
        "must be a string, got an integer (value hidden)",
    ),
    (broken({"max_request_body": "32 megabytes"}), "max_request_body", "size must look like"),
    (broken({"max_request_body": 0}), "max_request_body", "must be a positive size, got 0"),
    (broken({"max_connections": 0}), "max_connections", "must be a positive integer, got 0"),
    (broken({"max_inflight": True}), "max_inflight", "must be a positive integer, got true"),
    (
        broken({"shutdown_grace": "5 minutes"}),
        "shutdown_grace",
        "duration must look like 200ms, 30s, 5m or 1h, got '5 minutes'",
    ),
    (  # minutes, not months: refused rather than keeping 13 minutes of history
        broken({"usage_retention": "13m"}),
        "usage_retention",
        "must be 0 (keep forever) or at least 1d, e.g. 400d, got '13m'",
    ),
    (broken({"usage_retention": -1}), "usage_retention", "at least 1d, e.g. 400d, got -1"),
    (broken({"usage_retention": "a year"}), "usage_retention", "got 'a year'"),
    (broken({"usage_retention": True}), "usage_retention", "got true"),
    (broken({"metrics": {"per_key": "maybe"}}), "metrics.per_key", "must be true or false"),
    (broken({"metrics": [1]}), "metrics", "must be a mapping, got a list"),
    (broken({"timeouts": {"idle": 0}}), "timeouts.idle", "must be a positive duration, got 0"),
    (broken({"timeouts": {"connect": "-1s"}}), "timeouts.connect", "duration must look like"),
    (broken({"timeouts": "fast"}), "timeouts", "must be a mapping, got 'fast'"),
    (broken({"retry": {"attempts": 0}}), "retry.attempts", "must be a positive integer, got 0"),
    (broken({"retry": {"on": [429, 302]}}), "retry.on[1]", "must be an HTTP status 400..599"),
    (broken({"retry": {"on": ["connection_error"]}}), "retry.on[0]", "got 'connection_error'"),
    (broken({"retry": {"on": 429}}), "retry.on", "must be a list"),
    (
        broken({"retry": {"backoff": "10s", "max_backoff": "1s"}}),
        "retry.max_backoff",
        "must be at least retry.backoff (10s), got 1s",
    ),
    (broken({"health": {"eject_after": -2}}), "health.eject_after", "got -2"),
    (broken({"health": {"eject_for": "soon"}}), "health.eject_for", "got 'soon'"),
    (broken({"upstreams": {"a": 1}}), "upstreams", "must be a list of upstreams, got a mapping"),
    (broken({"upstreams": ["openai"]}), "upstreams[0]", "must be a mapping, got 'openai'"),
    (broken(up={"weight": -1}), "upstreams[2].weight", "must be a positive integer, got -1"),
    (broken(up={"weight": "heavy"}), "upstreams[2].weight", "got 'heavy'"),
    (broken(up={"priority": -1}), "upstreams[2].priority", "must be a non-negative integer"),
    (broken(up={"kind": "azure"}), "upstreams[2].kind", "must be one of openai, anthropic"),
    (broken(up={"kind": DELETE}), "upstreams[2].kind", "is required"),
    (broken(up={"name": DELETE}), "upstreams[2].name", "is required"),
    (broken(up={"api_keys": DELETE}), "upstreams[2].api_keys", "is required"),
    (broken(up={"name": "my upstream"}), "upstreams[2].name", "letters, digits"),
    (broken(up={"base_url": "ftp://x.example"}), "upstreams[2].base_url", "http:// or https://"),
    (broken(up={"base_url": "https://"}), "upstreams[2].base_url", "http:// or https://"),
    (broken(up={"base_url": "http://h:99999/v1"}), "upstreams[2].base_url", "http:// or https://"),
    (broken(up={"base_url": "https://h/v1?a=1"}), "upstreams[2].base_url", "?query or #fragment"),
    (broken(up={"api_keys": [1]}), "upstreams[2].api_keys[0]", "an integer (value hidden)"),
    (broken(up={"api_keys": {"a": "b"}}), "upstreams[2].api_keys", "must be a list of strings"),
    (broken(up={"api_keys": ["a b"]}), "upstreams[2].api_keys[0]", "must not contain whitespace"),
    (broken(up={"models": []}), "upstreams[2].models", "must be a non-empty list"),
    (broken(up={"models": "gpt-4o"}), "upstreams[2].models", "must be a non-empty list"),
    (broken(up={"models": [""]}), "upstreams[2].models[0]", "must not be empty"),
    (broken(up={"model_map": {"a": ["b"]}}), "upstreams[2].model_map.a", "must be a string"),
    (broken(up={"model_map": {1: "b"}}), "upstreams[2].model_map", "must be a string, got 1"),
    (broken(up={"headers": {"Authorization": "x"}}), "upstreams[2].headers.Authorization", "relay"),
    (broken(up={"headers": {"bad name": "x"}}), "upstreams[2].headers", "not a valid header name"),
    (broken(up={"headers": {"X-A": "a\r\nX-B: b"}}), "upstreams[2].headers.X-A", "line breaks"),
    (broken(up={"stream_usage": "always"}), "upstreams[2].stream_usage", "inject, off"),
    (broken(up={"timeouts": {"first_byte": -1}}), "upstreams[2].timeouts.first_byte", "positive"),
    (broken(up={"timeouts": [1]}), "upstreams[2].timeouts", "must be a mapping"),
    (broken(up={"enabled": "perhaps"}), "upstreams[2].enabled", "must be true or false"),
    (broken(up={"wieght": 2}), "upstreams[2]", "unknown key 'wieght' (did you mean 'weight'?)"),
    (
        broken({"models": {"gpt-5*": {"price": {"input": -1}}}}),
        'models."gpt-5*".price.input',
        "must be a non-negative number (USD per 1M tokens), got -1",
    ),
    (
        broken({"models": {"gpt-4.1": {"price": {"output": "cheap"}}}}),
        'models."gpt-4.1".price.output',
        "got 'cheap'",
    ),
    (broken({"models": {"m": {"price": 3}}}), "models.m.price", "must be a mapping, got 3"),
    (broken({"models": {"m": 5}}), "models.m", "must be a mapping, got 5"),
    (broken({"models": ["a"]}), "models", "must be a mapping of model names"),
    (broken({"models": {"m": {"params": {"drop": "top_p"}}}}), "models.m.params.drop", "a list"),
    (broken({"models": {"m": {"params": {"rename": ["a"]}}}}), "models.m.params.rename", "mapping"),
    (broken({"models": {1: None}}), "models", "model names must be non-empty strings, got 1"),
]


@pytest.mark.parametrize(("text", "path", "problem"), BROKEN)
def test_broken_configs(write: Write, text: str, path: str, problem: str) -> None:
    err = error(write, text)
    assert err.path == path
    assert str(err).startswith(f"relay.yaml: {path}: ")
    assert problem in err.problem


def test_broken_table_is_big_enough() -> None:
    assert len(BROKEN) >= 25


# --- fuzz: mutations of the shipped file raise ConfigError or nothing ----------------------------

TOKENS = [
    *("-", ":", " ", "  ", "\n", "\t", "[", "]", "{", "}", "'", '"', "#", ",", "?", "|"),
    *("&a ", "*a", "!!binary ", "!!python/object:os.system ", "!!set ", "!!timestamp "),
    *("${", "${X}", "${X:-}", "}", "0", "-1", "1e999", ".nan", "~", "null", "true", "off"),
    *("<<: *a", "%", "@", "`", ">", "\x00", "\x85", "é", "9" * 30, "[[[[[[", "ms", "KiB"),
]


def mutate(text: str, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 4)):
        lines = text.split("\n")
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        pos = rng.randrange(len(text) + 1)
        choice = rng.randrange(6)
        if choice == 0:
            text = text[:pos] + text[pos + 1 :]
        elif choice == 1:
            text = text[:pos] + rng.choice(TOKENS) + text[pos:]
        elif choice == 2:
            lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
        elif choice == 3:
            text = "\n".join(lines[:i] + lines[i + 1 :])
        elif choice == 4:
            text = "\n".join([*lines[: i + 1], lines[i], *lines[i + 1 :]])
        else:
            head, sep, _ = lines[i].partition(": ")
            lines[i] = head + sep + rng.choice(TOKENS) if sep else lines[i]
            text = "\n".join(lines)
    return text


def test_fuzzed_shipped_file_raises_only_config_error(write: Write) -> None:
    rng = random.Random(20240611)
    shipped = SHIPPED.read_text()
    outcomes = {"ok": 0, "error": 0}
    for _ in range(600):
        env = rng.choice([{}, PROVIDER_ENV, {"X": "1"}])
        path = write(mutate(shipped, rng))
        try:
            config = load_config(path, env)
        except ConfigError as exc:
            assert "\n" not in str(exc) and str(exc).startswith("relay.yaml: ")
            outcomes["error"] += 1
        else:
            assert summary(config)
            outcomes["ok"] += 1
    assert outcomes["ok"] > 50 and outcomes["error"] > 50  # both paths were exercised
