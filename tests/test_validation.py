"""The constructor-validation helpers: the message format, and the simple-typed argument check."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import numpy as np
import pytest

from lightning_fed import FedLoop
from lightning_fed.validation import (
    ArgumentTypeError,
    CheckedArguments,
    Kinds,
    annotation_kinds,
    check_arguments,
    fits,
    instance_kinds,
    need,
    python_scalars,
)


def test_need_passes_or_names_key_value_and_what_is_allowed():
    need("Thing", True, "ratio", 2.0, "in [0, 1)")
    with pytest.raises(ValueError, match=r"^Thing: ratio=2\.0 is not allowed; ratio must be in \[0, 1\)$"):
        need("Thing", False, "ratio", 2.0, "in [0, 1)")
    with pytest.raises(ValueError, match=r"scheme='int3' is not allowed"):
        need("QuantizationAware", False, "scheme", "int3", "one of ('int8',)")


# --- simple-typed constructor arguments (check_arguments / CheckedArguments) ---

PACKAGES = ("lightning_fed", "lightning_fed.strategies", "lightning_fed.codecs", "lightning_fed.callbacks",
            "lightning_fed.data", "lightning_fed.systems", "lightning_fed.models", "lightning_fed.privacy",
            "lightning_fed.moe", "lightning_fed.flower", "lightning_fed.search",
            "lightning_fed.strategies.fedavg_ft")
# Records the library builds itself (messages, results, per-client profiles), not configuration a user writes.
RECORDS = {"Instruction", "Reply", "FitResult", "TrainerView", "EncodeArgs", "DecodeArgs", "DeviceDataset",
           "Profile", "Workload", "SecAggServer", "RoutingStats"}


def _public_classes() -> list[type]:
    seen: dict[type, None] = {}
    for package in PACKAGES:
        module = importlib.import_module(package)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) and obj.__module__.startswith("lightning_fed") and not issubclass(obj, BaseException):
                seen.setdefault(obj)
    return list(seen)


def _simple_parameters(cls: type) -> list[tuple[str, Kinds]]:
    """The simple-typed parameters of the constructor a user calls (``inspect.signature(cls)``)."""
    out = []
    for p in inspect.signature(cls).parameters.values():
        kinds = annotation_kinds(p.annotation)
        if kinds is not None and p.kind is not p.VAR_KEYWORD and p.kind is not p.VAR_POSITIONAL:
            out.append((p.name, kinds))
    return out


def _wrong(kinds: Kinds):
    return next(v for v in ("3", 2.5, True, None, [1]) if not fits(v, kinds))


CLASSES = [c for c in _public_classes() if c.__name__ not in RECORDS and _simple_parameters(c)]
CASES = [(c, name, kinds) for c in CLASSES for name, kinds in _simple_parameters(c)]


def test_every_public_configurable_class_checks_its_arguments():
    assert len(CLASSES) > 100
    unchecked = [c.__name__ for c in CLASSES if not issubclass(c, CheckedArguments)]
    assert unchecked == [], f"derive these from lightning_fed.validation.CheckedArguments: {unchecked}"


@pytest.mark.parametrize(("cls", "name", "kinds"), CASES, ids=[f"{c.__name__}.{n}" for c, n, _ in CASES])
def test_a_wrong_simple_type_is_refused_before_the_constructor_runs(cls, name, kinds):
    value = _wrong(kinds)
    with pytest.raises(TypeError, match="^" + re.escape(f"{cls.__name__}: {name}={value!r} is not allowed; {name} must be ")):
        cls(**{name: value})  # the check runs before __init__: no other argument is needed


def _object_parameters(cls: type) -> list[tuple[str, tuple[type, ...], bool]]:
    """The parameters annotated with the library's classes (``Strategy | None``, ``PublicData``)."""
    namespace = getattr(inspect.unwrap(cls.__init__), "__globals__", {})
    return [(p.name, *found) for p in inspect.signature(cls).parameters.values()
            if annotation_kinds(p.annotation) is None and (found := instance_kinds(p.annotation, namespace))]


OBJECT_CASES = [(c, *rest) for c in _public_classes() if c.__name__ not in RECORDS for rest in _object_parameters(c)]


def test_the_object_check_covers_the_configuration_objects():
    """The settings that are objects of the library's classes: FedLoop's strategy, codec and partition, a
    strategy's aggregator and server optimizer, a defence's clean data, a codec's inner codec."""
    names = {f"{c.__name__}.{n}" for c, n, _, _ in OBJECT_CASES}
    assert {"FedLoop.strategy", "FedLoop.codec", "FedLoop.partition", "FedAvg.aggregator",
            "FedAvg.server_optimizer", "FinePruning.clean", "TopK.values", "Differential.inner"} <= names
    assert len(OBJECT_CASES) >= 60


@pytest.mark.parametrize(("cls", "name", "classes", "none"), OBJECT_CASES,
                         ids=[f"{c.__name__}.{n}" for c, n, _, _ in OBJECT_CASES])
def test_a_wrong_object_is_refused_before_the_constructor_runs(cls, name, classes, none):
    """A name where an object is asked, and the class where an instance is asked (each names what it wants)."""
    with pytest.raises(TypeError, match="^" + re.escape(f"{cls.__name__}: {name}='x' is not allowed; {name} must be ")):
        cls(**{name: "x"})
    wanted = classes[0]
    with pytest.raises(TypeError, match=re.escape(f"(the class itself was given: {wanted.__name__}(...) builds one)")):
        cls(**{name: wanted})
    if none:  # None passes the check (the constructor may still want other arguments)
        try:
            cls(**{name: None})
        except ArgumentTypeError as err:
            assert f" {name}=None " not in str(err)
        except (TypeError, ValueError):
            pass


def test_object_check_messages():
    from lightning_fed import FedAvg
    from lightning_fed.strategies import Krum

    with pytest.raises(ArgumentTypeError, match=re.escape(
            "FedLoop: strategy=<class 'lightning_fed.strategies.fedavg.FedAvg'> is not allowed; strategy must be a "
            "Strategy or None (the class itself was given: FedAvg(...) builds one)")):
        FedLoop(strategy=FedAvg)
    with pytest.raises(ValueError, match=r"^FedAvg: aggregator='krum' is not allowed; aggregator must be an "
                                         r"Aggregator or None$"):
        FedAvg(aggregator="krum")
    assert isinstance(FedAvg(aggregator=Krum()).aggregator, Krum)
    with pytest.raises(ArgumentTypeError, match=re.escape(
            "strategy must be a Strategy or None ('fsdp' is one of Lightning's process strategies; FedLoop's "
            "strategy is the federated server strategy")) as refused:
        FedLoop(strategy="fsdp")
    assert "devices=N" in str(refused.value)
    with pytest.raises(ArgumentTypeError, match=r"strategy must be a Strategy or None$"):
        FedLoop(strategy="fedavg")


def test_instance_kinds_reads_the_librarys_classes_only():
    from lightning_fed.strategies import Strategy

    namespace = {"Strategy": Strategy, "Tensor": np.ndarray}
    assert instance_kinds("Strategy | None", namespace) == ((Strategy,), True)
    assert instance_kinds(Strategy | None, {}) == ((Strategy,), True)
    for other in ("int | None", "Tensor", "list[Strategy]", "Missing | None", "Strategy | Tensor", inspect.Parameter.empty):
        assert instance_kinds(other, namespace) is None


def test_every_default_fits_its_annotation():
    bad = []
    for cls in CLASSES:
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or not klass.__module__.startswith("lightning_fed"):
                continue
            for p in list(inspect.signature(init).parameters.values())[1:]:
                kinds = annotation_kinds(p.annotation)
                if kinds is not None and p.default is not p.empty and not fits(p.default, kinds):
                    bad.append(f"{klass.__name__}.{p.name}={p.default!r}")
    assert bad == []


@check_arguments
class _Thing:
    def __init__(self, rounds: int, lr: float = 0.1, name: str | None = None, *, flag: bool = False, other=None,
                 layers: list[str] | None = None, at: int | list[int] | None = None,
                 size: tuple[float, float] = (0.0, 1.0)):
        self.args = (rounds, lr, name, flag, other)
        self.rest = (layers, at, size)


class _SubThing(_Thing):
    pass


def test_check_arguments_accepts_what_the_annotation_allows():
    assert _Thing(np.int64(3), 1).args == (3, 1, None, False, None)  # numpy ints; an int where a float is asked
    assert _Thing(3, np.float32(0.5), Path("runs"), flag=np.bool_(True), other="anything").args[2] == Path("runs")
    _Thing(1, layers=("fc1", Path("fc2")), at=[1, np.int64(2)], size=[1, 2.5])
    _Thing(1, layers=[], at=3, size=(0.5, 0.5))
    assert list(inspect.signature(_Thing).parameters) == ["rounds", "lr", "name", "flag", "other", "layers", "at",
                                                          "size"]


def test_python_scalars_makes_numpy_scalars_python_numbers():
    assert [(v, type(v)) for v in map(python_scalars, (np.int64(3), np.float32(0.5), np.bool_(True)))] == [
        (3, int), (0.5, float), (True, bool)]
    given = [1, np.int64(2)]
    out = python_scalars(given)
    assert out == [1, 2] and type(out[1]) is int and type(given[1]) is np.int64  # a new list; the caller's as it was
    pair = python_scalars((np.float64(1.5), 2))
    assert pair == (1.5, 2) and type(pair) is tuple and type(pair[0]) is float
    for plain in (3, 0.5, "s", None, [1, 2], (1.0, "a")):
        assert python_scalars(plain) is plain


def test_numpy_scalars_reach_the_constructor_as_python_numbers():
    """A sweep's ``np.int64`` works like an int downstream (torch's ``DataLoader`` refuses ``np.int64`` batch
    sizes; JSON and YAML refuse numpy scalars)."""
    at = [1, np.int64(2)]
    t = _SubThing(np.int64(3), lr=np.float32(0.5), flag=np.bool_(True), at=at, size=(np.float64(1.0), 2))
    assert [type(v) for v in (*t.args[:2], t.args[3], t.rest[1][1], t.rest[2][0])] == [int, float, bool, int, float]
    assert t.args[:4] == (3, 0.5, None, True) and t.rest[1:] == ([1, 2], (1.0, 2)) and type(at[1]) is np.int64
    from lightning_fed.data import SyntheticDataModule

    dm = SyntheticDataModule(num_devices=np.int64(3), batch_size=np.int64(4), seed=np.int64(0))
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))[:2]
    assert type(dm.batch_size) is int and len(x) == len(y) == 4


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((2.5,), {}, "rounds=2.5 is not allowed; rounds must be an int"),
        ((True,), {}, "rounds=True is not allowed; rounds must be an int"),
        ((3, "0.1"), {}, "lr='0.1' is not allowed; lr must be a number"),
        ((3,), {"lr": False}, "lr=False is not allowed; lr must be a number"),
        ((3,), {"name": 7}, "name=7 is not allowed; name must be a string or None"),
        ((3,), {"flag": 1}, "flag=1 is not allowed; flag must be True or False"),
        ((3,), {"layers": "fc1"}, "layers='fc1' is not allowed; layers must be a list of strings or None"),
        ((3,), {"at": [1, 2.5]}, r"at=\[1, 2\.5\] is not allowed; at must be an int or a list of ints or None"),
        ((3,), {"size": (1.0,)}, r"size=\(1\.0,\) is not allowed; size must be a list of 2 numbers"),
    ],
)
def test_check_arguments_names_the_class_the_user_built(args, kwargs, message):
    with pytest.raises(TypeError, match=rf"^_SubThing: {message}$"):
        _SubThing(*args, **kwargs)


@pytest.mark.parametrize("kwargs", [{"rounds": 2.5}, {"num_clients": "10"}, {"seed": 1.0}, {"verbose": "yes"}])
def test_fedloop_refuses_a_wrong_type_as_a_value_error_and_a_type_error(kwargs):
    """Both ``except ValueError`` (every other misconfiguration) and ``except TypeError`` catch it."""
    (name, value), = kwargs.items()
    with pytest.raises(ArgumentTypeError, match=rf"^FedLoop: {name}={value!r} is not allowed") as err:
        FedLoop(**kwargs)
    assert isinstance(err.value, ValueError) and isinstance(err.value, TypeError)


def test_the_architecture_docs_configuration_example_prints_what_it_says(capsys):
    doc = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    section = doc[doc.index("### Configuration errors"):]
    code = section[section.index("```python\n") + len("```python\n"):section.index("```\n\n")]
    exec(compile(code, "docs/architecture.md", "exec"), {})  # noqa: S102 - the documented example itself
    said = [line.removeprefix("# ") for line in code.splitlines() if line.startswith("# FedLoop")]
    assert capsys.readouterr().out.splitlines() == said
