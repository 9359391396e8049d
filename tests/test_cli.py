"""`fltune models`: lists the registry, and a wrong name exits 2 naming the choices."""

from fltuning.cli import main


def test_models_list_names_every_offline_model(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("e5-small", "minilm-l6", "smollm2-135m"))


def test_unknown_model_exits_2_with_the_choices(capsys):
    assert main(["models", "prepare", "e5-smal"]) == 2
    assert "e5-small" in capsys.readouterr().err
