"""SamplingParams and SpecConfig from each source: Python keywords, the API's JSON fields, CLI flags."""
import argparse

import pytest

from mtpx.engine.flags import (add_sampling_arguments, add_spec_arguments, sampling_options, spec_from_args)
from mtpx.engine.params import (FieldError, SamplingParams, SpecConfig, sampling_from_json, sampling_params,
                                spec_config, spec_from_json, split_options)
from mtpx.errors import RequestError


def test_sampling_params_still_importable_from_sampling():
    from mtpx.sampling import SamplingParams as Old
    assert Old is SamplingParams


def test_keywords_none_means_the_models_default_then_greedy():
    defaults = {"temperature": 0.7, "top_k": 20}
    p = sampling_params({"temperature": None, "top_k": 0, "min_p": 0.1}, defaults)
    assert (p.temperature, p.top_k, p.min_p, p.top_p) == (0.7, 0, 0.1, 1.0)  # an explicit 0 wins
    assert sampling_params({}).greedy
    with pytest.raises(TypeError, match="temprature"):
        sampling_params({"temprature": 1.0})


def test_bad_values_name_their_field():
    with pytest.raises(FieldError) as e:
        sampling_params({"top_p": 0})
    assert e.value.field == "top_p" and isinstance(e.value, RequestError)
    with pytest.raises(FieldError) as e:
        SamplingParams(presence_penalty=3)
    assert e.value.field == "presence_penalty"


def test_split_options_rejects_unknown_keywords():
    sampling, spec = split_options({"temperature": 0.5, "spec_type": "mtp"})
    assert sampling == {"temperature": 0.5} and spec == {"spec_type": "mtp"}
    with pytest.raises(TypeError, match="bogus"):
        split_options({"bogus": 1})


def test_sampling_from_json():
    p = sampling_from_json({"temperature": 0.5, "top_k": -1, "seed": 3.0, "dry_multiplier": 0.8}, {"top_p": 0.9})
    assert (p.temperature, p.top_k, p.top_p, p.seed, p.dry_multiplier) == (0.5, 0, 0.9, 3, 0.8)
    assert sampling_from_json({}).temperature == 1.0  # OpenAI's default where the model sets none
    for body, field, code in [({"temperature": "hot"}, "temperature", "invalid_type"),
                              ({"temperature": 101}, "temperature", "invalid_value"),
                              ({"top_k": True}, "top_k", "invalid_type"),
                              ({"top_p": 1.5}, "top_p", "invalid_value"),
                              ({"seed": 2 ** 70}, "seed", "invalid_value"),
                              ({"dry_sequence_breakers": [""]}, "dry_sequence_breakers", "invalid_value")]:
        with pytest.raises(FieldError) as e:
            sampling_from_json(body)
        assert (e.value.field, e.value.code) == (field, code), body


def test_spec_config_from_keywords_and_json():
    spec = spec_config({"spec_type": "draft-mtp", "spec_draft_n_max": 5, "spec_draft_model": None})
    assert spec.kind == "mtp" and spec.spec_draft_n_max == 5 and spec.spec_draft_model is None
    assert hash(spec) == hash(SpecConfig("draft-mtp", 5))
    assert not SpecConfig().speculative
    with pytest.raises(FieldError, match="unknown spec_type"):
        spec_config({"spec_type": "medusa"})
    with pytest.raises(FieldError, match="spec_draft_policy must be 'adaptive' or 'fixed'"):
        SpecConfig("mtp", spec_draft_policy="greedy")
    with pytest.raises(TypeError):
        spec_config({"draft_n_max": 3})
    assert spec_from_json(spec.to_json()) == SpecConfig("mtp", 5)
    assert spec_from_json({"spec_synth_rates": [0.5, 1]}).spec_synth_rates == (0.5, 1.0)
    with pytest.raises(FieldError) as e:
        spec_from_json({"spec_draft_n_max": "3"})
    assert (e.value.field, e.value.code) == ("spec_draft_n_max", "invalid_type")


def test_chains_and_suffix_settings():
    spec = spec_config({"spec_type": " draft-mtp , ngram-mod ", "spec_suffix_cache": 4096})
    assert spec.drafters == ("mtp", "ngram") and spec.kind == "mtp,ngram" and spec.speculative
    assert spec_from_json(spec.to_json()) == SpecConfig("mtp,ngram", spec_suffix_cache=4096)
    assert SpecConfig("suffix").drafters == ("suffix",) and SpecConfig().drafters == ("none",)
    with pytest.raises(FieldError) as e:
        SpecConfig("suffix", spec_suffix_cache=-1)
    assert e.value.field == "spec_suffix_cache"
    with pytest.raises(FieldError) as e:
        spec_from_json({"spec_type": ["mtp", "ngram"]})
    assert (e.value.field, e.value.code) == ("spec_type", "invalid_type")
    args = parse(["--spec-type", "mtp,suffix", "--spec-suffix-cache", "100"])
    assert spec_from_args(args) == SpecConfig("mtp,suffix", spec_suffix_cache=100)
    with pytest.raises(FieldError, match="^--spec-suffix-cache: "):
        spec_from_args(parse(["--spec-suffix-cache", "-5"]))


def parse(argv, **kw):
    p = argparse.ArgumentParser()
    add_sampling_arguments(p, **kw)
    add_spec_arguments(p)
    return p.parse_args(argv)


def test_cli_flags_with_llama_cpp_spellings():
    args = parse(["--temp", "0.3", "--repeat-penalty", "1.1", "--dry-sequence-breaker", "\\n",
                  "--spec-type", "ngram-simple", "--spec-draft-n-max", "6", "--spec-draft-policy", "fixed"])
    opts = sampling_options(args)
    assert opts["temperature"] == 0.3 and opts["repetition_penalty"] == 1.1
    assert opts["dry_sequence_breakers"] == ["\n"] and opts["top_k"] is None  # None: the model's default
    spec = spec_from_args(args)
    assert (spec.kind, spec.spec_draft_n_max, spec.spec_draft_policy) == ("ngram", 6, "fixed")
    assert spec_from_args(parse([])) == SpecConfig()
    args = parse([], exclude=("temperature",))
    args.temperature = [0.0, 0.7]  # a command's own flag of that name
    assert "temperature" not in sampling_options(args, exclude=("temperature",))


def test_cli_spec_subset_and_defaults():
    p = argparse.ArgumentParser()
    add_spec_arguments(p, only=("spec_draft_n_max",), spec_draft_n_max=6)
    args = p.parse_args([])
    assert args.spec_draft_n_max == 6 and not hasattr(args, "spec_type")
    assert spec_from_args(args) == SpecConfig(spec_draft_n_max=6)
