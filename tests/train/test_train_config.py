"""Configuration: merge order, validation and one-line errors."""

from __future__ import annotations

import pytest

from valleys.train import config as C


def _yaml(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_then_yaml_then_overrides(tmp_path):
    a = _yaml(tmp_path, "optim: {name: adam, lr: 0.01}\nrun: {max_steps: 5, seed: 3}\n", "a.yaml")
    b = _yaml(tmp_path, "optim: {lr: 0.02}\nrun: {seed: 4}\n", "b.yaml")
    cfg = C.load([a, b], ["run.seed=7", "model.widths=[8,8]"])
    assert cfg.optim.name == "adam"  # from a.yaml
    assert cfg.optim.hparams == {"lr": 0.02}  # b.yaml over a.yaml
    assert cfg.run.seed == 7  # the override over both
    assert cfg.run.max_steps == 5
    assert cfg.model.kwargs == {"widths": [8, 8]}
    assert cfg.data.batch_size == C.DataConfig().batch_size  # a default


def test_interpolation_and_yaml_round_trip(tmp_path):
    path = _yaml(tmp_path, "run: {max_steps: 9, eval_every_steps: '${run.max_steps}'}\n")
    cfg = C.load([path])
    assert cfg.run.eval_every_steps == 9
    again = C.load([_yaml(tmp_path, C.to_yaml(cfg), "saved.yaml")])
    assert again == cfg


def test_resolve_fills_in_defaults_from_the_signatures():
    cfg = C.load(
        [],
        [
            "optim.name=entropy_sgd",
            "optim.langevin_steps=5",
            "run.max_epochs=2",
            "schedule.name=knee",
            "schedule.explore_steps=50%",
        ],
    )
    r = C.resolve(cfg, num_train=1437)
    assert r.optim.hparams["langevin_steps"] == 5
    assert r.optim.hparams["scope"] == 1e-4  # EntropySGD's default
    assert r.model.kwargs == {"widths": [128], "activation": "relu"}
    spe = 1437 // 128
    assert r.schedule.kwargs == {"total_steps": 2 * spe, "explore_steps": spe, "warmup_steps": 0}
    epochs = C.resolve(
        C.load(
            [],
            [
                "run.max_steps=100",
                "optim.lr=1",
                "schedule.name=piecewise",
                "schedule.boundaries=[2]",
                "schedule.values=[1,0.1]",
                "schedule.steps_per_unit=epoch",
            ],
        ),
        num_train=1437,
    )
    assert epochs.schedule.kwargs["steps_per_unit"] == spe


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["run.max_steps=3", "run.max_step=5"],
            r"Unknown key of run: 'max_step' \(did you mean 'max_steps'\?",
        ),
        (
            ["run.max_steps=3", "optim.lrr=1"],
            r"Unknown hyperparameter of optimizer 'sgd': 'lrr' \(did you mean 'lr'",
        ),
        (
            ["run.max_steps=3", "optim.name=entropy-sgd"],
            r"Unknown optimizer: 'entropy-sgd' \(did you mean 'entropy_sgd",
        ),
        (
            ["run.max_steps=3", "model.name=lenett"],
            r"Unknown model: 'lenett' \(did you mean 'lenet'",
        ),
        (
            ["run.max_steps=3", "model.width=[3]"],
            r"Unknown kwarg of model 'mlp': 'width' \(did you mean 'widths'",
        ),
        (
            ["run.max_steps=3", "data.name=digit"],
            r"Unknown dataset: 'digit' \(did you mean 'digits'",
        ),
        (["run.max_steps=3", "data.flaten=true"], r"Unknown option of dataset 'digits': 'flaten'"),
        (
            ["run.max_steps=3", "schedule.name=cosin"],
            r"Unknown schedule: 'cosin' \(did you mean 'cosine'",
        ),
        (
            ["run.max_steps=3", "schedule.name=knee", "schedule.explor_steps=3"],
            r"did you mean 'explore_steps'",
        ),
        (
            ["run.max_steps=3", "runn.seed=1"],
            r"Unknown config section \(in the overrides\): 'runn'",
        ),
        (["run.max_steps=abc"], r"Invalid run\.max_steps: 'abc' \(expected an integer\)"),
        (["run.max_steps=1.5"], r"Invalid run\.max_steps: 1\.5 \(expected an integer\)"),
        (["run.max_steps=3", "optim.lr=fast"], r"Invalid optim\.lr: 'fast' \(expected a number\)"),
        (
            ["run.max_steps=3", "optim.nesterov=1"],
            r"Invalid optim\.nesterov: 1 \(expected true or false\)",
        ),
        (["run.max_steps=3", "run.amp=fp8"], r"Invalid run\.amp: 'fp8'"),
        (["run.max_steps"], r"Malformed override: 'run\.max_steps' \(expected key=value"),
        (
            ["run.max_steps=3", "seed=1"],
            r"Malformed override: 'seed=1' \(a key names a section and a field",
        ),
        (["run.max_steps=[1,"], r"Malformed override: 'run.max_steps=\[1,' \(.*close its brackets"),
        ([], r"No budget: set run\.max_steps, run\.max_epochs or run\.max_seconds"),
        (["run.max_steps=3", "schedule.progress=time"], r"needs a time budget"),
        (["run.max_steps=3", "data.batch_size=2000"], r"larger than the 1437 training samples"),
        (
            ["run.max_steps=3", "schedule.name=knee", "schedule.peak_lr=0.5"],
            r"Invalid schedule\.peak_lr: 0\.5 \(differs from optim\.lr",
        ),
    ],
)
def test_bad_input_is_a_one_line_value_error(overrides, message):
    with pytest.raises(ValueError, match=message) as err:
        C.resolve(C.load([], overrides), num_train=1437)
    assert "\n" not in str(err.value)


def test_malformed_yaml_files(tmp_path):
    bad = _yaml(tmp_path, "optim:\n  lr: [1,\nrun: {}\n")
    with pytest.raises(ValueError, match=r"Malformed YAML in .*cfg\.yaml at line \d+") as err:
        C.load([bad])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="expected a mapping of sections"):
        C.load([_yaml(tmp_path, "- 1\n- 2\n", "list.yaml")])
    with pytest.raises(ValueError, match=r"Invalid optim: 3"):
        C.load([_yaml(tmp_path, "optim: 3\n", "scalar.yaml")])
    with pytest.raises(FileNotFoundError, match="Config file not found"):
        C.load([tmp_path / "missing.yaml"])
    with pytest.raises(ValueError, match=r"Interpolation key 'run\.nope' not found"):
        C.load([_yaml(tmp_path, "run: {seed: '${run.nope}'}\n", "interp.yaml")])


def test_comparison_files(tmp_path):
    path = _yaml(
        tmp_path,
        "base:\n  run: {max_steps: 4}\nvariants:\n  a: {optim: {name: sgd}}\n"
        "  b: {optim: {name: adam, lr: 0.1}}\n",
    )
    variants = C.load_variants(path, ["run.seed=2"])
    assert list(variants) == ["a", "b"]
    assert variants["b"].optim.hparams == {"lr": 0.1}
    assert all(v.run.max_steps == 4 and v.run.seed == 2 for v in variants.values())
    assert list(C.load_variants(path, only=["b"])) == ["b"]
    with pytest.raises(ValueError, match=r"Unknown variant .*'c'"):
        C.load_variants(path, only=["c"])
    with pytest.raises(ValueError, match="is a comparison file"):
        C.load([path])
