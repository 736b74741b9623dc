"""``pyalign train --print-config`` prints a config file: saved and passed back with --config it
resolves to the same settings, for every algorithm."""
import pytest

from pyalign.cli.train import main
from pyalign.trainers.presets import ALGOS
from pyalign.trainers.resolve import resolve_config_values
from pyalign.trainers.settings import load_config_file


def printed_config(capsys, *argv):
    assert main([*map(str, argv), "--print-config"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_printed_config_reads_back_to_the_same_settings(algo, tmp_path, capsys):
    first = printed_config(capsys, "--algo", algo, "--lora", "r=8,alpha=16", "--seed", 3)
    assert "lora = \"r=8,alpha=16.0," in first and "seed = 3" in first
    saved = tmp_path / "printed.toml"
    saved.write_text(first)
    assert printed_config(capsys, "--config", saved) == first
    _, run, _ = resolve_config_values({"algo": algo, "lora": "r=8,alpha=16", "seed": 3}, "x")
    _, run_back, _ = resolve_config_values(load_config_file(str(saved)), str(saved))
    assert run_back == run


@pytest.mark.parametrize("reward", ["gold", "proxy"])
def test_embedded_reward_from_a_config_file_reaches_the_rl_trainer(reward, tmp_path, capsys):
    # "reward" names the embedded task's reward (the RL trainer's key) or, with --data, the
    # user's reward; a config file's reward = "gold" used to be taken for the second and lost
    config = tmp_path / "rloo.toml"
    config.write_text(f'algo = "rloo"\nreward = "{reward}"\n')
    _, run, trainer_config = resolve_config_values({"algo": "rloo", "reward": reward}, str(config))
    assert trainer_config.reward == reward and run["reward"] is None
    printed = printed_config(capsys, "--config", config)
    assert f'reward = "{reward}"' in printed
