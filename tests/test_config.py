import pytest

from hlip_fed.config import ConfigError, config_hash, load_config, model_presets


def test_presets_load_and_validate():
    assert {"tiny", "vit_base_multiscan_h2_token1176", "vit_base_multiscan_h3_token1176",
            "vit_base_singlescan_h2_token2744"} <= set(model_presets())
    for name in model_presets():
        cfg = load_config(name)
        assert cfg.model.preset == name
        assert len(cfg.model.vision.attention.levels) == cfg.model.vision.depth


def test_overrides_win_over_preset_and_files(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  vision:\n    depth: 6\n    attention:\n      levels: [slice, scan, study, slice, scan, study]\ntrain:\n  lr: 0.5\n")
    cfg = load_config("tiny", files=[f], overrides=["train.lr=0.25"])
    assert cfg.model.vision.depth == 6
    assert cfg.train.lr == 0.25
    assert cfg.model.vision.width == 96  # from the tiny preset


def test_preset_chosen_by_override():
    cfg = load_config(overrides=["model.preset=vit_base_multiscan_h3_token1176"])
    assert cfg.model.vision.attention.levels[:3] == ["slice", "scan", "study"]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.vision.nope=1", "model.vision.nope"),
        ("train.lr=fast", "train.lr"),
        ("model.vision.attention.levels=[scan,window,study]", "window"),
        ("model.vision.depth=4", "levels"),
        ("model.preset=vit_huge", "vit_huge"),
        ("data.fit=stretch", "data.fit"),
        ("federation.poll_interval_s=0", "poll_interval_s"),
        ("model.vision.pool=mean", "model.vision.pool.*token, max, avg|model.vision.pool.*'token', 'max', 'avg'"),
        ("federation.dp=server", "federation.dp"),
        ("train.precision=fp8", "train.precision"),
        ("data.memory_cache_mb=-1", "data.memory_cache_mb"),
        ("model.loss.target_temperature=-0.1", "target_temperature"),
    ],
)
def test_bad_keys_are_clear_errors(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        load_config(overrides=[override])


def test_report_similarity_targets_are_for_clip_only():
    assert load_config(overrides=["model.loss.target_temperature=0.05"]).model.loss.target_temperature == 0.05
    with pytest.raises(ConfigError, match="clip only"):
        load_config(overrides=["model.loss.name=siglip", "model.loss.target_temperature=0.05"])


def test_a_vision_tower_held_in_bf16_is_for_the_contrastive_losses():
    assert load_config(overrides=["train.precision=bf16-held"]).train.autocast_precision == "fp32"
    with pytest.raises(ConfigError, match="bf16-held"):
        load_config(overrides=["model.loss.name=masked", "train.precision=bf16-held"])


def test_missing_file_is_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(files=[tmp_path / "absent.yaml"])


def test_config_hash_changes_with_content():
    a = load_config("tiny")
    b = load_config("tiny", overrides=["data.mean=0.5"])
    assert config_hash(a) != config_hash(b)
    assert config_hash(a) == config_hash(load_config("tiny"))


def test_a_choice_that_yaml_reads_as_a_bool_is_kept_as_written(tmp_path):
    # YAML 1.1 reads off/on/no/yes as booleans; federation.dp's "off" must still mean "off".
    assert load_config("tiny", overrides=["federation.dp=off"]).federation.dp == "off"
    (tmp_path / "run.yaml").write_text("federation:\n  dp: off\n")
    assert load_config("tiny", files=[tmp_path / "run.yaml"]).federation.dp == "off"
    with pytest.raises(ConfigError, match="federation.dp"):
        load_config("tiny", overrides=["federation.dp=on"])  # no choice is spelt as a true
