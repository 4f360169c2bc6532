"""Tests for cai.config: YAML plus key=value overrides, and the one-sentence errors for bad input."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from cai.config import GenerateConfig, ModelConfig, SamplingConfig
from cai.config_loader import apply_overrides, config_hash, config_to_yaml, load_config
from cai.errors import CaiError
from cai.types import SamplingParams


def write(tmp_path: Path, text: str, name: str = "gen.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---- keys and values -------------------------------------------------------------------------------


def test_yaml_file_sets_values_and_leaves_defaults(tmp_path):
    text = 'model:\n  name: org/model\n  batch_size: 4\nsampling:\n  temperature: 0.7\n  stop: ["\\n\\n"]\n'
    path = write(tmp_path, text)
    config = load_config(GenerateConfig, path)
    assert (config.model.name, config.model.batch_size, config.model.backend) == ("org/model", 4, "hf")
    assert (config.sampling.temperature, config.sampling.stop, config.sampling.max_new_tokens) == (0.7, ["\n\n"], 128)


def test_unknown_top_level_key_lists_known_keys(tmp_path):
    with pytest.raises(CaiError, match=r"gen\.yaml: unknown key 'modle'; known keys there: model, sampling$"):
        load_config(GenerateConfig, write(tmp_path, "modle:\n  name: x\n"))


def test_unknown_nested_key_names_dotted_key_and_lists_known_keys(tmp_path):
    with pytest.raises(CaiError) as caught:
        load_config(GenerateConfig, write(tmp_path, "sampling:\n  temprature: 0.7\n"))
    message = str(caught.value)
    assert "unknown key 'sampling.temprature'" in message
    assert "known keys there: max_new_tokens, temperature, top_p, top_k, seed, stop" in message


@pytest.mark.parametrize(("text", "key", "got"), [
    ("model:\n  batch_size: many\n", "model.batch_size", '"many"'),
    ("model:\n  batch_size: true\n", "model.batch_size", "true"),  # YAML true is not the integer 1
    ("model:\n  backend: tpu\n", "model.backend", '"tpu"'),
    ("sampling:\n  temperature: hot\n", "sampling.temperature", '"hot"'),
    ("sampling:\n  stop: END\n", "sampling.stop", '"END"'),
    ("model: 5\n", "model", "5"),
])
def test_wrong_type_names_key_and_value(tmp_path, text, key, got):
    with pytest.raises(CaiError) as caught:
        load_config(GenerateConfig, write(tmp_path, text))
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'gen.yaml'}: '{key}' ")
    assert message.endswith(f"(got {got})")


@pytest.mark.parametrize(("text", "key", "bound"), [
    ("model:\n  batch_size: 0\n", "model.batch_size", "greater than or equal to 1"),
    ("sampling:\n  max_new_tokens: 0\n", "sampling.max_new_tokens", "greater than or equal to 1"),
    ("sampling:\n  temperature: -0.1\n", "sampling.temperature", "greater than or equal to 0"),
    ("sampling:\n  top_p: 0\n", "sampling.top_p", "greater than 0"),
    ("sampling:\n  top_p: 1.5\n", "sampling.top_p", "less than or equal to 1"),
    ("sampling:\n  top_k: -1\n", "sampling.top_k", "greater than or equal to 0"),
])
def test_value_out_of_range(tmp_path, text, key, bound):
    with pytest.raises(CaiError, match=f"'{key}' input should be {bound}"):
        load_config(GenerateConfig, write(tmp_path, text))


# ---- files that are not a config ---------------------------------------------------------------------


def test_malformed_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "model:\n  name: x\n  stop: [a, b\nsampling: {}\n")
    with pytest.raises(CaiError, match=r"gen\.yaml is not valid YAML at line \d+, column \d+: "):
        load_config(GenerateConfig, path)
    with pytest.raises(CaiError, match="is not valid YAML at line 3, column 2"):
        load_config(GenerateConfig, write(tmp_path, "model:\n  name: x\n bad: indent\n"))


def test_top_level_list_or_scalar_is_not_a_config(tmp_path):
    with pytest.raises(CaiError, match="must hold a mapping of keys to values at the top level, not a list"):
        load_config(GenerateConfig, write(tmp_path, "- model\n- sampling\n"))
    with pytest.raises(CaiError, match="not a str"):
        load_config(GenerateConfig, write(tmp_path, "just words\n"))


def test_non_utf8_file(tmp_path):
    path = tmp_path / "gen.yaml"
    path.write_bytes(b"model:\n  name: caf\xe9\n")
    with pytest.raises(CaiError, match=r"gen\.yaml is not UTF-8 text \(bad byte at offset 18\); save it as UTF-8"):
        load_config(GenerateConfig, path)


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "gen.yaml"
    path.write_bytes("\ufeffmodel:\n  name: café\n".encode())
    assert load_config(GenerateConfig, path).model.name == "café"


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CaiError, match=r"config file .*nope\.yaml does not exist"):
        load_config(GenerateConfig, tmp_path / "nope.yaml")
    with pytest.raises(CaiError, match="is a folder, not a YAML file"):
        load_config(GenerateConfig, tmp_path)


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing set yet\n"])
def test_empty_file_gives_defaults(tmp_path, text):
    assert load_config(GenerateConfig, write(tmp_path, text)) == GenerateConfig()
    assert load_config(GenerateConfig) == GenerateConfig()


# ---- overrides ---------------------------------------------------------------------------------------


def test_override_values_are_parsed_as_yaml():
    config = load_config(GenerateConfig, None, [
        "model.batch_size=8",
        "sampling.temperature=0.25",
        "model.reuse_prefix=false",
        "model.trust_remote_code=true",
        'sampling.stop=["\\n\\n", END]',
        "model.name=org/model-1.5",
        "model.device = cuda:1",  # spaces around '=' are fine
    ])
    assert config.model.batch_size == 8 and isinstance(config.model.batch_size, int)
    assert config.sampling.temperature == 0.25
    assert config.model.reuse_prefix is False and config.model.trust_remote_code is True
    assert config.sampling.stop == ["\n\n", "END"]
    assert (config.model.name, config.model.device) == ("org/model-1.5", "cuda:1")


def test_apply_overrides_types_and_edge_values():
    data = apply_overrides({}, ["a.int=3", "a.float=1.5", "a.bool=yes", "a.list=[1, two]", "a.text=hello world",
                                "a.empty=", "a.eq=x=y", "a.bad_yaml=[unclosed"])
    assert data == {"a": {"int": 3, "float": 1.5, "bool": True, "list": [1, "two"], "text": "hello world",
                          "empty": "", "eq": "x=y", "bad_yaml": "[unclosed"}}


def test_overrides_apply_on_top_of_the_file_in_order(tmp_path):
    path = write(tmp_path, "model:\n  name: from-file\n  batch_size: 2\n")
    config = load_config(GenerateConfig, path, ["model.batch_size=4", "model.batch_size=6"])
    assert (config.model.name, config.model.batch_size) == ("from-file", 6)


@pytest.mark.parametrize("override", ["sampling.temperature", "=0.7", " =1"])
def test_override_without_key_or_equals(override):
    with pytest.raises(CaiError, match=f"override '{override}' is not of the form key=value"):
        load_config(GenerateConfig, None, [override])


def test_override_into_a_scalar(tmp_path):
    path = write(tmp_path, "model:\n  name: x\n")
    with pytest.raises(CaiError, match=r"override 'model\.name\.first=y': 'model\.name' is a value, not a section"):
        load_config(GenerateConfig, path, ["model.name.first=y"])
    with pytest.raises(CaiError, match="'sampling' is a value, not a section"):
        apply_overrides({"sampling": 3}, ["sampling.seed=1"])


def test_override_creates_nested_sections():
    assert apply_overrides({"a": {"keep": 1}}, ["a.b.c.d=1"]) == {"a": {"keep": 1, "b": {"c": {"d": 1}}}}
    assert load_config(GenerateConfig, None, ["sampling.seed=7"]).sampling.seed == 7


def test_override_errors_name_the_override_not_the_file(tmp_path):
    path = write(tmp_path, "sampling:\n  temperature: 0.5\n")
    with pytest.raises(CaiError, match=r"^override 'sampling\.temprature=1': unknown key 'sampling\.temprature'"):
        load_config(GenerateConfig, path, ["sampling.temprature=1"])
    with pytest.raises(CaiError, match=r"^override 'model\.batch_size=0': 'model\.batch_size' input should be"):
        load_config(GenerateConfig, path, ["model.batch_size=0"])
    with pytest.raises(CaiError, match=r"^override 'model=\{batch_size: 0\}': 'model\.batch_size'"):
        load_config(GenerateConfig, None, ["model={batch_size: 0}"])
    # a mistake that is in the file is still blamed on the file
    with pytest.raises(CaiError, match=r"gen\.yaml: unknown key 'sampling\.tmp'"):
        load_config(GenerateConfig, write(tmp_path, "sampling:\n  tmp: 1\n"), ["model.batch_size=2"])


# ---- writing configs out -----------------------------------------------------------------------------


def test_config_to_yaml_round_trips_through_load_config(tmp_path):
    config = load_config(GenerateConfig, None, [
        "model.name=org/ünïcode", "model.backend=fake", "model.dtype=bfloat16", "sampling.temperature=0.9",
        'sampling.stop=["\\n\\nHuman:", "yes", "1"]', "sampling.seed=42",
    ])
    text = config_to_yaml(config)
    assert text.startswith("model:\n  name: org/ünïcode\n")  # field order kept, unicode unescaped
    assert load_config(GenerateConfig, write(tmp_path, text, "resolved.yaml")) == config
    assert yaml.safe_load(text)["sampling"]["stop"] == ["\n\nHuman:", "yes", "1"]  # strings stay strings


def test_config_hash_is_stable_and_tracks_values():
    base = GenerateConfig()
    assert config_hash(base) == config_hash(GenerateConfig()) == config_hash(load_config(GenerateConfig))
    assert len(config_hash(base)) == 16 and int(config_hash(base), 16) >= 0
    changed = load_config(GenerateConfig, None, ["sampling.temperature=0.1"])
    assert config_hash(changed) != config_hash(base)
    assert config_hash(load_config(GenerateConfig, None, ["model.batch_size=16"])) == config_hash(base)  # the default


def test_sampling_config_params_maps_every_field():
    config = SamplingConfig(max_new_tokens=9, temperature=0.5, top_p=0.9, top_k=40, seed=3, stop=["\n", "END"])
    params = config.params()
    assert params == SamplingParams(max_new_tokens=9, temperature=0.5, top_p=0.9, top_k=40, seed=3, stop=("\n", "END"))
    assert isinstance(params.stop, tuple) and not params.greedy
    assert SamplingConfig().params() == SamplingParams()
    assert SamplingConfig().params().greedy


def test_configs_built_in_code_are_checked_too():
    with pytest.raises(ValidationError, match="nme"):
        ModelConfig(nme="x")
    config = ModelConfig()
    with pytest.raises(ValidationError, match="batch_size"):
        config.batch_size = 0  # assignments are validated as well


def test_every_config_field_is_described():
    """`cai config show` is the --help of config keys: a key without a description is a bug."""
    from cai.config import GenerateConfig, RunConfig
    from cai.config_loader import describe_fields

    missing = [d.key for cls in (RunConfig, GenerateConfig) for d in describe_fields(cls) if not d.description.strip()]
    assert missing == []


def test_shared_sections_keep_each_stage_own_default_and_the_shared_checks():
    """SFT and PM share one definition of their training fields (PPO, RLOO and GRPO one of their rollout
    prompts): the keys stay under each stage, a stage keeps its own default, and the checks hold for both."""
    from cai.config import PMConfig, PPOConfig, RLOOConfig, RolloutPromptsConfig, RunConfig, SupervisedTrainingConfig

    config = RunConfig()
    assert (config.sft.learning_rate, config.pm.learning_rate) == (2e-5, 3e-5)
    assert PMConfig.model_fields["learning_rate"].description == SupervisedTrainingConfig.model_fields["learning_rate"].description
    for key in ("sft.learning_rate=0", "pm.learning_rate=0", "pm.warmup_ratio=1"):
        with pytest.raises(CaiError, match=f"override '{key}'"):
            load_config(RunConfig, None, [key])
    assert set(RolloutPromptsConfig.model_fields) <= set(PPOConfig.model_fields) & set(RLOOConfig.model_fields)
    assert load_config(RunConfig, None, ["rl.rloo.helpfulness_ratio=0.5"]).rl.rloo.helpfulness_ratio == 0.5


def test_config_show_lists_a_section_with_types_and_defaults(cai_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    code, text, _ = cai_cli("config", "show", "rl.ppo")
    assert code == 0
    assert "rl.ppo.kl_estimator" in text and "'k1' | 'k2' | 'k3' | 'abs'" in text and "rl.dpo.beta" not in text
    assert "GAE lambda" in text  # the description of rl.ppo.lam
    code, _, err = cai_cli("config", "show", "rl.nope")
    assert code == 1 and "'rl.nope' is not a config section" in err


def test_an_http_model_without_urls_is_named_by_its_key():
    from cai.config import RunConfig

    with pytest.raises(CaiError, match=r"override 'eval.judge.backend=http': eval.judge.backend is http but eval.judge.base_urls is empty"):
        load_config(RunConfig, None, ["eval.judge.backend=http"])
