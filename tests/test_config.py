"""Validation at the edges: merge configs, experiment configs and activation mappings give clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from spd_assets.config import ExperimentConfig, ExperimentConfigError, dump_config, load_config, parse_config
from spd_math import ActivationsError, ConfigError, MergeConfig, process_activations


def test_merge_config_defaults_are_the_originals():
    config = MergeConfig()
    assert config.to_dict() == {
        "activation_threshold": 0.01,
        "alpha": 1.0,
        "iters": 100,
        "merge_pair_sampling_method": "range",
        "merge_pair_sampling_kwargs": {"threshold": 0.05},
        "filter_dead_threshold": 0.001,
        "module_name_filter": None,
    }


def test_merge_config_from_an_original_research_block():
    block = yaml.safe_load(
        """
        activation_threshold: null
        alpha: 0.5
        iters: 250
        merge_pair_sampling_method: mcmc
        merge_pair_sampling_kwargs: {temperature: 2.0}
        filter_dead_threshold: 0.0
        module_name_filter: "layers.1"
        """
    )
    config = MergeConfig(**block)
    assert config.activation_threshold is None and config.merge_pair_sampling_kwargs == {"temperature": 2.0}
    assert MergeConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "values, field",
    [
        ({"alpha": -1}, "alpha"),
        ({"alpha": "high"}, "alpha"),
        ({"iters": 0}, "iters"),
        ({"iters": 2.5}, "iters"),
        ({"activation_threshold": float("nan")}, "activation_threshold"),
        ({"merge_pair_sampling_method": "greedy"}, "merge_pair_sampling_method"),
        ({"merge_pair_sampling_kwargs": {"temperature": 1.0}}, "merge_pair_sampling_kwargs"),
        ({"merge_pair_sampling_kwargs": {"threshold": 2}}, "merge_pair_sampling_kwargs.threshold"),
        ({"merge_pair_sampling_method": "mcmc", "merge_pair_sampling_kwargs": {"temperature": 0}}, "merge_pair_sampling_kwargs.temperature"),
        ({"filter_dead_threshold": -0.1}, "filter_dead_threshold"),
        ({"module_name_filter": 3}, "module_name_filter"),
    ],
)
def test_invalid_merge_config_names_the_field(values, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        MergeConfig(**values)


def test_unknown_merge_config_keys_are_named():
    with pytest.raises(ConfigError, match="unknown key"):
        MergeConfig.from_dict({"alpha": 1.0, "n_batches": 4})


def test_experiment_config_defaults_are_the_embedded_default():
    config = load_config(None)
    assert config.name == "default" and config.source.kind == "synthetic"
    assert config.merge_config.iters is None
    assert parse_config({}).config_hash == config.config_hash


def test_experiment_config_lists_every_problem(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "9lives", "base_seed": -1, "merge_config": {"alpha": -2},
                                    "distance_methods": ["euclid"], "surprise": 1}))
    with pytest.raises(ExperimentConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    for fragment in ("name", "base_seed", "merge_config", "alpha", "distance_methods", "surprise", str(path)):
        assert fragment in message


def test_unreadable_or_non_yaml_config(tmp_path):
    with pytest.raises(ExperimentConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed")
    with pytest.raises(ExperimentConfigError, match="not valid YAML"):
        load_config(broken)


def test_files_directory_is_relative_to_the_config_file(tmp_path):
    (tmp_path / "configs").mkdir()
    path = tmp_path / "configs" / "exp.yaml"
    path.write_text(yaml.safe_dump({"source": {"kind": "files", "directory": "../batches"}}))
    assert load_config(path).source.directory == (tmp_path / "batches").resolve()


def test_member_seeds_depend_only_on_base_seed_and_partition():
    first, second = parse_config({"base_seed": 3}), parse_config({"base_seed": 3, "name": "other"})
    assert first.member_seed("member_001") == second.member_seed("member_001")
    assert first.member_seed("member_001") != first.member_seed("member_002")
    assert first.member_seed("member_001") != parse_config({"base_seed": 4}).member_seed("member_001")


def test_process_activations_filters_and_labels():
    mapping = {"a.q": torch.rand(2, 3, 4), "b.up": torch.rand(2, 3, 2), "a.k": torch.rand(2, 3, 1)}
    assert process_activations(mapping, seq_mode="concat", module_filter="a.").labels == [
        "a.q:0", "a.q:1", "a.q:2", "a.q:3", "a.k:0"]
    assert process_activations(mapping, seq_mode="concat", module_filter={"b.up"}).labels == ["b.up:0", "b.up:1"]
    by_callable = process_activations(mapping, seq_mode="seq_mean", module_filter=lambda name: name.endswith("k"))
    assert by_callable.activations.shape == (2, 1)
    from_numpy = process_activations({"m": np.ones((5, 2), dtype=np.float32)})
    assert from_numpy.activations.shape == (5, 2)


@pytest.mark.parametrize(
    "mapping, kwargs, message",
    [
        ({}, {}, "no modules to cluster"),
        ({"a": torch.rand(4, 2)}, {"module_filter": "b"}, "no modules to cluster"),
        ({"a": torch.rand(4, 2), "b": torch.rand(5, 2)}, {}, "has 5 samples, expected 4"),
        ({"a": torch.rand(2, 3, 4)}, {"seq_mode": None}, r"expected \[samples, C\]"),
        ({"a": torch.rand(4)}, {"seq_mode": "concat"}, "got shape"),
        ({"a": "not a tensor"}, {}, "expected a tensor"),
        ({"a": torch.rand(0, 3)}, {}, "at least one sample"),
        ({"a": torch.rand(4, 2)}, {"seq_mode": "flatten"}, "seq_mode"),
        ({"a": torch.rand(4, 2)}, {"filter_dead_threshold": -1}, "filter_dead_threshold"),
    ],
)
def test_bad_activation_mappings_give_clear_errors(mapping, kwargs, message):
    with pytest.raises(ActivationsError, match=message):
        process_activations(mapping, **kwargs)


def test_dead_components_are_listed_in_order():
    values = torch.tensor([[0.5, 0.0, 0.2, 0.0005], [0.1, 0.0, 0.0, 0.0]])
    processed = process_activations({"m": values}, filter_dead_threshold=0.001)
    assert processed.labels == ["m:0", "m:2"]
    assert processed.dead_labels == ["m:1", "m:3"]


@pytest.mark.parametrize("name", ["tables", "logs", "experiments", "device_leases"])
def test_names_of_results_store_folders_are_not_experiment_names(name):
    with pytest.raises(ExperimentConfigError, match=f"{name!r} names a folder of the results store"):
        parse_config({"name": name})


def test_a_declared_files_layout_must_give_positive_sizes(tmp_path):
    with pytest.raises(ExperimentConfigError, match=r"source\.layout"):
        parse_config({"source": {"kind": "files", "directory": str(tmp_path), "layout": {"mlp": 0}}})
    config = parse_config({"source": {"kind": "files", "directory": str(tmp_path), "layout": {"mlp": 4, "attn": 2}}})
    assert config.source.layout == {"mlp": 4, "attn": 2}


def test_consensus_settings_are_validated():
    assert parse_config({"consensus": {"k": 40, "threshold": 0.75}}).consensus.k == 40
    with pytest.raises(ExperimentConfigError) as error:
        parse_config({"consensus": {"iteration": 10, "k": 40, "threshold": 0}})
    message = str(error.value)
    assert "consensus: set at most one of iteration (10) and k (40)" in message or "consensus.threshold" in message
    assert "consensus.threshold" in message
    with pytest.raises(ExperimentConfigError, match="consensus.iteration"):
        parse_config({"consensus": {"iteration": -1}})
    with pytest.raises(ExperimentConfigError, match="consensus.rule"):
        parse_config({"consensus": {"rule": "mdl"}})


@pytest.mark.parametrize("values, expected", [
    ({"source": {"kind": "synthetic", "n_member": 3}}, "source.n_member: unknown key 'n_member'; did you mean 'n_members'?"),
    ({"consensus": {"treshold": 0.3}}, "consensus.treshold: unknown key 'treshold'; did you mean 'threshold'?"),
    ({"nme": "x"}, "nme: unknown key 'nme'; did you mean 'name'?"),
    ({"merge_config": {"alph": 1}}, "merge_config.alph: unknown key 'alph'; did you mean 'alpha'?"),
])
def test_a_misspelt_key_is_named_as_written_with_the_key_meant(values, expected):
    with pytest.raises(ExperimentConfigError) as raised:
        parse_config(values)
    assert expected in str(raised.value)
    assert ".synthetic." not in str(raised.value)


def test_every_value_at_fault_is_named_at_once_and_null_is_said_as_written():
    with pytest.raises(ExperimentConfigError) as raised:
        parse_config({"merge_config": {"iters": -5, "alpha": "high"}, "source": {"kind": "synthetic", "n_members": None}})
    lines = str(raised.value).splitlines()[1:]
    assert sorted(lines) == sorted([
        "  merge_config.alpha: expected a number, got 'high'",
        "  merge_config.iters: expected a positive integer or None (null in YAML), got -5",
        "  source.n_members: Input should be a valid integer (got null)",
    ])


def test_merge_config_is_parsed_once_and_written_back_with_the_original_keys():
    config = parse_config({"merge_config": {"alpha": 0.5, "merge_pair_sampling_method": "mcmc", "merge_pair_sampling_kwargs": {}}})
    assert isinstance(config.merge_config, MergeConfig) and config.merge_config.alpha == 0.5
    assert config.merge_config.merge_pair_sampling_kwargs == {"temperature": 1.0}
    again = parse_config(yaml.safe_load(dump_config(config)))
    assert again == config and again.config_hash == config.config_hash
    renamed = config.model_copy(update={"name": "renamed"})
    assert renamed.config_hash != config.config_hash, "a copy is hashed anew, never with the original's cached hash"


def test_setting_another_source_kind_leaves_the_default_kinds_settings_behind():
    with pytest.raises(ExperimentConfigError) as raised:
        load_config(None, ["source.kind=histories"])
    assert str(raised.value).splitlines()[1:] == ["  source.directory: Field required"]
    for overrides in (["source.kind=files", "source.directory=/data"], ["source.directory=/data", "source.kind=files"]):
        source = load_config(None, overrides).source
        assert source.kind == "files" and str(source.directory) == "/data" and source.n_members is None
    assert load_config(None, ["source.n_members=4"]).source == ExperimentConfig().source.model_copy(update={"n_members": 4})
