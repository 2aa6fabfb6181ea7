"""Stage settings: the layering of named arguments over a settings dict."""

from aphq_cli.settings import with_arguments


def test_an_argument_left_at_none_keeps_the_dict_value():
    assert with_arguments({"iters": 4, "images": 2}, iters=None, images=None, loss=None) == {"iters": 4, "images": 2}


def test_a_given_argument_wins_and_the_dict_is_not_changed():
    settings = {"iters": 4, "seed": 1}
    assert with_arguments(settings, iters=9, loss="mse") == {"iters": 9, "seed": 1, "loss": "mse"}
    assert settings == {"iters": 4, "seed": 1}
    assert with_arguments(None, iters=None) == {}
