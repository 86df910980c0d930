"""Strategy parameters: one declaration drives validation and the description that the API,
the experiment form and the command line are built on."""

from __future__ import annotations

import inspect
import json

import pytest

from training.fl.strategies import (
    FedAdam,
    FedTrimmedAvg,
    StrategyContext,
    available_strategies,
    build_strategy,
    describe_strategies,
    strategy_class,
    validate_strategy_params,
)

EVERY_STRATEGY = [
    "fedadagrad", "fedadam", "fedavg", "fedavgm", "fedbn", "fedmedian", "fedprox",
    "fedtrimmedavg", "fedyogi", "krum", "multikrum", "scaffold",
]  # fmt: skip
CONTEXT = StrategyContext(num_sites=4, batch_norm_parameters=())


def test_every_strategy_of_the_issue_is_available_and_described_in_name_order() -> None:
    described = describe_strategies()
    assert available_strategies() == EVERY_STRATEGY
    assert [entry["name"] for entry in described] == EVERY_STRATEGY
    for entry in described:
        assert entry["title"] and entry["description"]
        assert "arXiv:" in entry["paper"]


def test_the_description_is_json_and_its_defaults_are_what_validation_fills_in() -> None:
    described = json.loads(json.dumps(describe_strategies()))
    for entry in described:
        defaults = {parameter["name"]: parameter["default"] for parameter in entry["parameters"]}
        assert validate_strategy_params(entry["name"], {}) == defaults
        # And the strategy builds from them.
        build_strategy(entry["name"], context=CONTEXT, **defaults)


def test_the_described_bounds_are_the_ones_validation_enforces() -> None:
    for entry in describe_strategies():
        for parameter in entry["parameters"]:
            name = parameter["name"]
            step = 1 if parameter["type"] == "int" else 1e-9
            if "minimum" in parameter:
                below = parameter["minimum"] - (0 if parameter["exclusive_minimum"] else step)
                with pytest.raises(ValueError, match=f"parameter '{name}' must be"):
                    validate_strategy_params(entry["name"], {name: below})
                if not parameter["exclusive_minimum"]:
                    validate_strategy_params(entry["name"], {name: parameter["minimum"]})
            if "maximum" in parameter:
                above = parameter["maximum"] + (0 if parameter["exclusive_maximum"] else step)
                with pytest.raises(ValueError, match=f"parameter '{name}' must be"):
                    validate_strategy_params(entry["name"], {name: above})
                if not parameter["exclusive_maximum"]:
                    validate_strategy_params(entry["name"], {name: parameter["maximum"]})


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        (
            "fedprox",
            {"proximal_mu": 0.1},
            r"strategy 'fedprox' got unknown parameters \['proximal_mu'\]; "
            r"accepted: \['mu', 'server_learning_rate'\]",
        ),
        ("fedmedian", {"beta": 0.1}, r"unknown parameters \['beta'\]; accepted: \[\]"),
        (
            "fedtrimmedavg",
            {"beta": 0.5},
            r"strategy 'fedtrimmedavg': parameter 'beta' must be less than 0\.5, got 0\.5",
        ),
        ("fedadam", {"beta_2": 1.0}, r"parameter 'beta_2' must be less than 1\.0"),
        ("fedadam", {"tau": 0}, r"parameter 'tau' must be greater than 0\.0, got 0"),
        ("fedavgm", {"server_momentum": -0.1}, r"'server_momentum' must be at least 0\.0"),
        ("krum", {"f": -1}, r"strategy 'krum': parameter 'f' must be at least 0, got -1"),
        ("multikrum", {"m": 2.5}, r"parameter 'm' must be an integer, got 2\.5"),
        ("krum", {"f": True}, r"parameter 'f' must be an integer, got True"),
        ("fedprox", {"mu": "0.1"}, r"parameter 'mu' must be a number, got '0\.1'"),
        ("fedyogi", {"server_learning_rate": float("inf")}, "must be a finite number"),
    ],
)
def test_a_bad_parameter_is_named_in_the_error(
    name: str, params: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        validate_strategy_params(name, params)
    with pytest.raises(ValueError, match=message):
        build_strategy(name, context=CONTEXT, **params)


def test_an_integer_parameter_accepts_a_whole_json_number() -> None:
    assert validate_strategy_params("multikrum", {"f": 2.0, "m": 3}) == {"f": 2, "m": 3}
    assert isinstance(validate_strategy_params("multikrum", {"f": 2.0})["f"], int)


def test_constructors_validate_their_keyword_arguments_too() -> None:
    with pytest.raises(ValueError, match="parameter 'beta_1' must be less than 1"):
        FedAdam(beta_1=1.0)
    with pytest.raises(ValueError, match="parameter 'beta' must be at least 0"):
        FedTrimmedAvg(beta=-0.1)
    with pytest.raises(TypeError):
        FedAdam(0.1)  # type: ignore[misc]  # keyword-only


def test_each_constructors_keyword_defaults_are_the_declared_ones() -> None:
    for name in EVERY_STRATEGY:
        cls = strategy_class(name)
        signature = inspect.signature(cls.__init__).parameters
        for parameter in cls.parameters:
            assert signature[parameter.name].kind is inspect.Parameter.KEYWORD_ONLY
            assert signature[parameter.name].default == parameter.default, (name, parameter.name)
