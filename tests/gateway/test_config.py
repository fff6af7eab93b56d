import pytest

from ember.config import ServerConfig
from ember.config.schema import ConfigError
from ember.config.server import ProviderSpec, parse_fallbacks
from ember.gateway.routing import Routing
from ember.server.backend import EngineBackend
from tests.gateway.upstream import NamedEngine


def test_provider_specs():
    config = ServerConfig(
        embedding_model=None,
        providers=["up=http://h:1/v1/", "my-up=https://x/v1,key_env=MINE,kind=ember"],
    )
    assert config.provider_specs == {
        "up": ProviderSpec("up", "http://h:1/v1", "EMBER_PROVIDER_UP_KEY", "openai"),
        "my-up": ProviderSpec("my-up", "https://x/v1", "MINE", "ember"),
    }


@pytest.mark.parametrize(
    "spec,says",
    [
        ("up", "--provider takes NAME=URL"),
        ("up=ftp://h", "must start with http"),
        ("up=http://h,key=X", "unknown option 'key=X'"),
        ("up=http://h,kind=vllm", "kind must be openai or ember"),
        ("a b=http://h", "NAME must be"),
    ],
)
def test_bad_provider_names_the_flag(spec, says):
    with pytest.raises(ConfigError) as refused:
        ServerConfig(embedding_model=None, providers=[spec])
    assert says in str(refused.value) and "--provider" in str(refused.value)


def test_provider_given_twice():
    with pytest.raises(ConfigError, match="--provider up is given twice"):
        ServerConfig(embedding_model=None, providers=["up=http://a", "up=http://b"])


def test_fallbacks():
    assert parse_fallbacks(["m=up/a,local", "m=up/b"]) == {"m": ["up/a", "local", "up/b"]}
    with pytest.raises(ValueError, match="--fallback takes"):
        parse_fallbacks(["m="])
    with pytest.raises(ValueError, match="cannot fall back to itself"):
        parse_fallbacks(["m=m"])


def test_fallback_to_an_unknown_provider_is_refused_at_start():
    options = ServerConfig(embedding_model=None, providers=["up=http://h"], fallbacks={"m": ["upp/x"]})
    with pytest.raises(ValueError, match="--fallback m: 'upp/x' names no --provider 'upp'"):
        Routing.from_config(EngineBackend(NamedEngine("x"), "m"), options)


def test_the_key_comes_from_the_environment_and_never_shows(monkeypatch):
    monkeypatch.setenv("EMBER_PROVIDER_UP_KEY", "sk-secret")
    options = ServerConfig(embedding_model=None, providers=["up=http://h/v1"])
    routing = Routing.from_config(EngineBackend(NamedEngine("x"), "m"), options)
    assert routing.providers["up"].client.headers["authorization"] == "Bearer sk-secret"
    assert "sk-secret" not in repr(options)
